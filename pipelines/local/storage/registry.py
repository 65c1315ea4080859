"""Local model registry: SageMaker model package groups and versioned model packages in SQLite.

Tables (owned here): ``model_package_groups`` and ``model_packages``. Requests and responses have the shapes of
the SageMaker API (``CreateModelPackage`` exactly as the pipeline definition's RegisterModel step carries it,
``DescribeModelPackage``/``ModelPackageSummary`` dicts back), and ARNs look like AWS's::

    arn:aws:sagemaker:us-east-1:000000000000:model-package/<group>/<version>

The evaluation report that ``ModelMetrics.ModelQuality.Statistics.S3Uri`` points at is read from the local
artifact store at registration time and kept with the package, so ``models describe`` can show its accuracy.

``CreateModelPackage`` honours ``ClientToken`` (the operation's idempotency token in botocore's model): a token seen
before with the same request returns the package it created, the same token with a different request raises
:class:`IdempotentParameterMismatch` (``ConflictException`` through the local client). The token and the package are
committed in one transaction, so a caller killed right after the commit gets the same package when it retries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

from botocore.exceptions import ParamValidationError
from botocore.validate import ParamValidator

from pipelines.local.storage.store import LOCAL_ACCOUNT, LOCAL_REGION, ArtifactStore, transaction

logger = logging.getLogger(__name__)

DEFAULT_GROUP = "ImageClassifierModels"
APPROVAL_STATUSES = ("PendingManualApproval", "Approved", "Rejected")
ARN_PREFIX = f"arn:aws:sagemaker:{LOCAL_REGION}:{LOCAL_ACCOUNT}"

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS model_package_groups (
        name TEXT PRIMARY KEY,
        arn TEXT NOT NULL UNIQUE,
        description TEXT,
        status TEXT NOT NULL DEFAULT 'Completed',
        tags TEXT NOT NULL DEFAULT '[]',
        creation_time REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS model_packages (
        arn TEXT PRIMARY KEY,
        group_name TEXT NOT NULL REFERENCES model_package_groups(name),
        version INTEGER NOT NULL,
        status TEXT NOT NULL DEFAULT 'Completed',
        approval_status TEXT NOT NULL,
        approval_description TEXT,
        description TEXT,
        inference_specification TEXT,
        model_metrics TEXT,
        evaluation TEXT,
        customer_metadata TEXT NOT NULL DEFAULT '{}',
        request TEXT NOT NULL,
        creation_time REAL NOT NULL,
        last_modified_time REAL NOT NULL,
        UNIQUE (group_name, version)
    )""",
    """CREATE TABLE IF NOT EXISTS model_package_client_tokens (
        token TEXT PRIMARY KEY,
        request_digest TEXT NOT NULL,
        arn TEXT NOT NULL,
        creation_time REAL NOT NULL
    )""",
)

#: Namespace of the deterministic ClientTokens the engine derives (uuid5: 36 characters, ``[a-zA-Z0-9-]+``).
CLIENT_TOKEN_NAMESPACE = uuid.UUID("5b0f7c1e-2f4d-4b8e-9a61-6c1f2e7d9a30")


class RegistryError(Exception):
    """Base class of the registry's own errors."""


class RegistryValidationError(RegistryError, ValueError):
    """A request SageMaker would refuse with ``ValidationException`` (beyond botocore's shape validation)."""


class ResourceNotFound(RegistryError, LookupError):
    """The named model package or group does not exist."""


class IdempotentParameterMismatch(RegistryError):
    """A ``ClientToken`` reused with a different request (the local client reports it as ``ConflictException``,
    the error botocore's model declares for ``CreateModelPackage``)."""

    code = "ConflictException"


@cache
def _service_model() -> Any:
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker")


def operation_model(operation: str) -> Any:
    """botocore's operation model for a SageMaker operation (``"CreateModelPackage"``...)."""
    return _service_model().operation_model(operation)


def validate_request(operation: str, params: dict[str, Any]) -> None:
    """Validate ``params`` against the operation's input shape exactly like boto3 does before sending.

    Raises ``botocore.exceptions.ParamValidationError`` with botocore's own report (missing/unknown parameters,
    wrong types, values below minimum lengths), plus the enum checks SageMaker itself does server-side.
    """
    if not isinstance(params, dict):
        raise ParamValidationError(report=f"{operation} request must be a dict, got {type(params).__name__}")
    shape = operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    if report.has_errors():
        raise ParamValidationError(report=report.generate_report())
    _check_enums(params, shape, operation)


