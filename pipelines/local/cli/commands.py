"""The local target's own commands of ``python -m pipelines.run`` (docs/CONTRACTS.md §10).

The pipeline commands (``definition``, ``upsert``, ``start``, ``status``/``describe``, ``list-executions``,
``retry``, ``stop``) are not here: ``pipelines/run.py`` runs them with boto3 for both targets, locally against the
local AWS service (:mod:`pipelines.local.api`). What SageMaker has no API for lives here:

- ``local up [--port P]`` / ``local down`` / ``local status``: the local AWS service itself;
- ``report [EXECUTION]``: the profiler report path(s) of an execution's training steps;
- ``gc``: old finished executions' job directories;
- ``ui [--port P] [--open]``: the local Studio (:mod:`pipelines.local.ui`);
- ``models ...`` / ``endpoints ...`` (:mod:`pipelines.local.cli.models`).

``add_local_subcommands(subparsers)`` adds them; ``dispatch(args)`` runs one and returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from rich.console import Console

from pipelines import views
from pipelines.local.storage.executions import ExecutionStore

logger = logging.getLogger(__name__)
console = Console()
err_console = Console(stderr=True)


def add_local_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``local``, ``report``, ``gc`` and (when available) ``models``/``endpoints`` to the CLI's subparsers."""
    p = subparsers.add_parser("local", help="the local AWS service: up (idempotent, prints the URL), down, status")
    p.add_argument("local_command", choices=("up", "down", "status"))
    p.add_argument("--port", type=int, default=0, help="port for `local up` (default: a free one)")
    views.add_output_argument(p)
    p.set_defaults(command="local")
    p = subparsers.add_parser("report", help="print the profiler report path(s) of an execution's training steps")
    p.add_argument("execution", nargs="?", default="latest", help="execution id (or prefix, or 'latest')")
    views.add_output_argument(p)
    p.set_defaults(command="report")
    p = subparsers.add_parser("gc", help="remove old finished executions' job directories (runs/); artifacts, "
                              "registry and endpoints are kept")
    p.add_argument("--retention-days", type=float, default=None,
                   help="keep run directories of executions that ended within this many days "
                        "(default 14, env MLOPS_GC_RETENTION_DAYS)")
    p.add_argument("--keep-last", type=int, default=5, help="always keep the newest N executions (default 5)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p.set_defaults(command="gc")
    p = subparsers.add_parser("ui", help="the local Studio: executions, trials, registry approve/reject, endpoints "
                              "in a browser (127.0.0.1 only; docs/UI.md)")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default %(default)s; 0: a free one)")
    p.add_argument("--open", action="store_true", help="open it in the default browser")
    p.set_defaults(command="ui")
    try:
        from pipelines.local.cli import models as cli_models
    except ImportError as exc:  # the registry CLI is optional for the engine
        logger.debug("models/endpoints commands unavailable: %s", exc)
        return
    cli_models.add_subcommands(subparsers)


def dispatch(args: argparse.Namespace) -> int:
    """Run one local-only command; returns the process exit code."""
    try:
        group = getattr(args, "cli_group", None)
        if group in ("models", "endpoints"):
            from pipelines.local.cli import models as cli_models

            return cli_models.run(args)
        handler = _HANDLERS.get(args.command)
        if handler is None:
            err_console.print(f"[red]error:[/red] command {args.command!r} is not a local command")
            return 2
        return handler(args)
    except (LookupError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1


def _cmd_local(args: argparse.Namespace) -> int:
    from pipelines.local.api import server

    if args.local_command == "up":
        url = server.up(port=args.port)
        sys.stdout.write(url + "\n")
        env = server.client_environment(url)
        err_console.print("point AWS clients at it:\n  export " + " ".join(f"{k}={v}" for k, v in env.items()),
                          highlight=False)
        return 0
    if args.local_command == "down":
        stopped = server.down()
        console.print("stopped the local AWS service" if stopped else "the local AWS service was not running")
        return 0
    running = server.status()
    if args.output == "json":
        views.print_json({"Running": running is not None, "Url": (running or {}).get("url"),
                          "Pid": (running or {}).get("pid")})
        return 0 if running is not None else 1
    if running is None:
        console.print("the local AWS service is not running (start it: python -m pipelines.run local up)")
        return 1
    sys.stdout.write(f"{running['url']}\tpid {running['pid']}\n")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    records = ExecutionStore()
    execution = records.find_execution(getattr(args, "execution", None) or "latest")
    reports = [(s["step_name"], (s.get("properties") or {}).get("ProfilerReport"))
               for s in records.steps(execution["execution_id"])]
    reports = [(name, path) for name, path in reports if path]
    if args.output == "json":
        views.print_json({"PipelineExecutionId": execution["execution_id"],
                          "Reports": [{"StepName": name, "ProfilerReport": path} for name, path in reports]})
        return 0 if reports else 1
    if not reports:
        err_console.print(f"execution {execution['execution_id']} has no profiler report "
                          "(no training step with a ProfilerConfig has succeeded)")
        return 1
    for name, path in reports:
        sys.stdout.write(f"{name}\t{path}\n")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from pipelines.local.storage import gc

    report = gc.collect(args.retention_days, args.keep_last, dry_run=args.dry_run)
    verb = "would remove" if report.dry_run else "removed"
    for path in report.removed:
        console.print(f"{verb} {path}", highlight=False)
    console.print(f"{verb} {len(report.removed)} run director{'y' if len(report.removed) == 1 else 'ies'} "
                  f"({report.freed_bytes / 2**20:.1f} MiB); kept {report.kept}", highlight=False)
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from pipelines.local.ui import server as ui_server

    def announce(url: str) -> None:
        sys.stdout.write(url + "\n")
        sys.stdout.flush()
        err_console.print(f"local Studio on {url} (Ctrl-C to stop)", highlight=False)

    try:
        return ui_server.serve(port=args.port, open_browser=args.open, announce=announce)
    except OSError as exc:
        err_console.print(f"[red]error:[/red] cannot serve on 127.0.0.1:{args.port}: {exc.strerror or exc}",
                          highlight=False)
        return 2


_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {"local": _cmd_local, "report": _cmd_report,
                                                              "gc": _cmd_gc, "ui": _cmd_ui}
