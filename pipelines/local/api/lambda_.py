"""Lambda for the local AWS service (REST-JSON), and :func:`invoke`, the in-process API EventBridge delivery and
the engine call.

Routing: every request is matched against the method and ``requestUri`` of each operation in botocore's ``lambda``
service model (the route table is built from the model, e.g. ``POST /2015-03-31/functions/{FunctionName}/
invocations`` is ``Invoke``). Its parameters are read from where the model puts them (URI labels, query string,
headers, the JSON body with blobs in base64, or the raw body for ``Invoke``'s ``Payload``) and validated like
boto3 validates them (botocore's ``ParamValidator``: ``ValidationException`` with its report) and like Lambda does
(enum values and patterns: ``1 validation error detected: ...``). Errors are Lambda's shape: the code in the
``x-amzn-ErrorType`` header, ``{"Type": "User", "message": ...}`` as the body -- ``ResourceNotFoundException`` 404,
``ResourceConflictException`` 409, ``InvalidParameterValueException`` 400, ``UnknownOperationException`` 404 for
a route the model does not have (400 for an operation it has that is not served here).

Served: CreateFunction, UpdateFunctionCode, UpdateFunctionConfiguration, GetFunction, GetFunctionConfiguration,
ListFunctions (``Marker``/``MaxItems``), DeleteFunction, Invoke. Only ``$LATEST`` exists (no versions, aliases,
layers, container images); ``FunctionName`` may be a name, a partial ARN (``<account>:function:<name>``) or an
ARN, with or without ``:$LATEST``; an ARN's region is not checked (there is one local region), its account is.

Storage: ``$MLOPS_HOME/lambda/<name>/function.json`` (configuration and tags, written atomically), the code zip as
``<sha256-hex>.zip`` and extracted once per CodeSha256 into ``<sha256-hex>/`` (the current code and the one it
replaced are kept, so an invocation still running the old code keeps its files), handler logs in ``logs/<request
id>.log``. Code comes as ``ZipFile`` (requests up to :data:`MAX_CODE_REQUEST_BYTES`, as on AWS) or ``S3Bucket``/
``S3Key`` from the local S3 store; zips are extracted with :func:`training.archives.safe_extract_zip` after a check
of their own: absolute paths, ``..`` and symlinks are one ``InvalidParameterValueException`` and nothing is
written outside a staging directory until the whole zip is extracted. Writes hold a per-function lock (the server
is threaded); only this service writes, other processes calling :func:`invoke` only read ``function.json``.

Invoke: ``RequestResponse`` runs the handler and answers its result (200; ``X-Amz-Function-Error: Unhandled`` and
AWS's error document for an exception, a timeout, a crash), ``Event`` answers 202 and runs it in a background
thread, ``DryRun`` answers 204. ``LogType: Tail`` gives the last 4 KB of the log in ``X-Amz-Log-Result``. Each
invocation is a subprocess, ``python -m pipelines.local.api.lambda_runtime`` (:mod:`.lambda_runtime`, the same
interpreter) in the code directory, the event on stdin, with this service's environment minus every ``AWS_*``
variable (its credentials, profile and endpoints), plus the function's variables, plus
:func:`~pipelines.local.api.server.client_environment` (boto3 in the handler talks to this service), plus the
Lambda runtime's own (``AWS_LAMBDA_FUNCTION_NAME``, ``LAMBDA_TASK_ROOT``, ...). A handler running past its
``Timeout`` is killed with its process group.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from botocore.model import OperationModel, Shape

from pipelines import arns
from pipelines.local.api import shapes
from pipelines.local.api.protocol import CHUNK, MAX_JSON_BODY_BYTES, BodyTooLarge, Request, Response
from pipelines.local.api.shapes import ApiError
from pipelines.local.storage.store import LOCAL_ACCOUNT, LOCAL_REGION, mlops_home
from training import archives

logger = logging.getLogger(__name__)

SERVICE = "lambda"
LATEST = "$LATEST"
FUNCTION_FILE = "function.json"
#: What AWS accepts as a CreateFunction/UpdateFunctionCode request: a 50 MB zip, base64 in JSON.
MAX_CODE_REQUEST_BYTES = 69_905_067
#: Unzipped code (AWS's limit), and the largest zip read from S3.
MAX_UNZIPPED_BYTES = 262_144_000
MAX_SYNC_PAYLOAD_BYTES = 6 * 1024 * 1024
MAX_EVENT_PAYLOAD_BYTES = 1024 * 1024
LOG_TAIL_BYTES = 4096
DEFAULT_TIMEOUT_S = 3
DEFAULT_MEMORY_MB = 128
LIST_PAGE_MAX = 50
ZIP_LIMITS = archives.ExtractionLimits(max_bytes=MAX_UNZIPPED_BYTES)
CODE_OPERATIONS = {"CreateFunction", "UpdateFunctionCode"}
#: Environment variables the Lambda runtime sets itself: a function may not set them (as on AWS).
RESERVED_VARIABLES = frozenset({
    "_HANDLER", "_X_AMZN_TRACE_ID", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE", "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME", "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_LAMBDA_RUNTIME_API", "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR"})
#: UpdateFunctionConfiguration members stored as given (the output shape keeps what FunctionConfiguration has).
UPDATABLE = ("Role", "Handler", "Description", "Timeout", "MemorySize", "VpcConfig", "Environment", "Runtime",
             "DeadLetterConfig", "KMSKeyArn", "TracingConfig", "EphemeralStorage", "LoggingConfig")

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_QUALIFIED = re.compile(r"^(?:(?P<account>\d{12}):function:)?(?P<name>[^:]+)(?::(?P<qualifier>[^:]+))?$")
_ARN_RESOURCE = re.compile(r"^function:(?P<name>[^:]+)(?::(?P<qualifier>[^:]+))?$")
_LOCKS: dict[str, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


# ------------------------------------------------------------------------------------------------------ errors


class FunctionNotFound(ApiError, LookupError):  # noqa: N818 -- the name other modules import
    """No such function (or no such version of it): Lambda's ``ResourceNotFoundException``."""

    def __init__(self, function: str) -> None:
        super().__init__("ResourceNotFoundException", f"Function not found: {function}", 404)
        self.function = function


