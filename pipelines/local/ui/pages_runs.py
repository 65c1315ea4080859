"""Executions: the list, one execution as its DAG with step details, the full step log, live state, Stop/Retry."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.local.ui import actions, svg
from pipelines.local.ui.html import (
    Markup,
    badge,
    details,
    e,
    hidden,
    join,
    json_block,
    kv,
    link,
    note,
    page,
    pre,
    seconds,
    section,
    table,
    url,
    when,
)
from pipelines.local.ui.reader import TERMINAL, Reader, arn_name, execution_id, tail
from pipelines.local.ui.web import App, Request, Response, html_response, json_response, not_found, redirect, route

logger = logging.getLogger(__name__)

PAGE_SIZE = 25
LOG_TAIL_LINES = 40


def duration(described: dict[str, Any]) -> float | None:
    start = described.get("CreationTime")
    end = described.get("LastModifiedTime") if described.get("PipelineExecutionStatus") in TERMINAL else None
    if not isinstance(start, datetime):
        return None
    return ((end if isinstance(end, datetime) else datetime.now(tz=UTC)) - start).total_seconds()


def signature(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:16]


def overrides(reader: Reader, arn: str) -> dict[str, str]:
    """The execution's parameters that differ from the definition's defaults."""
    defaults = {p.get("Name"): p.get("DefaultValue") for p in reader.definition(arn).get("Parameters") or []}
    return {k: v for k, v in reader.parameters(arn).items() if str(defaults.get(k)) != str(v)}


# ------------------------------------------------------------------------------------------------ the list


def _page_of(reader: Reader, req: Request) -> tuple[list[dict[str, Any]], int, int, str | None]:
    pipeline = req.arg("pipeline")
    summaries = reader.executions(pipeline)
    pages = max(1, -(-len(summaries) // PAGE_SIZE))
    number = req.int_arg("page", 1, high=pages)
    return summaries[(number - 1) * PAGE_SIZE:number * PAGE_SIZE], number, pages, pipeline


def _execution_row(reader: Reader, summary: dict[str, Any]) -> list[Any]:
    arn, status = summary["PipelineExecutionArn"], summary.get("PipelineExecutionStatus")
    described = reader.describe_execution(arn, status)
    params = overrides(reader, arn)
    took = duration(described)
    return [link(url("/execution", arn=arn), execution_id(arn)), summary["PipelineName"], (badge(status), status),
            (when(summary.get("StartTime")), str(summary.get("StartTime"))), (seconds(took), took or 0),
            summary.get("PipelineExecutionDisplayName") or "",
            join((f"{k}={v}" for k, v in sorted(params.items())), "; ") if params else "(defaults)",
            summary.get("PipelineExecutionFailureReason") or ""]


@route("GET", "/executions")
def executions(app: App, req: Request) -> Response:
    shown, number, pages, pipeline = _page_of(app.reader, req)
    rows = [_execution_row(app.reader, s) for s in shown]
    names = app.reader.pipelines()
    choose = join([link(url("/executions"), "all pipelines")] +
                  [link(url("/executions", pipeline=n), n) for n in names], " · ")
    pager = join(link(url("/executions", pipeline=pipeline, page=n), f"page {n}") for n in range(1, pages + 1))
    body = (Markup(f'<p class="pager">{choose}</p>') +
            table(["Execution", "Pipeline", "Status", "Started", "Duration", "Display name",
                   "Parameters (not default)", "Failure reason"], rows, cls="sortable", id_="executions") +
            (Markup(f'<p class="pager">{pager}</p>') if pages > 1 else Markup("")))
    if not rows:
        body = note("No executions yet: python -m pipelines.run start")
    live = any(s.get("PipelineExecutionStatus") not in TERMINAL for s in shown)
    state = url("/api/executions-state", pipeline=pipeline, page=number)
    return html_response(page("Executions", "executions", body, token=app.token, poll=state if live else None,
                              signature=_list_signature(shown)))


def _list_signature(shown: list[dict[str, Any]]) -> str:
    return signature([(s["PipelineExecutionArn"], s.get("PipelineExecutionStatus")) for s in shown])


@route("GET", "/api/executions-state")
def executions_state(app: App, req: Request) -> Response:
    shown, *_ = _page_of(app.reader, req)
    return json_response({"signature": _list_signature(shown),
                          "terminal": all(s.get("PipelineExecutionStatus") in TERMINAL for s in shown)})


# ------------------------------------------------------------------------------------------ one execution


def graph(reader: Reader, arn: str, status: str, steps: list[dict[str, Any]], selected: str | None) -> Markup:
    """The execution's DAG: every step of its definition (branches included), coloured by status."""
    from pipelines.local.engine.core import DefinitionError, parse_definition

    try:
        defs = parse_definition(reader.definition(arn))
    except DefinitionError as exc:
        return note(f"the definition cannot be drawn: {exc}")
    listed = {s["StepName"]: s for s in steps}
    outcomes = {n: str((s.get("Metadata") or {}).get("Condition", {}).get("Outcome", "")).lower()
                for n, s in listed.items()}
    shown: dict[str, str] = {}

    def status_of(name: str) -> str:
        if name not in shown:
            step = defs[name]
            if name in listed:
                shown[name] = str(listed[name].get("StepStatus"))
            elif (step.branch and outcomes.get(step.branch[0]) not in ("", None)
                  and outcomes[step.branch[0]] != str(step.branch[1]).lower()) or \
                    any(status_of(d) == "NotTaken" for d in step.deps if d in defs):
                shown[name] = "NotTaken"
            else:
                shown[name] = "NotExecuted" if status in TERMINAL else "NotStarted"
        return shown[name]

    nodes = {}
    for name, step in defs.items():
        labels = {step.branch[0]: "if true" if step.branch[1] else "else"} if step.branch else {}
        listed_step = listed.get(name) or {}
        sub = "cached" if listed_step.get("CacheHitResult") else seconds(_step_seconds(listed_step))
        nodes[name] = svg.Node(name, step.type, status_of(name), url("/execution", arn=arn, step=name) + "#step",
                               subtitle=sub, selected=name == selected,
                               edges=[(d, labels.get(d, "")) for d in sorted(step.deps)])
    return svg.dag(nodes)


