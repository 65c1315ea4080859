"""Terminal views of SageMaker API answers, for both targets (``python -m pipelines.run describe``).

Everything shown comes from the SageMaker API (``DescribePipelineExecution``, ``ListPipelineExecutionSteps``,
``DescribeTrainingJob``, ``ListTrainingJobsForHyperParameterTuningJob``), so the same view works against SageMaker and
against the local AWS service. When stdout is not a terminal, cells are never truncated.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError
from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)

RULE_STYLES = {"IssuesFound": "yellow", "Error": "red", "InProgress": "cyan"}


def console() -> Console:
    out = Console()
    return out if out.is_terminal else Console(width=10_000, soft_wrap=True)


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
