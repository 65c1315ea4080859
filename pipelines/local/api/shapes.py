"""botocore service-model helpers for the JSON services of the local AWS service: requests parsed and validated
against an operation's input shape, responses cut down to its output shape, errors and pagination.

- :func:`parse_input` turns the wire form into what botocore's ``ParamValidator`` checks (JSON-protocol timestamps
  arrive as epoch seconds); :func:`validate` runs that validator -- the very report boto3 raises client-side as
  ``ParamValidationError`` -- and then the checks the service itself makes and botocore does not (enum values,
  regular-expression patterns), worded like AWS's ``1 validation error detected: ...``.
- :func:`shape_output` keeps only the members the output shape declares (dropping engine-internal keys such as
  ``LocalJobDir``), renders timestamps as epoch seconds, a mapping given where the shape has a list as its values
  (the engine keys processing inputs/outputs by name), numbers given for strings as strings.
- :class:`ApiError` is a service error (code, message, HTTP status); :func:`paginate` pages a list with opaque
  ``NextToken`` values bound to the operation.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import functools
import json
import logging
import re
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

import botocore.session
from botocore.exceptions import ParamValidationError
from botocore.model import OperationModel, ServiceModel, Shape
from botocore.utils import parse_timestamp
from botocore.validate import ParamValidator

logger = logging.getLogger(__name__)

#: Strings longer than this are not matched against their shape's pattern (AWS patterns on long free text, such as
#: a pipeline definition's, are there to allow everything; a backtracking regex is no place for 100 KB of JSON).
PATTERN_CHECK_MAX_CHARS = 4096


class ApiError(Exception):
    """A service error: answered as the protocol's error shape with ``code`` (e.g. ``ValidationException``)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def validation_error(message: str) -> ApiError:
    return ApiError("ValidationException", message)


def answer(request: Any, api: Callable[[str], Any], error: Callable[[ApiError, str], Any], *,
           internal_code: str, title: str) -> Any:
    """``api(request_id)``'s response; an :class:`ApiError` becomes ``error(exc, request_id)``, the service's error
    shape, and a bug the service's internal error (500) -- never a dropped connection. A body over the limit is
    left to the server (413)."""
    from pipelines.local.api.protocol import BodyTooLarge

    request_id = str(uuid.uuid4())
    try:
        return api(request_id)
    except ApiError as exc:
        if exc.status >= 500:
            logger.warning("%s %s: %s %s", request.method, request.path, exc.code, exc.message)
        return error(exc, request_id)
    except BodyTooLarge:
        raise
    except Exception as exc:  # noqa: BLE001 -- a bug in one operation must not take the connection down
        logger.exception("%s %s (%s) failed", request.method, request.path, request.header("X-Amz-Target"))
        return error(ApiError(internal_code, f"The local {title} service failed: {type(exc).__name__}: {exc}", 500),
                     request_id)


def json_target_operation(request: Any, *, service: str, prefix: str, served: Collection[str], title: str,
                          serves: str) -> str:
    """The operation of a JSON 1.1 request (``X-Amz-Target: <prefix>.<Operation>``), or ``UnknownOperationException``
    for one the service (``title``, e.g. ``EventBridge``) does not have or that is not served locally."""
    target = request.header("X-Amz-Target") or ""
    found, _, operation = target.partition(".")
    if request.method != "POST" or found != prefix or not operation:
        raise ApiError("UnknownOperationException", f"No {title} operation for {request.method} {request.path} "
                                                    f"with X-Amz-Target {target or '(none)'}.")
    if operation_model(service, operation) is None:
        raise ApiError("UnknownOperationException", f"{title} has no operation {operation}.")
    if operation not in served:
        raise ApiError("UnknownOperationException", f"The local {title} service does not implement {operation} "
                                                    f"(it serves {serves}).")
    return operation


