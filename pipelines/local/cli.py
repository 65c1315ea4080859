"""Local-target commands of ``python -m pipelines.run`` (docs/CONTRACTS.md §10).

``add_local_subcommands(subparsers)`` adds the local-only commands (``report``, and ``models``/``endpoints`` from
:mod:`pipelines.local.cli_models`); ``dispatch(args, build_definition)`` runs any command against the local engine:
``definition``, ``upsert``, ``start [--param N=V ...]``, ``describe``/``status``, ``list-executions``, ``retry``,
``stop``, ``report``, ``models ...``, ``endpoints ...``. ``build_definition(upload)`` uploads the code bundles through
``upload(s3_uri, data)`` (here: into the local artifact store) and returns the definition JSON.

``build_parser()``/``main()`` give the same commands standalone (``python -m pipelines.local.cli``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from pipelines.local import store
from pipelines.local.executions import ExecutionStore, iso
from pipelines.local.resolver import ParameterError, parse_param_overrides

logger = logging.getLogger(__name__)
console = Console()
err_console = Console(stderr=True)

DEFAULT_PIPELINE_NAME = "ImageClassificationPipeline"
BuildDefinition = Callable[[Callable[[str, bytes], None]], str]


def add_local_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``report`` and (when available) ``models``/``endpoints`` to the CLI's subparsers."""
    p = subparsers.add_parser("report", help="print the profiler report path(s) of an execution's training steps")
    p.add_argument("execution", nargs="?", default="latest", help="execution id (or prefix, or 'latest')")
    p.set_defaults(command="report")
    p = subparsers.add_parser("gc", help="remove old finished executions' job directories (runs/); artifacts, "
                              "registry and endpoints are kept")
    p.add_argument("--retention-days", type=float, default=None,
                   help="keep run directories of executions that ended within this many days "
                        "(default 14, env MLOPS_GC_RETENTION_DAYS)")
    p.add_argument("--keep-last", type=int, default=5, help="always keep the newest N executions (default 5)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p.set_defaults(command="gc")
    try:
        from pipelines.local import cli_models
    except ImportError as exc:  # the registry CLI is optional for the engine
        logger.debug("models/endpoints commands unavailable: %s", exc)
        return
    cli_models.add_subcommands(subparsers)


def add_core_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """The pipeline commands (also defined by ``pipelines/run.py``; used here for the standalone CLI)."""
    subparsers.add_parser("definition", help="print the pipeline definition JSON").set_defaults(command="definition")
    subparsers.add_parser("upsert", help="store the pipeline definition").set_defaults(command="upsert")
    p = subparsers.add_parser("start", help="run the pipeline locally (foreground)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="override a parameter")
    add_start_no_cache(p)
    p.set_defaults(command="start")
    for name in ("describe", "status"):
        p = subparsers.add_parser(name, help="an execution's steps, statuses, failure reasons and rule results")
        p.add_argument("execution", nargs="?", default="latest")
        p.set_defaults(command=name)
    p = subparsers.add_parser("list-executions", help="recent executions")
    p.add_argument("--max-results", type=int, default=20)
    p.set_defaults(command="list-executions")
    p = subparsers.add_parser("retry", help="resume a failed/stopped execution from its failed steps")
    p.add_argument("execution", nargs="?", default="latest")
    p.set_defaults(command="retry")
    p = subparsers.add_parser("stop", help="stop a running execution")
    p.add_argument("execution", nargs="?", default="latest")
    p.set_defaults(command="stop")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.local.cli", description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline-name", default=os.environ.get("MLOPS_PIPELINE_NAME", DEFAULT_PIPELINE_NAME))
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_core_subcommands(sub)
    add_local_subcommands(sub)
    return parser


# --------------------------------------------------------------------------------------------------------------

def _arg(args: argparse.Namespace, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return default


def _command(args: argparse.Namespace) -> str:
    group = getattr(args, "cli_group", None)
    if group in ("models", "endpoints"):
        return group
    command = _arg(args, "command", "cmd", "action")
    if not command:
        raise ValueError("no command given")
    return str(command)


def _pipeline_name(args: argparse.Namespace) -> str:
    return str(_arg(args, "pipeline_name", "name", default=DEFAULT_PIPELINE_NAME))


def _uploader(artifacts: store.ArtifactStore) -> Callable[[str, bytes], None]:
    def upload(uri: str, data: bytes) -> None:
        target = artifacts.path(uri)
        if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
            return  # content-addressed: already there
        artifacts.put_bytes(uri, data)
    return upload


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    raw = _arg(args, "param", "params", "parameters", default=[])
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    flat: list[str] = []
    for item in raw:
        flat.extend(item if isinstance(item, list) else [item])
    return parse_param_overrides(flat)


def dispatch(args: argparse.Namespace, build_definition: BuildDefinition) -> int:
    """Run one CLI command against the local engine; returns the process exit code."""
    try:
        command = _command(args)
        if command in ("models", "endpoints"):
            from pipelines.local import cli_models

            return cli_models.run(args)
        handler = _HANDLERS.get(command)
        if handler is None:
            err_console.print(f"[red]error:[/red] command {command!r} is not available for the local target")
            return 2
        return handler(args, build_definition)
    except (LookupError, ParameterError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]: the execution stays recorded; resume it with `retry`")
        return 130


def _cmd_definition(args: argparse.Namespace, build_definition: BuildDefinition) -> int:
    definition = build_definition(_uploader(store.ArtifactStore()))
    sys.stdout.write(definition.rstrip() + "\n")
    return 0


def _cmd_upsert(args: argparse.Namespace, build_definition: BuildDefinition) -> int:
    definition = build_definition(_uploader(store.ArtifactStore()))
    json.loads(definition)
    from pipelines.local.engine import parse_definition

    parse_definition(json.loads(definition))  # refuse what the engine cannot run
    name = _pipeline_name(args)
    ExecutionStore().upsert_pipeline(name, definition)
    console.print(f"pipeline [bold]{name}[/bold] stored in {store.mlops_home() / 'mlops.db'}")
    return 0


#: ``start --no-cache``'s attribute: not ``no_cache``, which is ``pipelines.run``'s global flag (a definition built
#: with caching off); this one keeps the definition and makes one execution skip its cache lookups.
START_NO_CACHE_DEST = "start_no_cache"


def add_start_no_cache(start_parser: argparse.ArgumentParser) -> None:
    """Add ``--no-cache`` to a ``start`` subparser (here and in ``pipelines/run.py``)."""
    start_parser.add_argument("--no-cache", dest=START_NO_CACHE_DEST, action="store_true",
                              help="this execution looks nothing up in the step cache (local engine; its steps' "
                                   "results are still recorded for later executions)")


def run_pipeline(definition: str, pipeline_name: str, overrides: dict[str, Any] | None = None,
                 *, live: bool | None = None, retry_execution: str | None = None,
                 no_cache: bool = False) -> dict[str, Any]:
    """Start (or resume) an execution with the progress view; print and return the summary.

    ``no_cache``: the new execution makes no cache lookups (a resumed one keeps what it was started with)."""
    from pipelines.local.engine import LocalEngine
    from pipelines.local.progress import ProgressView, render_summary, summarize

    view = ProgressView(console=console, live=live)
    records = ExecutionStore()
    engine = LocalEngine(definition, pipeline_name=pipeline_name, observer=view, records=records)
    try:
        if retry_execution:
            execution = engine.resume(retry_execution)
        else:
            execution = engine.start(overrides, no_cache=no_cache)
    finally:
        view.close()
    summary = summarize(execution, records.steps(execution["execution_id"]))
    render_summary(summary, console)
    return summary


def _cmd_start(args: argparse.Namespace, build_definition: BuildDefinition) -> int:
    overrides = _overrides(args)
    definition = build_definition(_uploader(store.ArtifactStore()))
    from pipelines.local.resolver import resolve_parameters

    resolve_parameters(json.loads(definition), overrides)  # fail fast on a bad --param
    name = _pipeline_name(args)
    ExecutionStore().upsert_pipeline(name, definition)
    summary = run_pipeline(definition, name, overrides, no_cache=bool(getattr(args, START_NO_CACHE_DEST, False)))
    return 0 if summary["status"] == "Succeeded" else 1


def _cmd_retry(args: argparse.Namespace, build_definition: BuildDefinition) -> int:
    records = ExecutionStore()
    execution = records.find_execution(_arg(args, "execution", "execution_id", default="latest"))
    summary = run_pipeline(execution["definition"], execution["pipeline_name"],
                           retry_execution=execution["execution_id"])
    return 0 if summary["status"] == "Succeeded" else 1


def _cmd_stop(args: argparse.Namespace, build_definition: BuildDefinition) -> int:
    from pipelines.local.engine import _pid_alive

    records = ExecutionStore()
    execution = records.find_execution(_arg(args, "execution", "execution_id", default="latest"))
    execution_id = execution["execution_id"]
    if execution["status"] != "Executing":
        console.print(f"execution {execution_id} is {execution['status']}; nothing to stop")
        return 0
    records.request_stop(execution_id)
    if not _pid_alive(execution.get("pid")):
        for step in records.mark_stale_steps(execution_id, "stopped (engine not running)"):
            logger.info("marked %s stopped", step)
        records.mark_execution(execution_id, "Stopped", "stopped on request (engine was not running)")
        console.print(f"execution {execution_id} marked Stopped (its engine was not running)")
    else:
        console.print(f"stop requested for execution {execution_id} (engine pid {execution['pid']})")
    return 0


def _cmd_list(args: argparse.Namespace, build_definition: BuildDefinition) -> int:
    records = ExecutionStore()
    rows = records.list_executions(limit=int(_arg(args, "max_results", "limit", default=20)))
    table = Table(title="Pipeline executions")
    for col in ("Execution", "Pipeline", "Status", "Created", "Ended", "Failure"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(row["execution_id"], row["pipeline_name"], row["status"], iso(row["created_at"]),
                      iso(row["ended_at"]), (row.get("failure_reason") or "")[:120])
    console.print(table)
    return 0


def _cmd_describe(args: argparse.Namespace, build_definition: BuildDefinition) -> int:
    records = ExecutionStore()
    execution = records.find_execution(_arg(args, "execution", "execution_id", default="latest"))
    execution_id = execution["execution_id"]
    console.print(f"[bold]{execution_id}[/bold] {execution['pipeline_name']} status={execution['status']} "
                  f"created={iso(execution['created_at'])} ended={iso(execution['ended_at'])}")
    console.print(f"parameters: {json.dumps(execution['parameters'])}", highlight=False)
    if execution.get("failure_reason"):
        console.print(f"[red]failure:[/red] {execution['failure_reason']}", highlight=False)
    table = Table(title="Steps")
    for col in ("Step", "Type", "Status", "Attempt", "Duration", "Details", "Log"):
        table.add_column(col, overflow="fold")
    steps = records.steps(execution_id)
    for step in steps:
        duration = f"{step['ended_at'] - step['started_at']:.0f}s" if step["started_at"] and step["ended_at"] else ""
        details = step.get("failure_reason") or ""
        if step.get("cached_from"):
            details = f"cache hit from {step['cached_from']}"
        elif not details and step.get("properties"):
            details = _step_details(step)
        table.add_row(step["step_name"], step["step_type"], step["status"], str(step["attempt"]), duration,
                      details, step.get("log_path") or "")
    console.print(table)
    rules = [(step["step_name"], r) for step in steps for r in step.get("rule_statuses") or []]
    if rules:
        rtable = Table(title="Debugger and Profiler rules")
        for col in ("Step", "Rule", "Status", "Details"):
            rtable.add_column(col, overflow="fold")
        for step_name, r in rules:
            status = str(r.get("RuleEvaluationStatus"))
            style = {"IssuesFound": "yellow", "Error": "red"}.get(status, "green")
            rtable.add_row(step_name, str(r.get("RuleConfigurationName")), f"[{style}]{status}[/{style}]",
                           str(r.get("StatusDetails") or ""))
        console.print(rtable)
    trials = records.trials(execution_id)
    if trials:
        ttable = Table(title="Tuning trials")
        for col in ("#", "Job", "Status", "Objective", "Hyperparameters"):
            ttable.add_column(col, overflow="fold")
        for t in trials:
            ttable.add_row(str(t["trial_number"]), t["job_name"], t["status"],
                           "" if t["objective"] is None else f"{t['objective']:.4f}", json.dumps(t["hyperparameters"]))
        console.print(ttable)
    return 0


def _step_details(step: dict[str, Any]) -> str:
    props = step["properties"]
    if step["step_type"] == "Condition":
        return f"Outcome={props.get('Outcome')} {json.dumps(props.get('EvaluatedConditions'), default=str)}"
    if step["step_type"] == "Tuning":
        best = props.get("BestTrainingJob") or {}
        return f"best {best.get('TrainingJobName')} {json.dumps(best.get('TunedHyperParameters'))}"
    if step["step_type"] == "Training":
        return str((props.get("ModelArtifacts") or {}).get("S3ModelArtifacts", ""))
    if step["step_type"] == "RegisterModel":
        return f"{props.get('ModelPackageArn')} ({props.get('ModelApprovalStatus')})"
    if step["step_type"] == "Lambda":
        return json.dumps(props.get("OutputParameters"), default=str)
    return ""


def _cmd_report(args: argparse.Namespace, build_definition: BuildDefinition) -> int:
    records = ExecutionStore()
    execution = records.find_execution(_arg(args, "execution", "execution_id", default="latest"))
    reports = [(s["step_name"], (s.get("properties") or {}).get("ProfilerReport"))
               for s in records.steps(execution["execution_id"])]
    reports = [(name, path) for name, path in reports if path]
    if not reports:
        err_console.print(f"execution {execution['execution_id']} has no profiler report "
                          "(no training step with a ProfilerConfig has succeeded)")
        return 1
    for name, path in reports:
        sys.stdout.write(f"{name}\t{path}\n")
    return 0


def _cmd_gc(args: argparse.Namespace, build_definition: BuildDefinition) -> int:
    from pipelines.local import gc

    report = gc.collect(args.retention_days, args.keep_last, dry_run=args.dry_run)
    verb = "would remove" if report.dry_run else "removed"
    for path in report.removed:
        console.print(f"{verb} {path}", highlight=False)
    console.print(f"{verb} {len(report.removed)} run director{'y' if len(report.removed) == 1 else 'ies'} "
                  f"({report.freed_bytes / 2**20:.1f} MiB); kept {report.kept}", highlight=False)
    return 0


_HANDLERS: dict[str, Callable[[argparse.Namespace, BuildDefinition], int]] = {
    "definition": _cmd_definition,
    "upsert": _cmd_upsert,
    "start": _cmd_start,
    "describe": _cmd_describe,
    "status": _cmd_describe,
    "list-executions": _cmd_list,
    "retry": _cmd_retry,
    "stop": _cmd_stop,
    "report": _cmd_report,
    "gc": _cmd_gc,
}


def default_build_definition(upload: Callable[[str, bytes], None]) -> str:
    """Build the project's pipeline definition for the local target, uploading the code bundles first."""
    from pipelines import packaging
    from pipelines import pipeline as pipeline_mod

    bundles = packaging.build_code_bundles(packaging.project_root())
    locations = packaging.code_locations(store.LOCAL_BUCKET, pipeline_mod.DEFAULT_BASE_JOB_PREFIX, bundles)
    packaging.upload_code_bundles(bundles, locations, upload)
    pipeline = pipeline_mod.get_pipeline(store.LOCAL_REGION, store.LOCAL_ROLE_ARN, store.LOCAL_BUCKET, locations,
                                         deploy_function_arn=store.DEPLOY_FUNCTION_ARN)
    return pipeline_mod.pipeline_definition(pipeline)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return dispatch(args, default_build_definition)


if __name__ == "__main__":
    sys.exit(main())