def _step_seconds(step: dict[str, Any]) -> float | None:
    start, end = step.get("StartTime"), step.get("EndTime")
    return (end - start).total_seconds() if isinstance(start, datetime) and isinstance(end, datetime) else None


def _step_rows(arn: str, steps: list[dict[str, Any]]) -> list[list[Any]]:
    from pipelines import views

    return [[link(url("/execution", arn=arn, step=s["StepName"]) + "#step", s["StepName"]),
             (badge(s.get("StepStatus")), s.get("StepStatus")), s.get("AttemptCount", ""), when(s.get("StartTime")),
             seconds(_step_seconds(s)), views.step_details(s)] for s in steps]


def _header(described: dict[str, Any], arn: str, token: str) -> Markup:
    status = described.get("PipelineExecutionStatus")
    pairs = [("Execution", arn), ("Pipeline", arn_name(described.get("PipelineArn"))), ("Status", badge(status)),
             ("Display name", described.get("PipelineExecutionDisplayName") or ""),
             ("Created", when(described.get("CreationTime"))),
             ("Last modified", when(described.get("LastModifiedTime"))), ("Duration", seconds(duration(described)))]
    if described.get("FailureReason"):
        pairs.append(("Failure reason", Markup(f'<span class="error" id="failure">{e(described["FailureReason"])}'
                                               "</span>")))
    if described.get("PipelineExecutionDescription"):
        pairs.append(("Description", details(described["PipelineExecutionDescription"].splitlines()[0],
                                             pre(described["PipelineExecutionDescription"]))))
    buttons = []
    if status == "Executing":
        buttons.append(_action_form("/actions/stop", arn, token, "Stop", "danger"))
    if status in ("Failed", "Stopped"):
        buttons.append(_action_form("/actions/retry", arn, token, "Retry", "primary"))
    return kv(pairs) + Markup(f'<div class="actions">{join(buttons)}</div>')