def _invalid(message: str) -> ApiError:
    return ApiError("InvalidParameterValueException", message)


def _conflict(name: str) -> ApiError:
    return ApiError("ResourceConflictException", f"Function already exist: {name}", 409)


# ----------------------------------------------------------------------------------------------------- storage


def lambda_root() -> Path:
    path = mlops_home() / "lambda"
    path.mkdir(parents=True, exist_ok=True)
    return path


def function_dir(name: str) -> Path:
    if not _NAME.match(name):
        raise _invalid(f"Invalid function name {name!r}: 1-64 letters, digits, '-' or '_'.")
    return lambda_root() / name


def function_arn(name: str, qualifier: str | None = None) -> str:
    base = arns.lambda_function_arn(LOCAL_REGION, LOCAL_ACCOUNT, name)
    return f"{base}:{qualifier}" if qualifier else base


def _lock(name: str) -> threading.RLock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(name, threading.RLock())


def parse_function_name(function: str, qualifier: str | None = None) -> tuple[str, str | None]:
    """``(name, qualifier)`` of a function name, partial ARN or ARN (and a separately given qualifier)."""
    match = None
    account = LOCAL_ACCOUNT
    if function.startswith("arn:"):
        try:
            parts = arns.parse(function)
        except ValueError:
            raise _invalid(f"Invalid function ARN {function!r}.") from None
        if parts.service == SERVICE:
            match, account = _ARN_RESOURCE.match(parts.resource), parts.account
    else:
        match = _QUALIFIED.match(function)
        account = (match and match.group("account")) or LOCAL_ACCOUNT
    if match is None:
        raise _invalid(f"Invalid function name or ARN {function!r}.")
    if account != LOCAL_ACCOUNT:
        raise FunctionNotFound(function)
    derived = match.group("qualifier")
    if qualifier and derived and qualifier != derived:
        raise _invalid("The derived qualifier from the function name does not match the specified qualifier.")
    return match.group("name"), qualifier or derived


