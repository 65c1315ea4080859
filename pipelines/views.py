"""Terminal views of SageMaker API answers, for both targets (``python -m pipelines.run describe``).

Everything shown comes from the SageMaker API (``DescribePipelineExecution``, ``ListPipelineExecutionSteps``,
``DescribeTrainingJob``, ``ListTrainingJobsForHyperParameterTuningJob``), so the same view works against SageMaker and
against the local AWS service. When stdout is not a terminal, cells are never truncated.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError
from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)

RULE_STYLES = {"IssuesFound": "yellow", "Error": "red", "InProgress": "cyan"}


def console(stderr: bool = False) -> Console:
    """A console for tables: the terminal's width on a terminal; otherwise (a pipe, a file, CI) as wide as the
    longest row, so that no cell is wrapped or truncated and each row stays one line for ``grep``/``awk``."""
    out = Console(stderr=stderr)
    return out if out.is_terminal else Console(stderr=stderr, width=100_000, soft_wrap=True, no_color=True)


def _iso(value: Any) -> str:
    return value.isoformat(timespec="seconds") if isinstance(value, datetime) else str(value or "")


def _duration(step: Mapping[str, Any]) -> str:
    start, end = step.get("StartTime"), step.get("EndTime")
    return f"{(end - start).total_seconds():.0f}s" if isinstance(start, datetime) and isinstance(end, datetime) else ""


def _arn_name(arn: str | None) -> str:
    return (arn or "").rsplit("/", 1)[-1]


def step_types(definition: str) -> dict[str, str]:
    """``{step name: Type}`` of a pipeline definition, Condition branches included (ListPipelineExecutionSteps has
    no step type; the definition of the execution, DescribePipelineDefinitionForExecution, has)."""
    found: dict[str, str] = {}

    def walk(steps: list[Any]) -> None:
        for step in steps or []:
            if isinstance(step, dict) and step.get("Name"):
                found[step["Name"]] = str(step.get("Type", ""))
                arguments = step.get("Arguments") if isinstance(step.get("Arguments"), dict) else {}
                walk(arguments.get("IfSteps") or [])
                walk(arguments.get("ElseSteps") or [])

    try:
        walk(json.loads(definition).get("Steps") or [])
    except (ValueError, AttributeError):
        logger.warning("the execution's pipeline definition is not readable JSON")
    return found


def with_step_types(sm_client: Any, arn: str, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``steps`` with ``StepType`` from the execution's definition."""
    try:
        definition = sm_client.describe_pipeline_definition_for_execution(PipelineExecutionArn=arn)
    except ClientError as exc:
        logger.warning("DescribePipelineDefinitionForExecution %s: %s", arn, exc)
        return steps
    types = step_types(definition.get("PipelineDefinition") or "{}")
    return [{**step, "StepType": types.get(step.get("StepName", ""), "")} for step in steps]


def step_details(step: Mapping[str, Any]) -> str:
    """One line about what a step produced, from its ``Metadata`` as ListPipelineExecutionSteps shapes it."""
    if step.get("FailureReason"):
        return str(step["FailureReason"])
    if step.get("CacheHitResult"):
        return f"cache hit from {step['CacheHitResult'].get('SourcePipelineExecutionArn', '')}"
    meta = step.get("Metadata") or {}
    if "Condition" in meta:
        return f"Outcome={meta['Condition'].get('Outcome')}"
    for kind in ("TrainingJob", "ProcessingJob", "TuningJob", "TransformJob", "Model"):
        if kind in meta:
            return _arn_name(meta[kind].get("Arn"))
    if "RegisterModel" in meta:
        return str(meta["RegisterModel"].get("Arn"))
    if "Lambda" in meta:
        outputs = {o.get("Name"): o.get("Value") for o in meta["Lambda"].get("OutputParameters") or []}
        return json.dumps(outputs)
    if "Fail" in meta:
        return str(meta["Fail"].get("ErrorMessage", ""))
    return ""


