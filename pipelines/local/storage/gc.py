"""``gc``: reclaim the disk that finished local executions' job directories hold.

Every job runs in ``$MLOPS_HOME/runs/<execution-id>/<step>/`` (its ``/opt/ml``: downloaded inputs, extracted code,
the model before packing, logs) -- a few hundred MB per tiny run, kept so that a failed run can be inspected. What
the pipeline *produced* lives in the artifact store (``artifacts/``, the local S3) and in SQLite, and ``gc`` never
touches either: cached steps, registered models and endpoints keep working.

Policy (defaults, configurable): an execution's run directory is removed when the execution has ended
(``Succeeded``/``Failed``/``Stopped``) more than ``retention_days`` (14, env ``MLOPS_GC_RETENTION_DAYS``) ago and
it is not among the ``keep_last`` (5) newest executions. Directories under ``runs/`` that no execution owns
(left by an engine that was killed) go when they are older than the retention too. Executions still running are
never touched. Their records stay (``describe`` still works; logs under ``runs/`` are gone and say so).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.local.storage.executions import TERMINAL_EXECUTION, ExecutionStore
from pipelines.local.storage.store import runs_dir

logger = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = 14.0
DEFAULT_KEEP_LAST = 5


@dataclass
class GcReport:
    removed: list[Path] = field(default_factory=list)
    kept: int = 0
    freed_bytes: int = 0
    dry_run: bool = False


def default_retention_days() -> float:
    raw = os.environ.get("MLOPS_GC_RETENTION_DAYS", "")
    try:
        return float(raw) if raw.strip() else DEFAULT_RETENTION_DAYS
    except ValueError:
        logger.warning("ignoring MLOPS_GC_RETENTION_DAYS=%r (not a number)", raw)
        return DEFAULT_RETENTION_DAYS


def tree_size(path: Path) -> int:
    """Bytes held by the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _candidates(retention_days: float, keep_last: int, now: float) -> tuple[list[Path], int]:
    """Run directories the policy lets go, and how many it keeps."""
    root = runs_dir()
    cutoff = now - retention_days * 86400
    executions = {e["execution_id"]: e for e in ExecutionStore().list_executions(limit=1_000_000)}
    newest = sorted(executions.values(), key=lambda e: e["created_at"], reverse=True)
    protected = {e["execution_id"] for e in newest[:keep_last]}
    chosen, kept = [], 0
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        execution = executions.get(path.name)
        if execution is None:
            old = path.lstat().st_mtime < cutoff
        else:
            old = (execution["status"] in TERMINAL_EXECUTION and path.name not in protected
                   and (execution.get("ended_at") or execution["created_at"]) < cutoff)
        if old:
            chosen.append(path)
        else:
            kept += 1
    return chosen, kept


def collect(retention_days: float | None = None, keep_last: int = DEFAULT_KEEP_LAST, *, dry_run: bool = False,
            now: float | None = None) -> GcReport:
    """Remove (or with ``dry_run`` only list) the run directories the retention policy lets go."""
    retention = default_retention_days() if retention_days is None else retention_days
    if retention < 0 or keep_last < 0:
        raise ValueError("retention days and keep-last must not be negative")
    chosen, kept = _candidates(retention, keep_last, time.time() if now is None else now)
    report = GcReport(kept=kept, dry_run=dry_run)
    for path in chosen:
        size = tree_size(path) if path.is_dir() else path.lstat().st_size
        if not dry_run:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        report.removed.append(path)
        report.freed_bytes += size
    logger.info("gc: %s %d run dir(s), %d bytes; kept %d", "would remove" if dry_run else "removed",
                len(report.removed), report.freed_bytes, kept)
    return report