def _check_enums(value: Any, shape: Any, path: str) -> None:
    """SageMaker rejects values outside an enum with a ValidationException; botocore does not check them."""
    kind = shape.type_name
    if kind == "structure" and isinstance(value, dict):
        for key, item in value.items():
            if key in shape.members:
                _check_enums(item, shape.members[key], f"{path}.{key}")
    elif kind == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            _check_enums(item, shape.member, f"{path}[{i}]")
    elif kind == "map" and isinstance(value, dict):
        for key, item in value.items():
            _check_enums(item, shape.value, f"{path}.{key}")
    elif kind == "string" and getattr(shape, "enum", None) and isinstance(value, str) and value not in shape.enum:
        raise RegistryValidationError(
            f"1 validation error detected: Value '{value}' at '{path}' failed to satisfy constraint: "
            f"Member must satisfy enum value set: [{', '.join(shape.enum)}]"
        )


def group_arn(group: str) -> str:
    return f"{ARN_PREFIX}:model-package-group/{group.lower()}"


def package_arn(group: str, version: int) -> str:
    return f"{ARN_PREFIX}:model-package/{group.lower()}/{int(version)}"


#: The ``ModelPackageSummary`` members of a ``DescribeModelPackage`` response.
SUMMARY_KEYS = ("ModelPackageName", "ModelPackageGroupName", "ModelPackageVersion", "ModelPackageArn", "CreationTime",
                "ModelPackageStatus", "ModelApprovalStatus", "ModelPackageDescription")


def to_datetime(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=UTC)


def _db(write: bool = False) -> contextlib.AbstractContextManager[sqlite3.Connection]:
    return transaction(SCHEMA, write)


# ------------------------------------------------------------------------------------------------ data objects


@dataclass(frozen=True)
class ModelPackageGroup:
    name: str
    arn: str
    description: str | None
    status: str
    creation_time: float
    tags: list[dict[str, str]]

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ModelPackageGroup:
        return cls(row["name"], row["arn"], row["description"], row["status"], row["creation_time"],
                   json.loads(row["tags"]))

    def describe(self) -> dict[str, Any]:
        """``DescribeModelPackageGroup`` response."""
        out: dict[str, Any] = {
            "ModelPackageGroupName": self.name,
            "ModelPackageGroupArn": self.arn,
            "CreationTime": to_datetime(self.creation_time),
            "CreatedBy": {},
            "ModelPackageGroupStatus": self.status,
        }
        if self.description:
            out["ModelPackageGroupDescription"] = self.description
        return out

    def summary(self) -> dict[str, Any]:
        """``ModelPackageGroupSummary``."""
        out = self.describe()
        del out["CreatedBy"]
        return out


