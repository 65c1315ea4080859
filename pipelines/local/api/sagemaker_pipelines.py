"""SageMaker Pipelines over the local engine: pipelines, executions and the jobs the engine ran, as the SageMaker
API (JSON 1.1) answers them. :mod:`pipelines.local.api.sagemaker` validates each request against botocore's input
shape and cuts each result down to the output shape; the functions here get validated ``params`` and return plain
dicts (timestamps as epoch seconds), raising :class:`~pipelines.local.api.shapes.ApiError` for SageMaker's errors.

State: the engine's own tables (:mod:`pipelines.local.storage.executions`: ``executions``, ``steps``, ``trials``, and
``pipelines``, which the CLI's ``upsert`` writes) stay the truth about runs; what only the API knows lives here:

- ``sm_pipelines`` / ``sm_pipeline_versions``: a pipeline's RoleArn, display name, description, parallelism, the
  ``ClientRequestToken`` it was created with, and every definition version (``UpdatePipeline`` with a definition
  adds one; ``PipelineVersionId`` picks one). A pipeline that only the CLI stored (engine table) is adopted as
  version 1 with the local role on first sight, so both front doors see the same pipelines.
- ``sm_pipeline_executions``: an execution's display name, description, version, parallelism and
  ``ClientRequestToken`` (a retried ``StartPipelineExecution`` with the same token returns the same execution).

``StartPipelineExecution`` records the execution (``Executing``) and spawns ``python -m
pipelines.local.api.runner start <id>`` detached, with the environment of :func:`server.client_environment` for the
service's own URL, so the engine's jobs and Lambda calls reach this service; ``RetryPipelineExecution`` spawns
``runner resume``. The runner records its own crash; an execution still ``Executing`` whose engine process is gone
(``kill -9``) is settled as ``Failed`` by the next Describe/List/Stop/Retry, never left ``Executing``.

Job operations (Describe/List of training, processing and tuning jobs) read the steps' stored, Describe-shaped
properties (or, for a job that did not succeed, the resolved request recorded before it started) and the tuner's
``trials`` table; job names are the engine's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from pipelines import arns
from pipelines.local.api import sagemaker_backend
from pipelines.local.api.shapes import ApiError, epoch, paginate, validation_error
from pipelines.local.engine import core as engine
from pipelines.local.engine import resolver
from pipelines.local.engine import steps as step_kinds
from pipelines.local.storage.executions import ExecutionStore, execution_arn
from pipelines.local.storage.store import (
    LOCAL_ACCOUNT,
    LOCAL_REGION,
    LOCAL_ROLE_ARN,
    ArtifactStore,
    mlops_home,
    runs_dir,
)
from pipelines.local.storage.store import transaction as _transaction

logger = logging.getLogger(__name__)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sm_pipelines (
        name TEXT PRIMARY KEY, arn TEXT NOT NULL, display_name TEXT, description TEXT, role_arn TEXT NOT NULL,
        parallelism TEXT, version INTEGER NOT NULL, client_token TEXT, created REAL NOT NULL,
        modified REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS sm_pipeline_versions (
        name TEXT NOT NULL, version INTEGER NOT NULL, definition TEXT NOT NULL, created REAL NOT NULL,
        PRIMARY KEY (name, version))""",
    """CREATE TABLE IF NOT EXISTS sm_pipeline_executions (
        execution_id TEXT PRIMARY KEY, pipeline_name TEXT NOT NULL, version INTEGER, display_name TEXT,
        description TEXT, parallelism TEXT, client_token TEXT, request_digest TEXT, retry_token TEXT,
        created REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS sm_pipeline_execution_tokens ON sm_pipeline_executions (pipeline_name, client_token)",
)
_ALL_SCHEMA = SCHEMA + sagemaker_backend.SCHEMA  # tags live in the client's sm_tags

ALREADY_EXISTS = ("Pipeline names must be unique within an AWS account and region. Pipeline with name ({name}) "
                  "already exists.")
PROJECT_ROOT = Path(__file__).resolve().parents[3]
RUNNER_MODULE = "pipelines.local.api.runner"

#: Serializes the check-then-write decisions of this service process (names, idempotency tokens, retries).
_LOCK = threading.RLock()


@dataclass(frozen=True)
class Context:
    """What an operation knows about the request besides its parameters."""

    service_url: str  # this service's URL, as the client reached it (jobs and Lambda calls are pointed at it)
    no_cache: bool = False  # the request's ``x-mlops-no-cache`` header (protocol.NO_CACHE_HEADER)


Operation = Callable[[dict[str, Any], Context], dict[str, Any]]


def pipeline_arn(name: str) -> str:
    return arns.sagemaker_arn(LOCAL_REGION, LOCAL_ACCOUNT, "pipeline", name.lower())


def _job_arn(kind: str, name: str) -> str:
    return arns.sagemaker_arn(LOCAL_REGION, LOCAL_ACCOUNT, kind, name.lower())


def _not_found(message: str) -> ApiError:
    return ApiError("ResourceNotFound", message)


@contextlib.contextmanager
def _db(write: bool = False) -> Iterator[Any]:
    with _transaction(_ALL_SCHEMA, write) as conn:
        yield conn


@contextlib.contextmanager
def _records() -> Iterator[ExecutionStore]:
    records = ExecutionStore()
    try:
        yield records
    finally:
        records.conn.close()


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _sorted(items: list[dict[str, Any]], key: str, descending: bool) -> list[dict[str, Any]]:
    """Sort on ``key`` (missing values last in either order)."""
    present = [i for i in items if i.get(key) is not None]
    missing = [i for i in items if i.get(key) is None]
    return sorted(present, key=lambda i: i[key], reverse=descending) + missing


def _between(value: float | None, params: Mapping[str, Any], after: str, before: str) -> bool:
    low, high = epoch(params.get(after)), epoch(params.get(before))
    if value is None:
        return low is None and high is None
    return (low is None or value > low) and (high is None or value < high)


# ---------------------------------------------------------------------------------------------------- pipelines


def _pipeline_row(conn: Any, ref: str) -> dict[str, Any] | None:
    """A pipeline by name (case-insensitive, as its ARN is) or ARN; adopts one only the CLI stored."""
    column = "arn" if ref.startswith("arn:") else "lower(name)"
    row = conn.execute(f"SELECT * FROM sm_pipelines WHERE {column} = ?", (ref.lower(),)).fetchone()
    if row is None and _adopt(conn, ref):
        row = conn.execute(f"SELECT * FROM sm_pipelines WHERE {column} = ?", (ref.lower(),)).fetchone()
    return dict(row) if row else None


def _adopt(conn: Any, ref: str) -> bool:
    """Give a pipeline the CLI stored in the engine's ``pipelines`` table (no API metadata) its version 1."""
    name = ref.rsplit("/", 1)[-1] if ref.startswith("arn:") else ref
    with contextlib.suppress(sqlite3.OperationalError, sqlite3.IntegrityError):  # no engine table yet; a race
        row = conn.execute("SELECT * FROM pipelines WHERE lower(name) = ?", (name.lower(),)).fetchone()
        if row is None:
            return False
        _insert_pipeline(conn, {"PipelineName": row["name"], "RoleArn": LOCAL_ROLE_ARN}, row["definition"],
                         row["created_at"])
        logger.info("adopted pipeline %s (stored by the CLI) as version 1", row["name"])
        return True
    return False


