"""What a person watching ``python -m pipelines.run start`` sees: a live per-step table (``rich``) on a terminal,
plain log lines otherwise (CI), and a final summary (accuracy, chosen hyperparameters, registered model, endpoint).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipelines.local.engine.resolver import decode_hyperparameter

logger = logging.getLogger("pipelines.local.engine.progress")

_STYLE = {"Succeeded": "green", "Failed": "red", "Executing": "yellow", "Stopped": "magenta",
          "NotExecuted": "dim", "Pending": "dim"}


class ProgressView:
    """Engine observer rendering a live table (TTY) or logging status changes (non-TTY)."""

    def __init__(self, console: Console | None = None, live: bool | None = None) -> None:
        self.console = console or Console()
        self.live_enabled = self.console.is_terminal if live is None else live
        self._rows: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._live: Live | None = None
        self.execution_id = ""

    # engine observer --------------------------------------------------------------------------------------
    def execution_started(self, execution_id: str, steps: list[tuple[str, str]]) -> None:
        self.execution_id = execution_id
        with self._lock:
            for name, stype in steps:
                self._rows.setdefault(name, {"type": stype, "status": "Pending", "start": None, "end": None,
                                             "message": ""})
        if self.live_enabled and self._live is None:
            self._live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False,
                              get_renderable=self._table)
            self._live.start()
        else:
            logger.info("execution %s: %d steps", execution_id, len(steps))

    def step_status(self, step_name: str, status: str, detail: str = "") -> None:
        with self._lock:
            row = self._rows.setdefault(step_name, {"type": "", "status": "Pending", "start": None, "end": None,
                                                    "message": ""})
            row["status"] = status
            if status == "Executing":
                row["start"], row["end"] = time.time(), None
            elif row["start"] and status != "NotExecuted":
                row["end"] = time.time()
            if detail:
                row["message"] = detail
        if not self._live:
            logger.info("step %-28s %-11s %s", step_name, status, detail)

    def step_message(self, step_name: str, message: str) -> None:
        if not message:
            return
        with self._lock:
            if step_name in self._rows:
                self._rows[step_name]["message"] = message
        if not self._live and (message.startswith("epoch=") or message.startswith("trial ")):
            logger.info("step %-28s %s", step_name, message)

    def execution_finished(self, execution: Mapping[str, Any], steps: list[dict[str, Any]]) -> None:
        if self._live:
            self._live.update(self._table())
            self._live.stop()
            self._live = None

    def close(self) -> None:
        if self._live:
            self._live.stop()
            self._live = None

    # rendering -------------------------------------------------------------------------------------------
    def _table(self) -> Table:
        table = Table(title=f"Pipeline execution {self.execution_id}", expand=True)
        table.add_column("Step", no_wrap=True)
        table.add_column("Type", no_wrap=True)
        table.add_column("Status", no_wrap=True)
        table.add_column("Time", justify="right", no_wrap=True)
        table.add_column("Latest", overflow="ellipsis", no_wrap=True, ratio=1)
        now = time.time()
        with self._lock:
            rows = list(self._rows.items())
        for name, row in rows:
            duration = ""
            if row["start"]:
                duration = f"{(row['end'] or now) - row['start']:.0f}s"
            style = _STYLE.get(row["status"], "")
            table.add_row(name, row["type"], f"[{style}]{row['status']}[/]" if style else row["status"],
                          duration, row["message"])
        return table


def summarize(execution: Mapping[str, Any], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline facts of an execution from its step records (for the summary and for the demo)."""
    summary: dict[str, Any] = {"execution_id": execution["execution_id"], "status": execution["status"],
                               "failure_reason": execution.get("failure_reason")}
    for step in steps:
        props = step.get("properties") or {}
        stype = step.get("step_type")
        if step.get("status") != "Succeeded":
            continue
        if stype == "Condition":
            for evaluation in props.get("EvaluatedConditions") or []:
                left = evaluation.get("LeftValue")
                if isinstance(left, (int, float)) and not isinstance(left, bool):
                    summary.setdefault("accuracy", left)
                    summary.setdefault("threshold", evaluation.get("RightValue"))
        elif stype == "Tuning":
            best = props.get("BestTrainingJob") or {}
            summary["best_training_job"] = best.get("TrainingJobName")
            summary["hyperparameters"] = {k: decode_hyperparameter(v)
                                          for k, v in (best.get("TunedHyperParameters") or {}).items()}
            metric = best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
            summary["tuning_objective"] = {metric.get("MetricName"): metric.get("Value")}
            summary["trials"] = len(props.get("TrainingJobSummaries") or [])
        elif stype == "RegisterModel":
            summary["model_package_arn"] = props.get("ModelPackageArn")
            summary["model_package_version"] = props.get("ModelPackageVersion")
            summary["model_approval_status"] = props.get("ModelApprovalStatus")
        elif stype == "Lambda":
            out = props.get("Output") or {}
            if out.get("endpoint_name"):
                summary["endpoint_name"] = out.get("endpoint_name")
                summary["deploy_status"] = out.get("status")
                summary["deploy_message"] = out.get("message")
        elif stype == "Training":
            artifacts = (props.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
            if artifacts:
                summary["model_artifacts"] = artifacts
            if props.get("ProfilerReport"):
                summary["profiler_report"] = props["ProfilerReport"]
    if summary.get("endpoint_name"):
        try:
            from pipelines.local.serving import endpoints

            endpoint = endpoints.get(summary["endpoint_name"])
            summary["endpoint_url"] = endpoint.url if endpoint.alive else None
        except Exception:  # noqa: BLE001 -- the endpoint may not exist (nothing approved yet)
            summary["endpoint_url"] = None
    return summary


def render_summary(summary: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the summary as a small table."""
    console = console or Console()
    table = Table(title="Summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    status = summary.get("status")
    table.add_row("Execution", f"{summary.get('execution_id')} [{_STYLE.get(status, '')}]{status}[/]")
    if summary.get("failure_reason"):
        table.add_row("Failure", str(summary["failure_reason"]))
    if "accuracy" in summary:
        table.add_row("Test accuracy", f"{summary['accuracy']:.4f} (threshold {summary.get('threshold')})")
    if summary.get("hyperparameters"):
        table.add_row("Best hyperparameters", json.dumps(summary["hyperparameters"]))
        table.add_row("Tuning", f"{summary.get('trials')} trials, best {summary.get('tuning_objective')}")
    if summary.get("model_package_arn"):
        table.add_row("Registered model", f"version {summary.get('model_package_version')} "
                      f"({summary.get('model_approval_status')}) {summary['model_package_arn']}")
    if summary.get("endpoint_name"):
        table.add_row("Endpoint", f"{summary['endpoint_name']} {summary.get('endpoint_url') or ''} "
                      f"[{summary.get('deploy_status')}]")
    elif summary.get("deploy_message"):
        table.add_row("Deploy", str(summary["deploy_message"]))
    if summary.get("profiler_report"):
        table.add_row("Profiler report", str(summary["profiler_report"]))
    console.print(table)
