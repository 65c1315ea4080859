"""What every ``run_<name>.py`` driver shares: the small synthetic abalone data, S3 uploads, a runner for a vendored
notebook's cells, and one execution of a pipeline (upsert, start, wait, ``list_steps``) reported as JSON.

A driver is the only code of a conformance case that is ours: the vendored pipeline (``vendored/<name>/``) is run as
its authors wrote it. The driver does what the authors' own instructions leave to the user -- the execution role,
putting the dataset where the pipeline reads it, starting and waiting -- and nothing else.

The driver's last line of stdout is one JSON object (:func:`report`)::

    {"pipeline": ..., "error": null | "<phase>: <exception>", "runs": [{"label", "parameters", "execution_arn",
     "status", "failure_reason", "steps": <list_steps()>, "error"}], "extra": {...}}

``error`` is set when the pipeline could not be built, upserted or started (the local service refuses a definition
its engine cannot run at ``upsert``); the test then fails with that message.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import boto3

HERE = Path(__file__).resolve().parent
VENDORED = HERE / "vendored"

#: The UCI abalone columns, in the file's order; the file has no header.
ABALONE_COLUMNS = ("sex", "length", "diameter", "height", "whole_weight", "shucked_weight", "viscera_weight",
                   "shell_weight", "rings")
#: Rows in the generated dataset: enough for the 70/15/15 split the pipelines make, small enough for 2 CPUs.
ABALONE_ROWS = 400
#: Rows in the generated batch-transform input.
BATCH_ROWS = 40


def abalone_rows(n: int = ABALONE_ROWS, seed: int = 13) -> list[list[Any]]:
    """``n`` synthetic abalone records with the real columns and plausible values. ``rings`` is a near-deterministic
    function of the shell weight (noise sd 0.5), so every pipeline's XGBoost model reaches an MSE well under the
    6.0 threshold their ConditionSteps check, and the registration branch is the one taken."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        sex = rng.choice("MFI")
        length = rng.uniform(0.15, 0.75)
        diameter = 0.8 * length + rng.gauss(0, 0.01)
        height = 0.34 * length + rng.gauss(0, 0.01)
        whole = 4.2 * length ** 3 + abs(rng.gauss(0, 0.02))
        shucked, viscera, shell = 0.43 * whole, 0.22 * whole, 0.29 * whole
        rings = max(1, round(3 + 16 * shell + rng.gauss(0, 0.5)))
        rows.append([sex, *(round(v, 4) for v in (length, diameter, height, whole, shucked, viscera, shell)), rings])
    return rows


def batch_features(n: int = BATCH_ROWS, seed: int = 29) -> list[list[float]]:
    """Records shaped like the pipelines' preprocessing output without the label (what the seed code's
    ``abalone-dataset-batch`` holds): 7 standardized numeric features, then the one-hot ``sex`` (F, I, M)."""
    rows = abalone_rows(n, seed)
    columns = list(zip(*(r[1:8] for r in rows), strict=True))
    stats = [(sum(c) / len(c), (sum((x - sum(c) / len(c)) ** 2 for x in c) / len(c)) ** 0.5 or 1.0) for c in columns]
    out = []
    for r in rows:
        numeric = [round((x - mean) / std, 6) for x, (mean, std) in zip(r[1:8], stats, strict=True)]
        out.append(numeric + [float(r[0] == s) for s in "FIM"])
    return out