def _action_form(action: str, arn: str, token: str, label: str, css: str) -> Markup:
    return Markup(f'<form class="inline" method="post" action="{e(action)}">{hidden("arn", arn)}'
                  f'{hidden("token", token)}<button type="submit" class="{e(css)}" id="{e(label.lower())}">'
                  f"{e(label)}</button></form>")


@route("GET", "/execution")
def execution(app: App, req: Request) -> Response:
    arn = str(req.arg("arn", required=True))
    reader = app.reader
    described = reader.describe_execution(arn)
    status = str(described.get("PipelineExecutionStatus"))
    steps = reader.steps(arn, status)
    selected = req.arg("step") or next((s["StepName"] for s in steps if s.get("StepStatus") == "Failed"), None)
    body = [section("Execution", _header(described, arn, app.token)),
            section("Graph", graph(reader, arn, status, steps, selected) +
                    note("Click a step for its details. Dashed grey: the branch the condition did not take."),
                    id_="graph")]
    if selected:
        body.append(section(f"Step {selected}", step_details(reader, arn, selected), id_="step"))
    body.append(section("Steps", table(["Step", "Status", "Attempts", "Started", "Duration", "Details"],
                                       _step_rows(arn, steps), cls="sortable", id_="steps")))
    params = reader.parameters(arn)
    changed = overrides(reader, arn)
    body.append(section("Parameters", table(["Name", "Value", ""], [
        [k, v, "set for this execution" if k in changed else "default"] for k, v in sorted(params.items())])
        if params else note("this pipeline has no parameters")))
    return html_response(page(f"Execution {execution_id(arn)}", "executions", join(body), token=app.token,
                              poll=None if status in TERMINAL else url("/api/execution-state", arn=arn),
                              signature=_execution_signature(status, steps), flash=req.arg("flash")))


def _execution_signature(status: str, steps: list[dict[str, Any]]) -> str:
    return signature(status, [(s["StepName"], s.get("StepStatus"), s.get("AttemptCount")) for s in steps])


@route("GET", "/api/execution-state")
def execution_state(app: App, req: Request) -> Response:
    arn = str(req.arg("arn", required=True))
    status = str(app.reader.describe_execution(arn).get("PipelineExecutionStatus"))
    steps = app.reader.steps(arn)
    return json_response({"status": status, "terminal": status in TERMINAL,
                          "signature": _execution_signature(status, steps),
                          "steps": {s["StepName"]: s.get("StepStatus") for s in steps}})


# ------------------------------------------------------------------------------------------- step details


def _step_spec(reader: Reader, arn: str, name: str) -> tuple[str, dict[str, Any]]:
    from pipelines.local.engine.core import DefinitionError, parse_definition

    try:
        step = parse_definition(reader.definition(arn)).get(name)
    except DefinitionError:
        step = None
    return (step.type, step.spec) if step else ("", {})


def _step_links(arn: str, name: str, step_type: str, job: tuple[str, dict[str, Any]] | None) -> Markup:
    links = []
    if step_type == "Tuning":
        links.append(link(url("/tuning", arn=arn, step=name), "Trials of this tuning step"))
    if step_type == "Training":
        links.append(link(url("/training", arn=arn, step=name), "Training: curves, Debugger and Profiler"))
    if job and job[0] == "ProcessingJob" and _is_evaluation(job[1]):
        links.append(link(url("/evaluation", arn=arn, step=name), "Evaluation report"))
    return Markup(f'<p class="actions">{join(links, " · ")}</p>') if links else Markup("")


def _is_evaluation(job: dict[str, Any]) -> bool:
    outputs = (job.get("ProcessingOutputConfig") or {}).get("Outputs") or []
    return any("evaluation" in str(o.get("OutputName", "")).lower() for o in outputs)


