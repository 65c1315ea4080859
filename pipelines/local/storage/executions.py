"""Execution records of the local engine in SQLite (``$MLOPS_HOME/mlops.db``): pipelines, executions, steps, trials.

Every state change is a single SQL statement (autocommit), so a process killed at any moment leaves either the old
or the new record -- never half of one -- and ``retry`` can pick up from what is recorded.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pipelines.local.storage import store

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS pipelines (
        name TEXT PRIMARY KEY, definition TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS executions (
        execution_id TEXT PRIMARY KEY, pipeline_name TEXT NOT NULL, arn TEXT NOT NULL, status TEXT NOT NULL,
        parameters TEXT NOT NULL, definition TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL,
        ended_at REAL, failure_reason TEXT, pid INTEGER, stop_requested INTEGER NOT NULL DEFAULT 0,
        attempt INTEGER NOT NULL DEFAULT 1, no_cache INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS steps (
        execution_id TEXT NOT NULL REFERENCES executions(execution_id) ON DELETE CASCADE,
        step_name TEXT NOT NULL, step_type TEXT NOT NULL, status TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0,
        started_at REAL, ended_at REAL, properties TEXT, arguments TEXT, log_path TEXT, failure_reason TEXT,
        cache_key TEXT, cached_from TEXT, rule_statuses TEXT, last_message TEXT,
        PRIMARY KEY (execution_id, step_name))""",
    "CREATE INDEX IF NOT EXISTS steps_cache ON steps (cache_key, status)",
    """CREATE TABLE IF NOT EXISTS trials (
        execution_id TEXT NOT NULL, step_name TEXT NOT NULL, trial_number INTEGER NOT NULL,
        job_name TEXT NOT NULL, status TEXT NOT NULL, hyperparameters TEXT NOT NULL, objective REAL,
        metrics TEXT, started_at REAL, ended_at REAL, log_path TEXT, failure_reason TEXT,
        PRIMARY KEY (execution_id, step_name, job_name))""",
)

# Step statuses (SageMaker's): Starting, Executing, Stopping, Stopped, Failed, Succeeded; plus local "NotExecuted".
TERMINAL_STEP = {"Succeeded", "Failed", "Stopped", "NotExecuted"}
TERMINAL_EXECUTION = {"Succeeded", "Failed", "Stopped"}


def utcnow() -> float:
    return time.time()


def iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else ""


