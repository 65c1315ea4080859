"""The model registry: groups and versions with metrics, one version with its lineage and Approve / Reject (with a
comment), two versions side by side, and the endpoint update an approval change causes."""

from __future__ import annotations

import logging
from typing import Any

from botocore.exceptions import ClientError

from pipelines.local.ui import actions
from pipelines.local.ui.html import (
    Markup,
    badge,
    e,
    hidden,
    join,
    json_block,
    kv,
    link,
    note,
    number,
    page,
    section,
    table,
    url,
    when,
)
from pipelines.local.ui.reader import Reader, arn_name, decode_hyperparameter, execution_id
from pipelines.local.ui.web import (
    App,
    Request,
    Response,
    bad_request,
    html_response,
    json_response,
    redirect,
    route,
)

logger = logging.getLogger(__name__)

PAGE_SIZE = 25
HEADLINE_METRICS = ("accuracy", "top_5_accuracy", "macro_f1", "weighted_f1")


def metrics_of(report: dict[str, Any] | None) -> dict[str, Any]:
    return (report or {}).get("multiclass_classification_metrics") or (report or {}).get(
        "binary_classification_metrics") or {}


def metric(report: dict[str, Any] | None, name: str) -> float | None:
    value = metrics_of(report).get(name)
    return value.get("value") if isinstance(value, dict) else None


def serving_map(reader: Reader) -> dict[str, list[str]]:
    """``{package ARN: [endpoint (status), ...]}`` of every endpoint."""
    found: dict[str, list[str]] = {}
    for endpoint in reader.endpoints():
        arn = reader.serving_package(endpoint.get("EndpointConfigName"))
        if arn:
            found.setdefault(arn, []).append(f"{endpoint['EndpointName']} ({endpoint['EndpointStatus']})")
    return found


# ----------------------------------------------------------------------------------------------------- list


def _version_rows(reader: Reader, versions: list[dict[str, Any]], serving: dict[str, list[str]]) -> list[list[Any]]:
    rows = []
    for summary in versions:
        arn, status = summary["ModelPackageArn"], summary.get("ModelApprovalStatus")
        described = reader.package(arn, status)
        report = reader.evaluation(described)
        check = Markup(f'<input type="checkbox" name="v" value="{e(arn)}" aria-label="compare">')
        rows.append([check, (link(url("/models/version", arn=arn), f"version {summary['ModelPackageVersion']}"),
                             summary["ModelPackageVersion"]), (badge(status), status),
                     (when(summary.get("CreationTime")), str(summary.get("CreationTime"))),
                     *[(number(metric(report, m)), metric(report, m) or -1) for m in HEADLINE_METRICS[:3]],
                     described.get("ApprovalDescription") or "", ", ".join(serving.get(arn, []))])
    return rows


