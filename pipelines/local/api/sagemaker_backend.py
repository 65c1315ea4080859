"""``SageMakerBackend``: what the local SageMaker service (:mod:`.sagemaker`) answers for models, endpoint configs,
endpoints, the model registry and tags. Nothing outside the service calls it as a client: the project's code, the
deploy function and users' code all reach it through boto3 and the wire (``AWS_ENDPOINT_URL``); its methods are named
as boto3 names the operations, and the service dispatches each operation it serves to the method of that name.

Same call style (keyword arguments only), same request validation (botocore's ``ParamValidator`` on the service model's
input shapes, raising ``botocore.exceptions.ParamValidationError``), response dicts shaped like SageMaker's (including
``ResponseMetadata``) and failures as ``botocore.exceptions.ClientError`` with SageMaker's error codes and messages
(``ValidationException`` ``Could not find endpoint "<arn>".``, ``Cannot create already existing model "<arn>".``...).
Model packages live in :mod:`pipelines.local.storage.registry`; models, endpoint configs, endpoints and tags in SQLite
tables owned here (``sm_models``, ``sm_endpoint_configs``, ``sm_endpoints``, ``sm_tags``).

 ``create_endpoint``/``update_endpoint`` really deploy, through :mod:`pipelines.local.serving.endpoints`: the call
returns once the local server is up (or has failed), so ``describe_endpoint`` afterwards shows ``InService``, or
``Failed`` with a ``FailureReason``. A failed update leaves the endpoint ``InService`` on its previous configuration
with the ``FailureReason`` set, as SageMaker's rollback does.

A deploy is recorded before it starts (``sm_endpoint_operations``: the target config and the pid of the deploying
process, written in the same transaction as the ``Creating``/``Updating`` status). An endpoint left ``Creating`` or
``Updating`` by a process that died (kill -9, a crash) is reconciled on the next ``DescribeEndpoint``,
``ListEndpoints``, ``CreateEndpoint`` or ``UpdateEndpoint``: ``InService`` with the target config if its server came
up with it before the process died, ``InService`` on the previous config (with a ``FailureReason``) if an update was
cut short while the old server kept serving, otherwise ``Failed`` with a ``FailureReason`` saying the deploy was
interrupted -- so the deploy function sees the truth and recreates it, as it does with any ``Failed`` endpoint.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import psutil
from botocore.exceptions import ClientError
from botocore.utils import parse_timestamp

from pipelines.local.serving import endpoints
from pipelines.local.storage import registry
from pipelines.local.storage.registry import ARN_PREFIX, to_datetime, validate_request
from pipelines.local.storage.store import transaction

logger = logging.getLogger(__name__)

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS sm_models (
        name TEXT PRIMARY KEY, arn TEXT NOT NULL, request TEXT NOT NULL, creation_time REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS sm_endpoint_configs (
        name TEXT PRIMARY KEY, arn TEXT NOT NULL, request TEXT NOT NULL, creation_time REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS sm_endpoints (
        name TEXT PRIMARY KEY, arn TEXT NOT NULL, config_name TEXT NOT NULL, status TEXT NOT NULL,
        failure_reason TEXT, creation_time REAL NOT NULL, last_modified_time REAL NOT NULL,
        deployed_at REAL)""",
    """CREATE TABLE IF NOT EXISTS sm_tags (
        resource_arn TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (resource_arn, key))""",
    """CREATE TABLE IF NOT EXISTS sm_endpoint_operations (
        name TEXT PRIMARY KEY, operation TEXT NOT NULL, config_name TEXT NOT NULL, pid INTEGER NOT NULL,
        pid_create_time REAL, started_at REAL NOT NULL)""",
)

IN_PROGRESS = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting")
RECONCILED = ("Creating", "Updating")  # the states a local deploy leaves behind when its process dies
SERVING_POLL_S = 0.5

# Endpoints this process is deploying right now (any thread): a recorded pid equal to ours is a live deploy only then.
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()

DEFAULT_PAGE_SIZE = {"ListModelPackages": 100, "ListModelPackageGroups": 100, "ListEndpoints": 10, "ListTags": 50}


def model_arn(name: str) -> str:
    return f"{ARN_PREFIX}:model/{name.lower()}"


def endpoint_config_arn(name: str) -> str:
    return f"{ARN_PREFIX}:endpoint-config/{name.lower()}"


def endpoint_arn(name: str) -> str:
    return f"{ARN_PREFIX}:endpoint/{name.lower()}"


def _client_error(operation: str, message: str, code: str = "ValidationException", status: int = 400) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"RequestId": str(uuid.uuid4()), "HTTPStatusCode": status}}, operation)


def _response(body: dict[str, Any]) -> dict[str, Any]:
    body["ResponseMetadata"] = {"RequestId": str(uuid.uuid4()), "HTTPStatusCode": 200,
                                "HTTPHeaders": {"content-type": "application/x-amz-json-1.1"}, "RetryAttempts": 0}
    return body