@dataclass(frozen=True)
class ModelPackage:
    arn: str
    group: str
    version: int
    status: str
    approval_status: str
    approval_description: str | None
    description: str | None
    inference_specification: dict[str, Any] | None
    model_metrics: dict[str, Any] | None
    evaluation: dict[str, Any] | None
    customer_metadata: dict[str, str]
    request: dict[str, Any]
    creation_time: float
    last_modified_time: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ModelPackage:
        def load(col: str) -> Any:
            return json.loads(row[col]) if row[col] else None

        return cls(row["arn"], row["group_name"], row["version"], row["status"], row["approval_status"],
                   row["approval_description"], row["description"], load("inference_specification"),
                   load("model_metrics"), load("evaluation"), load("customer_metadata") or {}, load("request"),
                   row["creation_time"], row["last_modified_time"])

    @property
    def accuracy(self) -> float | None:
        """``multiclass_classification_metrics.accuracy.value`` of the evaluation report, if there is one."""
        try:
            return float(self.evaluation["multiclass_classification_metrics"]["accuracy"]["value"])  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            return None

    @property
    def container(self) -> dict[str, Any] | None:
        containers = (self.inference_specification or {}).get("Containers") or []
        return containers[0] if containers else None

    def describe(self) -> dict[str, Any]:
        """``DescribeModelPackage`` response (the keys SageMaker returns for a versioned package)."""
        out: dict[str, Any] = {
            "ModelPackageName": self.group,
            "ModelPackageGroupName": self.group,
            "ModelPackageVersion": self.version,
            "ModelPackageArn": self.arn,
            "CreationTime": to_datetime(self.creation_time),
            "ModelPackageStatus": self.status,
            "ModelPackageStatusDetails": {"ValidationStatuses": [], "ImageScanStatuses": []},
            "CertifyForMarketplace": bool(self.request.get("CertifyForMarketplace", False)),
            "ModelApprovalStatus": self.approval_status,
            "CreatedBy": {},
            "LastModifiedTime": to_datetime(self.last_modified_time),
            "LastModifiedBy": {},
        }
        optional = {
            "ModelPackageDescription": self.description,
            "InferenceSpecification": self.inference_specification,
            "ModelMetrics": self.model_metrics,
            "ApprovalDescription": self.approval_description,
            "CustomerMetadataProperties": self.customer_metadata or None,
        }
        out.update({k: v for k, v in optional.items() if v})
        for key in ("MetadataProperties", "Domain", "Task", "SamplePayloadUrl", "DriftCheckBaselines",
                    "AdditionalInferenceSpecifications", "SkipModelValidation", "SourceUri",
                    "ModelPackageRegistrationType", "ModelLifeCycle"):
            if key in self.request:
                out[key] = self.request[key]
        return out

    def summary(self) -> dict[str, Any]:
        """``ModelPackageSummary`` as ``ListModelPackages`` returns it (a subset of ``describe()``)."""
        described = self.describe()
        return {key: described[key] for key in SUMMARY_KEYS if key in described}


# ------------------------------------------------------------------------------------------------------ groups


def create_model_package_group(name: str, description: str | None = None,
                               tags: list[dict[str, str]] | None = None, *, exist_ok: bool = False) -> dict[str, Any]:
    """``CreateModelPackageGroup``; returns ``{"ModelPackageGroupArn"}``."""
    request: dict[str, Any] = {"ModelPackageGroupName": name}
    if description:
        request["ModelPackageGroupDescription"] = description
    if tags:
        request["Tags"] = tags
    validate_request("CreateModelPackageGroup", request)
    with _db(write=True) as conn:
        _insert_group(conn, name, description, tags or [], exist_ok=exist_ok)
    return {"ModelPackageGroupArn": group_arn(name)}


def _insert_group(conn: sqlite3.Connection, name: str, description: str | None, tags: list[dict[str, str]],
                  *, exist_ok: bool) -> None:
    existing = conn.execute("SELECT name FROM model_package_groups WHERE lower(name) = lower(?)", (name,)).fetchone()
    if existing:
        if exist_ok:
            return
        raise RegistryValidationError(f"Model Package Group already exists: {group_arn(name)}")
    conn.execute("INSERT INTO model_package_groups (name, arn, description, tags, creation_time) VALUES (?,?,?,?,?)",
                 (name, group_arn(name), description, json.dumps(tags), time.time()))
    logger.info("created model package group %s", name)


def get_group(name: str) -> ModelPackageGroup:
    with _db() as conn:
        row = conn.execute("SELECT * FROM model_package_groups WHERE name = ? OR arn = ?", (name, name)).fetchone()
    if row is None:
        raise ResourceNotFound(f"ModelPackageGroup {name} does not exist.")
    return ModelPackageGroup.from_row(row)


def list_groups() -> list[ModelPackageGroup]:
    with _db() as conn:
        rows = conn.execute("SELECT * FROM model_package_groups ORDER BY creation_time, name").fetchall()
    return [ModelPackageGroup.from_row(r) for r in rows]


# ---------------------------------------------------------------------------------------------------- packages