def _insert_pipeline(conn: Any, params: Mapping[str, Any], definition: str, now: float) -> str:
    name, arn = params["PipelineName"], pipeline_arn(params["PipelineName"])
    parallelism = params.get("ParallelismConfiguration")
    conn.execute(
        "INSERT INTO sm_pipelines (name, arn, display_name, description, role_arn, parallelism, version, client_token,"
        " created, modified) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
        (name, arn, params.get("PipelineDisplayName") or name, params.get("PipelineDescription"), params["RoleArn"],
         json.dumps(parallelism) if parallelism else None, params.get("ClientRequestToken"), now, now))
    conn.execute("INSERT INTO sm_pipeline_versions (name, version, definition, created) VALUES (?, 1, ?, ?)",
                 (name, definition, now))
    return arn


def _require_pipeline(conn: Any, ref: str) -> dict[str, Any]:
    row = _pipeline_row(conn, ref)
    if row is None:
        arn = ref if ref.startswith("arn:") else pipeline_arn(ref)
        raise _not_found(f"Pipeline '{arn}' does not exist.")
    return row


def _version_definition(conn: Any, row: Mapping[str, Any], version: int | None) -> tuple[int, str, float]:
    """``(version, definition, created)`` of a pipeline version (the current one by default)."""
    number = int(version or row["version"])
    found = conn.execute("SELECT definition, created FROM sm_pipeline_versions WHERE name = ? AND version = ?",
                         (row["name"], number)).fetchone()
    if found is None:
        raise _not_found(f"Pipeline version {number} of pipeline '{row['arn']}' does not exist.")
    return number, found["definition"], found["created"]


def _definition_from(params: Mapping[str, Any], *, required: bool) -> str | None:
    """The definition of a Create/UpdatePipeline request (inline, or read from the local S3), checked."""
    inline, location = params.get("PipelineDefinition"), params.get("PipelineDefinitionS3Location")
    if inline and location:
        raise validation_error("Both PipelineDefinition and PipelineDefinitionS3Location shouldn't be present.")
    if location:
        text = _read_s3(location)
    elif inline:
        text = inline
    elif required:
        raise validation_error("Either PipelineDefinition or PipelineDefinitionS3Location should be provided.")
    else:
        return None
    _check_definition(text)
    return text


def _read_s3(location: Mapping[str, Any]) -> str:
    uri = f"s3://{location['Bucket']}/{location['ObjectKey']}"
    try:
        return ArtifactStore().path(uri).read_text(encoding="utf-8")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise validation_error(f"Unable to read the pipeline definition from {uri}: {exc}") from exc


def _check_definition(text: str) -> None:
    """Refuse a definition that is not JSON, or that the local engine cannot run (as ``upsert`` does locally)."""
    try:
        definition = json.loads(text)
    except json.JSONDecodeError as exc:
        raise validation_error(f"The pipeline definition is not valid JSON: {exc}") from exc
    if not isinstance(definition, dict):
        raise validation_error("The pipeline definition must be a JSON object.")
    try:
        engine.parse_definition(definition)
    except engine.DefinitionError as exc:
        raise validation_error(f"The local engine cannot run this pipeline definition: {exc}") from exc


def _mirror(name: str, definition: str | None) -> None:
    """Keep the engine's ``pipelines`` table (what the CLI reads and writes) on the current definition."""
    with _records() as records:
        if definition is None:
            records.conn.execute("DELETE FROM pipelines WHERE name = ?", (name,))
        else:
            records.upsert_pipeline(name, definition)


def _store_tags(conn: Any, arn: str, tags: list[dict[str, str]] | None) -> None:
    for tag in tags or []:
        conn.execute("INSERT INTO sm_tags (resource_arn, key, value) VALUES (?, ?, ?) ON CONFLICT(resource_arn, key) "
                     "DO UPDATE SET value = excluded.value", (arn, tag["Key"], tag["Value"]))