def steps_table(steps: list[dict[str, Any]]) -> Table:
    table = Table(title="Steps")
    for col in ("Step", "Type", "Status", "Attempts", "Duration", "Details"):
        table.add_column(col, overflow="fold")
    for step in steps:
        table.add_row(step.get("StepName", ""), step.get("StepType", ""), step.get("StepStatus", ""),
                      str(step.get("AttemptCount", "")), _duration(step), step_details(step))
    return table


def _training_jobs(steps: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(s["StepName"], _arn_name(s["Metadata"]["TrainingJob"]["Arn"])) for s in steps
            if (s.get("Metadata") or {}).get("TrainingJob", {}).get("Arn")]


def rules_table(sm_client: Any, steps: list[dict[str, Any]]) -> Table | None:
    """Debugger and Profiler rule statuses of every training step's job (``DescribeTrainingJob``)."""
    rows: list[tuple[str, Mapping[str, Any]]] = []
    for step_name, job in _training_jobs(steps):
        try:
            described = sm_client.describe_training_job(TrainingJobName=job)
        except ClientError as exc:
            logger.warning("DescribeTrainingJob %s: %s", job, exc)
            continue
        for key in ("DebugRuleEvaluationStatuses", "ProfilerRuleEvaluationStatuses"):
            rows.extend((step_name, rule) for rule in described.get(key) or [])
    if not rows:
        return None
    table = Table(title="Debugger and Profiler rules")
    for col in ("Step", "Rule", "Status", "Details"):
        table.add_column(col, overflow="fold")
    for step_name, rule in rows:
        status = str(rule.get("RuleEvaluationStatus"))
        style = RULE_STYLES.get(status, "green")
        table.add_row(step_name, str(rule.get("RuleConfigurationName")), f"[{style}]{status}[/{style}]",
                      str(rule.get("StatusDetails") or ""))
    return table


def _tuning_summaries(sm_client: Any, tuning_job: str) -> list[dict[str, Any]]:
    paginator = sm_client.get_paginator("list_training_jobs_for_hyper_parameter_tuning_job")
    return [summary for page in paginator.paginate(HyperParameterTuningJobName=tuning_job)
            for summary in page.get("TrainingJobSummaries", [])]


def trials_table(sm_client: Any, steps: list[dict[str, Any]]) -> Table | None:
    """The training jobs of every tuning step (``ListTrainingJobsForHyperParameterTuningJob``)."""
    table = Table(title="Tuning trials")
    for col in ("Step", "Job", "Status", "Objective", "Hyperparameters"):
        table.add_column(col, overflow="fold")
    rows = 0
    for step in steps:
        arn = (step.get("Metadata") or {}).get("TuningJob", {}).get("Arn")
        if not arn:
            continue
        try:
            summaries = _tuning_summaries(sm_client, _arn_name(arn))
        except ClientError as exc:
            logger.warning("ListTrainingJobsForHyperParameterTuningJob %s: %s", arn, exc)
            continue
        for summary in sorted(summaries, key=lambda s: s.get("TrainingJobName", "")):
            objective = (summary.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value")
            table.add_row(step["StepName"], summary.get("TrainingJobName", ""), summary.get("TrainingJobStatus", ""),
                          "" if objective is None else f"{objective:.4f}",
                          json.dumps(summary.get("TunedHyperParameters") or {}, sort_keys=True))
            rows += 1
    return table if rows else None


def render_execution(sm_client: Any, described: Mapping[str, Any], steps: list[dict[str, Any]],
                     out: Console | None = None) -> None:
    """An execution (``DescribePipelineExecution``) with its steps, rule statuses and tuning trials."""
    out = out or console()
    arn = described.get("PipelineExecutionArn", "")
    out.print(f"[bold]{_arn_name(arn)}[/bold] {_arn_name(described.get('PipelineArn'))} "
              f"status={described.get('PipelineExecutionStatus')} created={_iso(described.get('CreationTime'))} "
              f"modified={_iso(described.get('LastModifiedTime'))}", highlight=False)
    if described.get("PipelineExecutionDisplayName"):
        out.print(f"display name: {described['PipelineExecutionDisplayName']}", highlight=False)
    if described.get("FailureReason"):
        out.print(f"[red]failure:[/red] {described['FailureReason']}", highlight=False)
    out.print(steps_table(steps))
    for table in (rules_table(sm_client, steps), trials_table(sm_client, steps)):
        if table is not None:
            out.print(table)


# --- output for scripts --------------------------------------------------------------------------------------------

OUTPUT_FORMATS = ("table", "json")


def add_output_argument(parser: Any) -> None:
    """``--output table|json`` of every read command (the JSON shapes are listed in docs/CONTRACTS.md §10)."""
    parser.add_argument("--output", choices=OUTPUT_FORMATS, default="table",
                        help="a table (default), or JSON with stable keys for scripts")


def jsonable(value: Any) -> Any:
    """``value`` with datetimes and other non-JSON values as strings, ``ResponseMetadata`` dropped."""
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k != "ResponseMetadata"}
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def print_json(value: Any) -> None:
    """The one way read commands print JSON (stdout, indented, ISO-8601 times)."""
    sys.stdout.write(json.dumps(jsonable(value), indent=2) + "\n")