def json_params(request: Any) -> dict[str, Any]:
    """The JSON object of a request body (``SerializationException`` when it is not one)."""
    try:
        params = request.json()
    except ValueError as exc:
        raise ApiError("SerializationException", f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise ApiError("SerializationException", "The request body must be a JSON object.")
    return params


@functools.cache
def service_model(service: str) -> ServiceModel:
    return botocore.session.get_session().get_service_model(service)


def operation_model(service: str, operation: str) -> OperationModel | None:
    """The operation's model, or ``None`` when the service has no such operation."""
    model = service_model(service)
    return model.operation_model(operation) if operation in model.operation_names else None


# ------------------------------------------------------------------------------------------------------- input


def parse_input(shape: Shape | None, value: Any) -> Any:
    """The wire value as a boto3 caller would have passed it: timestamps (epoch seconds or strings) as datetimes."""
    if shape is None or value is None:
        return value
    kind = shape.type_name
    if kind == "structure" and isinstance(value, dict):
        return {k: parse_input(shape.members.get(k), v) for k, v in value.items()}
    if kind == "list" and isinstance(value, list):
        return [parse_input(shape.member, v) for v in value]
    if kind == "map" and isinstance(value, dict):
        return {k: parse_input(shape.value, v) for k, v in value.items()}
    if kind == "timestamp" and isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.datetime.fromtimestamp(value, datetime.UTC)
    return value


def validate(shape: Shape | None, params: dict[str, Any]) -> None:
    """Validate a request like boto3 does before sending it, then like the service does; :class:`ApiError`
    ``ValidationException`` with botocore's report (``Parameter validation failed: ...``) or AWS's wording."""
    if shape is None:
        return
    report = ParamValidator().validate(params, shape)
    if report.has_errors():
        raise validation_error(str(ParamValidationError(report=report.generate_report())))
    problems: list[str] = []
    _check_constraints(params, shape, "", problems)
    if problems:
        count = len(problems)
        raise validation_error(f"{count} validation error{'s' if count > 1 else ''} detected: " + "; ".join(problems))


def _member_path(path: str, name: str) -> str:
    camel = name[:1].lower() + name[1:]
    return f"{path}.{camel}" if path else camel


def _check_constraints(value: Any, shape: Shape, path: str, problems: list[str]) -> None:
    kind = shape.type_name
    if kind == "structure" and isinstance(value, dict):
        for key, item in value.items():
            if key in shape.members:
                _check_constraints(item, shape.members[key], _member_path(path, key), problems)
    elif kind == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            _check_constraints(item, shape.member, f"{path}.{i + 1}.member", problems)
    elif kind == "map" and isinstance(value, dict):
        for key, item in value.items():
            _check_constraints(item, shape.value, f"{path}.{key}", problems)
    elif kind == "string" and isinstance(value, str):
        problem = _string_problem(value, shape)
        if problem:
            problems.append(f"Value '{value[:200]}' at '{path}' failed to satisfy constraint: {problem}")


def _string_problem(value: str, shape: Shape) -> str | None:
    enum = getattr(shape, "enum", None)
    if enum and value not in enum:
        return f"Member must satisfy enum value set: [{', '.join(enum)}]"
    pattern = shape.metadata.get("pattern")
    if pattern and len(value) <= PATTERN_CHECK_MAX_CHARS:
        compiled = _compiled(pattern)
        if compiled is not None and compiled.fullmatch(value) is None:
            return f"Member must satisfy regular expression pattern: {pattern}"
    return None


@functools.lru_cache(maxsize=2048)
def _compiled(pattern: str) -> re.Pattern[str] | None:
    """The model's (Java) pattern as a Python regex; ``None`` for one Python cannot compile (not checked then)."""
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error:
        logger.debug("pattern %r is not a Python regex; not checked", pattern)
        return None


# ------------------------------------------------------------------------------------------------------ output


def shape_output(shape: Shape | None, value: Any) -> Any:
    """``value`` cut down to ``shape``: unknown members dropped, ``None`` dropped, scalars in the wire form."""
    if shape is None or value is None:
        return None
    if shape.type_name in ("structure", "list", "map"):
        return _CONTAINERS[shape.type_name](shape, value)
    converter = _SCALARS.get(shape.type_name)
    try:
        return converter(value) if converter else value
    except (TypeError, ValueError, OverflowError):
        logger.debug("dropping %r: not a %s", value, shape.type_name)
        return None


def _structure(shape: Shape, value: Any) -> dict[str, Any] | None:
    if not isinstance(value, Mapping):
        return None
    if getattr(shape, "is_document_type", False):
        return dict(value)
    out: dict[str, Any] = {}
    for name, member in shape.members.items():
        if name in value:
            item = shape_output(member, value[name])
            if item is not None:
                out[name] = item
    return out


def _list(shape: Shape, value: Any) -> list[Any] | None:
    items = list(value.values()) if isinstance(value, Mapping) else value
    if not isinstance(items, list | tuple):
        return None
    return [out for out in (shape_output(shape.member, item) for item in items) if out is not None]


def _map(shape: Shape, value: Any) -> dict[str, Any] | None:
    if not isinstance(value, Mapping):
        return None
    return {str(k): out for k, v in value.items() if (out := shape_output(shape.value, v)) is not None}


def _timestamp(value: Any) -> float:
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return parse_timestamp(value).timestamp()


def _string(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, default=str)


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("boolean")
    return int(value)


def _boolean(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() == "true"
    return bool(value)


def _blob(value: Any) -> str:
    raw = value if isinstance(value, bytes | bytearray) else str(value).encode("utf-8")
    return base64.b64encode(bytes(raw)).decode("ascii")


_CONTAINERS: dict[str, Callable[[Shape, Any], Any]] = {"structure": _structure, "list": _list, "map": _map}
_SCALARS: dict[str, Callable[[Any], Any]] = {
    "timestamp": _timestamp, "string": _string, "integer": _integer, "long": _integer, "float": float,
    "double": float, "boolean": _boolean, "blob": _blob,
}


# -------------------------------------------------------------------------------------------------- pagination


def paginate(operation: str, items: list[Any], params: Mapping[str, Any], key: str,
             default_size: int = 50) -> dict[str, Any]:
    """One page of ``items`` (``MaxResults``/``NextToken``); tokens are opaque offsets bound to the operation."""
    offset = 0
    token = params.get("NextToken")
    if token:
        try:
            decoded = json.loads(base64.urlsafe_b64decode(str(token).encode()))
            if decoded["op"] != operation:
                raise ValueError(decoded["op"])
            offset = int(decoded["offset"])
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise validation_error(f"Invalid pagination token {token!r}.") from exc
    size = int(params.get("MaxResults") or default_size)
    page: dict[str, Any] = {key: items[offset:offset + size]}
    if offset + size < len(items):
        page["NextToken"] = base64.urlsafe_b64encode(
            json.dumps({"op": operation, "offset": offset + size}).encode()).decode()
    return page


def epoch(value: Any) -> float | None:
    """Epoch seconds of a request timestamp (datetime after :func:`parse_input`), ``None`` for none."""
    return None if value is None else _timestamp(value)