def create_model_package(request: dict[str, Any], *, create_group: bool = True) -> dict[str, Any]:
    """Register a model version from a ``CreateModelPackage`` request (the RegisterModel step's ``Arguments``).

    The request is validated with botocore against SageMaker's service model (``ParamValidationError`` with
    botocore's report when it is malformed). With ``create_group`` the group is created on first use, as a
    pipeline's RegisterModel step does; otherwise a missing group is a :class:`RegistryValidationError`, as the
    ``CreateModelPackage`` API call gives. Returns ``{"ModelPackageArn": ...}``.
    """
    validate_request("CreateModelPackage", request)
    group = request.get("ModelPackageGroupName")
    if not group:
        raise RegistryValidationError(
            "ModelPackageGroupName is required: the local registry only keeps versioned model packages "
            f"(got ModelPackageName={request.get('ModelPackageName')!r} without a group)")
    if request.get("ModelPackageName"):
        raise RegistryValidationError("ModelPackageName and ModelPackageGroupName are mutually exclusive: "
                                      "give only ModelPackageGroupName for a versioned package")
    approval = request.get("ModelApprovalStatus", "PendingManualApproval")
    spec = request.get("InferenceSpecification")
    if spec is not None and not spec.get("Containers"):
        raise RegistryValidationError("InferenceSpecification.Containers must hold at least one container")
    metrics = request.get("ModelMetrics")
    evaluation = _read_evaluation(metrics)
    now = time.time()
    token = request.get("ClientToken")
    with _db(write=True) as conn:
        if token:
            replayed = _replayed_package(conn, token, request)
            if replayed is not None:
                return {"ModelPackageArn": replayed}
        row = conn.execute("SELECT name FROM model_package_groups WHERE name = ?", (group,)).fetchone()
        if row is None:
            if not create_group:
                raise RegistryValidationError(f"Model Package Group {group} does not exist.")
            _insert_group(conn, group, None, [], exist_ok=True)
        version = conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM model_packages WHERE group_name = ?",
                               (group,)).fetchone()[0]
        arn = package_arn(group, version)
        conn.execute(
            "INSERT INTO model_packages (arn, group_name, version, approval_status, approval_description, description,"
            " inference_specification, model_metrics, evaluation, customer_metadata, request, creation_time,"
            " last_modified_time) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (arn, group, version, approval, None, request.get("ModelPackageDescription"),
             json.dumps(spec) if spec is not None else None, json.dumps(metrics) if metrics else None,
             json.dumps(evaluation) if evaluation is not None else None,
             json.dumps(request.get("CustomerMetadataProperties") or {}), json.dumps(request, default=str), now, now),
        )
        if token:
            conn.execute("INSERT INTO model_package_client_tokens (token, request_digest, arn, creation_time)"
                         " VALUES (?,?,?,?)", (token, request_digest(request), arn, now))
    logger.info("registered %s (%s)%s", arn, approval, f" with ClientToken {token}" if token else "")
    return {"ModelPackageArn": arn}


def client_token(*parts: str) -> str:
    """A deterministic ``ClientToken`` for ``parts`` (e.g. the execution ARN and the step name): the same caller
    identity always sends the same token, so a retried request is recognised as the same request."""
    return str(uuid.uuid5(CLIENT_TOKEN_NAMESPACE, "\x1f".join(parts)))