def executions_table(summaries: list[Mapping[str, Any]]) -> Table:
    """``ListPipelineExecutions`` summaries, newest first."""
    table = Table(title="Executions")
    for col in ("Execution", "Status", "Started", "Display name", "ARN"):
        table.add_column(col, overflow="fold")
    for summary in summaries:
        arn = summary.get("PipelineExecutionArn", "")
        table.add_row(_arn_name(arn), str(summary.get("PipelineExecutionStatus", "")),
                      _iso(summary.get("StartTime")), str(summary.get("PipelineExecutionDisplayName") or ""), arn)
    return table


# --- progress ---------------------------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    value = max(0, int(value))
    return f"{value // 3600}h{value % 3600 // 60:02d}m" if value >= 3600 else \
        f"{value // 60}m{value % 60:02d}s" if value >= 60 else f"{value}s"


def _hyperparameter(value: Any) -> str:
    text = str(value or "")
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


def _elapsed(start: Any, now: datetime) -> float:
    return (now - start).total_seconds() if isinstance(start, datetime) else 0.0


def job_epochs(described: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """``(epochs done, epochs planned)`` of a training job from ``DescribeTrainingJob``: the ``epoch`` metric
    (``FinalMetricDataList``, which SageMaker updates while the job runs) and the ``epochs`` hyperparameter."""
    done = next((m.get("Value") for m in described.get("FinalMetricDataList") or []
                 if m.get("MetricName") == "epoch"), None)
    planned = _hyperparameter((described.get("HyperParameters") or {}).get("epochs"))
    return (int(done) if isinstance(done, int | float) else None, int(planned) if planned.isdigit() else None)


def training_progress(described: Mapping[str, Any], now: datetime) -> str:
    """``epoch 2/5 · 40s · ETA 1m00s`` of a running training job (the ETA from the mean epoch time so far)."""
    elapsed = _elapsed(described.get("TrainingStartTime") or described.get("CreationTime"), now)
    done, planned = job_epochs(described)
    if not planned:
        return f"{_seconds(elapsed)}"
    text = f"epoch {done or 0}/{planned} · {_seconds(elapsed)}"
    if done:
        text += f" · ETA {_seconds(elapsed / done * (planned - done))}"
    return text


def tuning_progress(sm_client: Any, tuning_job: str, now: datetime) -> str:
    """``trials 3/12 done, 1 running (epoch 2/5) · ETA 4m10s`` of a running tuning job: the counters of
    ``DescribeHyperParameterTuningJob``, the mean duration of its finished trials, the parallel limit."""
    described = sm_client.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=tuning_job)
    limits = (described.get("HyperParameterTuningJobConfig") or {}).get("ResourceLimits") or {}
    total, parallel = limits.get("MaxNumberOfTrainingJobs"), max(1, limits.get("MaxParallelTrainingJobs") or 1)
    counters = described.get("TrainingJobStatusCounters") or {}
    running = int(counters.get("InProgress") or 0)
    done = sum(int(counters.get(k) or 0) for k in ("Completed", "RetryableError", "NonRetryableError", "Stopped"))
    summaries = _tuning_summaries(sm_client, tuning_job)
    durations = [(s["TrainingEndTime"] - s["TrainingStartTime"]).total_seconds() for s in summaries
                 if isinstance(s.get("TrainingEndTime"), datetime) and isinstance(s.get("TrainingStartTime"), datetime)]
    epochs = [training_progress(sm_client.describe_training_job(TrainingJobName=s["TrainingJobName"]), now)
              for s in summaries if s.get("TrainingJobStatus") == "InProgress"][:3]
    text = f"trials {done}/{total or '?'} done, {running} running" + (f" ({'; '.join(epochs)})" if epochs else "")
    if durations and total:
        mean = sum(durations) / len(durations)
        elapsed = [(now - s["TrainingStartTime"]).total_seconds() for s in summaries
                   if s.get("TrainingJobStatus") == "InProgress" and isinstance(s.get("TrainingStartTime"), datetime)]
        queued = max(0, total - done - running)
        # the running wave's rest (from its oldest trial), then the queued trials' waves
        rest = max(0.0, mean - max(elapsed)) if elapsed else 0.0
        text += f" · ETA {_seconds(rest + -(-queued // parallel) * mean)}"
    return text