def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return parse_timestamp(value).timestamp()


def _paginate(operation: str, items: list[Any], params: dict[str, Any], key: str) -> dict[str, Any]:
    """One page of ``items`` (``MaxResults``/``NextToken``); tokens are opaque offsets bound to the operation."""
    offset = 0
    if params.get("NextToken"):
        try:
            decoded = json.loads(base64.urlsafe_b64decode(params["NextToken"].encode()))
            if decoded["op"] != operation:
                raise ValueError(decoded["op"])
            offset = int(decoded["offset"])
        except (ValueError, KeyError, TypeError) as exc:
            raise _client_error(operation, f"Invalid pagination token {params['NextToken']!r}.") from exc
    size = int(params.get("MaxResults") or DEFAULT_PAGE_SIZE[operation])
    out: dict[str, Any] = {key: items[offset:offset + size]}
    if offset + size < len(items):
        out["NextToken"] = base64.urlsafe_b64encode(
            json.dumps({"op": operation, "offset": offset + size}).encode()).decode()
    return out


def _sort(items: list[dict[str, Any]], params: dict[str, Any], default_order: str,
          keys: dict[str, Callable[[dict[str, Any]], Any]]) -> list[dict[str, Any]]:
    by = params.get("SortBy", "CreationTime")
    order = params.get("SortOrder", default_order)
    return sorted(items, key=keys[by], reverse=order == "Descending")


def _process_identity() -> tuple[int, float | None]:
    """This process's pid and start time (the pair that tells a live deployer from a recycled pid)."""
    try:
        return os.getpid(), psutil.Process().create_time()
    except psutil.Error:
        return os.getpid(), None


def _record_operation(conn: Any, name: str, operation: str, config_name: str, started_at: float) -> None:
    """Record who deploys ``config_name`` to ``name`` (in the transaction that sets the in-progress status)."""
    pid, created = _process_identity()
    conn.execute("INSERT OR REPLACE INTO sm_endpoint_operations (name, operation, config_name, pid, pid_create_time,"
                 " started_at) VALUES (?,?,?,?,?,?)", (name, operation, config_name, pid, created, started_at))


def _deployer_alive(op: dict[str, Any]) -> bool:
    """Whether the process recorded on a deploy is still running it (not dead, not a recycled pid)."""
    pid, created = op["pid"], op["pid_create_time"]
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if created is not None and abs(proc.create_time() - created) > 1.0:
            return False
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # somebody else's live process: assume it is deploying
    if pid == os.getpid():
        with _ACTIVE_LOCK:
            return op["name"] in _ACTIVE
    return True


def _server(name: str) -> endpoints.LocalEndpoint | None:
    try:
        return endpoints.get(name)
    except (endpoints.EndpointNotFound, ValueError):
        return None


def _interrupted_outcome(row: dict[str, Any], op: dict[str, Any] | None) -> tuple[str, str, str | None]:
    """(status, config, FailureReason) for an endpoint whose deploy's process is gone, from what its server does."""
    name, target = row["name"], (op["config_name"] if op else row["config_name"])
    who = f"the process deploying it (pid {op['pid']}) is gone" if op else "no process is deploying it"
    server = _server(name)
    alive = server is not None and server.alive
    if alive and op is not None and server.deployed_at >= op["started_at"]:  # type: ignore[union-attr]
        return "InService", target, None  # the server came up with the target; only the record was lost
    if alive and row["status"] == "Updating":
        return "InService", row["config_name"], (
            f"The update to endpoint configuration {target!r} was interrupted ({who}); the endpoint keeps serving "
            f"{row['config_name']!r}.")
    action = "creation" if row["status"] == "Creating" else "update"
    return "Failed", row["config_name"], (
        f"The {action} of endpoint {name!r} with configuration {target!r} was interrupted: {who} and no server is "
        f"running. The deploy function recreates a Failed endpoint on its next run; `endpoints restart {name}` "
        "starts this configuration again.")


