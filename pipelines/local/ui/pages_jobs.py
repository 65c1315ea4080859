"""Tuning (trials, objective plot, learning curves), Training (curves, Debugger/Profiler), Evaluation (metrics,
confusion matrix, per-class precision/recall, misclassified images)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.local.ui import svg
from pipelines.local.ui.html import (
    Markup,
    badge,
    e,
    join,
    kv,
    link,
    note,
    number,
    page,
    seconds,
    section,
    table,
    url,
    when,
)
from pipelines.local.ui.reader import (
    TERMINAL,
    Reader,
    arn_name,
    decode_hyperparameter,
    execution_id,
    split_s3,
    trial_number,
)
from pipelines.local.ui.web import App, Request, Response, html_response, not_found, route

logger = logging.getLogger(__name__)

Accept = Callable[[Reader, dict[str, Any]], bool]


def _evaluation_step(reader: Reader, step: dict[str, Any]) -> bool:
    """A processing step with an output named ``evaluation`` (the project's EvaluateModel, or any like it)."""
    job = reader.job_of(step) if "ProcessingJob" in (step.get("Metadata") or {}) else None
    outputs = ((job[1].get("ProcessingOutputConfig") or {}).get("Outputs") or []) if job else []
    return any("evaluation" in str(o.get("OutputName", "")).lower() for o in outputs)


def target(reader: Reader, req: Request, kind: str, what: str,
           accept: Accept | None = None) -> tuple[str, dict[str, Any]]:
    """``(execution ARN, step)`` from ``?arn=&step=``, else the newest matching step (of ``?arn=`` if given)."""
    arn, name = req.arg("arn"), req.arg("step")
    if arn and name:
        step = reader.step(arn, name)
        if step is None or kind not in (step.get("Metadata") or {}):
            raise not_found(f"step {name!r} of {execution_id(arn)} has no {kind} (yet)")
        return arn, step
    summaries = [{"PipelineExecutionArn": arn}] if arn else reader.executions()[:50]
    for summary in summaries:
        steps = reader.steps(summary["PipelineExecutionArn"], summary.get("PipelineExecutionStatus"))
        for step in reversed(steps):
            if kind in (step.get("Metadata") or {}) and (accept is None or accept(reader, step)):
                return summary["PipelineExecutionArn"], step
    raise not_found(f"no {what} step has run yet")


def _context(arn: str, step: dict[str, Any]) -> Markup:
    out = Markup('<p class="note">') + "Step " + link(url("/execution", arn=arn, step=step["StepName"]) + "#step",
                                                      step["StepName"]) + \
        " of execution " + link(url("/execution", arn=arn), execution_id(arn)) + " · " + badge(step.get("StepStatus"))
    source = (step.get("CacheHitResult") or {}).get("SourcePipelineExecutionArn")
    if source:
        out += Markup(" · ") + "cache hit: the job of execution " + link(url("/execution", arn=source),
                                                                          execution_id(source))
    return out + Markup("</p>")


def _live(arn: str, step: dict[str, Any]) -> str | None:
    return url("/api/execution-state", arn=arn) if step.get("StepStatus") not in TERMINAL else None


def _sig(reader: Reader, arn: str) -> str:
    from pipelines.local.ui.pages_runs import _execution_signature

    status = str(reader.describe_execution(arn).get("PipelineExecutionStatus"))
    return _execution_signature(status, reader.steps(arn))


# --------------------------------------------------------------------------------------------------- tuning


def metric_values(log: Path | None, regex: str | None) -> list[float]:
    """Every value of a metric in a log, in order, with the metric definition's regex (as SageMaker reads it)."""
    if log is None or not regex:
        return []
    try:
        text = log.read_text(errors="replace")
        return [float(m.group(1)) for m in re.finditer(regex, text)]
    except (OSError, re.error, ValueError, IndexError):
        return []


def _objective(described: dict[str, Any]) -> tuple[str, str, str | None]:
    """``(metric name, Maximize|Minimize, its regex)`` of a tuning job."""
    objective = (described.get("HyperParameterTuningJobConfig") or {}).get("HyperParameterTuningJobObjective") or {}
    name = objective.get("MetricName", "")
    definitions = ((described.get("TrainingJobDefinition") or {}).get("AlgorithmSpecification") or {}).get(
        "MetricDefinitions") or []
    regex = next((d.get("Regex") for d in definitions if d.get("Name") == name), None)
    return name, objective.get("Type", "Maximize"), regex


def trial_rows(reader: Reader, arn: str, step_name: str, described: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per trial: number, job, status, objective, hyperparameters, per-epoch objective, note."""
    name, _, regex = _objective(described)
    logs = reader.trial_logs(arn, step_name)
    best = (described.get("BestTrainingJob") or {}).get("TrainingJobName")
    rows = []
    summaries = sorted(reader.trials(described["HyperParameterTuningJobName"]),
                       key=lambda s: str(s.get("CreationTime")))
    for index, summary in enumerate(summaries, start=1):
        job = summary["TrainingJobName"]
        curve = metric_values(logs.get(job.lower()), regex)
        reason = summary.get("FailureReason") or ""
        status = summary.get("TrainingJobStatus", "")
        pruned = status == "Stopped" and "pruned" in reason.lower()
        start, end = summary.get("TrainingStartTime"), summary.get("TrainingEndTime")
        took = (end - start).total_seconds() if isinstance(start, datetime) and isinstance(end, datetime) else None
        rows.append({"number": trial_number(job, index), "job": job, "status": status, "best": job == best,
                     "objective": (summary.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value"),
                     "hyperparameters": {k: decode_hyperparameter(v) for k, v in
                                         (summary.get("TunedHyperParameters") or {}).items()},
                     "curve": curve, "seconds": took, "has_log": job.lower() in logs,
                     "note": f"pruned at epoch {len(curve)}" if pruned else reason, "metric": name})
    return rows


def _trial_table(arn: str, step_name: str, rows: list[dict[str, Any]]) -> Markup:
    names = sorted({k for r in rows for k in r["hyperparameters"]})
    headers = ["#", "Trial (training job)", "Status", f"Objective ({rows[0]['metric'] if rows else ''})",
               *names, "Epochs", "Duration", "Note"]
    cells = []
    for r in rows:
        job = link(url("/log", arn=arn, step=step_name, trial=r["job"]), r["job"]) if r["has_log"] else r["job"]
        star = Markup(" ★ best") if r["best"] else Markup("")
        cells.append([r["number"], job + star, (badge(r["status"]), r["status"]),
                      (number(r["objective"]), r["objective"] if r["objective"] is not None else -1e308),
                      *[_hp_cell(r["hyperparameters"].get(n, "")) for n in names], len(r["curve"]),
                      (seconds(r["seconds"]), r["seconds"] or 0), r["note"]])
    attrs = [{"class": "best" if r["best"] else "", "data-job": r["job"]} for r in rows]
    return table(headers, cells, cls="sortable", id_="trials", row_attrs=attrs)


def _hp_cell(value: str) -> tuple[str, str]:
    """A hyperparameter cell: numbers shown with 4 significant digits, sorted by their full value."""
    try:
        number_ = float(value)
    except ValueError:
        return value, value
    return (value if value.lstrip("-").isdigit() else f"{number_:.4g}"), repr(number_)


def _trial_plots(rows: list[dict[str, Any]], direction: str) -> Markup:
    metric = rows[0]["metric"] if rows else "objective"
    points = [(r["number"], r["objective"]) for r in rows if r["objective"] is not None]
    best_so_far: list[tuple[float, float]] = []
    pick = max if direction == "Maximize" else min
    for x, y in sorted(points):
        best_so_far.append((x, pick(y, best_so_far[-1][1]) if best_so_far else y))
    marks = [(r["number"], r["objective"], f"best: trial {r['number']}") for r in rows
             if r["best"] and r["objective"] is not None]
    objective = svg.line_chart([("objective", points), ("best so far", best_so_far)], title=f"{metric} by trial",
                               x_label="trial", y_label=metric, marks=marks, points=["objective"], integer_x=True)
    curves = svg.line_chart([(f"trial {r['number']}" + (" (best)" if r["best"] else ""),
                              list(enumerate(r["curve"], start=1))) for r in rows],
                            title=f"Learning curves: {metric} per epoch", x_label="epoch", y_label=metric,
                            integer_x=True)
    return Markup('<div class="grid">') + objective + curves + Markup("</div>")


@route("GET", "/tuning")
def tuning(app: App, req: Request) -> Response:
    reader = app.reader
    arn, step = target(reader, req, "TuningJob", "tuning")
    described = reader.tuning_job(arn_name(step["Metadata"]["TuningJob"]["Arn"]))
    config = described.get("HyperParameterTuningJobConfig") or {}
    metric, direction, _ = _objective(described)
    rows = trial_rows(reader, arn, step["StepName"], described)
    counters = described.get("TrainingJobStatusCounters") or {}
    info = kv([("Tuning job", described["HyperParameterTuningJobName"]),
               ("Status", badge(described.get("HyperParameterTuningJobStatus"))),
               ("Strategy", config.get("Strategy")), ("Objective", f"{direction} {metric}"),
               ("Early stopping", config.get("TrainingJobEarlyStoppingType", "Off")),
               ("Limits", ", ".join(f"{k} {v}" for k, v in (config.get("ResourceLimits") or {}).items())),
               ("Trials", ", ".join(f"{k} {v}" for k, v in counters.items())),
               ("Best trial", (described.get("BestTrainingJob") or {}).get("TrainingJobName", "—"))])
    body = [_context(arn, step), section("Tuning job", info),
            section(f"Trials ({len(rows)})", _trial_table(arn, step["StepName"], rows) if rows
                    else note("no trial has started yet")),
            section("Objective and learning curves", _trial_plots(rows, direction))]
    return html_response(page(f"Tuning · {step['StepName']}", "tuning", join(body), token=app.token,
                              poll=_live(arn, step), signature=_sig(reader, arn) if _live(arn, step) else ""))


# ------------------------------------------------------------------------------------------------- training


def epoch_rows(log: Path | None) -> list[dict[str, float]]:
    from training.metrics import parse_epoch_lines

    if log is None:
        return []
    try:
        return parse_epoch_lines(log.read_text(errors="replace"))
    except OSError:
        return []


def _curves(epochs: list[dict[str, float]]) -> Markup:
    if not epochs:
        return note("no per-epoch metric lines in the job's log yet")

    def series(key: str) -> list[tuple[float, float]]:
        return [(r["epoch"], r[key]) for r in epochs if key in r]

    loss = svg.line_chart([("train_loss", series("train_loss")), ("valid_loss", series("valid_loss"))],
                          title="Loss per epoch", x_label="epoch", y_label="loss", integer_x=True)
    accuracy = svg.line_chart([("train_accuracy", series("train_accuracy")),
                               ("valid_accuracy", series("valid_accuracy"))],
                              title="Accuracy per epoch", x_label="epoch", y_label="accuracy", integer_x=True)
    return Markup('<div class="grid">') + loss + accuracy + Markup("</div>")


def _rules(job: dict[str, Any]) -> Markup:
    kinds = (("Debugger", "DebugRuleEvaluationStatuses"), ("Profiler", "ProfilerRuleEvaluationStatuses"))
    rows = [[kind, r.get("RuleConfigurationName"),
             (badge(r.get("RuleEvaluationStatus")), r.get("RuleEvaluationStatus")),
             r.get("StatusDetails") or ""] for kind, key in kinds for r in job.get(key) or []]
    if not rows:
        return note("this training job has no Debugger or Profiler rules")
    return table(["Kind", "Rule", "Status", "Details"], rows, cls="sortable", id_="rules")


def profiler_report_uri(reader: Reader, job: dict[str, Any]) -> str | None:
    """Where SageMaker puts the ProfilerReport rule's HTML: ``<ProfilerConfig.S3OutputPath>/<job>/rule-output/
    ProfilerReport/profiler-output/profiler-report.html``."""
    root = (job.get("ProfilerConfig") or {}).get("S3OutputPath")
    if not root:
        return None
    for rule in job.get("ProfilerRuleConfigurations") or [{"RuleConfigurationName": "ProfilerReport"}]:
        name = rule.get("RuleConfigurationName")
        uri = f"{root.rstrip('/')}/{job['TrainingJobName']}/rule-output/{name}/profiler-output/profiler-report.html"
        if reader.s3_exists(uri):
            return uri
    return None


def _job_info(job: dict[str, Any]) -> Markup:
    hps = {k: decode_hyperparameter(v) for k, v in (job.get("HyperParameters") or {}).items()
           if not k.startswith("sagemaker_")}
    metrics = [[m.get("MetricName"), number(m.get("Value"))] for m in job.get("FinalMetricDataList") or []]
    info = kv([("Training job", job.get("TrainingJobName")), ("Status", badge(job.get("TrainingJobStatus"))),
               ("Secondary status", job.get("SecondaryStatus")), ("Started", when(job.get("TrainingStartTime"))),
               ("Ended", when(job.get("TrainingEndTime"))),
               ("Model artifacts", (job.get("ModelArtifacts") or {}).get("S3ModelArtifacts", "")),
               ("Failure reason", job.get("FailureReason") or "")])
    return Markup('<div class="grid">') + info + table(["Hyperparameter", "Value"], sorted(hps.items())) + \
        table(["Final metric", "Value"], metrics) + Markup("</div>")


@route("GET", "/training")
def training(app: App, req: Request) -> Response:
    reader = app.reader
    arn, step = target(reader, req, "TrainingJob", "training")
    found = reader.job_of(step)
    job = found[1] if found else {}
    report = profiler_report_uri(reader, job)
    body = [_context(arn, step), section("Training job", _job_info(job)),
            section("Per-epoch curves", _curves(epoch_rows(reader.step_log(arn, step["StepName"])))),
            section("Debugger and Profiler rules", _rules(job))]
    if report:
        frame = Markup(f'<iframe class="report" id="profiler-report" src="{e(url("/artifact", uri=report))}" '
                       'sandbox="allow-scripts" title="Profiler report"></iframe>')
        body.append(section("Profiler report", link(url("/artifact", uri=report), "open in its own tab") + frame))
    else:
        body.append(section("Profiler report", note("no profiler report (no ProfilerReport rule output yet)")))
    return html_response(page(f"Training · {step['StepName']}", "training", join(body), token=app.token,
                              poll=_live(arn, step), signature=_sig(reader, arn) if _live(arn, step) else ""))


# ----------------------------------------------------------------------------------------------- evaluation


def _evaluation_uri(job: dict[str, Any]) -> str | None:
    for output in (job.get("ProcessingOutputConfig") or {}).get("Outputs") or []:
        if "evaluation" in str(output.get("OutputName", "")).lower():
            return str(output["S3Output"]["S3Uri"]).rstrip("/")
    return None


def metrics_table(metrics: dict[str, Any]) -> Markup:
    rows = [[name, number(value.get("value")), number(value.get("standard_deviation"))]
            for name, value in metrics.items() if isinstance(value, dict) and "value" in value]
    return table(["Metric", "Value", "Standard deviation"], rows, id_="metrics")


def per_class(metrics: dict[str, Any]) -> Markup:
    precision, recall = metrics.get("precision") or {}, metrics.get("recall") or {}
    names = list(dict.fromkeys([*precision, *recall]))
    if not names:
        return note("no per-class precision/recall in the report")

    def value(block: dict[str, Any], name: str) -> float | None:
        item = block.get(name)
        return item.get("value") if isinstance(item, dict) else item

    rows = [[n, number(value(precision, n)), number(value(recall, n))] for n in names]
    chart = svg.bars([(n, [value(precision, n), value(recall, n)]) for n in names], ["precision", "recall"],
                     title="Precision and recall per class")
    return Markup('<div class="grid">') + table(["Class", "Precision", "Recall"], rows, cls="sortable",
                                                id_="per-class") + chart + Markup("</div>")


def _image_uri(job: dict[str, Any], path: str) -> str | None:
    """An image the report names: an ``s3://`` URI, a container path under a ProcessingInput's LocalPath, or a
    path relative to the ``test`` input."""
    if path.startswith("s3://"):
        return path
    inputs = [i.get("S3Input") or {} for i in job.get("ProcessingInputs") or []]
    for item in inputs:
        local = str(item.get("LocalPath", "")).rstrip("/")
        if local and path.startswith(local + "/"):
            return f"{str(item['S3Uri']).rstrip('/')}/{path[len(local) + 1:]}"
    test = next((i.get("S3Input") for i in job.get("ProcessingInputs") or [] if i.get("InputName") == "test"), None)
    return f"{str(test['S3Uri']).rstrip('/')}/{path.lstrip('/')}" if test else None


def misclassified(report: dict[str, Any], job: dict[str, Any], objects: list[dict[str, Any]]) -> Markup:
    items = report.get("misclassified") or (report.get("dataset") or {}).get("misclassified")
    if not isinstance(items, list):
        written = ", ".join(o["Key"].rsplit("/", 1)[-1] for o in objects) or "nothing"
        return note(f"The evaluation step does not record its misclassified test images (it writes: {written}). "
                    "A 'misclassified' list in evaluation.json ({path, actual, predicted, confidence} per image, "
                    "path relative to the test input) would be shown here as thumbnails.", "note missing")
    figures = []
    for item in items[:60]:
        uri = _image_uri(job, str(item.get("path", "")))
        img = Markup(f'<img src="{e(url("/artifact", uri=uri))}" alt="{e(item.get("path"))}" loading="lazy">') \
            if uri else Markup("")
        caption = f"actual {item.get('actual', '?')} → predicted {item.get('predicted', '?')}"
        if isinstance(item.get("confidence"), int | float):
            caption += f" ({item['confidence']:.2f})"
        figures.append(Markup("<figure>") + img + Markup("<figcaption>") + caption + Markup("</figcaption></figure>"))
    return Markup(f'<p class="note">{len(items)} misclassified test image(s)</p><div class="thumbs">') + \
        join(figures) + Markup("</div>")


@route("GET", "/evaluation")
def evaluation(app: App, req: Request) -> Response:
    reader = app.reader
    arn, step = target(reader, req, "ProcessingJob", "evaluation", _evaluation_step)
    found = reader.job_of(step)
    job = found[1] if found else {}
    root = _evaluation_uri(job)
    objects = reader.s3_list(root) if root else []
    bucket = split_s3(root)[0] if root else ""
    keys = {o["Key"].rsplit("/", 1)[-1]: f"s3://{bucket}/{o['Key']}" for o in objects}
    if "evaluation.json" not in keys:
        body = [_context(arn, step), note("the evaluation report (evaluation.json) is not there yet")]
        return html_response(page(f"Evaluation · {step['StepName']}", "evaluation", join(body), token=app.token,
                                  poll=_live(arn, step), signature=_sig(reader, arn) if _live(arn, step) else ""))
    report = reader.s3_json(keys["evaluation.json"])
    metrics = report.get("multiclass_classification_metrics") or report.get("binary_classification_metrics") or {}
    dataset = report.get("dataset") or {}
    matrix = svg.heatmap(metrics["confusion_matrix"]) if metrics.get("confusion_matrix") else \
        note("no confusion matrix in the report")
    png = keys.get("confusion_matrix.png")
    body = [_context(arn, step),
            section("Metrics (evaluation.json)", metrics_table(metrics) + link(url("/artifact", uri=keys[
                "evaluation.json"]), "evaluation.json")),
            section("Confusion matrix", matrix + (link(url("/artifact", uri=png), "the step's own PNG") if png
                                                   else Markup(""))),
            section("Per-class precision and recall", per_class(metrics)),
            section("Test set", kv([("Images evaluated", dataset.get("item_count")),
                                    ("Files found", dataset.get("files_found")),
                                    ("Skipped (unreadable)", dataset.get("skipped_count")),
                                    ("Model", dataset.get("model_arch")),
                                    ("Evaluated at", dataset.get("evaluation_time"))]) +
                    (table(["Skipped file", "Reason"], [[s.get("path"), s.get("reason")] for s in
                                                        dataset.get("skipped") or []])
                     if dataset.get("skipped") else Markup(""))),
            section("Misclassified test images", misclassified(report, job, objects), id_="misclassified")]
    return html_response(page(f"Evaluation · {step['StepName']}", "evaluation", join(body), token=app.token))