def create_pipeline(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    name = params["PipelineName"]
    definition = _definition_from(params, required=True)
    assert definition is not None
    with _LOCK, _db(write=True) as conn:
        existing = _pipeline_row(conn, name)
        if existing is not None:
            token = params.get("ClientRequestToken")
            if token and existing["client_token"] == token:  # a retried request
                return {"PipelineArn": existing["arn"]}
            raise validation_error(ALREADY_EXISTS.format(name=name))
        arn = _insert_pipeline(conn, params, definition, time.time())
        _store_tags(conn, arn, params.get("Tags"))
    _mirror(name, definition)
    logger.info("created pipeline %s", name)
    return {"PipelineArn": arn}


def update_pipeline(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    definition = _definition_from(params, required=False)
    now = time.time()
    with _LOCK, _db(write=True) as conn:
        row = _require_pipeline(conn, params["PipelineName"])
        version = int(row["version"]) + (1 if definition is not None else 0)
        if definition is not None:
            conn.execute("INSERT INTO sm_pipeline_versions (name, version, definition, created) VALUES (?, ?, ?, ?)",
                         (row["name"], version, definition, now))
        parallelism = params.get("ParallelismConfiguration")
        conn.execute(
            "UPDATE sm_pipelines SET display_name = COALESCE(?, display_name), description = COALESCE(?, description),"
            " role_arn = COALESCE(?, role_arn), parallelism = COALESCE(?, parallelism), version = ?, modified = ? "
            "WHERE name = ?",
            (params.get("PipelineDisplayName"), params.get("PipelineDescription"), params.get("RoleArn"),
             json.dumps(parallelism) if parallelism else None, version, now, row["name"]))
    if definition is not None:
        _mirror(row["name"], definition)
    return {"PipelineArn": row["arn"], "PipelineVersionId": version}


def _last_run(name: str) -> float | None:
    with _records() as records:
        found = records.conn.execute("SELECT MAX(created_at) FROM executions WHERE pipeline_name = ?",
                                     (name,)).fetchone()
    return found[0] if found else None


def describe_pipeline(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    with _db(write=True) as conn:  # write: a CLI-only pipeline is adopted on first sight
        row = _require_pipeline(conn, params["PipelineName"])
        version, definition, _ = _version_definition(conn, row, params.get("PipelineVersionId"))
    return {
        "PipelineArn": row["arn"], "PipelineName": row["name"], "PipelineDisplayName": row["display_name"],
        "PipelineDefinition": definition, "PipelineDescription": row["description"], "RoleArn": row["role_arn"],
        "PipelineStatus": "Active", "CreationTime": row["created"], "LastModifiedTime": row["modified"],
        "LastRunTime": _last_run(row["name"]), "ParallelismConfiguration": _loads(row["parallelism"]),
    }


def delete_pipeline(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    with _LOCK, _db(write=True) as conn:
        row = _require_pipeline(conn, params["PipelineName"])
        for table in ("sm_pipelines", "sm_pipeline_versions"):
            conn.execute(f"DELETE FROM {table} WHERE name = ?", (row["name"],))
        conn.execute("DELETE FROM sm_tags WHERE resource_arn = ?", (row["arn"],))
    _mirror(row["name"], None)
    with _records() as records:  # as on SageMaker, deleting a pipeline stops its running executions
        for execution in records.list_executions(row["name"], limit=1_000_000):
            if execution["status"] == "Executing":
                records.request_stop(execution["execution_id"])
    logger.info("deleted pipeline %s", row["name"])
    return {"PipelineArn": row["arn"]}


def list_pipelines(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    with _db(write=True) as conn:
        with contextlib.suppress(sqlite3.OperationalError):  # adopt what the CLI stored (if it stored any)
            for found in conn.execute("SELECT name FROM pipelines").fetchall():
                _pipeline_row(conn, found["name"])
        rows = [dict(r) for r in conn.execute("SELECT * FROM sm_pipelines").fetchall()]
    prefix = (params.get("PipelineNamePrefix") or "").lower()
    items = [{"PipelineArn": r["arn"], "PipelineName": r["name"], "PipelineDisplayName": r["display_name"],
              "PipelineDescription": r["description"], "RoleArn": r["role_arn"], "CreationTime": r["created"],
              "LastModifiedTime": r["modified"], "LastExecutionTime": _last_run(r["name"])}
             for r in rows if r["name"].lower().startswith(prefix)
             and _between(r["created"], params, "CreatedAfter", "CreatedBefore")]
    key = "PipelineName" if params.get("SortBy") == "Name" else "CreationTime"
    items = _sorted(items, key, params.get("SortOrder", "Descending") == "Descending")
    return paginate("ListPipelines", items, params, "PipelineSummaries")


def list_pipeline_versions(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    with _db(write=True) as conn:
        row = _require_pipeline(conn, params["PipelineName"])
        versions = conn.execute("SELECT version, created FROM sm_pipeline_versions WHERE name = ?",
                                (row["name"],)).fetchall()
    items = [{"PipelineArn": row["arn"], "PipelineVersionId": v["version"], "CreationTime": v["created"]}
             for v in versions if _between(v["created"], params, "CreatedAfter", "CreatedBefore")]
    items = _sorted(items, "PipelineVersionId", params.get("SortOrder", "Descending") == "Descending")
    return paginate("ListPipelineVersions", items, params, "PipelineVersionSummaries")


# --------------------------------------------------------------------------------------------------- executions


def _settle(records: ExecutionStore, execution: dict[str, Any]) -> dict[str, Any]:
    """An execution still ``Executing`` whose engine process is gone becomes ``Failed`` (with its stale steps)."""
    if execution["status"] != "Executing" or engine._pid_alive(execution.get("pid")):  # noqa: SLF001
        return execution
    fresh = records.get_execution(execution["execution_id"]) or execution  # it may have finished meanwhile
    if fresh["status"] != "Executing":
        return fresh
    log = runs_dir() / fresh["execution_id"] / "engine.log"
    reason = (f"The local engine process (pid {fresh.get('pid')}) ended without recording the end of the "
              f"execution; see {log}")
    records.mark_stale_steps(fresh["execution_id"], reason)
    records.mark_execution(fresh["execution_id"], "Failed", reason)
    logger.warning("execution %s: %s", fresh["execution_id"], reason)
    return records.get_execution(fresh["execution_id"]) or fresh


def _require_execution(records: ExecutionStore, arn: str) -> dict[str, Any]:
    found = records.get_execution(arn) if arn else None
    if found is None:
        raise _not_found(f"Pipeline execution '{arn}' does not exist.")
    return _settle(records, found)


def _execution_status(execution: Mapping[str, Any]) -> str:
    if execution["status"] == "Executing" and execution.get("stop_requested"):
        return "Stopping"
    return str(execution["status"])


def _meta(execution_ids: list[str]) -> dict[str, dict[str, Any]]:
    if not execution_ids:
        return {}
    marks = ",".join("?" * len(execution_ids))
    with _db() as conn:
        rows = conn.execute(f"SELECT * FROM sm_pipeline_executions WHERE execution_id IN ({marks})",
                            execution_ids).fetchall()
    return {r["execution_id"]: dict(r) for r in rows}


def _resolve_parameters(definition: str, params: Mapping[str, Any]) -> dict[str, Any]:
    overrides = {p["Name"]: p["Value"] for p in params.get("PipelineParameters") or []}
    try:
        return resolver.resolve_parameters(json.loads(definition), overrides)
    except resolver.ParameterError as exc:
        raise validation_error(str(exc)) from exc


def _request_digest(params: Mapping[str, Any]) -> str:
    payload = {k: v for k, v in params.items() if k != "ClientRequestToken"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _earlier_start(pipeline_name: str, params: Mapping[str, Any]) -> str | None:
    """The execution an earlier StartPipelineExecution with this ClientRequestToken started (same request)."""
    token = params.get("ClientRequestToken")
    if not token:
        return None
    with _db() as conn:
        row = conn.execute("SELECT execution_id, request_digest FROM sm_pipeline_executions WHERE pipeline_name = ? "
                           "AND client_token = ?", (pipeline_name, token)).fetchone()
    if row is None:
        return None
    if row["request_digest"] != _request_digest(params):
        raise ApiError("ConflictException", f"ClientRequestToken {token} was already used to start another "
                                            "pipeline execution with different parameters.")
    return str(row["execution_id"])


def start_pipeline_execution(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    if params.get("SelectiveExecutionConfig"):
        raise validation_error("SelectiveExecutionConfig is not supported by the local engine; use "
                               "RetryPipelineExecution to rerun the failed steps of an execution.")
    with _db(write=True) as conn:
        row = _require_pipeline(conn, params["PipelineName"])
        version, definition, _ = _version_definition(conn, row, params.get("PipelineVersionId"))
    parameters = _resolve_parameters(definition, params)
    with _LOCK:
        earlier = _earlier_start(row["name"], params)
        if earlier is not None:
            return {"PipelineExecutionArn": execution_arn(row["name"], earlier)}
        with _records() as records:
            execution = records.create_execution(row["name"], definition, parameters, no_cache=ctx.no_cache)
        _record_start(execution, params, version)
    parallelism = params.get("ParallelismConfiguration") or _loads(row["parallelism"])
    _spawn(execution["execution_id"], "start", ctx, parallelism)
    return {"PipelineExecutionArn": execution["arn"]}


def _record_start(execution: Mapping[str, Any], params: Mapping[str, Any], version: int) -> None:
    parallelism = params.get("ParallelismConfiguration")
    display = params.get("PipelineExecutionDisplayName") or f"execution-{int(execution['created_at'] * 1000)}"
    with _db(write=True) as conn:
        conn.execute(
            "INSERT INTO sm_pipeline_executions (execution_id, pipeline_name, version, display_name, description, "
            "parallelism, client_token, request_digest, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (execution["execution_id"], execution["pipeline_name"], version, display,
             params.get("PipelineExecutionDescription"), json.dumps(parallelism) if parallelism else None,
             params.get("ClientRequestToken"), _request_digest(params), execution["created_at"]))


def runner_environment(service_url: str, parallelism: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The runner's environment: every AWS client pointed at this service, the same MLOPS_HOME, the project
    importable, and the parallelism as the engine's ``MLOPS_MAX_WORKERS``."""
    from pipelines.local.api import server

    env = {**os.environ, **server.client_environment(service_url), "MLOPS_HOME": str(mlops_home())}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    if parallelism and parallelism.get("MaxParallelExecutionSteps"):
        env["MLOPS_MAX_WORKERS"] = str(int(parallelism["MaxParallelExecutionSteps"]))
    return env


def _spawn(execution_id: str, mode: str, ctx: Context, parallelism: Mapping[str, Any] | None) -> None:
    """Run ``runner <mode> <execution_id>`` detached (its own session: it outlives this service)."""
    log_path = runs_dir() / execution_id / "engine.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", RUNNER_MODULE, mode, execution_id], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                    close_fds=True, env=runner_environment(ctx.service_url, parallelism))
    except OSError as exc:
        with _records() as records:
            records.mark_execution(execution_id, "Failed", f"The local engine could not be started: {exc}")
        logger.error("execution %s: runner not started: %s", execution_id, exc)
        return
    with _records() as records:  # the runner's pid from now on (the runner records it too)
        records.conn.execute("UPDATE executions SET pid = ? WHERE execution_id = ? AND status = 'Executing'",
                             (proc.pid, execution_id))
    threading.Thread(target=proc.wait, name=f"reap-{execution_id}", daemon=True).start()  # no zombie left behind
    logger.info("execution %s: runner %s started (pid %d), log %s", execution_id, mode, proc.pid, log_path)


def _experiment_config(execution: Mapping[str, Any]) -> dict[str, Any] | None:
    """The definition's PipelineExperimentConfig with its execution variables resolved."""
    config = (_loads(execution["definition"]) or {}).get("PipelineExperimentConfig")
    if not isinstance(config, dict):
        return None
    variables = {"Execution.PipelineName": execution["pipeline_name"],
                 "Execution.PipelineExecutionId": execution["execution_id"]}

    def value(item: Any) -> Any:
        return variables.get(item.get("Get"), None) if isinstance(item, dict) else item

    return {key: value(item) for key, item in config.items()}


def _describe_execution(execution: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "PipelineArn": pipeline_arn(execution["pipeline_name"]), "PipelineExecutionArn": execution["arn"],
        "PipelineExecutionDisplayName": meta.get("display_name"), "PipelineExecutionStatus":
            _execution_status(execution), "PipelineExecutionDescription": meta.get("description"),
        "PipelineExperimentConfig": _experiment_config(execution), "FailureReason": execution["failure_reason"],
        "CreationTime": execution["created_at"],
        "LastModifiedTime": execution["ended_at"] or execution["started_at"] or execution["created_at"],
        "ParallelismConfiguration": _loads(meta.get("parallelism")), "PipelineVersionId": meta.get("version"),
    }


def describe_pipeline_execution(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    with _records() as records:
        execution = _require_execution(records, params["PipelineExecutionArn"])
    meta = _meta([execution["execution_id"]]).get(execution["execution_id"], {})
    return _describe_execution(execution, meta)


def list_pipeline_executions(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    with _db(write=True) as conn:
        row = _require_pipeline(conn, params["PipelineName"])
    with _records() as records:
        executions = [_settle(records, e) for e in records.list_executions(row["name"], limit=1_000_000)]
    meta = _meta([e["execution_id"] for e in executions])
    items = [{"PipelineExecutionArn": e["arn"], "StartTime": e["created_at"],
              "PipelineExecutionStatus": _execution_status(e),
              "PipelineExecutionDescription": meta.get(e["execution_id"], {}).get("description"),
              "PipelineExecutionDisplayName": meta.get(e["execution_id"], {}).get("display_name"),
              "PipelineExecutionFailureReason": e["failure_reason"]}
             for e in executions if _between(e["created_at"], params, "CreatedAfter", "CreatedBefore")]
    key = "PipelineExecutionArn" if params.get("SortBy") == "PipelineExecutionArn" else "StartTime"
    items = _sorted(items, key, params.get("SortOrder", "Descending") == "Descending")
    return paginate("ListPipelineExecutions", items, params, "PipelineExecutionSummaries")


def stop_pipeline_execution(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    arn = params["PipelineExecutionArn"]
    with _records() as records:
        execution = _require_execution(records, arn)
        if execution["status"] != "Executing":
            raise validation_error(f"Pipeline execution with ARN {execution['arn']} status is "
                                   f"{execution['status']}. Only an Executing pipeline execution can be stopped.")
        records.request_stop(execution["execution_id"])
    logger.info("execution %s: stop requested", execution["execution_id"])
    return {"PipelineExecutionArn": execution["arn"]}


def retry_pipeline_execution(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    arn, token = params["PipelineExecutionArn"], params.get("ClientRequestToken")
    with _LOCK, _records() as records:
        execution = _require_execution(records, arn)
        meta = _meta([execution["execution_id"]]).get(execution["execution_id"], {})
        if token and meta.get("retry_token") == token:  # a retried RetryPipelineExecution
            return {"PipelineExecutionArn": execution["arn"]}
        if execution["status"] == "Executing":
            raise ApiError("ConflictException", f"Pipeline execution with ARN {execution['arn']} is still executing.")
        if execution["status"] not in ("Failed", "Stopped"):
            raise validation_error(f"Pipeline execution with ARN {execution['arn']} status is "
                                   f"{execution['status']}. Only a Failed or Stopped pipeline execution can be "
                                   "retried.")
        records.begin_run(execution["execution_id"], resumed=False)  # Executing from now on, for every waiter
    _remember_retry(execution, token)
    parallelism = params.get("ParallelismConfiguration") or _loads(meta.get("parallelism"))
    _spawn(execution["execution_id"], "resume", ctx, parallelism)
    return {"PipelineExecutionArn": execution["arn"]}


def _remember_retry(execution: Mapping[str, Any], token: str | None) -> None:
    with _db(write=True) as conn:
        conn.execute("INSERT INTO sm_pipeline_executions (execution_id, pipeline_name, retry_token, created) "
                     "VALUES (?, ?, ?, ?) ON CONFLICT(execution_id) DO UPDATE SET retry_token = excluded.retry_token",
                     (execution["execution_id"], execution["pipeline_name"], token, execution["created_at"]))


def describe_pipeline_definition_for_execution(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    with _records() as records:
        execution = _require_execution(records, params["PipelineExecutionArn"])
    return {"PipelineDefinition": execution["definition"], "CreationTime": execution["created_at"]}


def list_pipeline_parameters_for_execution(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    with _records() as records:
        execution = _require_execution(records, params["PipelineExecutionArn"])
    items = [{"Name": name, "Value": value} for name, value in (execution["parameters"] or {}).items()]
    return paginate("ListPipelineParametersForExecution", items, params, "PipelineParameters")


# -------------------------------------------------------------------------------------------------------- steps


def _step_specs(definition: str) -> dict[str, dict[str, Any]]:
    try:
        return {name: step.spec for name, step in engine.parse_definition(json.loads(definition)).items()}
    except (ValueError, engine.DefinitionError):
        return {}


def _step_status(step: Mapping[str, Any], execution: Mapping[str, Any]) -> str:
    if step["status"] == "Executing" and execution.get("stop_requested"):
        return "Stopping"
    return str(step["status"])


def _step_metadata(execution: Mapping[str, Any], step: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """``PipelineExecutionStepMetadata`` as SageMaker fills it for each step type (the step kind says)."""
    props = step["properties"] if isinstance(step["properties"], dict) else {}
    job_arn = None
    if step["step_type"] in JOB_KINDS:
        job = JOB_KINDS[step["step_type"]]
        name = _job_name(job, execution["execution_id"], step)
        job_arn = _job_arn(job.arn_type, name) if name else None
    return step_kinds.kind_for(step["step_type"]).metadata(props, spec, str(step["status"]), step["failure_reason"],
                                                           job_arn)


def _step_summary(execution: Mapping[str, Any], step: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    terminal = step["status"] in ("Succeeded", "Failed", "Stopped")
    summary = {
        "StepName": step["step_name"], "StepDisplayName": spec.get("DisplayName"),
        "StepDescription": spec.get("Description"), "StartTime": step["started_at"],
        "EndTime": step["ended_at"] if terminal else None, "StepStatus": _step_status(step, execution),
        "FailureReason": step["failure_reason"], "AttemptCount": step["attempt"],
        "Metadata": _step_metadata(execution, step, spec),
    }
    if step["cached_from"]:
        summary["CacheHitResult"] = {"SourcePipelineExecutionArn": execution_arn(execution["pipeline_name"],
                                                                                 step["cached_from"])}
    return summary


def list_pipeline_execution_steps(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    if not params.get("PipelineExecutionArn"):
        raise validation_error("PipelineExecutionArn is required.")
    with _records() as records:
        execution = _require_execution(records, params["PipelineExecutionArn"])
        steps = records.steps(execution["execution_id"])
    specs = _step_specs(execution["definition"])
    items = [_step_summary(execution, s, specs.get(s["step_name"], {})) for s in steps if s["status"] != "NotExecuted"]
    items = _sorted(items, "StartTime", params.get("SortOrder", "Descending") == "Descending")
    return paginate("ListPipelineExecutionSteps", items, params, "PipelineExecutionSteps", default_size=100)


# --------------------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class JobKind(step_kinds.JobInfo):
    """How one kind of job the engine runs is named in the SageMaker API: its step kind's ``job``, and that kind."""

    step_type: str = ""

    @classmethod
    def of(cls, step_type: str) -> JobKind:
        info = step_kinds.STEP_KINDS[step_type].job
        assert info is not None, step_type
        return cls(**asdict(info), step_type=step_type)


TRAINING, PROCESSING, TUNING, TRANSFORM = (JobKind.of(t) for t in ("Training", "Processing", "Tuning", "Transform"))
JOB_KINDS = {k.step_type: k for k in (TRAINING, PROCESSING, TUNING, TRANSFORM)}
#: A step's status -> its job's status.
JOB_STATUS = {"Starting": "InProgress", "Executing": "InProgress", "Stopping": "Stopping", "Succeeded": "Completed",
              "Failed": "Failed", "Stopped": "Stopped"}


def _job_name(kind: JobKind, execution_id: str, step: Mapping[str, Any]) -> str | None:
    """The job's name: from its properties, else as the engine names it (once the request was recorded, i.e. the
    job was about to start)."""
    props = step["properties"] if isinstance(step["properties"], dict) else {}
    if props.get(kind.name_key):
        return str(props[kind.name_key])
    if step["arguments"] is None:
        return None
    if kind is TUNING:  # as the Tuning step names it
        return step_kinds.jobs.tuning_job_name(execution_id, step["step_name"], int(step["attempt"]))
    return step_kinds.job_name(execution_id, step["step_name"], int(step["attempt"]))


def _step_rows(step_type: str) -> list[dict[str, Any]]:
    """Every recorded step of a type that ran its own job (cache hits are the original job), with its execution's
    stop flag."""
    with _records() as records:
        rows = records.conn.execute(
            "SELECT s.*, e.stop_requested AS execution_stop FROM steps s JOIN executions e "
            "ON e.execution_id = s.execution_id WHERE s.step_type = ? AND s.cached_from IS NULL", (step_type,)
        ).fetchall()
    out = []
    for row in rows:
        item = dict(row)
        item["properties"], item["arguments"] = _loads(item["properties"]), _loads(item["arguments"])
        out.append(item)
    return out


def _job_status(kind: JobKind, step: Mapping[str, Any]) -> str:
    props = step["properties"] if isinstance(step["properties"], dict) else {}
    if step["status"] == "Succeeded" and props.get(kind.status_key):
        return str(props[kind.status_key])
    if step["status"] == "Executing" and step.get("execution_stop"):
        return "Stopping"
    return JOB_STATUS.get(step["status"], "InProgress")


def _step_job(kind: JobKind, step: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Describe-shaped record of the job a step ran."""
    name = _job_name(kind, step["execution_id"], step)
    if name is None:
        return None
    request = step["arguments"] if isinstance(step["arguments"], dict) else {}
    props = step["properties"] if step["status"] == "Succeeded" and isinstance(step["properties"], dict) else {}
    status = _job_status(kind, step)
    job = {**request, **props, kind.name_key: name, kind.arn_key: _job_arn(kind.arn_type, name),
           kind.status_key: status, "CreationTime": step["started_at"], "FailureReason": step["failure_reason"],
           "LastModifiedTime": step["ended_at"] or step["started_at"]}
    job.setdefault(kind.end_key, step["ended_at"])
    if kind is TRAINING:
        job.setdefault("SecondaryStatus", "Training" if status == "InProgress" else status)
        job.setdefault("TrainingStartTime", step["started_at"])
        if status == "InProgress":
            definitions = (request.get("AlgorithmSpecification") or {}).get("MetricDefinitions") or []
            job["FinalMetricDataList"] = _metrics_so_far(step.get("log_path"), definitions)
    elif kind is PROCESSING:
        job.setdefault("ProcessingStartTime", step["started_at"])
    else:
        job.update(_tuning_counters(step, props))
    return job


#: How much of a running job's log is read for its metrics so far (the newest lines; epochs print one line each).
_METRICS_TAIL_BYTES = 256 * 1024


def _metrics_so_far(log_path: str | None, definitions: list[Mapping[str, str]]) -> list[dict[str, Any]]:
    """A running job's ``FinalMetricDataList``: the latest value of each metric definition in its log so far, as
    SageMaker updates it from the metrics it has read while the job runs (``epoch`` gives progress)."""
    from pipelines.local.jobs.runtime import final_metrics

    if not log_path or not definitions:
        return []
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _METRICS_TAIL_BYTES))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return final_metrics(text, definitions)


def _trial_rows(execution_id: str | None = None, step_name: str | None = None) -> list[dict[str, Any]]:
    with _records() as records:
        return records.trials(execution_id, step_name) if execution_id else [
            dict(r, hyperparameters=_loads(r["hyperparameters"]))
            for r in records.conn.execute("SELECT * FROM trials").fetchall()]


def _tuning_counters(step: Mapping[str, Any], props: Mapping[str, Any]) -> dict[str, Any]:
    if props.get("TrainingJobStatusCounters"):
        return {}
    trials = _trial_rows(step["execution_id"], step["step_name"])
    count = {s: sum(1 for t in trials if t["status"] == s) for s in ("Completed", "InProgress", "Failed", "Stopped")}
    return {"TrainingJobStatusCounters": {"Completed": count["Completed"], "InProgress": count["InProgress"],
                                          "RetryableError": 0, "NonRetryableError": count["Failed"],
                                          "Stopped": count["Stopped"]},
            "ObjectiveStatusCounters": {"Succeeded": sum(1 for t in trials if t["objective"] is not None),
                                        "Pending": count["InProgress"],
                                        "Failed": sum(1 for t in trials if t["objective"] is None
                                                      and t["status"] != "InProgress")}}


def _tuning_source(step: Mapping[str, Any]) -> dict[str, Any]:
    """What a tuning step recorded: its properties when it succeeded, else its resolved request."""
    for key in ("properties", "arguments"):
        if isinstance(step.get(key), dict):
            return cast(dict[str, Any], step[key])
    return {}


def _objective_name(source: Mapping[str, Any]) -> str | None:
    config = source.get("HyperParameterTuningJobConfig") or {}
    return (config.get("HyperParameterTuningJobObjective") or {}).get("MetricName")


def _trial_job(trial: Mapping[str, Any], tuning_step: Mapping[str, Any] | None) -> dict[str, Any]:
    """DescribeTrainingJob of a tuning trial: the tuning job's training definition plus the trial's record."""
    source = _tuning_source(tuning_step) if tuning_step else {}
    definition = source.get("TrainingJobDefinition") or {}
    summary = next((s for s in source.get("TrainingJobSummaries") or []
                    if s.get("TrainingJobName") == trial["job_name"]), {})
    tuned = trial["hyperparameters"] or {}
    name, status, started, ended = trial["job_name"], trial["status"], trial["started_at"], trial["ended_at"]
    job = {
        **definition, "TrainingJobName": name, "TrainingJobArn": _job_arn("training-job", name),
        "TrainingJobStatus": status, "SecondaryStatus": "Training" if status == "InProgress" else status,
        "HyperParameters": {**(definition.get("StaticHyperParameters") or {}), **tuned}, "TunedHyperParameters": tuned,
        "CreationTime": started, "TrainingStartTime": started, "TrainingEndTime": ended,
        "LastModifiedTime": ended or started, "FailureReason": trial["failure_reason"],
        "ModelArtifacts": summary.get("ModelArtifacts"), "ObjectiveStatus": summary.get("ObjectiveStatus"),
    }
    if tuning_step is not None:
        tuning_name = _job_name(TUNING, tuning_step["execution_id"], tuning_step)
        job["TuningJobName"], job["TuningJobArn"] = tuning_name, _job_arn("hyper-parameter-tuning-job",
                                                                          tuning_name or "")
    if status == "InProgress":
        definitions = (definition.get("AlgorithmSpecification") or {}).get("MetricDefinitions") or []
        job["FinalMetricDataList"] = _metrics_so_far(trial.get("log_path"), definitions)
    metric = _objective_name(source)
    if trial["objective"] is not None and metric:
        job["FinalMetricDataList"] = [{"MetricName": metric, "Value": trial["objective"],
                                       "Timestamp": trial["ended_at"]}]
        job["FinalHyperParameterTuningJobObjectiveMetric"] = {"MetricName": metric, "Value": trial["objective"]}
    return job


def _jobs(kind: JobKind) -> list[dict[str, Any]]:
    """Every job of a kind the engine ran (training jobs include tuning trials), newest first by creation."""
    steps = _step_rows(kind.step_type)
    found = [job for step in steps if (job := _step_job(kind, step)) is not None]
    if kind is TRAINING:
        tuning = {(s["execution_id"], s["step_name"]): s for s in _step_rows("Tuning")}
        found += [_trial_job(t, tuning.get((t["execution_id"], t["step_name"]))) for t in _trial_rows()]
    unique: dict[str, dict[str, Any]] = {}
    for job in found:
        unique.setdefault(job[kind.name_key], job)
    return list(unique.values())


def _find_job(kind: JobKind, name: str) -> dict[str, Any] | None:
    """A job by name; case-insensitive, as SageMaker's job names (and their lowercase ARNs) are."""
    return next((job for job in _jobs(kind) if job[kind.name_key].lower() == name.lower()), None)


def describe_training_job(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    job = _find_job(TRAINING, params["TrainingJobName"])
    if job is None:
        raise validation_error("Requested resource not found.")
    return job


def describe_processing_job(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    name = params["ProcessingJobName"]
    job = _find_job(PROCESSING, name)
    if job is None:
        raise validation_error(f"Could not find processing job '{_job_arn('processing-job', name)}'.")
    return job


def describe_hyper_parameter_tuning_job(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    name = params["HyperParameterTuningJobName"]
    job = _find_job(TUNING, name)
    if job is None:
        raise _not_found(f"Amazon SageMaker can't find a tuning job with name {name}")
    return job


def _list_jobs(kind: JobKind, operation: str, summaries_key: str, params: Mapping[str, Any],
               jobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A List*Jobs page: NameContains/StatusEquals/time filters, SortBy/SortOrder (default CreationTime,
    Descending)."""
    contains = (params.get("NameContains") or "").lower()
    items = [j for j in (jobs if jobs is not None else _jobs(kind))
             if contains in j[kind.name_key].lower()
             and params.get("StatusEquals") in (None, j[kind.status_key])
             and _between(j.get("CreationTime"), params, "CreationTimeAfter", "CreationTimeBefore")
             and _between(j.get("LastModifiedTime"), params, "LastModifiedTimeAfter", "LastModifiedTimeBefore")]
    by = params.get("SortBy") or "CreationTime"
    key = {"Name": kind.name_key, "Status": kind.status_key}.get(by, "CreationTime")
    if by == "FinalObjectiveMetricValue":
        for item in items:
            item["_objective"] = (item.get("FinalHyperParameterTuningJobObjectiveMetric") or {}).get("Value")
        key = "_objective"
    items = _sorted(items, key, params.get("SortOrder", "Descending") == "Descending")
    return paginate(operation, items, params, summaries_key, default_size=10)


def list_training_jobs(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return _list_jobs(TRAINING, "ListTrainingJobs", "TrainingJobSummaries", params)


def list_processing_jobs(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return _list_jobs(PROCESSING, "ListProcessingJobs", "ProcessingJobSummaries", params)


def list_training_jobs_for_hyper_parameter_tuning_job(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    name = params["HyperParameterTuningJobName"]
    step = next((s for s in _step_rows("Tuning")
                 if (_job_name(TUNING, s["execution_id"], s) or "").lower() == name.lower()), None)
    if step is None:
        raise _not_found(f"Amazon SageMaker can't find a tuning job with name {name}")
    trials = [_trial_job(t, step) for t in _trial_rows(step["execution_id"], step["step_name"])]
    return _list_jobs(TRAINING, "ListTrainingJobsForHyperParameterTuningJob", "TrainingJobSummaries", params, trials)


# --------------------------------------------------------------------------------------------------------- tags


def is_pipeline_arn(arn: str) -> bool:
    return arn.startswith(pipeline_arn("").rstrip("/") + "/")


def _require_pipeline_arn(arn: str) -> None:
    with _db(write=True) as conn:
        if _pipeline_row(conn, arn) is None:
            raise validation_error(f"Resource {arn} does not exist.")


def add_tags(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    _require_pipeline_arn(params["ResourceArn"])
    with _db(write=True) as conn:
        _store_tags(conn, params["ResourceArn"], params["Tags"])
    return {"Tags": params["Tags"]}


def list_tags(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    _require_pipeline_arn(params["ResourceArn"])
    with _db() as conn:
        rows = conn.execute("SELECT key, value FROM sm_tags WHERE resource_arn = ? ORDER BY key",
                            (params["ResourceArn"],)).fetchall()
    return paginate("ListTags", [{"Key": r["key"], "Value": r["value"]} for r in rows], params, "Tags")


def delete_tags(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """DeleteTags on any resource whose tags the local service stores (the caller checked it exists)."""
    with _db(write=True) as conn:
        for key in params["TagKeys"]:
            conn.execute("DELETE FROM sm_tags WHERE resource_arn = ? AND key = ?", (params["ResourceArn"], key))
    return {}


#: SageMaker operation name -> implementation.
OPERATIONS: dict[str, Operation] = {
    "CreatePipeline": create_pipeline, "UpdatePipeline": update_pipeline, "DescribePipeline": describe_pipeline,
    "DeletePipeline": delete_pipeline, "ListPipelines": list_pipelines, "ListPipelineVersions": list_pipeline_versions,
    "StartPipelineExecution": start_pipeline_execution, "DescribePipelineExecution": describe_pipeline_execution,
    "ListPipelineExecutions": list_pipeline_executions, "StopPipelineExecution": stop_pipeline_execution,
    "RetryPipelineExecution": retry_pipeline_execution, "ListPipelineExecutionSteps": list_pipeline_execution_steps,
    "DescribePipelineDefinitionForExecution": describe_pipeline_definition_for_execution,
    "ListPipelineParametersForExecution": list_pipeline_parameters_for_execution,
    "DescribeTrainingJob": describe_training_job, "DescribeProcessingJob": describe_processing_job,
    "DescribeHyperParameterTuningJob": describe_hyper_parameter_tuning_job, "ListTrainingJobs": list_training_jobs,
    "ListProcessingJobs": list_processing_jobs,
    "ListTrainingJobsForHyperParameterTuningJob": list_training_jobs_for_hyper_parameter_tuning_job,
}
#: Tag operations answered here for pipeline ARNs (other resources: the local SageMaker client).
PIPELINE_TAG_OPERATIONS: dict[str, Operation] = {"AddTags": add_tags, "ListTags": list_tags, "DeleteTags": delete_tags}