def csv_bytes(rows: Sequence[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


def put_object(uri: str, body: bytes) -> str:
    """Upload ``body`` to ``uri`` (creating the bucket if it is missing, as the pipelines' public dataset buckets are
    locally); returns ``uri``."""
    bucket, key = split_s3(uri)
    s3 = boto3.client("s3")
    try:
        s3.head_bucket(Bucket=bucket)
    except s3.exceptions.ClientError:
        s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=body)
    return uri


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def local_role() -> str:
    from pipelines.local.storage.store import LOCAL_ROLE_ARN

    return LOCAL_ROLE_ARN


# --- vendored notebooks ---------------------------------------------------------------------------------------------

class Notebook:
    """Runs a vendored notebook's code cells in order in one namespace, as Jupyter would, in ``workdir``:
    ``%%writefile`` cells write their file, ``!mkdir -p`` makes the directory. ``skip`` (cell index -> a text the
    cell must contain) and ``substitute`` (cell index -> [(old, new)], each ``old`` occurring exactly once) are the
    driver's only changes, each checked against the cell so a different notebook cannot be run by mistake;
    :attr:`changes` lists them for the report. Stops before the first cell containing ``stop_before``. ``workdir``
    stays the process's working directory afterwards, as it stays the kernel's: the SDK resolves the notebook's
    relative ``code=`` paths when the definition is built, at ``upsert``."""

    def __init__(self, path: Path, workdir: Path, *, skip: Mapping[int, str] | None = None,
                 substitute: Mapping[int, Sequence[tuple[str, str]]] | None = None, stop_before: str) -> None:
        self.path, self.workdir = path, workdir
        self.skip, self.substitute, self.stop_before = dict(skip or {}), dict(substitute or {}), stop_before
        self.changes: list[str] = []

    def cells(self) -> Iterator[tuple[int, str]]:
        for index, cell in enumerate(json.loads(self.path.read_text())["cells"]):
            if cell["cell_type"] == "code":
                yield index, "".join(cell["source"])

    def run(self, namespace: dict[str, Any]) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        used = set()
        os.chdir(self.workdir)
        for index, source in self.cells():
            if self.stop_before in source:
                break
            if index in self.skip:
                if self.skip[index] not in source:
                    raise RuntimeError(f"{self.path.name} cell {index} is not the cell to skip: {source[:200]!r}")
                self.changes.append(f"cell {index} skipped: {source.strip()[:120]!r}")
                used.add(index)
                continue
            for old, new in self.substitute.get(index, ()):
                if source.count(old) != 1:
                    raise RuntimeError(f"{self.path.name} cell {index}: {old!r} does not occur exactly once")
                source = source.replace(old, new)
                self.changes.append(f"cell {index}: {old!r} -> {new!r}")
                used.add(index)
            self._run_cell(index, source, namespace)
        else:
            raise RuntimeError(f"{self.path.name}: no cell contains {self.stop_before!r}")
        unused = (set(self.skip) | set(self.substitute)) - used
        if unused:
            raise RuntimeError(f"{self.path.name}: cells {sorted(unused)} to change come after {self.stop_before!r}")
        return namespace

    def _run_cell(self, index: int, source: str, namespace: dict[str, Any]) -> None:
        if source.startswith("%%writefile"):
            first, _, body = source.partition("\n")
            target = Path(first.split(None, 1)[1].strip())
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body if body.endswith("\n") else body + "\n")  # IPython adds the final newline
            return
        lines = source.splitlines()
        shell = [line for line in lines if line.lstrip().startswith("!")]
        for line in shell:
            match = re.fullmatch(r"\s*!mkdir -p (\S+)\s*", line)
            if not match:
                raise RuntimeError(f"{self.path.name} cell {index}: shell line {line!r} has no local equivalent; "
                                   "the driver must skip or substitute it")
            Path(match.group(1)).mkdir(parents=True, exist_ok=True)
        code = "\n".join(line for line in lines if not line.lstrip().startswith("!"))
        if code.strip():
            exec(compile(code, f"{self.path.name}[cell {index}]", "exec"), namespace)  # noqa: S102


# --- one execution --------------------------------------------------------------------------------------------------

def execute(pipeline: Any, label: str, parameters: Mapping[str, Any] | None = None, *,
            timeout_s: float | None = None) -> tuple[dict[str, Any], Any]:
    """Start ``pipeline`` (already upserted) with ``parameters``, wait for it to finish (stopping it past
    ``timeout_s``); its run record and the SDK's ``_PipelineExecution`` (None if it did not start)."""
    timeout_s = timeout_s if timeout_s is not None else float(os.environ.get("CONFORMANCE_WAIT_S", "1200"))
    run: dict[str, Any] = {"label": label, "parameters": dict(parameters or {}), "execution_arn": None,
                           "status": None, "failure_reason": None, "steps": [], "error": None}
    try:
        execution = pipeline.start(parameters=dict(parameters or {})) if parameters else pipeline.start()
    except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
        run["error"] = f"start: {type(exc).__name__}: {exc}"
        return run, None
    run["execution_arn"] = execution.arn
    sm = boto3.client("sagemaker")
    deadline = time.monotonic() + timeout_s
    while True:
        described = sm.describe_pipeline_execution(PipelineExecutionArn=execution.arn)
        status = described["PipelineExecutionStatus"]
        if status not in ("Executing", "Stopping"):
            break
        if time.monotonic() > deadline:
            run["error"] = f"wait: still {status} after {timeout_s:.0f} s; stopped"
            with contextlib.suppress(Exception):
                sm.stop_pipeline_execution(PipelineExecutionArn=execution.arn)
            break
        time.sleep(3)
    run["status"] = status
    run["failure_reason"] = described.get("FailureReason")
    run["steps"] = execution.list_steps()
    return run, execution


def main(build: Callable[[dict[str, Any]], tuple[Any, list[tuple[str, dict[str, Any] | None]]]], *,
         name: str | None = None, after: Callable[[dict[str, Any], list[Any]], None] | None = None) -> int:
    """Build the pipeline (``build(extra)`` -> (pipeline, [(label, parameters)])), upsert it with the local role, run
    each execution in turn, then ``after(extra, executions)`` (the SDK's execution objects, None for one that did
    not start); print the report as the last line."""
    report: dict[str, Any] = {"pipeline": name, "error": None, "runs": [], "extra": {}}
    phase = "build"
    try:
        pipeline, runs = build(report["extra"])
        report["pipeline"] = pipeline.name
        if os.environ.get("CONFORMANCE_DEFINITION_ONLY"):  # for looking at what the SDK built; nothing is run
            report["extra"]["definition"] = json.loads(pipeline.definition())
            print("\n" + json.dumps(report, default=str))
            return 0
        phase = "upsert"
        pipeline.upsert(role_arn=local_role())
        executions = []
        for label, parameters in runs:
            run, execution = execute(pipeline, label, parameters)
            report["runs"].append(run)
            executions.append(execution)
        if after is not None:
            phase = "after"
            after(report["extra"], executions)
    except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
        report["error"] = f"{phase}: {type(exc).__name__}: {exc}"
        report["extra"]["traceback"] = traceback.format_exc()[-4000:]
    sys.stdout.flush()
    print("\n" + json.dumps(report, default=str))
    return 0