def step_progress(sm_client: Any, step: Mapping[str, Any], now: datetime | None = None) -> str:
    """One line of progress of an executing step (tuning trials, training epochs, elapsed time otherwise)."""
    now = now or datetime.now(tz=step["StartTime"].tzinfo if isinstance(step.get("StartTime"), datetime) else None)
    meta = step.get("Metadata") or {}
    try:
        if (meta.get("TuningJob") or {}).get("Arn"):
            return tuning_progress(sm_client, _arn_name(meta["TuningJob"]["Arn"]), now)
        if (meta.get("TrainingJob") or {}).get("Arn"):
            job = sm_client.describe_training_job(TrainingJobName=_arn_name(meta["TrainingJob"]["Arn"]))
            return training_progress(job, now)
    except ClientError as exc:
        logger.debug("progress of %s: %s", step.get("StepName"), exc)
    return _seconds(_elapsed(step.get("StartTime"), now))


def status_record(described: Mapping[str, Any], steps: list[dict[str, Any]],
                  progress: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``status --output json``: ``PipelineExecutionArn``, ``PipelineExecutionStatus``, ``FailureReason``,
    ``Steps`` (``{step: status}``) and ``Progress`` (``{executing step: text}``)."""
    return {"PipelineExecutionArn": described.get("PipelineExecutionArn"),
            "PipelineExecutionStatus": described.get("PipelineExecutionStatus"),
            "FailureReason": described.get("FailureReason"),
            "Steps": {s["StepName"]: s.get("StepStatus") for s in steps},
            "Progress": dict(progress or {})}


def status_table(record: Mapping[str, Any]) -> Table:
    """The table of ``status``: each step, its status, and the progress of those executing."""
    table = Table(title=f"{_arn_name(record.get('PipelineExecutionArn'))} {record.get('PipelineExecutionStatus')}"
                  + (f": {record['FailureReason']}" if record.get("FailureReason") else ""))
    for col in ("Step", "Status", "Progress"):
        table.add_column(col, overflow="fold")
    for name, status in record["Steps"].items():
        table.add_row(name, str(status), record["Progress"].get(name, ""))
    return table