def step_details(reader: Reader, arn: str, name: str) -> Markup:
    """Status, timing, failure, cache source, job request, resolved arguments, properties, log tail."""
    listed = reader.step(arn, name) or {}
    step_type, spec = _step_spec(reader, arn, name)
    if not listed and not spec:
        raise not_found(f"execution {execution_id(arn)} has no step {name!r}")
    record = reader.step_record(arn, name) or {}
    pairs: list[tuple[str, Any]] = [("Type", step_type), ("Status", badge(listed.get("StepStatus") or
                                                                          record.get("status") or "NotStarted")),
                                    ("Attempts", listed.get("AttemptCount", "")),
                                    ("Started", when(listed.get("StartTime"))), ("Ended", when(listed.get("EndTime"))),
                                    ("Duration", seconds(_step_seconds(listed)))]
    if listed.get("FailureReason"):
        pairs.append(("Failure reason", Markup(f'<span class="error">{e(listed["FailureReason"])}</span>')))
    source = (listed.get("CacheHitResult") or {}).get("SourcePipelineExecutionArn")
    if source:
        pairs.append(("Cache hit from", link(url("/execution", arn=source, step=name) + "#step",
                                             execution_id(source))))
    if spec.get("Description"):
        pairs.append(("Description", spec["Description"]))
    job = _job(reader, listed)
    parts = [kv(pairs), _step_links(arn, name, step_type, job)]
    parts += _step_data(listed, record, spec, job)
    log = reader.step_log(arn, name)
    if log is not None:
        parts.append(section("Log (last lines)", pre(tail(log, LOG_TAIL_LINES), "log") +
                             link(url("/log", arn=arn, step=name), "full log", id_="full-log")))
    return join(parts)


def _job(reader: Reader, listed: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    from botocore.exceptions import ClientError

    try:
        return reader.job_of(listed) if listed else None
    except ClientError as exc:
        logger.info("job of %s: %s", listed.get("StepName"), exc)
        return None


def _step_data(listed: dict[str, Any], record: dict[str, Any], spec: dict[str, Any],
               job: tuple[str, dict[str, Any]] | None) -> list[Markup]:
    out = []
    if job:
        described = {k: v for k, v in job[1].items() if k != "ResponseMetadata"}
        out.append(details(f"Job request and state (Describe{job[0]})", json_block(described), open_=True))
    if listed.get("Metadata"):
        out.append(details("Step metadata (ListPipelineExecutionSteps)", json_block(listed["Metadata"]),
                           open_=not job))
    if record.get("arguments") is not None:
        out.append(details("Resolved arguments (as the engine sent them)", json_block(record["arguments"])))
    if record.get("properties"):
        out.append(details("Properties", json_block(record["properties"]), open_=not job))
    if spec.get("Arguments") is not None:
        out.append(details("Arguments in the definition (unresolved)", json_block(spec.get("Arguments"))))
    return out


@route("GET", "/log")
def full_log(app: App, req: Request) -> Response:
    """A step's (or a trial's) whole log as text, streamed."""
    arn, name = str(req.arg("arn", required=True)), str(req.arg("step", required=True))
    trial = req.arg("trial")
    path: Path | None
    if trial:
        path = app.reader.trial_logs(arn, name).get(trial.lower())
    else:
        path = app.reader.step_log(arn, name)
    if path is None:
        raise not_found(f"no log for step {name!r}" + (f" trial {trial!r}" if trial else "") +
                        f" of {execution_id(arn)}")
    size = path.stat().st_size

    def chunks() -> Any:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 16):
                yield chunk

    return Response(200, chunks(), "text/plain; charset=utf-8", length=size)


@route("POST", "/actions/stop")
def stop(app: App, req: Request) -> Response:
    arn = str(req.arg("arn", required=True))
    actions.stop(app.reader, arn)
    return redirect(url("/execution", arn=arn, flash="Stop requested (StopPipelineExecution)"))


@route("POST", "/actions/retry")
def retry(app: App, req: Request) -> Response:
    arn = str(req.arg("arn", required=True))
    actions.retry(app.reader, arn)
    return redirect(url("/execution", arn=arn, flash="Retry started (RetryPipelineExecution)"))
