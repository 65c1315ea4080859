"""Runs one pipeline execution of the local SageMaker service in a process of its own.

``python -m pipelines.local.api.runner start <execution-id>`` runs an execution that ``StartPipelineExecution``
recorded (with the parameters stored with it); ``resume <execution-id>`` retries one
(``RetryPipelineExecution``: succeeded steps kept, failed/stopped/stale ones rerun). The service spawns it detached
(its own session) with the environment that points every AWS client at the service; it logs to
``$MLOPS_HOME/runs/<execution-id>/engine.log``.

The runner records the outcome whatever happens: the engine records a normal end itself; an exception (a bug, a
definition the engine refuses, SIGTERM/SIGINT) marks the steps still running and the execution ``Failed`` with the
reason. Only ``kill -9`` leaves it to the service, which settles an ``Executing`` execution whose process is gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

from pipelines.local.jobs import warm
from pipelines.local.storage.executions import TERMINAL_EXECUTION, ExecutionStore
from pipelines.local.storage.store import runs_dir

logger = logging.getLogger("pipelines.local.api.runner")


class Terminated(BaseException):
    """The runner got SIGTERM/SIGINT: unwinds the engine (which stops its jobs) like Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"the local engine was terminated by {signal.Signals(signum).name}")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def log_path(execution_id: str) -> Path:
    path = runs_dir() / execution_id / "engine.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _setup_logging(path: Path) -> None:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def run(records: ExecutionStore, execution: dict[str, Any], mode: str) -> dict[str, Any]:
    """Run (``start``) or retry (``resume``) a recorded execution in this process; returns the final record."""
    from pipelines.local.engine.core import LocalEngine

    execution_id = execution["execution_id"]
    engine = LocalEngine(execution["definition"], pipeline_name=execution["pipeline_name"], records=records)
    if records.stop_requested(execution_id):  # stopped before the engine began (which clears the flag)
        logger.info("execution %s was stopped before it began", execution_id)
        records.mark_execution(execution_id, "Stopped", "stopped on request")
        return records.get_execution(execution_id) or execution
    if mode == "resume":
        return engine.resume(execution_id)
    # The record exists already (the service answered with its ARN): run it as LocalEngine.start runs the one it
    # creates, with the parameters resolved and stored at StartPipelineExecution.
    return engine._run(execution_id, resumed=False)  # noqa: SLF001


def record_crash(records: ExecutionStore, execution_id: str, exc: BaseException, log: Path) -> str:
    """Mark what the engine left running and the execution ``Failed`` (unless it ended already)."""
    detail = str(exc) if isinstance(exc, Terminated) else f"{type(exc).__name__}: {exc}"
    reason = f"The local engine failed: {detail} (see {log})"
    records.mark_stale_steps(execution_id, reason)
    current = records.get_execution(execution_id)
    if current is not None and current["status"] not in TERMINAL_EXECUTION:
        records.mark_execution(execution_id, "Failed", reason)
    return reason


def _claim(records: ExecutionStore, execution_id: str) -> None:
    """This process runs the execution from now on (``resume`` checks that no other live process does)."""
    records.conn.execute("UPDATE executions SET pid = ? WHERE execution_id = ? AND status = 'Executing'",
                         (os.getpid(), execution_id))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.local.api.runner",
                                     description="Run one execution of the local SageMaker service")
    parser.add_argument("mode", choices=("start", "resume"))
    parser.add_argument("execution_id")
    args = parser.parse_args(argv)
    log = log_path(args.execution_id)
    _setup_logging(log)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    records = ExecutionStore()
    execution = records.get_execution(args.execution_id)
    if execution is None:
        logger.error("no execution %s recorded", args.execution_id)
        return 2
    _claim(records, args.execution_id)
    logger.info("runner %s of execution %s (pid %d)", args.mode, args.execution_id, os.getpid())
    if warm.uses_project_environment(execution["definition"]):
        warm.ZYGOTES.prestart()  # preloads torch while the engine reads the definition and runs the first steps
    try:
        final = run(records, execution, args.mode)
    except BaseException as exc:  # noqa: BLE001 -- every end is recorded, none is left Executing
        logger.error("execution %s: %s", args.execution_id, "".join(traceback.format_exception(exc)).rstrip())
        reason = record_crash(records, args.execution_id, exc, log)
        logger.error("execution %s recorded as Failed: %s", args.execution_id, reason)
        return 1
    logger.info("execution %s ended %s", args.execution_id, final["status"])
    return 0 if final["status"] == "Succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