def new_execution_id() -> str:
    """A SageMaker-like execution id (12 lowercase alphanumerics)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(12))


def execution_arn(pipeline_name: str, execution_id: str) -> str:
    return (f"arn:aws:sagemaker:{store.LOCAL_REGION}:{store.LOCAL_ACCOUNT}:pipeline/{pipeline_name.lower()}"
            f"/execution/{execution_id}")


def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for key in ("parameters", "properties", "arguments", "rule_statuses", "hyperparameters", "metrics"):
        if key in out and isinstance(out[key], str):
            out[key] = json.loads(out[key])
    return out


class _Rows:
    """Already-fetched rows with the cursor methods the store uses."""

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows


class ExecutionStore:
    """CRUD over the execution tables; one instance per thread is not needed (the connection is shared, autocommit)."""

    def __init__(self, conn: sqlite3.Connection | None = None) -> None:
        self.conn = conn or store.connect(SCHEMA)
        self._lock = threading.RLock()
        if conn is not None:
            for statement in SCHEMA:
                self._x(statement)
        self._migrate()

    def _migrate(self) -> None:
        """Columns added since a database was created (``no_cache``); tolerates another process adding them."""
        columns = {row[1] for row in self._x("PRAGMA table_info(executions)").fetchall()}
        if "no_cache" in columns:
            return
        try:
            self._x("ALTER TABLE executions ADD COLUMN no_cache INTEGER NOT NULL DEFAULT 0")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):
                raise

    def _x(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        """Execute and fetch under a lock (the connection is shared by the engine's threads)."""
        with self._lock:
            cursor = self.conn.execute(sql, params)
            rows = cursor.fetchall()
        return _Rows(rows)  # type: ignore[return-value]

    # pipelines ---------------------------------------------------------------------------------------------
    def upsert_pipeline(self, name: str, definition: str) -> None:
        now = utcnow()
        self._x(
            "INSERT INTO pipelines (name, definition, created_at, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET definition=excluded.definition, updated_at=excluded.updated_at",
            (name, definition, now, now))

    def get_pipeline(self, name: str) -> dict[str, Any] | None:
        return _row(self._x("SELECT * FROM pipelines WHERE name=?", (name,)).fetchone())

    # executions --------------------------------------------------------------------------------------------
    def create_execution(self, pipeline_name: str, definition: str, parameters: dict[str, Any],
                         execution_id: str | None = None, *, no_cache: bool = False) -> dict[str, Any]:
        """Record a new execution (``no_cache``: its steps look nothing up in the step cache)."""
        execution_id = execution_id or new_execution_id()
        self._x(
            "INSERT INTO executions (execution_id, pipeline_name, arn, status, parameters, definition, created_at, pid,"
            " no_cache) VALUES (?, ?, ?, 'Executing', ?, ?, ?, ?, ?)",
            (execution_id, pipeline_name, execution_arn(pipeline_name, execution_id), json.dumps(parameters),
             definition, utcnow(), os.getpid(), int(no_cache)))
        return self.get_execution(execution_id)  # type: ignore[return-value]

    def get_execution(self, execution_id: str) -> dict[str, Any] | None:
        row = self._x("SELECT * FROM executions WHERE execution_id=? OR arn=?",
                                (execution_id, execution_id)).fetchone()
        return _row(row)

    def find_execution(self, ref: str) -> dict[str, Any]:
        """An execution by id, ARN, unique id prefix, or ``latest``; ``LookupError`` otherwise."""
        if ref == "latest":
            row = self._x("SELECT * FROM executions ORDER BY created_at DESC LIMIT 1").fetchone()
            if row is None:
                raise LookupError("no executions recorded yet")
            return _row(row)  # type: ignore[return-value]
        found = self.get_execution(ref)
        if found:
            return found
        rows = self._x("SELECT * FROM executions WHERE execution_id LIKE ?", (ref + "%",)).fetchall()
        if len(rows) == 1:
            return _row(rows[0])  # type: ignore[return-value]
        if len(rows) > 1:
            raise LookupError(f"execution prefix {ref!r} is ambiguous ({len(rows)} matches)")
        raise LookupError(f"no execution {ref!r} (see list-executions)")

    def list_executions(self, pipeline_name: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        if pipeline_name:
            rows = self._x("SELECT * FROM executions WHERE pipeline_name=? ORDER BY created_at DESC "
                                     "LIMIT ?", (pipeline_name, limit)).fetchall()
        else:
            rows = self._x("SELECT * FROM executions ORDER BY created_at DESC LIMIT ?",
                                     (limit,)).fetchall()
        return [_row(r) for r in rows]  # type: ignore[misc]

    def mark_execution(self, execution_id: str, status: str, failure_reason: str | None = None) -> None:
        ended = utcnow() if status in TERMINAL_EXECUTION else None
        self._x("UPDATE executions SET status=?, failure_reason=?, ended_at=? WHERE execution_id=?",
                          (status, failure_reason, ended, execution_id))

    def begin_run(self, execution_id: str, resumed: bool) -> None:
        self._x(
            "UPDATE executions SET status='Executing', failure_reason=NULL, ended_at=NULL, pid=?, "
            "stop_requested=0, started_at=COALESCE(started_at, ?), attempt=attempt+? WHERE execution_id=?",
            (os.getpid(), utcnow(), 1 if resumed else 0, execution_id))

    def request_stop(self, execution_id: str) -> None:
        self._x("UPDATE executions SET stop_requested=1 WHERE execution_id=?", (execution_id,))

    def stop_requested(self, execution_id: str) -> bool:
        row = self._x("SELECT stop_requested FROM executions WHERE execution_id=?",
                                (execution_id,)).fetchone()
        return bool(row and row[0])

    # steps -------------------------------------------------------------------------------------------------
    def steps(self, execution_id: str) -> list[dict[str, Any]]:
        rows = self._x("SELECT * FROM steps WHERE execution_id=? ORDER BY COALESCE(started_at, 9e18), "
                                 "step_name", (execution_id,)).fetchall()
        return [_row(r) for r in rows]  # type: ignore[misc]

    def step(self, execution_id: str, step_name: str) -> dict[str, Any] | None:
        return _row(self._x("SELECT * FROM steps WHERE execution_id=? AND step_name=?",
                                      (execution_id, step_name)).fetchone())

    def start_step(self, execution_id: str, step_name: str, step_type: str, log_path: str | None) -> int:
        """Mark a step Executing (a new attempt); returns the attempt number."""
        self._x(
            "INSERT INTO steps (execution_id, step_name, step_type, status, attempt, started_at, log_path) "
            "VALUES (?, ?, ?, 'Executing', 1, ?, ?) ON CONFLICT(execution_id, step_name) DO UPDATE SET "
            "status='Executing', attempt=attempt+1, started_at=excluded.started_at, ended_at=NULL, "
            "failure_reason=NULL, properties=NULL, cached_from=NULL, rule_statuses=NULL, last_message=NULL, "
            "log_path=excluded.log_path",
            (execution_id, step_name, step_type, utcnow(), log_path))
        return int(self.step(execution_id, step_name)["attempt"])  # type: ignore[index]

    def set_step_arguments(self, execution_id: str, step_name: str, arguments: Any, cache_key: str | None) -> None:
        self._x("UPDATE steps SET arguments=?, cache_key=? WHERE execution_id=? AND step_name=?",
                          (json.dumps(arguments, default=str), cache_key, execution_id, step_name))

    def set_step_message(self, execution_id: str, step_name: str, message: str) -> None:
        self._x("UPDATE steps SET last_message=? WHERE execution_id=? AND step_name=?",
                          (message[:500], execution_id, step_name))

    def finish_step(self, execution_id: str, step_name: str, status: str, *, properties: Any = None,
                    failure_reason: str | None = None, cached_from: str | None = None,
                    rule_statuses: Any = None) -> None:
        """Record a step's end in one statement (status, properties and failure together)."""
        self._x(
            "UPDATE steps SET status=?, ended_at=?, properties=?, failure_reason=?, cached_from=?, "
            "rule_statuses=? WHERE execution_id=? AND step_name=?",
            (status, utcnow(), None if properties is None else json.dumps(properties, default=str),
             failure_reason, cached_from, None if rule_statuses is None else json.dumps(rule_statuses, default=str),
             execution_id, step_name))

    def mark_not_executed(self, execution_id: str, step_name: str, step_type: str) -> None:
        self._x(
            "INSERT INTO steps (execution_id, step_name, step_type, status, attempt) VALUES (?, ?, ?, 'NotExecuted', 0)"
            " ON CONFLICT(execution_id, step_name) DO UPDATE SET status='NotExecuted'",
            (execution_id, step_name, step_type))

    def mark_stale_steps(self, execution_id: str, reason: str) -> list[str]:
        """Steps left ``Executing`` by a killed engine become ``Failed`` (so ``retry`` reruns them)."""
        rows = self._x("SELECT step_name FROM steps WHERE execution_id=? AND status IN "
                                 "('Executing', 'Starting', 'Stopping')", (execution_id,)).fetchall()
        names = [r[0] for r in rows]
        for name in names:
            self.finish_step(execution_id, name, "Failed", failure_reason=reason)
        return names

    def find_cached(self, pipeline_name: str, step_name: str, cache_key: str,
                    newer_than: float) -> dict[str, Any] | None:
        """The latest Succeeded run of the same step with the same cache key (any execution of the pipeline).

        Only ``Succeeded`` runs are candidates: a stopped or failed step's outputs are never reused."""
        row = self._x(
            "SELECT s.* FROM steps s JOIN executions e ON e.execution_id = s.execution_id "
            "WHERE e.pipeline_name=? AND s.step_name=? AND s.cache_key=? AND s.status='Succeeded' "
            "AND s.ended_at >= ? ORDER BY s.ended_at DESC LIMIT 1",
            (pipeline_name, step_name, cache_key, newer_than)).fetchone()
        return _row(row)

    # trials ------------------------------------------------------------------------------------------------
    def record_trial(self, execution_id: str, step_name: str, trial_number: int, job_name: str, status: str,
                     hyperparameters: dict[str, Any], *, objective: float | None = None,
                     metrics: Any = None, started_at: float | None = None, ended_at: float | None = None,
                     log_path: str | None = None, failure_reason: str | None = None) -> None:
        self._x(
            "INSERT INTO trials (execution_id, step_name, trial_number, job_name, status, hyperparameters, objective,"
            " metrics, started_at, ended_at, log_path, failure_reason) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(execution_id, step_name, job_name) DO UPDATE SET status=excluded.status, "
            "objective=excluded.objective, metrics=excluded.metrics, ended_at=excluded.ended_at, "
            "failure_reason=excluded.failure_reason",
            (execution_id, step_name, trial_number, job_name, status, json.dumps(hyperparameters), objective,
             json.dumps(metrics) if metrics is not None else None, started_at, ended_at, log_path, failure_reason))

    def trials(self, execution_id: str, step_name: str | None = None) -> list[dict[str, Any]]:
        if step_name:
            rows = self._x("SELECT * FROM trials WHERE execution_id=? AND step_name=? ORDER BY trial_number",
                                     (execution_id, step_name)).fetchall()
        else:
            rows = self._x("SELECT * FROM trials WHERE execution_id=? ORDER BY step_name, trial_number",
                                     (execution_id,)).fetchall()
        return [_row(r) for r in rows]  # type: ignore[misc]


_ISO_DURATION = re.compile(r"P(?:(?P<Y>\d+(?:\.\d+)?)Y)?(?:(?P<MO>\d+(?:\.\d+)?)M)?(?:(?P<W>\d+(?:\.\d+)?)W)?"
                           r"(?:(?P<D>\d+(?:\.\d+)?)D)?(?:T(?:(?P<H>\d+(?:\.\d+)?)H)?(?:(?P<MI>\d+(?:\.\d+)?)M)?"
                           r"(?:(?P<S>\d+(?:\.\d+)?)S)?)?")
_SHORT_DURATION = re.compile(r"(?:(?P<W>\d+(?:\.\d+)?)W)?(?:(?P<D>\d+(?:\.\d+)?)D)?(?:(?P<H>\d+(?:\.\d+)?)H)?"
                             r"(?:(?P<MI>\d+(?:\.\d+)?)M)?(?:(?P<S>\d+(?:\.\d+)?)S)?")
_SECONDS = {"Y": 365 * 86400, "MO": 30 * 86400, "W": 7 * 86400, "D": 86400, "H": 3600, "MI": 60, "S": 1}


def parse_iso_duration(text: str) -> float:
    """Seconds of a ``CacheConfig.ExpireAfter``: an ISO-8601 duration (``P30D``, ``PT1H``, ``P1Y2M``, ``P2W``,
    ``PT0.5H``; a year is 365 days, a month 30), also without its ``P`` (``T12H``) or in the short form AWS's own
    notebooks write and SageMaker accepts (``30d``, ``12h``, ``1d12h``, ``90m``, ``2w``; case-insensitive)."""
    raw = text.strip().upper()
    candidates = [raw] if raw.startswith("P") else [f"P{raw}"] if raw.startswith("T") else []
    for pattern, value in [(_ISO_DURATION, c) for c in candidates] + [(_SHORT_DURATION, raw)]:
        match = pattern.fullmatch(value)
        if match and any(match.groupdict().values()):
            return float(sum(float(v) * _SECONDS[k] for k, v in match.groupdict().items() if v))
    raise ValueError(f"invalid ExpireAfter duration {text!r} (ISO 8601 such as P30D or PT12H, or 30d, 12h)")


def summarize_statuses(steps: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for step in steps:
        counts[step["status"]] = counts.get(step["status"], 0) + 1
    return counts