class SageMakerBackend:
    """A local stand-in for ``boto3.client("sagemaker")`` (the methods of docs/CONTRACTS.md §8 and a few more)."""

    def __init__(self, *, startup_timeout: float = endpoints.DEFAULT_STARTUP_TIMEOUT_S) -> None:
        self.startup_timeout = startup_timeout

    # ------------------------------------------------------------------------------------------------ plumbing

    def _db(self, write: bool = False) -> contextlib.AbstractContextManager[Any]:
        return transaction(SCHEMA, write)

    @staticmethod
    def _validate(operation: str, params: dict[str, Any]) -> None:
        try:
            validate_request(operation, params)
        except registry.RegistryValidationError as exc:
            raise _client_error(operation, str(exc)) from exc

    @staticmethod
    @contextlib.contextmanager
    def _registry_errors(operation: str) -> Iterator[None]:
        try:
            yield
        except registry.IdempotentParameterMismatch as exc:
            raise _client_error(operation, str(exc), code=exc.code) from exc
        except (registry.RegistryValidationError, registry.ResourceNotFound) as exc:
            raise _client_error(operation, str(exc)) from exc

    def _store_tags(self, conn: Any, arn: str, tags: list[dict[str, str]] | None) -> None:
        for tag in tags or []:
            conn.execute("INSERT INTO sm_tags (resource_arn, key, value) VALUES (?,?,?) ON CONFLICT(resource_arn, key)"
                         " DO UPDATE SET value = excluded.value", (arn, tag["Key"], tag["Value"]))

    def _get(self, table: str, name: str) -> dict[str, Any] | None:
        with self._db() as conn:
            row = conn.execute(f"SELECT * FROM {table} WHERE name = ? COLLATE NOCASE", (name,)).fetchone()
        return dict(row) if row else None

    def _delete(self, operation: str, table: str, name: str, arn: str, not_found: str) -> dict[str, Any]:
        """Delete a named resource row and its tags; ``not_found`` is the service's message when there is none."""
        with self._db(write=True) as conn:
            if conn.execute(f"DELETE FROM {table} WHERE name = ? COLLATE NOCASE", (name,)).rowcount == 0:
                raise _client_error(operation, not_found)
            conn.execute("DELETE FROM sm_tags WHERE resource_arn = ?", (arn,))
        return _response({})

    # --------------------------------------------------------------------------------------- model registry

    def create_model_package_group(self, **params: Any) -> dict[str, Any]:
        self._validate("CreateModelPackageGroup", params)
        with self._registry_errors("CreateModelPackageGroup"):
            out = registry.create_model_package_group(params["ModelPackageGroupName"],
                                                      params.get("ModelPackageGroupDescription"), params.get("Tags"))
        with self._db(write=True) as conn:
            self._store_tags(conn, out["ModelPackageGroupArn"], params.get("Tags"))
        return _response(out)

    def describe_model_package_group(self, **params: Any) -> dict[str, Any]:
        self._validate("DescribeModelPackageGroup", params)
        with self._registry_errors("DescribeModelPackageGroup"):
            return _response(registry.get_group(params["ModelPackageGroupName"]).describe())

    def list_model_package_groups(self, **params: Any) -> dict[str, Any]:
        self._validate("ListModelPackageGroups", params)
        groups = [g.summary() for g in registry.list_groups()]
        groups = [g for g in groups if self._created_between(g, params)
                  and params.get("NameContains", "").lower() in g["ModelPackageGroupName"].lower()]
        groups = _sort(groups, params, "Ascending", {"Name": lambda g: g["ModelPackageGroupName"],
                                                     "CreationTime": lambda g: g["CreationTime"]})
        return _response(_paginate("ListModelPackageGroups", groups, params, "ModelPackageGroupSummaryList"))

    @staticmethod
    def _created_between(item: dict[str, Any], params: dict[str, Any]) -> bool:
        created = item["CreationTime"].timestamp()
        if "CreationTimeAfter" in params and created <= _epoch(params["CreationTimeAfter"]):
            return False
        return not ("CreationTimeBefore" in params and created >= _epoch(params["CreationTimeBefore"]))

    def create_model_package(self, **params: Any) -> dict[str, Any]:
        with self._registry_errors("CreateModelPackage"):
            out = registry.create_model_package(params, create_group=False)
        with self._db(write=True) as conn:
            self._store_tags(conn, out["ModelPackageArn"], params.get("Tags"))
        return _response(out)

    def describe_model_package(self, **params: Any) -> dict[str, Any]:
        self._validate("DescribeModelPackage", params)
        name = params["ModelPackageName"]
        if not name.startswith("arn:"):
            raise _client_error("DescribeModelPackage", f"ModelPackage {name} does not exist. Versioned model "
                                "packages are described by their ARN.")
        with self._registry_errors("DescribeModelPackage"):
            return _response(registry.get_package(name).describe())

    def list_model_packages(self, **params: Any) -> dict[str, Any]:
        self._validate("ListModelPackages", params)
        group = params.get("ModelPackageGroupName")
        package_type = params.get("ModelPackageType") or ("Versioned" if group else "Unversioned")
        if package_type == "Unversioned":
            packages: list[dict[str, Any]] = []  # the local registry only holds versioned packages
        else:
            if group and group.startswith("arn:"):
                group = group.rsplit("/", 1)[-1]
            with self._registry_errors("ListModelPackages"):
                packages = [p.summary() for p in registry.list_packages(group, params.get("ModelApprovalStatus"))]
        name_filter = params.get("NameContains", "").lower()
        packages = [p for p in packages if self._created_between(p, params)
                    and name_filter in p["ModelPackageName"].lower()]
        packages = _sort(packages, params, "Ascending", {
            "Name": lambda p: (p["ModelPackageName"], p["ModelPackageVersion"]),
            "CreationTime": lambda p: (p["CreationTime"], p["ModelPackageVersion"]),
        })
        return _response(_paginate("ListModelPackages", packages, params, "ModelPackageSummaryList"))

    def update_model_package(self, **params: Any) -> dict[str, Any]:
        with self._registry_errors("UpdateModelPackage"):
            return _response(registry.update_model_package(params))

    # ------------------------------------------------------------------------------------------------- models

    def create_model(self, **params: Any) -> dict[str, Any]:
        self._validate("CreateModel", params)
        name = params["ModelName"]
        containers = ([params["PrimaryContainer"]] if params.get("PrimaryContainer") else []) + list(
            params.get("Containers") or [])
        if not containers:
            raise _client_error("CreateModel", "Either PrimaryContainer or Containers must be specified.")
        if params.get("PrimaryContainer") and params.get("Containers"):
            raise _client_error("CreateModel", "PrimaryContainer and Containers are mutually exclusive.")
        for container in containers:
            if container.get("ModelPackageName"):
                self._package_container(container["ModelPackageName"], "CreateModel")
            elif not container.get("Image"):
                raise _client_error("CreateModel", "A container needs an Image or a ModelPackageName.")
        arn = model_arn(name)
        with self._db(write=True) as conn:
            if conn.execute("SELECT 1 FROM sm_models WHERE name = ? COLLATE NOCASE", (name,)).fetchone():
                raise _client_error("CreateModel", f'Cannot create already existing model "{arn}".')
            conn.execute("INSERT INTO sm_models (name, arn, request, creation_time) VALUES (?,?,?,?)",
                         (name, arn, json.dumps(params), time.time()))
            self._store_tags(conn, arn, params.get("Tags"))
        logger.info("created model %s", name)
        return _response({"ModelArn": arn})

    def _package_container(self, ref: str, operation: str) -> dict[str, Any]:
        try:
            package = registry.get_package(ref)
        except registry.ResourceNotFound as exc:
            raise _client_error(operation, f"ModelPackage {ref} does not exist.") from exc
        if package.container is None:
            raise _client_error(operation, f"ModelPackage {ref} has no InferenceSpecification containers.")
        return package.container

    def describe_model(self, **params: Any) -> dict[str, Any]:
        self._validate("DescribeModel", params)
        row = self._get("sm_models", params["ModelName"])
        if row is None:
            raise _client_error("DescribeModel", f'Could not find model "{model_arn(params["ModelName"])}".')
        request = json.loads(row["request"])
        out: dict[str, Any] = {"ModelName": row["name"]}
        for key in ("PrimaryContainer", "Containers", "InferenceExecutionConfig", "ExecutionRoleArn", "VpcConfig"):
            if key in request:
                out[key] = request[key]
        out.update(CreationTime=to_datetime(row["creation_time"]), ModelArn=row["arn"],
                   EnableNetworkIsolation=bool(request.get("EnableNetworkIsolation", False)))
        return _response(out)

    def delete_model(self, **params: Any) -> dict[str, Any]:
        self._validate("DeleteModel", params)
        arn = model_arn(params["ModelName"])
        return self._delete("DeleteModel", "sm_models", params["ModelName"], arn, f'Could not find model "{arn}".')

    # --------------------------------------------------------------------------------------- endpoint configs

    def create_endpoint_config(self, **params: Any) -> dict[str, Any]:
        self._validate("CreateEndpointConfig", params)
        name = params["EndpointConfigName"]
        arn = endpoint_config_arn(name)
        variants = params["ProductionVariants"]
        if not variants:
            raise _client_error("CreateEndpointConfig", "ProductionVariants must hold at least one variant.")
        for variant in variants:
            model = variant.get("ModelName")
            if not model or self._get("sm_models", model) is None:
                raise _client_error("CreateEndpointConfig", f'Could not find model "{model_arn(model or "")}".')
        with self._db(write=True) as conn:
            if conn.execute("SELECT 1 FROM sm_endpoint_configs WHERE name = ?", (name,)).fetchone():
                raise _client_error("CreateEndpointConfig",
                                    f'Cannot create already existing endpoint configuration "{arn}".')
            conn.execute("INSERT INTO sm_endpoint_configs (name, arn, request, creation_time) VALUES (?,?,?,?)",
                         (name, arn, json.dumps(params), time.time()))
            self._store_tags(conn, arn, params.get("Tags"))
        logger.info("created endpoint config %s", name)
        return _response({"EndpointConfigArn": arn})

    def _config(self, name: str, operation: str) -> tuple[dict[str, Any], dict[str, Any]]:
        row = self._get("sm_endpoint_configs", name)
        if row is None:
            raise _client_error(operation, f'Could not find endpoint configuration "{endpoint_config_arn(name)}".')
        return row, json.loads(row["request"])

    def describe_endpoint_config(self, **params: Any) -> dict[str, Any]:
        self._validate("DescribeEndpointConfig", params)
        row, request = self._config(params["EndpointConfigName"], "DescribeEndpointConfig")
        out: dict[str, Any] = {"EndpointConfigName": row["name"], "EndpointConfigArn": row["arn"],
                               "ProductionVariants": request["ProductionVariants"]}
        for key in ("DataCaptureConfig", "KmsKeyId", "AsyncInferenceConfig", "ExplainerConfig",
                    "ShadowProductionVariants", "ExecutionRoleArn", "VpcConfig", "EnableNetworkIsolation"):
            if key in request:
                out[key] = request[key]
        out["CreationTime"] = to_datetime(row["creation_time"])
        return _response(out)

    def delete_endpoint_config(self, **params: Any) -> dict[str, Any]:
        self._validate("DeleteEndpointConfig", params)
        arn = endpoint_config_arn(params["EndpointConfigName"])
        return self._delete("DeleteEndpointConfig", "sm_endpoint_configs", params["EndpointConfigName"], arn,
                            f'Could not find endpoint configuration "{arn}".')

    # ---------------------------------------------------------------------------------------------- endpoints

    def create_endpoint(self, **params: Any) -> dict[str, Any]:
        self._validate("CreateEndpoint", params)
        name, config_name = params["EndpointName"], params["EndpointConfigName"]
        arn = endpoint_arn(name)
        self._config(config_name, "CreateEndpoint")
        self._reconcile(name)
        now = time.time()
        with self._db(write=True) as conn:
            if conn.execute("SELECT 1 FROM sm_endpoints WHERE name = ?", (name,)).fetchone():
                raise _client_error("CreateEndpoint", f'Cannot create already existing endpoint "{arn}".')
            conn.execute("INSERT INTO sm_endpoints (name, arn, config_name, status, creation_time, last_modified_time)"
                         " VALUES (?,?,?,?,?,?)", (name, arn, config_name, "Creating", now, now))
            _record_operation(conn, name, "Create", config_name, now)
            self._store_tags(conn, arn, params.get("Tags"))
        self._deploy(name, config_name, creating=True)
        return _response({"EndpointArn": arn})

    def update_endpoint(self, **params: Any) -> dict[str, Any]:
        self._validate("UpdateEndpoint", params)
        name, config_name = params["EndpointName"], params["EndpointConfigName"]
        arn = endpoint_arn(name)
        self._config(config_name, "UpdateEndpoint")
        self._reconcile(name)
        with self._db(write=True) as conn:
            row = conn.execute("SELECT status FROM sm_endpoints WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise _client_error("UpdateEndpoint", f'Could not find endpoint "{arn}".')
            if row["status"] in IN_PROGRESS:
                raise _client_error("UpdateEndpoint", f'Cannot update in-progress endpoint "{arn}".')
            if row["status"] == "Failed":
                raise _client_error("UpdateEndpoint", f'Cannot update failed endpoint "{arn}". DeleteEndpoint is the '
                                    "only operation that can be performed on a failed endpoint.")
            now = time.time()
            conn.execute("UPDATE sm_endpoints SET status = 'Updating', last_modified_time = ? WHERE name = ?",
                         (now, name))
            _record_operation(conn, name, "Update", config_name, now)
        self._deploy(name, config_name, creating=False)
        return _response({"EndpointArn": arn})

    def _served_variant(self, config_name: str) -> dict[str, Any]:
        """The production variant the local endpoint serves: the config's heaviest."""
        _, config = self._config(config_name, "CreateEndpoint")
        return max(config["ProductionVariants"], key=lambda v: float(v.get("InitialVariantWeight", 1.0)))

    def _variant_name(self, config_name: str) -> str:
        return str(self._served_variant(config_name)["VariantName"])

    def _resolve_container(self, config_name: str) -> dict[str, Any]:
        """The container an endpoint config serves: its heaviest variant's model, package references resolved."""
        _, config = self._config(config_name, "CreateEndpoint")
        variants = config["ProductionVariants"]
        variant = self._served_variant(config_name)
        if len(variants) > 1:
            logger.warning("endpoint config %s has %d variants; the local endpoint serves only %s", config_name,
                           len(variants), variant["VariantName"])
        if int(variant.get("InitialInstanceCount") or 1) > 1:
            logger.info("endpoint config %s asks for %s instances; the local endpoint runs one server",
                        config_name, variant.get("InitialInstanceCount"))
        row = self._get("sm_models", variant["ModelName"])
        if row is None:
            raise endpoints.EndpointError(f'Could not find model "{model_arn(variant["ModelName"])}".')
        model = json.loads(row["request"])
        container = dict(model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0])
        if container.get("ModelPackageName"):
            package = dict(self._package_container(container["ModelPackageName"], "CreateEndpoint"))
            environment = dict(package.get("Environment") or {})
            environment.update(container.get("Environment") or {})
            package["Environment"] = environment
            container = package
        return container

    def _deploy(self, name: str, config_name: str, *, creating: bool) -> None:
        """Deploy ``config_name`` to the local server of ``name`` and record the outcome (this process is the
        deployer meanwhile: see :func:`_deployer_alive`)."""
        with _ACTIVE_LOCK:
            _ACTIVE.add(name)
        try:
            self._run_deploy(name, config_name, creating=creating)
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(name)

    def _run_deploy(self, name: str, config_name: str, *, creating: bool) -> None:
        try:
            container = self._resolve_container(config_name)
            deployment = endpoints.materialize(name, container)
            endpoints.deploy(name, deployment.model_dir, environment=deployment.environment,
                             startup_timeout=self.startup_timeout, variant=self._variant_name(config_name))
        except Exception as exc:  # the endpoint's status carries the failure, as on SageMaker
            reason = str(exc)[-1024:] or type(exc).__name__
            logger.error("endpoint %s: deploying %s failed: %s", name, config_name, reason)
            with self._db(write=True) as conn:
                if creating:
                    conn.execute("UPDATE sm_endpoints SET status = 'Failed', failure_reason = ?, last_modified_time = ?"
                                 " WHERE name = ?", (reason, time.time(), name))
                else:  # SageMaker rolls a failed update back: the old configuration keeps serving
                    conn.execute("UPDATE sm_endpoints SET status = 'InService', failure_reason = ?,"
                                 " last_modified_time = ? WHERE name = ?", (reason, time.time(), name))
                conn.execute("DELETE FROM sm_endpoint_operations WHERE name = ?", (name,))
            return
        now = time.time()
        with self._db(write=True) as conn:
            conn.execute("UPDATE sm_endpoints SET status = 'InService', config_name = ?, failure_reason = NULL,"
                         " last_modified_time = ?, deployed_at = ? WHERE name = ?", (config_name, now, now, name))
            conn.execute("DELETE FROM sm_endpoint_operations WHERE name = ?", (name,))
        logger.info("endpoint %s is InService with %s", name, config_name)

    def describe_endpoint(self, **params: Any) -> dict[str, Any]:
        self._validate("DescribeEndpoint", params)
        name = params["EndpointName"]
        self._reconcile(name)
        row = self._get("sm_endpoints", name)
        if row is None:
            raise _client_error("DescribeEndpoint", f'Could not find endpoint "{endpoint_arn(name)}".')
        out: dict[str, Any] = {"EndpointName": row["name"], "EndpointArn": row["arn"],
                               "EndpointConfigName": row["config_name"]}
        config_row = self._get("sm_endpoint_configs", row["config_name"])
        config = json.loads(config_row["request"]) if config_row else {}
        if row["status"] in ("InService", "Updating") and config:
            deployed = to_datetime(row["deployed_at"] or row["last_modified_time"])
            variants = []
            for variant in config["ProductionVariants"]:
                image = self._image_of(variant.get("ModelName"))
                summary: dict[str, Any] = {"VariantName": variant["VariantName"]}
                if image:
                    summary["DeployedImages"] = [{"SpecifiedImage": image, "ResolvedImage": image,
                                                  "ResolutionTime": deployed}]
                weight = float(variant.get("InitialVariantWeight", 1.0))
                count = int(variant.get("InitialInstanceCount") or 1)
                summary.update(CurrentWeight=weight, DesiredWeight=weight, CurrentInstanceCount=count,
                               DesiredInstanceCount=count)
                variants.append(summary)
            out["ProductionVariants"] = variants
        capture = config.get("DataCaptureConfig")
        if capture:
            out["DataCaptureConfig"] = {
                "EnableCapture": bool(capture.get("EnableCapture", True)),
                "CaptureStatus": "Started" if capture.get("EnableCapture", True) else "Stopped",
                "CurrentSamplingPercentage": int(capture["InitialSamplingPercentage"]),
                "DestinationS3Uri": capture["DestinationS3Uri"],
                "KmsKeyId": capture.get("KmsKeyId", ""),
            }
        out["EndpointStatus"] = row["status"]
        if row["failure_reason"]:
            out["FailureReason"] = row["failure_reason"]
        operation = self._get("sm_endpoint_operations", name) if row["status"] == "Updating" else None
        if operation:  # as SageMaker shows an update's target while the old fleet still serves
            out["PendingDeploymentSummary"] = {"EndpointConfigName": operation["config_name"],
                                               "StartTime": to_datetime(operation["started_at"])}
        out["CreationTime"] = to_datetime(row["creation_time"])
        out["LastModifiedTime"] = to_datetime(row["last_modified_time"])
        return _response(out)

    def _image_of(self, model_name: str | None) -> str | None:
        row = self._get("sm_models", model_name or "")
        if row is None:
            return None
        request = json.loads(row["request"])
        container = request.get("PrimaryContainer") or (request.get("Containers") or [{}])[0]
        if container.get("Image"):
            return container["Image"]
        if container.get("ModelPackageName"):
            with contextlib.suppress(registry.ResourceNotFound):
                return (registry.get_package(container["ModelPackageName"]).container or {}).get("Image")
        return None

    def list_endpoints(self, **params: Any) -> dict[str, Any]:
        self._validate("ListEndpoints", params)
        with self._db() as conn:
            unsettled = [r["name"] for r in conn.execute("SELECT name FROM sm_endpoints WHERE status IN (?, ?)",
                                                         RECONCILED).fetchall()]
        for name in unsettled:
            self._reconcile(name)
        with self._db() as conn:
            rows = [dict(r) for r in conn.execute("SELECT * FROM sm_endpoints").fetchall()]
        items = [{"EndpointName": r["name"], "EndpointArn": r["arn"], "CreationTime": to_datetime(r["creation_time"]),
                  "LastModifiedTime": to_datetime(r["last_modified_time"]), "EndpointStatus": r["status"]}
                 for r in rows]
        name_filter = params.get("NameContains", "").lower()
        items = [i for i in items if name_filter in i["EndpointName"].lower() and self._created_between(i, params)
                 and (not params.get("StatusEquals") or i["EndpointStatus"] == params["StatusEquals"])
                 and ("LastModifiedTimeAfter" not in params
                      or i["LastModifiedTime"].timestamp() > _epoch(params["LastModifiedTimeAfter"]))
                 and ("LastModifiedTimeBefore" not in params
                      or i["LastModifiedTime"].timestamp() < _epoch(params["LastModifiedTimeBefore"]))]
        items = _sort(items, params, "Descending", {"Name": lambda i: i["EndpointName"],
                                                    "CreationTime": lambda i: i["CreationTime"],
                                                    "Status": lambda i: i["EndpointStatus"]})
        return _response(_paginate("ListEndpoints", items, params, "Endpoints"))

    def delete_endpoint(self, **params: Any) -> dict[str, Any]:
        self._validate("DeleteEndpoint", params)
        name = params["EndpointName"]
        arn = endpoint_arn(name)
        with self._db(write=True) as conn:
            row = conn.execute("SELECT status FROM sm_endpoints WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise _client_error("DeleteEndpoint", f'Could not find endpoint "{arn}".')
            conn.execute("UPDATE sm_endpoints SET status = 'Deleting', last_modified_time = ? WHERE name = ?",
                         (time.time(), name))
        endpoints.delete(name)
        with self._db(write=True) as conn:
            conn.execute("DELETE FROM sm_endpoints WHERE name = ?", (name,))
            conn.execute("DELETE FROM sm_endpoint_operations WHERE name = ?", (name,))
            conn.execute("DELETE FROM sm_tags WHERE resource_arn = ?", (arn,))
        logger.info("deleted endpoint %s", name)
        return _response({})

    def redeploy_endpoint(self, endpoint_name: str) -> dict[str, Any]:
        """Local-only: deploy an endpoint's current configuration again (restarts a server that died)."""
        self._reconcile(endpoint_name)
        arn = endpoint_arn(endpoint_name)
        with self._db(write=True) as conn:
            row = conn.execute("SELECT * FROM sm_endpoints WHERE name = ?", (endpoint_name,)).fetchone()
            if row is None:
                raise _client_error("DescribeEndpoint", f'Could not find endpoint "{arn}".')
            if row["status"] in IN_PROGRESS:
                raise _client_error("UpdateEndpoint", f'Cannot restart in-progress endpoint "{arn}".')
            _record_operation(conn, endpoint_name, "Restart", row["config_name"], time.time())
        self._deploy(endpoint_name, row["config_name"], creating=row["status"] == "Failed")
        return self.describe_endpoint(EndpointName=endpoint_name)

    def _reconcile(self, name: str) -> None:
        """Settle an endpoint left ``Creating``/``Updating`` by a deploy whose process is gone (module docstring)."""
        row = self._get("sm_endpoints", name)
        if row is None or row["status"] not in RECONCILED:
            return
        operation = self._get("sm_endpoint_operations", name)
        if operation is not None and _deployer_alive(operation):
            return  # a deploy is really in progress
        status, config_name, reason = _interrupted_outcome(row, operation)
        with self._db(write=True) as conn:
            current = conn.execute("SELECT status, last_modified_time FROM sm_endpoints WHERE name = ?",
                                   (name,)).fetchone()
            if current is None or tuple(current) != (row["status"], row["last_modified_time"]):
                return  # settled (or moved on) meanwhile
            now = time.time()
            conn.execute("UPDATE sm_endpoints SET status = ?, config_name = ?, failure_reason = ?, last_modified_time"
                         " = ?, deployed_at = CASE WHEN ? THEN ? ELSE deployed_at END WHERE name = ?",
                         (status, config_name, reason, now, reason is None, now, name))
            conn.execute("DELETE FROM sm_endpoint_operations WHERE name = ?", (name,))
        logger.warning("endpoint %s was %s with nobody deploying it: now %s%s", name, row["status"], status,
                       f" ({reason})" if reason else f" with {config_name} (its server came up before the deploy "
                       "was cut short)")

    def package_of_config(self, config_name: str | None) -> str | None:
        """Local-only: the model package ARN the served variant of an endpoint config deploys, if any."""
        if not config_name:
            return None
        try:
            variant = self._served_variant(config_name)
        except ClientError:
            return None
        row = self._get("sm_models", variant["ModelName"])
        if row is None:
            return None
        request = json.loads(row["request"])
        container = request.get("PrimaryContainer") or (request.get("Containers") or [{}])[0]
        return container.get("ModelPackageName")

    def _settled(self, endpoint_name: str, timeout: float | None) -> dict[str, Any]:
        """``DescribeEndpoint`` once no deploy is in progress (another process's), or at the deadline."""
        deadline = time.monotonic() + (self.startup_timeout + 30 if timeout is None else timeout)
        while True:
            described = self.describe_endpoint(EndpointName=endpoint_name)
            if described["EndpointStatus"] not in IN_PROGRESS or time.monotonic() > deadline:
                return described
            time.sleep(SERVING_POLL_S)

    def serving_problem(self, endpoint_name: str, package_arn: str | None, *, heal: bool = True,
                        timeout: float | None = None) -> str | None:
        """Local-only: why ``endpoint_name`` is not serving ``package_arn`` from a live server; ``None`` when it is.

        Waits for a deploy another process is running. With ``heal``, an ``InService`` endpoint whose server died
        gets its server restarted on the same configuration, as SageMaker replaces a failed instance by itself.
        """
        described = self._settled(endpoint_name, timeout)
        status, reason = described["EndpointStatus"], described.get("FailureReason")
        if status != "InService":
            return f"endpoint {endpoint_name!r} is {status}: {reason or 'no reason given'}"
        serving = self.package_of_config(described["EndpointConfigName"])
        if package_arn and serving != package_arn:
            return (f"endpoint {endpoint_name!r} serves {serving or 'an unknown model'}, not {package_arn}"
                    + (f" ({reason})" if reason else ""))
        server = _server(endpoint_name)
        if server is not None and server.alive:
            return None
        gone = f"the server of endpoint {endpoint_name!r} is not running"
        if not heal:
            return gone
        logger.warning("%s; starting it again with %s", gone, described["EndpointConfigName"])
        described = self.redeploy_endpoint(endpoint_name)
        server = _server(endpoint_name)
        if server is not None and server.alive:
            return None
        return f"{gone} and restarting it failed: {described.get('FailureReason') or 'no reason given'}"

    # --------------------------------------------------------------------------------------------------- tags

    def _resource_exists(self, arn: str) -> bool:
        kind, _, rest = arn.partition(f"{ARN_PREFIX}:")[2].partition("/")
        tables = {"model": "sm_models", "endpoint-config": "sm_endpoint_configs", "endpoint": "sm_endpoints"}
        with self._db() as conn:
            if kind in tables:
                return conn.execute(f"SELECT 1 FROM {tables[kind]} WHERE arn = ?", (arn,)).fetchone() is not None
        if kind == "model-package":
            with contextlib.suppress(registry.ResourceNotFound):
                return bool(registry.get_package(arn))
        if kind == "model-package-group":
            return any(g.arn == arn for g in registry.list_groups())
        return False

    def add_tags(self, **params: Any) -> dict[str, Any]:
        self._validate("AddTags", params)
        arn = params["ResourceArn"]
        if not self._resource_exists(arn):
            raise _client_error("AddTags", f"Resource {arn} does not exist.")
        with self._db(write=True) as conn:
            self._store_tags(conn, arn, params["Tags"])
        return _response({"Tags": params["Tags"]})

    def list_tags(self, **params: Any) -> dict[str, Any]:
        self._validate("ListTags", params)
        arn = params["ResourceArn"]
        if not self._resource_exists(arn):
            raise _client_error("ListTags", f"Resource {arn} does not exist.")
        with self._db() as conn:
            rows = conn.execute("SELECT key, value FROM sm_tags WHERE resource_arn = ? ORDER BY key", (arn,)).fetchall()
        return _response(_paginate("ListTags", [{"Key": r["key"], "Value": r["value"]} for r in rows], params, "Tags"))