def _read_record(name: str) -> dict[str, Any] | None:
    if not _NAME.match(name):
        return None
    try:
        record = json.loads((lambda_root() / name / FUNCTION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("Configuration"), dict) else None


def _record(name: str, qualifier: str | None = None) -> dict[str, Any]:
    """The stored record of ``$LATEST``; :class:`FunctionNotFound` for an unknown function or another version."""
    record = _read_record(name)
    if record is None or qualifier not in (None, LATEST):
        raise FunctionNotFound(function_arn(name, qualifier))
    return record


def _save(name: str, record: dict[str, Any]) -> None:
    path = function_dir(name) / FUNCTION_FILE
    tmp = path.with_name(f".{FUNCTION_FILE}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def get_configuration(function: str) -> dict[str, Any]:
    """The FunctionConfiguration of a function (name or ARN); :class:`FunctionNotFound` if there is none."""
    name, qualifier = parse_function_name(function)
    return dict(_record(name, qualifier)["Configuration"])


def _now() -> str:
    """Lambda's ``LastModified`` format: ``2024-01-31T12:34:56.789+0000``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"


# -------------------------------------------------------------------------------------------------------- code


@dataclass(frozen=True)
class StagedCode:
    """A code zip received into a staging directory (and, once checked, extracted beside it)."""

    staging: Path
    size: int
    sha256: str  # base64, as Lambda's CodeSha256
    sha_hex: str

    @property
    def zip_path(self) -> Path:
        return self.staging / "code.zip"

    @property
    def tree(self) -> Path:
        return self.staging / "code"


@contextlib.contextmanager
def _staged(chunks: Iterable[bytes]) -> Iterator[StagedCode]:
    """Receive the zip into ``lambda/.staging/<id>/``; the staging directory is removed afterwards."""
    staging = lambda_root() / ".staging" / uuid.uuid4().hex
    staging.mkdir(parents=True)
    try:
        digest, size = hashlib.sha256(), 0
        with open(staging / "code.zip", "wb") as fh:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                fh.write(chunk)
        raw = digest.digest()
        yield StagedCode(staging, size, base64.b64encode(raw).decode("ascii"), raw.hex())
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _s3_chunks(bucket: str, key: str) -> Iterator[bytes]:
    """The bytes of an object of the local S3 store (through the S3 service's own path mapping)."""
    from pipelines.local.api import s3

    try:
        _path, fd, st = s3._open_object(bucket, key)
    except s3.S3Error as exc:
        raise _invalid(f"Error occurred while GetObject. S3 Error Code: {exc.code}. S3 Error Message: "
                       f"{exc.message}") from None
    if fd < 0:
        raise _invalid(f"Error occurred while GetObject. S3 Error Code: NoSuchKey. S3 Error Message: "
                       f"s3://{bucket}/{key} is a folder, not a zip.")
    with os.fdopen(fd, "rb") as fh:
        if st.st_size > MAX_UNZIPPED_BYTES:
            raise _invalid(f"Unzipped size must be smaller than {MAX_UNZIPPED_BYTES} bytes")
        while chunk := fh.read(CHUNK):
            yield chunk


def _code_source(code: dict[str, Any]) -> Iterable[bytes]:
    """The zip's bytes from ``ZipFile`` or ``S3Bucket``/``S3Key`` (CreateFunction's Code, UpdateFunctionCode)."""
    if code.get("ImageUri"):
        raise _invalid("The local Lambda service runs zip packages only, not container images (ImageUri).")
    if code.get("ZipFile") is not None:
        if code.get("S3Bucket") or code.get("S3Key"):
            raise _invalid("Please provide either ZipFile or S3Bucket/S3Key, not both.")
        data = code["ZipFile"]
        return [data if isinstance(data, bytes) else str(data).encode("utf-8")]
    if code.get("S3Bucket") and code.get("S3Key"):
        return _s3_chunks(str(code["S3Bucket"]), str(code["S3Key"]))
    raise _invalid("Please provide a source for function code.")


def _check_members(infos: list[zipfile.ZipInfo]) -> None:
    """Refuse a zip with a member that is absolute, has a ``..`` segment or is a symlink -- before extracting."""
    for info in infos:
        name = info.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        mode = (info.external_attr >> 16) & 0o170000
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts or mode == 0o120000:
            raise _invalid(f"Could not unzip uploaded file: member {info.filename!r} is an absolute path, has a "
                           "'..' segment or is a symlink; the local Lambda service extracts none of the zip.")


def _extract(code: StagedCode) -> None:
    """Check and extract the staged zip into ``code.tree``; ``InvalidParameterValueException`` if it is no
    zip, unsafe, or too large unzipped."""
    try:
        with zipfile.ZipFile(code.zip_path) as zf:
            _check_members(zf.infolist())
        archives.safe_extract_zip(code.zip_path, code.tree, ZIP_LIMITS)
    except archives.ArchiveLimitError as exc:
        if exc.limit == "max_bytes":
            raise _invalid(f"Unzipped size must be smaller than {MAX_UNZIPPED_BYTES} bytes") from None
        raise _invalid(f"Could not unzip uploaded file: it exceeds the {exc.limit} limit of "
                       f"{archives.format_limit(exc.limit, exc.value)}.") from None
    except archives.UnsafeArchiveError as exc:
        raise _invalid(f"Could not unzip uploaded file: {exc}".replace(str(code.zip_path), "the zip")) from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError, EOFError,
            zlib.error) as exc:
        raise _invalid(f"Could not unzip uploaded file. Please check your file, then try to upload again. "
                       f"({exc})") from None


def _prepare(name: str, code: StagedCode) -> None:
    """Extract the staged zip unless the function has this code already (extracted once per CodeSha256)."""
    if not (lambda_root() / name / code.sha_hex).is_dir():
        _extract(code)


def _install(name: str, code: StagedCode) -> None:
    """Move prepared code into the function's directory (caller holds the function's lock)."""
    directory = function_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    zip_path = directory / f"{code.sha_hex}.zip"
    if not zip_path.exists():
        os.replace(code.zip_path, zip_path)
    tree = directory / code.sha_hex
    if not tree.is_dir():
        os.replace(code.tree, tree)


def _prune_code(name: str, keep: set[str]) -> None:
    """Remove code trees and zips other than ``keep`` (sha hex digests)."""
    for entry in function_dir(name).iterdir():
        digest = entry.name.removesuffix(".zip")
        if re.fullmatch(r"[0-9a-f]{64}", digest) and digest not in keep:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _sha_hex(config: dict[str, Any]) -> str:
    return base64.b64decode(config["CodeSha256"]).hex()


def _code_dir(config: dict[str, Any]) -> Path:
    """The extracted code of a configuration (extracted again from its zip if the tree went missing)."""
    name, digest = config["FunctionName"], _sha_hex(config)
    tree = function_dir(name) / digest
    if tree.is_dir():
        return tree
    with _lock(name):
        zip_path = tree.with_suffix(".zip")
        if not tree.is_dir():
            if not zip_path.is_file():
                raise ApiError("ServiceException", f"The code of function {name} is missing ({zip_path}).", 500)
            staging = tree.with_name(f".{digest}.{uuid.uuid4().hex}.tmp")
            archives.safe_extract_zip(zip_path, staging, ZIP_LIMITS)
            os.replace(staging, tree)
    return tree


# -------------------------------------------------------------------------------------------------- operations


def _check_environment(environment: dict[str, Any] | None) -> None:
    variables = (environment or {}).get("Variables") or {}
    reserved = sorted(set(variables) & RESERVED_VARIABLES)
    if reserved:
        raise _invalid("Lambda was unable to configure your environment variables because the environment "
                       "variables you have provided contains reserved keys that are currently not supported for "
                       f"modification. Reserved keys used in this request: {', '.join(reserved)}")
    measured = json.dumps(variables, separators=(",", ":"))
    if len(measured.encode("utf-8")) > 4096:
        raise _invalid("Lambda was unable to configure your environment variables because the environment "
                       "variables you have provided exceeded the 4KB limit.")


def _check_served(params: dict[str, Any]) -> None:
    """What the local service cannot run: other runtimes than Python, images, layers, file systems."""
    if params.get("PackageType", "Zip") != "Zip" or params.get("ImageConfig"):
        raise _invalid("The local Lambda service runs zip packages only (PackageType Zip).")
    runtime = params.get("Runtime")
    if runtime is not None and not str(runtime).startswith("python"):
        raise _invalid(f"The local Lambda service runs Python functions only (with its own Python "
                       f"{sys.version_info.major}.{sys.version_info.minor}); runtime {runtime} is not served.")
    if params.get("Layers"):
        raise _invalid("The local Lambda service does not serve layers: package the code in the zip.")
    if params.get("FileSystemConfigs"):
        raise _invalid("The local Lambda service does not mount file systems (FileSystemConfigs).")
    _check_environment(params.get("Environment"))


def _apply(config: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the UPDATABLE members of ``params``; an empty Environment or VpcConfig is dropped."""
    out = {**config, **{key: params[key] for key in UPDATABLE if key in params}}
    for key, inner in (("Environment", "Variables"), ("VpcConfig", "SubnetIds")):
        if key in out and not (out[key] or {}).get(inner):
            out.pop(key)
    return out


def _new_configuration(name: str, params: dict[str, Any], code: StagedCode) -> dict[str, Any]:
    base = {
        "FunctionName": name, "FunctionArn": function_arn(name), "CodeSize": code.size, "CodeSha256": code.sha256,
        "Description": "", "Timeout": DEFAULT_TIMEOUT_S, "MemorySize": DEFAULT_MEMORY_MB, "LastModified": _now(),
        "Version": LATEST, "RevisionId": str(uuid.uuid4()), "State": "Active", "LastUpdateStatus": "Successful",
        "PackageType": "Zip", "Architectures": params.get("Architectures") or ["x86_64"],
        "TracingConfig": {"Mode": "PassThrough"}, "EphemeralStorage": {"Size": 512},
        "LoggingConfig": {"LogFormat": "Text", "LogGroup": f"/aws/lambda/{name}"},
    }
    return _apply(base, params)


def create_function(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    name, qualifier = parse_function_name(params["FunctionName"])
    if qualifier:
        raise _invalid("A function name for CreateFunction cannot carry a qualifier.")
    function_dir(name)  # the name check
    if not params.get("Runtime") or not params.get("Handler"):
        raise _invalid("Runtime and Handler are mandatory parameters for functions created with deployment "
                       "packages.")
    _check_served(params)
    if _read_record(name) is not None:
        raise _conflict(name)
    with _staged(_code_source(params.get("Code") or {})) as code:
        config = _new_configuration(name, params, code)
        _prepare(name, code)
        with _lock(name):
            if _read_record(name) is not None:
                raise _conflict(name)
            _install(name, code)
            _save(name, {"Configuration": config, "Tags": params.get("Tags") or {}})
    logger.info("created function %s (%d bytes of code, %s)", name, config["CodeSize"], config["CodeSha256"])
    return config


def _check_revision(config: dict[str, Any], params: dict[str, Any]) -> None:
    if params.get("RevisionId") and params["RevisionId"] != config.get("RevisionId"):
        raise ApiError("PreconditionFailedException", "The Revision Id provided does not match the latest Revision "
                       "Id. Call the GetFunction/GetAlias API to retrieve the latest Revision Id", 412)


def update_function_code(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    name, qualifier = parse_function_name(params["FunctionName"])
    _record(name, qualifier)
    with _staged(_code_source(params)) as code:
        _prepare(name, code)
        with _lock(name):
            record = _record(name, qualifier)
            old = record["Configuration"]
            _check_revision(old, params)
            config = {**old, "CodeSha256": code.sha256, "CodeSize": code.size, "LastModified": _now(),
                      "RevisionId": str(uuid.uuid4())}
            if params.get("Architectures"):
                config["Architectures"] = params["Architectures"]
            if params.get("DryRun"):
                return config
            _install(name, code)
            _save(name, {**record, "Configuration": config})
            _prune_code(name, {code.sha_hex, _sha_hex(old)})
    logger.info("updated the code of function %s (%s)", name, config["CodeSha256"])
    return config


def update_function_configuration(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    name, qualifier = parse_function_name(params["FunctionName"])
    _check_served(params)
    with _lock(name):
        record = _record(name, qualifier)
        _check_revision(record["Configuration"], params)
        config = _apply(record["Configuration"], params)
        config.update(LastModified=_now(), RevisionId=str(uuid.uuid4()))
        _save(name, {**record, "Configuration": config})
    return config


def get_function(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    name, qualifier = parse_function_name(params["FunctionName"], params.get("Qualifier"))
    record = _record(name, qualifier)
    config = record["Configuration"]
    location = (function_dir(name) / f"{_sha_hex(config)}.zip").as_uri()
    out: dict[str, Any] = {"Configuration": config, "Code": {"RepositoryType": "S3", "Location": location}}
    if record.get("Tags"):
        out["Tags"] = record["Tags"]
    return out


def get_function_configuration(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    name, qualifier = parse_function_name(params["FunctionName"], params.get("Qualifier"))
    return dict(_record(name, qualifier)["Configuration"])


def _marker(after: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode("ascii")


def _after(marker: str | None) -> str:
    if not marker:
        return ""
    try:
        return str(json.loads(base64.urlsafe_b64decode(marker.encode()))["after"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise _invalid(f"Invalid marker {marker!r}.") from None


def list_functions(params: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Functions in name order, at most :data:`LIST_PAGE_MAX` a page (``Marker``/``NextMarker``)."""
    after = _after(params.get("Marker"))
    size = min(int(params.get("MaxItems") or LIST_PAGE_MAX), LIST_PAGE_MAX)
    names = sorted(entry.name for entry in lambda_root().iterdir()
                   if _NAME.match(entry.name) and entry.name > after and (entry / FUNCTION_FILE).is_file())
    functions: list[dict[str, Any]] = []
    index = 0
    while index < len(names) and len(functions) < size:
        record = _read_record(names[index])
        if record is not None:
            functions.append(record["Configuration"])
        index += 1
    out: dict[str, Any] = {"Functions": functions}
    if index < len(names) and functions:
        out["NextMarker"] = _marker(functions[-1]["FunctionName"])
    return out


def delete_function(params: dict[str, Any], ctx: Context) -> Response:
    name, qualifier = parse_function_name(params["FunctionName"], params.get("Qualifier"))
    if qualifier == LATEST:
        raise _invalid("$LATEST version cannot be deleted without deleting the function.")
    with _lock(name):
        _record(name, qualifier)
        graveyard = lambda_root() / f".deleted-{name}-{uuid.uuid4().hex}"
        os.replace(function_dir(name), graveyard)
    shutil.rmtree(graveyard, ignore_errors=True)
    logger.info("deleted function %s", name)
    return Response(204)


# ------------------------------------------------------------------------------------------------------ invoke


@dataclass(frozen=True)
class InvokeResult:
    """What an invocation answers, as boto3's ``invoke`` response has it: ``log_tail`` is ``LogResult`` (base64 of
    the last 4 KB of the log), ``function_error`` is ``FunctionError`` (``"Unhandled"``)."""

    status_code: int
    payload: bytes
    function_error: str | None
    log_tail: str | None
    executed_version: str = LATEST
    request_id: str = ""


@dataclass(frozen=True)
class _Outcome:
    error: bool
    payload: bytes
    log_path: Path


def _check_payload(payload: bytes, invocation_type: str) -> None:
    limit = MAX_EVENT_PAYLOAD_BYTES if invocation_type == "Event" else MAX_SYNC_PAYLOAD_BYTES
    if len(payload) > limit:
        raise ApiError("RequestTooLargeException", f"Request must be smaller than {limit} bytes for the "
                       "InvokeFunction operation", 413)
    if payload.strip():
        try:
            json.loads(payload)
        except ValueError as exc:
            raise ApiError("InvalidRequestContentException", f"Could not parse request body into json: {exc}") from None


def invoke(function: str, payload: bytes, *, service_url: str, invocation_type: str = "RequestResponse",
           log_tail: bool = False) -> InvokeResult:
    """Invoke a function (name or ARN) with a JSON ``payload``: ``RequestResponse`` runs it and returns its result,
    ``Event`` starts it in a background thread (202), ``DryRun`` only checks (204). ``service_url`` is the local
    service the handler's AWS clients talk to. :class:`FunctionNotFound` for an unknown function; ``ApiError`` for
    a payload that is not JSON or too large."""
    if invocation_type not in ("RequestResponse", "Event", "DryRun"):
        raise _invalid(f"Invalid InvocationType {invocation_type!r}: RequestResponse, Event or DryRun.")
    config = get_configuration(function)
    _check_payload(payload, invocation_type)
    request_id = str(uuid.uuid4())
    if invocation_type == "DryRun":
        return InvokeResult(204, b"", None, None, request_id=request_id)
    if invocation_type == "Event":
        worker = threading.Thread(target=_run_event, args=(config, payload, service_url, request_id), daemon=True,
                                  name=f"lambda-event-{config['FunctionName']}-{request_id[:8]}")
        worker.start()
        return InvokeResult(202, b"", None, None, request_id=request_id)
    outcome = _execute(config, payload, service_url, request_id)
    return InvokeResult(200, outcome.payload, "Unhandled" if outcome.error else None,
                        _log_tail(outcome.log_path) if log_tail else None, LATEST, request_id)


def _run_event(config: dict[str, Any], payload: bytes, service_url: str, request_id: str) -> None:
    try:
        outcome = _execute(config, payload, service_url, request_id)
    except Exception:  # noqa: BLE001 -- a background invocation has no caller to report to
        logger.exception("asynchronous invocation %s of %s failed", request_id, config["FunctionName"])
        return
    if outcome.error:
        logger.warning("asynchronous invocation %s of %s: Unhandled error %s (log %s)", request_id,
                       config["FunctionName"], outcome.payload[:500].decode("utf-8", "replace"), outcome.log_path)


def _log_tail(path: Path) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
        return base64.b64encode(fh.read(LOG_TAIL_BYTES)).decode("ascii")


def function_environment(config: dict[str, Any], code_dir: Path, service_url: str) -> dict[str, str]:
    """The handler's environment: this process's minus every ``AWS_*`` variable, the function's variables, the
    local service's client environment, the Lambda runtime's variables."""
    from pipelines.local.api import server

    name = config["FunctionName"]
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("AWS_")}
    env.update({str(k): str(v) for k, v in ((config.get("Environment") or {}).get("Variables") or {}).items()})
    env.update(server.client_environment(service_url))
    project_root = str(Path(__file__).resolve().parents[3])  # where ``pipelines`` (the bootstrap) is importable
    env.update({
        "AWS_LAMBDA_FUNCTION_NAME": name, "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(config.get("MemorySize", 128)),
        "AWS_LAMBDA_FUNCTION_VERSION": LATEST, "LAMBDA_TASK_ROOT": str(code_dir), "_HANDLER": config["Handler"],
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{name}", "AWS_EXECUTION_ENV": f"AWS_Lambda_{config['Runtime']}",
        "AWS_LAMBDA_LOG_STREAM_NAME": time.strftime("%Y/%m/%d/[$LATEST]", time.gmtime()) + uuid.uuid4().hex,
        "MLOPS_HOME": str(mlops_home()), "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), project_root) if p),
    })
    return env


def _run_process(cmd: list[str], cwd: Path, env: dict[str, str], payload: bytes, log: IO[bytes],
                 timeout: float) -> tuple[bool, int]:
    """``(timed out, exit status)`` of the bootstrap; on a timeout its whole process group is killed."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, close_fds=True)
    try:
        proc.communicate(payload, timeout=timeout)
        return False, proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group of the bootstrap it started (start_new_session)
        proc.communicate()
        return True, proc.returncode
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def _error_payload(request_id: str, error_type: str, message: str) -> bytes:
    return json.dumps({"errorMessage": message, "errorType": error_type, "requestId": request_id,
                       "stackTrace": []}).encode("utf-8")


def _outcome_of(result_path: Path, timed_out: bool, status: int, config: dict[str, Any],
                request_id: str) -> tuple[bool, bytes, str]:
    """``(error, payload, line for the log)`` of a finished bootstrap."""
    if timed_out:
        message = f"Task timed out after {float(config.get('Timeout') or DEFAULT_TIMEOUT_S):.2f} seconds"
        return True, _error_payload(request_id, "Sandbox.Timedout", f"RequestId: {request_id} Error: {message}"), \
            f"{datetime.datetime.now(datetime.UTC).isoformat()[:23]}Z {request_id} {message}\n"
    try:
        result = json.loads(result_path.read_text(encoding="utf-8"))
        error, payload = bool(result["error"]), str(result["payload"]).encode("utf-8")
    except (OSError, ValueError, KeyError, TypeError):
        exit_text = f"signal: {signal.Signals(-status).name}" if status < 0 else f"exit status {status}"
        message = f"RequestId: {request_id} Error: Runtime exited with error: {exit_text}"
        return True, _error_payload(request_id, "Runtime.ExitError", message), f"{message}\nRuntime.ExitError\n"
    if len(payload) > MAX_SYNC_PAYLOAD_BYTES:
        message = f"Response payload size exceeded maximum allowed payload size ({MAX_SYNC_PAYLOAD_BYTES} bytes)."
        return True, _error_payload(request_id, "Function.ResponseSizeTooLarge", message), message + "\n"
    return error, payload, ""


def _execute(config: dict[str, Any], payload: bytes, service_url: str, request_id: str) -> _Outcome:
    """Run the handler once in the bootstrap subprocess; its log goes to ``logs/<request id>.log``."""
    name = config["FunctionName"]
    code_dir = _code_dir(config)
    logs = function_dir(name) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path, result_path = logs / f"{request_id}.log", logs / f".{request_id}.result.json"
    timeout = float(config.get("Timeout") or DEFAULT_TIMEOUT_S)
    cmd = [sys.executable, "-m", "pipelines.local.api.lambda_runtime", "--result", str(result_path),
           "--request-id", request_id, "--invoked-arn", config["FunctionArn"],
           "--deadline-ms", str(int((time.time() + timeout) * 1000))]
    env = function_environment(config, code_dir, service_url)
    started = time.monotonic()
    try:
        with open(log_path, "ab") as log:
            log.write(f"START RequestId: {request_id} Version: {LATEST}\n".encode())
            log.flush()
            timed_out, status = _run_process(cmd, code_dir, env, payload or b"{}", log, timeout)
            error, body, line = _outcome_of(result_path, timed_out, status, config, request_id)
            millis = (time.monotonic() - started) * 1000
            log.write(f"{line}END RequestId: {request_id}\nREPORT RequestId: {request_id}\tDuration: {millis:.2f} "
                      f"ms\tBilled Duration: {int(millis) + 1} ms\tMemory Size: {config.get('MemorySize', 128)} "
                      "MB\n".encode())
    finally:
        result_path.unlink(missing_ok=True)
    logger.info("invoked %s (%s): %s in %.0f ms", name, request_id, "Unhandled" if error else "ok", millis)
    return _Outcome(error, body, log_path)


def invoke_operation(params: dict[str, Any], ctx: Context) -> Response:
    """``Invoke`` over HTTP: :func:`invoke`, its result as Lambda's response headers and body."""
    name, qualifier = parse_function_name(params["FunctionName"], params.get("Qualifier"))
    function = f"{name}:{qualifier}" if qualifier else name
    result = invoke(function, params.get("Payload") or b"", service_url=ctx.service_url,
                    invocation_type=params.get("InvocationType") or "RequestResponse",
                    log_tail=params.get("LogType") == "Tail")
    headers = {"Content-Type": "application/json", "x-amzn-RequestId": result.request_id}
    if result.status_code == 200:
        headers["X-Amz-Executed-Version"] = result.executed_version
    if result.function_error:
        headers["X-Amz-Function-Error"] = result.function_error
    if result.log_tail is not None:
        headers["X-Amz-Log-Result"] = result.log_tail
    return Response(result.status_code, headers, result.payload)


# -------------------------------------------------------------------------------------------------------- HTTP


@dataclass(frozen=True)
class Context:
    service_url: str


OPERATIONS: dict[str, Callable[[dict[str, Any], Context], Any]] = {
    "CreateFunction": create_function, "UpdateFunctionCode": update_function_code,
    "UpdateFunctionConfiguration": update_function_configuration, "GetFunction": get_function,
    "GetFunctionConfiguration": get_function_configuration, "ListFunctions": list_functions,
    "DeleteFunction": delete_function, "Invoke": invoke_operation,
}


@dataclass(frozen=True)
class Route:
    operation: str
    method: str
    pattern: re.Pattern[str]
    labels: tuple[str, ...]
    query: tuple[tuple[str, str | None], ...]  # query parameters the requestUri fixes (``?List=ALL``)
    literal_chars: int


def _route_of(operation: OperationModel) -> Route:
    path, _, fixed = operation.http["requestUri"].partition("?")
    labels: list[str] = []
    regex = ""
    for piece in re.split(r"(\{[^}]+\})", path):
        if piece.startswith("{"):
            greedy = piece.endswith("+}")
            labels.append(piece.strip("{}+"))
            regex += "(.+)" if greedy else "([^/]+)"
        else:
            regex += re.escape(piece)
    query = tuple((k, v or None) for k, _, v in (part.partition("=") for part in fixed.split("&") if part))
    return Route(operation.name, operation.http["method"], re.compile(f"^{regex}$"), tuple(labels), query,
                 len(re.sub(r"\{[^}]+\}", "", path)))


@functools.cache
def routes() -> tuple[Route, ...]:
    """Every operation of botocore's Lambda model as a route; the most specific first."""
    model = shapes.service_model(SERVICE)
    table = [_route_of(model.operation_model(name)) for name in model.operation_names]
    return tuple(sorted(table, key=lambda r: (-len(r.query), -r.literal_chars, len(r.labels))))


def match_route(method: str, raw_path: str, query: dict[str, list[str]]) -> tuple[str, dict[str, str]]:
    """``(operation, URI labels)`` of a request; ``UnknownOperationException`` if the model has none."""
    for route in routes():
        if route.method != method:
            continue
        match = route.pattern.match(raw_path)
        if match is None or any(k not in query or (v is not None and v not in query[k]) for k, v in route.query):
            continue
        return route.operation, {label: urllib.parse.unquote(value)
                                 for label, value in zip(route.labels, match.groups(), strict=True)}
    raise ApiError("UnknownOperationException", f"No Lambda operation for {method} {raw_path}.", 404)


def _scalar(shape: Shape, value: str) -> Any:
    """A header or query value as the shape's type."""
    if shape.type_name in ("integer", "long"):
        try:
            return int(value)
        except ValueError:
            raise shapes.validation_error(f"Value '{value}' is not an integer.") from None
    if shape.type_name == "boolean":
        return value.lower() == "true"
    return value


def _decode_blobs(shape: Shape | None, value: Any) -> Any:
    """JSON-body blobs (base64) as bytes, recursively."""
    if shape is None or value is None:
        return value
    if shape.type_name == "blob" and isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError("InvalidRequestContentException", "A blob member is not valid base64.") from None
    if shape.type_name == "structure" and isinstance(value, dict):
        return {k: _decode_blobs(shape.members.get(k), v) for k, v in value.items()}
    if shape.type_name == "list" and isinstance(value, list):
        return [_decode_blobs(shape.member, v) for v in value]
    if shape.type_name == "map" and isinstance(value, dict):
        return {k: _decode_blobs(shape.value, v) for k, v in value.items()}
    return value


def _body_limit(operation: str, request: Request) -> int:
    if operation in CODE_OPERATIONS:
        return MAX_CODE_REQUEST_BYTES
    if operation == "Invoke":
        event = request.header("X-Amz-Invocation-Type") == "Event"
        return MAX_EVENT_PAYLOAD_BYTES if event else MAX_SYNC_PAYLOAD_BYTES
    return MAX_JSON_BODY_BYTES


def _read_body(operation: str, request: Request) -> bytes:
    limit = _body_limit(operation, request)
    try:
        return request.body(limit)
    except BodyTooLarge:
        code = "RequestTooLargeException" if operation == "Invoke" else "RequestEntityTooLargeException"
        name = "InvokeFunction" if operation == "Invoke" else operation
        raise ApiError(code, f"Request must be smaller than {limit} bytes for the {name} operation", 413) from None


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body) if body.strip() else {}
    except ValueError as exc:
        raise ApiError("InvalidRequestContentException", f"Could not parse request body into json: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError("InvalidRequestContentException", "The request body must be a JSON object.")
    return data


def request_params(request: Request, operation: OperationModel, labels: dict[str, str]) -> dict[str, Any]:
    """The operation's input as a boto3 caller passed it, read from where the model puts each member."""
    shape = operation.input_shape
    if shape is None:
        return {}
    params: dict[str, Any] = {}
    for name, member in shape.members.items():
        location, wire = member.serialization.get("location"), member.serialization.get("name", name)
        if location == "uri" and wire in labels:
            params[name] = labels[wire]
        elif location == "querystring" and request.query.get(wire):
            values = request.query[wire]
            params[name] = values if member.type_name == "list" else _scalar(member, values[0])
        elif location == "header" and request.header(wire) is not None:
            params[name] = _scalar(member, str(request.header(wire)))
    body = _read_body(operation.name, request)
    payload = shape.serialization.get("payload")
    if payload:
        if body:
            params[payload] = body
        return params
    body_members = {k: v for k, v in _json_body(body).items()
                    if k in shape.members and not shape.members[k].serialization.get("location")}
    params.update(_decode_blobs(shape, body_members))
    return params


def _body_of(shape: Shape | None, result: Any) -> dict[str, Any]:
    """``result`` cut down to the output shape's body members."""
    if shape is None:
        return {}
    body = {k: v for k, v in result.items() if k in shape.members
            and not shape.members[k].serialization.get("location")}
    return shapes.shape_output(shape, body) or {}


def _error(exc: ApiError, request_id: str) -> Response:
    kind = "Service" if exc.status >= 500 else "User"
    return Response.json({"Type": kind, "message": exc.message}, status=exc.status, content_type="application/json",
                         headers={"x-amzn-ErrorType": exc.code, "x-amzn-RequestId": request_id})


def _api(request: Request, request_id: str) -> Response:
    operation_name, labels = match_route(request.method, request.raw_path, request.query)
    operation = shapes.operation_model(SERVICE, operation_name)
    assert operation is not None
    if operation_name not in OPERATIONS:
        raise ApiError("UnknownOperationException", f"The local Lambda service does not implement {operation_name} "
                       f"(it serves {', '.join(OPERATIONS)}).")
    params = request_params(request, operation, labels)
    shapes.validate(operation.input_shape, params)
    result = OPERATIONS[operation_name](params, Context(service_url=request.service_url()))
    if isinstance(result, Response):
        result.headers.setdefault("x-amzn-RequestId", request_id)
        return result
    status = int(operation.http.get("responseCode") or 200)
    return Response.json(_body_of(operation.output_shape, result), status=status, content_type="application/json",
                         headers={"x-amzn-RequestId": request_id})


def handle(request: Request) -> Response:
    """Answer one Lambda request; every failure is Lambda's error shape."""
    return shapes.answer(request, lambda request_id: _api(request, request_id), _error,
                         internal_code="ServiceException", title="Lambda")