def _group_section(reader: Reader, group: dict[str, Any], number_: int, serving: dict[str, list[str]]) -> Markup:
    name = group["ModelPackageGroupName"]
    versions = reader.packages(name)
    pages = max(1, -(-len(versions) // PAGE_SIZE))
    shown = versions[(min(number_, pages) - 1) * PAGE_SIZE:min(number_, pages) * PAGE_SIZE]
    headers = ["", "Version", "Approval", "Created", "Accuracy", "Top-5", "Macro F1", "Approval comment", "Serving"]
    body = table(headers, _version_rows(reader, shown, serving), cls="sortable versions",
                 row_attrs=[{"data-version": v["ModelPackageVersion"]} for v in shown])
    pager = join(link(url("/models", page=n), f"page {n}") for n in range(1, pages + 1)) if pages > 1 else ""
    form = (Markup('<form method="get" action="/models/compare">') + body +
            Markup('<div class="actions"><button type="submit" id="compare">Compare the two selected versions'
                   "</button></div></form>") + Markup(f'<p class="pager">{e(pager)}</p>'))
    return section(f"{name} · {len(versions)} version(s)", form)


@route("GET", "/models")
def models(app: App, req: Request) -> Response:
    reader = app.reader
    number_ = req.int_arg("page", 1)
    serving = serving_map(reader)
    groups = reader.groups()
    body = [_group_section(reader, g, number_, serving) for g in groups] or [note("No model package groups yet.")]
    return html_response(page("Model registry", "models", join(body), token=app.token))


# -------------------------------------------------------------------------------------------------- lineage


def lineage(reader: Reader, package: dict[str, Any]) -> dict[str, Any]:
    """Which execution registered the version, the data it was trained on (the manifest's fingerprint), the
    training job and its hyperparameters, the tuning job, the evaluation report."""
    arn = package["ModelPackageArn"]
    found = reader.cached(("lineage", arn), lambda: _lineage(reader, package), keep=lambda v: v is not None)
    return found or {}


def _lineage(reader: Reader, package: dict[str, Any]) -> dict[str, Any] | None:
    registering = reader.registering_execution(package)
    if registering is None:
        return None
    summary, steps = registering
    containers = (package.get("InferenceSpecification") or {}).get("Containers") or [{}]
    model_data = containers[0].get("ModelDataUrl")
    out: dict[str, Any] = {"execution": summary["PipelineExecutionArn"], "pipeline": summary.get("PipelineName"),
                           "started": summary.get("StartTime"), "model_data": model_data}
    for step in steps:
        try:
            job = reader.job_of(step)
        except ClientError:
            continue
        if job is None:
            continue
        kind, described = job
        if kind == "TrainingJob" and (described.get("ModelArtifacts") or {}).get("S3ModelArtifacts") == model_data:
            out["training_job"] = described["TrainingJobName"]
            out["training_step"] = step["StepName"]
            hyperparameters = described.get("HyperParameters") or {}
            out["hyperparameters"] = {k: decode_hyperparameter(v) for k, v in hyperparameters.items()
                                      if not k.startswith("sagemaker_")}
        elif kind == "TuningJob":
            out["tuning_job"] = described.get("HyperParameterTuningJobName")
        elif kind == "ProcessingJob":
            out.update(_manifest(reader, described))
    return out


def _manifest(reader: Reader, job: dict[str, Any]) -> dict[str, Any]:
    for output in (job.get("ProcessingOutputConfig") or {}).get("Outputs") or []:
        if output.get("OutputName") == "manifest":
            uri = f"{str(output['S3Output']['S3Uri']).rstrip('/')}/manifest.json"
            try:
                manifest = reader.s3_json(uri)
            except (ClientError, ValueError):
                return {"manifest": uri}
            return {"manifest": uri, "data_fingerprint": manifest.get("input_fingerprint"),
                    "classes": manifest.get("classes"), "counts": manifest.get("counts")}
    return {}


def _lineage_block(found: dict[str, Any]) -> Markup:
    if not found:
        return note("no execution of a pipeline here registered this version (created with CreateModelPackage "
                    "directly?)")
    execution = found["execution"]
    counts = found.get("counts") or {}
    pairs = [("Registered by execution", link(url("/execution", arn=execution), execution_id(execution))),
             ("Pipeline", found.get("pipeline")), ("Started", when(found.get("started"))),
             ("Data fingerprint", found.get("data_fingerprint") or "—"),
             ("Classes", ", ".join(found.get("classes") or [])),
             ("Images per split", "; ".join(f"{k} {sum(v.values())}" for k, v in counts.items()
                                            if isinstance(v, dict))),
             ("Training job", link(url("/training", arn=execution, step=found["training_step"]), found["training_job"])
              if found.get("training_job") else "—"),
             ("Tuning job", link(url("/tuning", arn=execution), found["tuning_job"]) if found.get("tuning_job")
              else "—"),
             ("Model data", found.get("model_data"))]
    hps = table(["Hyperparameter", "Value"], sorted((found.get("hyperparameters") or {}).items()))
    return Markup('<div class="grid">') + kv(pairs) + hps + Markup("</div>")


# ---------------------------------------------------------------------------------------------- one version


def _approval_form(arn: str, status: str, token: str) -> Markup:
    approve = "" if status != "Approved" else " disabled"
    reject = "" if status != "Rejected" else " disabled"
    return Markup(f'<form method="post" action="/actions/approval" id="approval">{hidden("arn", arn)}'
                  f'{hidden("token", token)}<label for="comment">Comment (ApprovalDescription)</label><br>'
                  '<textarea id="comment" name="comment" rows="2" maxlength="1024"></textarea>'
                  '<div class="actions"><button type="submit" name="status" value="Approved" class="primary" '
                  f'id="approve"{approve}>Approve</button><button type="submit" name="status" value="Rejected" '
                  f'class="danger" id="reject"{reject}>Reject</button></div></form>')


def _deploy_panel(req: Request) -> Markup:
    since, endpoint = req.arg("since"), req.arg("endpoint")
    if not since or not endpoint:
        return Markup("")
    poll = url("/api/deploy-status", since=since, endpoint=endpoint)
    return section("Endpoint update", Markup(f'<div id="deploy" data-deploy-poll="{e(poll)}" data-state="pending">'
                                             '<pre class="text">waiting for the deploy…</pre></div>'))


@route("GET", "/models/version")
def version(app: App, req: Request) -> Response:
    reader = app.reader
    arn = str(req.arg("arn", required=True))
    described = reader.package(arn)
    report = reader.evaluation(described)
    status = str(described.get("ModelApprovalStatus"))
    serving = serving_map(reader).get(arn, [])
    containers = (described.get("InferenceSpecification") or {}).get("Containers") or [{}]
    info = kv([("ARN", arn), ("Group", described.get("ModelPackageGroupName")),
               ("Version", described.get("ModelPackageVersion")), ("Approval", badge(status)),
               ("Approval comment", described.get("ApprovalDescription") or ""),
               ("Description", described.get("ModelPackageDescription") or ""),
               ("Created", when(described.get("CreationTime"))),
               ("Last modified", when(described.get("LastModifiedTime"))),
               ("Image", containers[0].get("Image")), ("Model data", containers[0].get("ModelDataUrl")),
               ("Serving on", ", ".join(serving) or "no endpoint")])
    metrics = table(["Metric", "Value"], [[m, number(metric(report, m))] for m in HEADLINE_METRICS]) if report \
        else note("no readable evaluation report (ModelMetrics)")
    body = [_deploy_panel(req), section("Version", Markup('<div class="grid">') + info + metrics + Markup("</div>")),
            section("Approve or reject", _approval_form(arn, status, app.token) + note(
                "UpdateModelPackage, as on AWS: the state-change event goes through the EventBridge rule to the "
                "deploy function, which deploys the newest Approved version (a rejected live version rolls back).")),
            section("Lineage", _lineage_block(lineage(reader, described))),
            section("DescribeModelPackage", json_block({k: v for k, v in described.items()
                                                        if k != "ResponseMetadata"}))]
    title = f"{described.get('ModelPackageGroupName')} version {described.get('ModelPackageVersion')}"
    return html_response(page(title, "models", join(body), token=app.token, flash=req.arg("flash")))


@route("POST", "/actions/approval")
def approval(app: App, req: Request) -> Response:
    arn = str(req.arg("arn", required=True))
    status = str(req.arg("status", required=True))
    comment = (req.arg("comment") or "").strip() or None
    since, endpoint = actions.set_approval(app.reader, arn, status, comment)
    return redirect(url("/models/version", arn=arn, since=f"{since:.3f}", endpoint=endpoint,
                        flash=f"{arn_name(arn)}: {status} (UpdateModelPackage); the deploy function updates "
                              f"{endpoint}"))


@route("GET", "/api/deploy-status")
def deploy_status(app: App, req: Request) -> Response:
    try:
        since = float(str(req.arg("since", required=True)))
    except ValueError:
        raise bad_request("since must be a number (epoch seconds)") from None
    return json_response(actions.deploy_status(app.reader, since, str(req.arg("endpoint", required=True))))


# ---------------------------------------------------------------------------------------------- comparison


def _compare_rows(reader: Reader, packages: list[dict[str, Any]]) -> list[list[Any]]:
    reports = [reader.evaluation(p) for p in packages]
    lineages = [lineage(reader, p) for p in packages]
    rows: list[list[Any]] = [["Approval", *[badge(p.get("ModelApprovalStatus")) for p in packages], ""],
                             ["Created", *[when(p.get("CreationTime")) for p in packages], ""]]
    for name in HEADLINE_METRICS:
        values = [metric(r, name) for r in reports]
        delta = values[1] - values[0] if None not in values else None
        rows.append([name, *[number(v) for v in values], "" if delta is None else f"{delta:+.4f}"])
    classes = sorted({c for r in reports for c in (metrics_of(r).get("recall") or {})})
    for kind in ("precision", "recall"):
        for cls in classes:
            values = [((metrics_of(r).get(kind) or {}).get(cls) or {}).get("value") for r in reports]
            delta = values[1] - values[0] if None not in values else None
            rows.append([f"{kind} · {cls}", *[number(v) for v in values], "" if delta is None else f"{delta:+.4f}"])
    rows.append(["Data fingerprint", *[lin.get("data_fingerprint") or "—" for lin in lineages], ""])
    rows.append(["Execution", *[execution_id(lin["execution"]) if lin.get("execution") else "—"
                                for lin in lineages], ""])
    names = sorted({k for lin in lineages for k in (lin.get("hyperparameters") or {})})
    for hp in names:
        values = [(lin.get("hyperparameters") or {}).get(hp, "") for lin in lineages]
        rows.append([f"hyperparameter {hp}", *values, "differs" if values[0] != values[1] else ""])
    return rows


@route("GET", "/models/compare")
def compare(app: App, req: Request) -> Response:
    arns = req.args("v")
    if len(arns) != 2:
        raise bad_request(f"choose exactly two versions to compare (got {len(arns)})")
    packages = [app.reader.package(a) for a in arns]
    headers = ["", *[link(url("/models/version", arn=p["ModelPackageArn"]),
                          f"{p['ModelPackageGroupName']} v{p['ModelPackageVersion']}") for p in packages],
               "Δ (second − first)"]
    body = section("Side by side", table(headers, _compare_rows(app.reader, packages), id_="compare-table"))
    return html_response(page("Compare model versions", "models", body, token=app.token))
