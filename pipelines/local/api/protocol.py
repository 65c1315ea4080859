"""What every service module of the local AWS service shares: the request and response types, the SigV4 credential
scope parser (which service a request is for) and the body limits.

A service module exposes ``handle(request: Request) -> Response`` and raises nothing for a bad request: it answers
with its own protocol's error shape (REST-XML for S3, JSON for SageMaker/Lambda, XML for STS).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler

#: Bodies are read whole into memory only up to this size (JSON APIs); S3 object bodies are streamed instead.
MAX_JSON_BODY_BYTES = 16 * 1024 * 1024
CHUNK = 1 << 20
#: The local service's one extension header: on ``StartPipelineExecution``, ``true`` means this execution looks
#: nothing up in the step cache (``start --no-cache``). SageMaker has no such switch.
NO_CACHE_HEADER = "x-mlops-no-cache"

_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/(\d{8})/([^/,\s]+)/([^/,\s]+)/aws4_request")


class BodyTooLarge(ValueError):
    """A request body above the service's in-memory limit."""


@dataclass(frozen=True)
class Scope:
    """The SigV4 credential scope: who signed (access key) for which region and service."""

    access_key: str
    region: str
    service: str


def parse_scope(headers: Mapping[str, str], query: Mapping[str, list[str]]) -> Scope | None:
    """The credential scope of a signed request (``Authorization`` header, or a presigned URL's
    ``X-Amz-Credential``), or ``None`` for an unsigned one."""
    auth = headers.get("Authorization") or headers.get("authorization") or ""
    match = _CREDENTIAL.search(auth)
    if match is None and query.get("X-Amz-Credential"):
        match = _CREDENTIAL.search("Credential=" + query["X-Amz-Credential"][0])
    if match is not None:
        return Scope(access_key=match.group(1), region=match.group(3), service=match.group(4))
    # SigV2, which only S3 still accepts: boto3 presigns S3 URLs with it by default (``?AWSAccessKeyId=...``).
    if auth.startswith("AWS ") and ":" in auth:
        return Scope(access_key=auth[4:].split(":", 1)[0].strip(), region="us-east-1", service="s3")
    if query.get("AWSAccessKeyId"):
        return Scope(access_key=query["AWSAccessKeyId"][0], region="us-east-1", service="s3")
    return None


@dataclass
class Request:
    method: str
    path: str  # percent-decoded
    raw_path: str  # as sent (S3 keys may contain characters that must be compared encoded)
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    rfile: IO[bytes]
    content_length: int
    scope: Scope
    #: The URL the server listens on (it sets it): the service URL of a request without a ``Host`` header.
    listen_url: str = "http://127.0.0.1"
    _consumed: bool = field(default=False, repr=False)

    @classmethod
    def parse_target(cls, target: str) -> tuple[str, str, dict[str, list[str]]]:
        """``(decoded path, raw path, query)`` of a request target."""
        raw_path, _, raw_query = target.partition("?")
        query = urllib.parse.parse_qs(raw_query, keep_blank_values=True)
        return urllib.parse.unquote(raw_path), raw_path, query

    def header(self, name: str, default: str | None = None) -> str | None:
        value = self.headers.get(name)
        if value is None:
            lowered = name.lower()
            value = next((v for k, v in self.headers.items() if k.lower() == lowered), None)
        return default if value is None else value

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def stream(self) -> Iterator[bytes]:
        """The body in chunks, read once, never whole into memory."""
        if self._consumed:
            raise RuntimeError("request body already read")
        self._consumed = True
        remaining = self.content_length
        while remaining > 0:
            chunk = self.rfile.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk

    def body(self, limit: int = MAX_JSON_BODY_BYTES) -> bytes:
        if self.content_length > limit:
            raise BodyTooLarge(f"request body of {self.content_length} bytes exceeds the limit of {limit} bytes")
        return b"".join(self.stream())

    def json(self, limit: int = MAX_JSON_BODY_BYTES) -> Any:
        data = self.body(limit)
        return json.loads(data) if data.strip() else {}

    def service_url(self) -> str:
        """The URL this service was reached at (the ``Host`` header): what jobs and Lambda handlers it starts for
        this request are pointed at."""
        host = self.header("Host")
        return f"http://{host}" if host else self.listen_url

    def drain(self) -> None:
        """Read what is left of the body, so the connection can be reused."""
        if not self._consumed:
            for _ in self.stream():
                pass


@dataclass
class Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | Iterable[bytes] = b""
    length: int | None = None  # Content-Length for a streamed body

    @classmethod
    def json(cls, payload: Any, status: int = 200, content_type: str = "application/x-amz-json-1.1",
             headers: Mapping[str, str] | None = None) -> Response:
        return cls(status, {"Content-Type": content_type, **(headers or {})},
                   json.dumps(payload, default=_json_default).encode("utf-8"))

    @classmethod
    def xml(cls, text: str, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        return cls(status, {"Content-Type": "application/xml", **(headers or {})}, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    import datetime

    if isinstance(value, datetime.datetime):
        return value.timestamp()  # the JSON protocols' timestamp format: epoch seconds
    if isinstance(value, bytes | bytearray):
        import base64

        return base64.b64encode(bytes(value)).decode("ascii")
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def send(handler: BaseHTTPRequestHandler, status: int, headers: Mapping[str, str], body: bytes | Iterable[bytes],
         length: int | None = None) -> None:
    """Write one response on ``handler``: status, ``headers``, ``Content-Length`` (``len(body)``, or ``length`` for a
    streamed body, an iterable of bytes, which is closed afterwards when it can be) and the body, none for ``HEAD``.
    The one writer of the local AWS service and of the local Studio."""
    handler.send_response(status)
    for key, value in headers.items():
        handler.send_header(key, value)
    if isinstance(body, bytes | bytearray):
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)
        return
    handler.send_header("Content-Length", str(length or 0))
    handler.end_headers()
    try:
        for chunk in body:
            if handler.command != "HEAD":
                handler.wfile.write(chunk)
    finally:
        close = getattr(body, "close", None)
        if close:
            close()