def request_digest(request: dict[str, Any]) -> str:
    """sha256 of a request without its ``ClientToken`` (canonical JSON): what "the same request" means."""
    body = {k: v for k, v in request.items() if k != "ClientToken"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def package_for_token(token: str) -> str | None:
    """The ARN of the package a ``ClientToken`` created, ``None`` if the token is new."""
    with _db() as conn:
        row = conn.execute("SELECT arn FROM model_package_client_tokens WHERE token = ?", (token,)).fetchone()
    return row["arn"] if row else None


def _replayed_package(conn: sqlite3.Connection, token: str, request: dict[str, Any]) -> str | None:
    """The package an earlier request with ``token`` created (same request), ``None`` for a new token; raises
    :class:`IdempotentParameterMismatch` when the token came with a different request."""
    row = conn.execute("SELECT request_digest, arn FROM model_package_client_tokens WHERE token = ?",
                       (token,)).fetchone()
    if row is None:
        return None
    if row["request_digest"] != request_digest(request):
        raise IdempotentParameterMismatch(
            f"IdempotentParameterMismatch: ClientToken {token} was already used with a different "
            f"CreateModelPackage request (it created {row['arn']}); use a new token for a new request")
    logger.info("CreateModelPackage with ClientToken %s already created %s; returning it", token, row["arn"])
    return str(row["arn"])


def _read_evaluation(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON report ``ModelQuality.Statistics`` points at, read from the artifact store (``None`` if absent)."""
    uri = (((metrics or {}).get("ModelQuality") or {}).get("Statistics") or {}).get("S3Uri")
    if not uri:
        return None
    try:
        path = ArtifactStore().path(uri)
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        # SageMaker does not read the report at registration either; keep the reference, warn, carry on.
        logger.warning("could not read model metrics %s: %s", uri, exc)
        return None


def get_package(ref: str | int, group: str | None = None) -> ModelPackage:
    """A model package by ARN, ``group/version`` or version number (in ``group``, default the only/default group)."""
    text = str(ref).strip()
    with _db() as conn:
        if text.startswith("arn:"):
            row = conn.execute("SELECT * FROM model_packages WHERE arn = lower(?)", (text,)).fetchone()
            if row is None:
                raise ResourceNotFound(f"ModelPackage {text} does not exist.")
            return ModelPackage.from_row(row)
        if "/" in text:
            group, _, text = text.rpartition("/")
        if not text.isdigit():
            raise ResourceNotFound(f"{ref!r} is not a model package ARN, <group>/<version> or a version number")
        group = group or _default_group(conn)
        row = conn.execute("SELECT * FROM model_packages WHERE lower(group_name) = lower(?) AND version = ?",
                           (group, int(text))).fetchone()
    if row is None:
        raise ResourceNotFound(f"model package version {text} does not exist in group {group!r}")
    return ModelPackage.from_row(row)


def _default_group(conn: sqlite3.Connection) -> str:
    names = [r[0] for r in conn.execute("SELECT name FROM model_package_groups ORDER BY name")]
    if len(names) == 1:
        return names[0]
    return DEFAULT_GROUP


def list_packages(group: str | None = None, approval_status: str | None = None) -> list[ModelPackage]:
    """Model packages, oldest first (by group, then version)."""
    if approval_status is not None and approval_status not in APPROVAL_STATUSES:
        raise RegistryValidationError(f"unknown approval status {approval_status!r}; use one of {APPROVAL_STATUSES}")
    query, params = "SELECT * FROM model_packages WHERE 1=1", []
    if group:
        query += " AND lower(group_name) = lower(?)"
        params.append(group)
    if approval_status:
        query += " AND approval_status = ?"
        params.append(approval_status)
    with _db() as conn:
        rows = conn.execute(query + " ORDER BY group_name, version", params).fetchall()
    return [ModelPackage.from_row(r) for r in rows]


def update_model_package(request: dict[str, Any]) -> dict[str, Any]:
    """``UpdateModelPackage``: approval status/description and customer metadata. Returns ``{"ModelPackageArn"}``."""
    validate_request("UpdateModelPackage", request)
    arn = request["ModelPackageArn"]
    unsupported = set(request) - {"ModelPackageArn", "ModelApprovalStatus", "ApprovalDescription",
                                  "CustomerMetadataProperties", "CustomerMetadataPropertiesToRemove", "ClientToken"}
    if unsupported:
        raise RegistryValidationError(f"the local registry cannot update {', '.join(sorted(unsupported))}")
    with _db(write=True) as conn:
        row = conn.execute("SELECT * FROM model_packages WHERE arn = ?", (arn,)).fetchone()
        if row is None:
            raise ResourceNotFound(f"ModelPackage {arn} does not exist.")
        package = ModelPackage.from_row(row)
        metadata = dict(package.customer_metadata)
        metadata.update(request.get("CustomerMetadataProperties") or {})
        for key in request.get("CustomerMetadataPropertiesToRemove") or []:
            metadata.pop(key, None)
        approval = request.get("ModelApprovalStatus", package.approval_status)
        description = request.get("ApprovalDescription", package.approval_description)
        conn.execute("UPDATE model_packages SET approval_status = ?, approval_description = ?, customer_metadata = ?,"
                     " last_modified_time = ? WHERE arn = ?",
                     (approval, description, json.dumps(metadata), time.time(), arn))
    if approval != package.approval_status:
        logger.info("%s: %s -> %s", arn, package.approval_status, approval)
    return {"ModelPackageArn": arn}


def set_approval(ref: str | int, status: str, description: str | None = None,
                 group: str | None = None) -> ModelPackage:
    """Change a package's approval status (any of the three, as SageMaker allows) and return the updated package."""
    if status not in APPROVAL_STATUSES:
        raise RegistryValidationError(f"unknown approval status {status!r}; use one of {APPROVAL_STATUSES}")
    package = get_package(ref, group)
    request: dict[str, Any] = {"ModelPackageArn": package.arn, "ModelApprovalStatus": status}
    if description is not None:
        request["ApprovalDescription"] = description
    update_model_package(request)
    return get_package(package.arn)
