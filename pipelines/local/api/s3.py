"""S3 (REST-XML, path-style addressing) over the local artifact store.

An object ``s3://<bucket>/<key>`` *is* the file ``$MLOPS_HOME/artifacts/<bucket>/<key>`` -- the same file the engine
reads and writes through :class:`~pipelines.local.storage.store.ArtifactStore` -- so there is one copy of the bytes and
every file the engine writes under a bucket (whole output directories included) lists and reads as an object.

What S3 keeps beside the bytes lives in SQLite (``mlops.db``, table ``s3_objects``): ETag, Content-Type and the other
stored headers, ``x-amz-meta-*``, verified checksums, the multipart part count. A row is valid only while the file's
identity (inode, size, mtime_ns) is the one it recorded, so a file the engine rewrites simply loses its stale
metadata. A file without a valid row (written by the engine) gets ``binary/octet-stream`` and an ETag computed lazily:
its MD5 up to :data:`LAZY_MD5_MAX_BYTES` (8 MiB, cached in the table), above that a stable non-MD5 tag ``"<hash>-1"``
derived from the file's identity (the ``-N`` form S3 uses for ETags that are not a content MD5).

Writes stream the body to a hidden temp file (``.s3tmp-*``) in the target's directory and rename it into place
(atomic for readers; temp files never list). Multipart parts of the upload's part size are written straight into
one sparse assembly file at ``(n-1) * part_size``, so CompleteMultipartUpload is a rename, not a copy; a part of
another size (the last one) goes to its own temp file and is copied in at completion. Upload state: tables
``s3_uploads`` / ``s3_parts``.

Keys must map to files: ``.``/``..``/empty segments, a leading ``/`` and segments starting ``.s3tmp-`` are refused
(``InvalidArgument``); a key that is a "directory" of other keys cannot also be an object (409 ``KeyConflict``); a
key ending in ``/`` with an empty body is a directory marker (the directory plus a row). Nothing outside
``$MLOPS_HOME/artifacts`` is ever read or written (symlinks are resolved and checked; symlinked directories are not
followed when listing).

Not implemented (501 ``NotImplemented``): versioning (``versionId`` is ignored, ``GetBucketVersioning`` answers
"never enabled"), ACLs, policies, tagging, lifecycle, CORS, website, object lock, SSE, ``ListMultipartUploads``,
``ListObjectVersions``, ``GetObjectAttributes``, ``partNumber`` reads, virtual-hosted-style addressing.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import hashlib
import json
import logging
import os
import re
import sqlite3
import stat
import threading
import time
import urllib.parse
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from pipelines.local.api.protocol import CHUNK, Request, Response
from pipelines.local.storage.store import LOCAL_ACCOUNT, LOCAL_REGION, ArtifactStore, connect, immediate, mlops_home

logger = logging.getLogger(__name__)

NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
TEMP_PREFIX = ".s3tmp-"
DEFAULT_CONTENT_TYPE = "binary/octet-stream"
EMPTY_MD5 = hashlib.md5(b"").hexdigest()
MAX_KEY_BYTES = 1024
MAX_SEGMENT_BYTES = 255
MAX_PUT_BYTES = 5 * 1024**3  # single PUT, one part, CopyObject source
MIN_PART_BYTES = 5 * 1024**2
MAX_PART_NUMBER = 10000
MAX_METADATA_BYTES = 2048
MAX_XML_BYTES = 4 * 1024**2
MAX_KEYS = 1000
#: Files the engine wrote get a real MD5 ETag up to this size (what boto3/the CLI upload in one PUT anyway); above,
#: a "-1" identity tag, so that a listing page never reads more than 1000 x 8 MiB to compute ETags.
LAZY_MD5_MAX_BYTES = 8 * 1024**2
OWNER_ID = hashlib.sha256(f"mlops-local:{LOCAL_ACCOUNT}".encode()).hexdigest()
OWNER_NAME = "local"
#: Request headers stored with an object and returned by GET/HEAD (besides ``x-amz-meta-*`` and checksums).
STORED_HEADERS = ("content-type", "content-encoding", "content-disposition", "content-language", "cache-control",
                  "expires", "x-amz-website-redirect-location", "x-amz-storage-class")
#: GET's ``response-*`` query parameters and the header each one overrides.
RESPONSE_OVERRIDES = {"response-content-type": "Content-Type", "response-content-language": "Content-Language",
                      "response-expires": "Expires", "response-cache-control": "Cache-Control",
                      "response-content-disposition": "Content-Disposition",
                      "response-content-encoding": "Content-Encoding"}
#: Query parameters that are arguments, not sub-resources (``?acl``, ``?tagging``, ... select another API).
PARAMS = {"prefix", "delimiter", "marker", "max-keys", "encoding-type", "continuation-token", "start-after",
          "fetch-owner", "list-type", "uploadId", "partNumber", "max-parts", "part-number-marker", "versionId",
          "max-buckets", "bucket-region", "x-id",  # x-id=<Operation>: what newer SDKs append to object requests
          "AWSAccessKeyId", "Signature", "Expires"}  # SigV2 presigned URLs

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS s3_objects (
        bucket TEXT NOT NULL,
        key TEXT NOT NULL,
        ino INTEGER NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        etag TEXT NOT NULL,
        headers TEXT NOT NULL DEFAULT '{}',
        parts INTEGER,
        PRIMARY KEY (bucket, key)
    )""",
    """CREATE TABLE IF NOT EXISTS s3_buckets (name TEXT PRIMARY KEY, created REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS s3_uploads (
        upload_id TEXT PRIMARY KEY,
        bucket TEXT NOT NULL,
        key TEXT NOT NULL,
        headers TEXT NOT NULL,
        initiated REAL NOT NULL,
        part_size INTEGER
    )""",
    """CREATE TABLE IF NOT EXISTS s3_parts (
        upload_id TEXT NOT NULL REFERENCES s3_uploads(upload_id) ON DELETE CASCADE,
        part_number INTEGER NOT NULL,
        size INTEGER NOT NULL,
        md5 TEXT NOT NULL,
        offset INTEGER,
        last_modified REAL NOT NULL,
        PRIMARY KEY (upload_id, part_number)
    )""",
)

_BUCKET_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")  # what botocore lets through (legacy names)
_NEW_BUCKET_NAME = re.compile(r"^(?!xn--)(?!.*\.\.)(?!\d+\.\d+\.\d+\.\d+$)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


# ------------------------------------------------------------------------------------------------------ errors


class S3Error(Exception):
    """An error answered in S3's XML error format."""

    def __init__(self, code: str, message: str, status: int = 400, headers: dict[str, str] | None = None,
                 **fields: object) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status
        self.headers = headers or {}
        self.fields = fields


def _no_such_bucket(bucket: str) -> S3Error:
    return S3Error("NoSuchBucket", "The specified bucket does not exist", 404, BucketName=bucket)


def _no_such_key(key: str) -> S3Error:
    return S3Error("NoSuchKey", "The specified key does not exist.", 404, Key=key)


def _no_such_upload(upload_id: str) -> S3Error:
    return S3Error("NoSuchUpload", "The specified upload does not exist. The upload ID may be invalid, or the upload "
                   "may have been aborted or completed.", 404, UploadId=upload_id)


def _bad_key(key: str, why: str) -> S3Error:
    return S3Error("InvalidArgument", f"The local S3 service stores objects as files and refuses this key: {why}.",
                   ArgumentName="key", ArgumentValue=key)


def _key_conflict(key: str) -> S3Error:
    return S3Error("KeyConflict", "The local S3 service stores objects as files: a key cannot be both an object and "
                   "a prefix (directory) of other objects.", 409, Key=key)


def _precondition_failed(condition: str) -> S3Error:
    return S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold", 412,
                   Condition=condition)


def _error_response(error: S3Error, resource: str, request_id: str) -> Response:
    extra = "".join(_el(name, value) for name, value in error.fields.items())
    text = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error>{_el("Code", error.code)}{_el("Message", error.message)}'
            f"{extra}{_el('Resource', resource)}{_el('RequestId', request_id)}</Error>")
    return Response.xml(text, error.status, headers=error.headers)


# ------------------------------------------------------------------------------------------------ XML and time


def _el(name: str, value: object) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"<{name}>{escape(str(value))}</{name}>"


def _xml(root: str, inner: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response.xml(f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} xmlns="{NAMESPACE}">{inner}</{root}>',
                        status, headers)


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(int(epoch)))


def _http_date(epoch: float) -> str:
    return email.utils.formatdate(int(epoch), usegmt=True)


def _parse_http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _parse_xml(data: bytes) -> ElementTree.Element:
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise S3Error("MalformedXML", "The XML you provided was not well-formed or did not validate against our "
                      "published schema") from exc
    for element in root.iter():
        element.tag = element.tag.rpartition("}")[2]  # drop the namespace
    return root


def _owner_xml(tag: str = "Owner") -> str:
    return f"<{tag}>{_el('ID', OWNER_ID)}{_el('DisplayName', OWNER_NAME)}</{tag}>"


# ------------------------------------------------------------------------------------------- paths and names


def _root() -> Path:
    return ArtifactStore().root


def _bucket_dir(bucket: str, must_exist: bool = True) -> Path:
    if not _BUCKET_NAME.match(bucket):
        raise S3Error("InvalidBucketName", "The specified bucket is not valid.", BucketName=bucket)
    root = _root()
    path = root / bucket
    if must_exist and not (path.is_dir() and path.resolve().is_relative_to(root)):
        raise _no_such_bucket(bucket)
    return path


def check_key(key: str) -> None:
    """Refuse a key that cannot be a file under its bucket (or would name one outside it)."""
    if not key:
        raise _bad_key(key, "it is empty")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise S3Error("KeyTooLongError", "Your key is too long", Key=key[:64] + "...")
    if "\x00" in key:
        raise _bad_key(key, "it contains a NUL character")
    for segment in (key[:-1] if key.endswith("/") else key).split("/"):
        if segment in ("", ".", ".."):
            raise _bad_key(key, "a leading '/', an empty, '.' or '..' path segment")
        if segment.startswith(TEMP_PREFIX):
            raise _bad_key(key, f"a path segment starting {TEMP_PREFIX!r} (the service's temporary files)")
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            raise S3Error("KeyTooLongError", f"A path segment of your key exceeds {MAX_SEGMENT_BYTES} bytes "
                          "(the local store keeps keys as file paths)", Key=key[:64] + "...")


def _object_path(bucket: str, key: str) -> Path:
    """The file of ``bucket``/``key`` (the directory for a ``dir/`` marker), symlinks resolved, inside the store."""
    check_key(key)
    bucket_dir = _bucket_dir(bucket)
    path = (bucket_dir / key.rstrip("/")).resolve()
    if not path.is_relative_to(_root()):
        raise S3Error("AccessDenied", "The key resolves outside the local artifact store", 403, Key=key)
    return path


def _make_parents(path: Path, key: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise _key_conflict(key) from exc


def _open_new(parent: Path, name: str | None = None, flags: int = os.O_EXCL) -> tuple[Path, int]:
    """Create (or open, without ``O_EXCL``) a file in ``parent``, recreating the directory if a concurrent delete
    pruned it."""
    path = parent / (name or f"{TEMP_PREFIX}{uuid.uuid4().hex}")
    for attempt in range(3):
        try:
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | flags, 0o666)
        except FileNotFoundError:
            if attempt == 2:
                raise
            parent.mkdir(parents=True, exist_ok=True)
    raise AssertionError("unreachable")


def _prune(directory: Path, stop: Path, bucket: str) -> None:
    """Remove ``directory`` and its parents up to ``stop`` while they are empty (S3 has no empty prefixes), keeping
    directory markers."""
    markers = _markers(bucket)
    while directory != stop and directory.is_relative_to(stop):
        if directory.relative_to(stop).as_posix() + "/" in markers:
            return
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


# ------------------------------------------------------------------------------------------------- metadata


_connections = threading.local()


def _connection() -> sqlite3.Connection:
    """This thread's connection to ``mlops.db`` (schema applied once; the server runs a thread per client
    connection, and a thread's connection is closed with it)."""
    path = str(mlops_home() / "mlops.db")
    cached: tuple[str, sqlite3.Connection] | None = getattr(_connections, "db", None)
    if cached is not None and cached[0] == path:
        return cached[1]
    if cached is not None:
        cached[1].close()
    conn = connect(SCHEMA)
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable enough for metadata, no fsync per PUT
    _connections.db = (path, conn)
    return conn


@contextlib.contextmanager
def _db(write: bool = False) -> Iterator[sqlite3.Connection]:
    conn = _connection()
    if not write:
        yield conn
        return
    with immediate(conn):
        yield conn


@dataclass
class ObjectInfo:
    size: int
    mtime: float
    etag: str  # quoted, as in the ETag header
    headers: dict[str, str] = field(default_factory=dict)
    parts: int | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", DEFAULT_CONTENT_TYPE)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _rows(bucket: str, keys: list[str]) -> dict[str, sqlite3.Row]:
    if not keys:
        return {}
    with _db() as db:
        marks = ",".join("?" * len(keys))
        rows = db.execute(f"SELECT * FROM s3_objects WHERE bucket = ? AND key IN ({marks})", (bucket, *keys))
        return {row["key"]: row for row in rows}


def _markers(bucket: str) -> set[str]:
    with _db() as db:
        return {row[0] for row in db.execute("SELECT key FROM s3_objects WHERE bucket = ? AND key LIKE '%/'",
                                             (bucket,))}


def _save(bucket: str, key: str, st: os.stat_result, etag: str, headers: dict[str, str],
          parts: int | None = None) -> None:
    with _db(write=True) as db:
        db.execute("INSERT OR REPLACE INTO s3_objects (bucket, key, ino, size, mtime_ns, etag, headers, parts) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (bucket, key, *_identity(st), etag, json.dumps(headers), parts))


def _forget(bucket: str, key: str) -> None:
    with _db(write=True) as db:
        db.execute("DELETE FROM s3_objects WHERE bucket = ? AND key = ?", (bucket, key))


def describe(bucket: str, key: str, path: Path, st: os.stat_result, row: sqlite3.Row | None) -> ObjectInfo:
    """Size, Last-Modified, ETag and stored headers of the file ``st`` describes (``row``: its metadata, if any)."""
    if key.endswith("/"):  # a directory marker: valid while the directory exists
        headers = json.loads(row["headers"]) if row else {}
        return ObjectInfo(0, st.st_mtime, f'"{EMPTY_MD5}"', headers)
    if row is not None and (row["ino"], row["size"], row["mtime_ns"]) == _identity(st):
        return ObjectInfo(st.st_size, st.st_mtime, row["etag"], json.loads(row["headers"]), row["parts"])
    return ObjectInfo(st.st_size, st.st_mtime, _lazy_etag(bucket, key, path, st, row))


def _lazy_etag(bucket: str, key: str, path: Path, st: os.stat_result, row: sqlite3.Row | None) -> str:
    """The ETag of a file written behind the API's back: its MD5 (cached) if small, else an identity tag."""
    identity_tag = '"' + hashlib.md5(repr(_identity(st)).encode()).hexdigest() + '-1"'
    if st.st_size > LAZY_MD5_MAX_BYTES:
        return identity_tag
    digest = hashlib.md5()
    try:
        with open(path, "rb") as handle:
            if _identity(os.fstat(handle.fileno())) != _identity(st):
                return identity_tag  # replaced meanwhile: do not cache a digest of another file
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    except OSError:
        return identity_tag
    etag = f'"{digest.hexdigest()}"'
    with _db(write=True) as db:  # compare-and-set: never overwrite a row a concurrent PUT just wrote
        if row is None:
            db.execute("INSERT OR IGNORE INTO s3_objects (bucket, key, ino, size, mtime_ns, etag) VALUES "
                       "(?, ?, ?, ?, ?, ?)", (bucket, key, *_identity(st), etag))
        else:
            db.execute("UPDATE s3_objects SET ino = ?, size = ?, mtime_ns = ?, etag = ?, headers = '{}', parts = NULL "
                       "WHERE bucket = ? AND key = ? AND ino = ? AND size = ? AND mtime_ns = ?",
                       (*_identity(st), etag, bucket, key, row["ino"], row["size"], row["mtime_ns"]))
    return etag


def _stored_headers(request: Request) -> dict[str, str]:
    """The headers of a PUT / CreateMultipartUpload / CopyObject (REPLACE) that S3 stores with the object."""
    headers = {"content-type": request.header("Content-Type") or DEFAULT_CONTENT_TYPE}
    for name in STORED_HEADERS[1:]:
        value = request.header(name)
        if value:
            headers[name] = value
    encoding = [e for e in headers.get("content-encoding", "").split(",") if e.strip() not in ("", "aws-chunked")]
    if encoding:
        headers["content-encoding"] = ",".join(encoding).strip()
    else:
        headers.pop("content-encoding", None)
    meta = {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-amz-meta-")}
    if sum(len(k) - len("x-amz-meta-") + len(v) for k, v in meta.items()) > MAX_METADATA_BYTES:
        raise S3Error("MetadataTooLarge", f"Your metadata headers exceed the maximum allowed metadata size "
                      f"({MAX_METADATA_BYTES} bytes)")
    return {**headers, **meta}


# ---------------------------------------------------------------------------------------------- request bodies


class _Hash(Protocol):
    def update(self, data: bytes, /) -> object: ...

    def digest(self) -> bytes: ...


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes, /) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


#: Flexible checksums verified (and then stored and returned); others (CRC32C, CRC64NVME, ...) are accepted unchecked.
CHECKSUMS: dict[str, Callable[[], _Hash]] = {"crc32": _Crc32, "sha1": hashlib.sha1, "sha256": hashlib.sha256}


@dataclass
class Body:
    """An upload's payload: its chunks (aws-chunked framing removed), declared length, trailing headers."""

    chunks: Iterator[bytes]
    length: int
    trailers: dict[str, str] = field(default_factory=dict)


@dataclass
class Written:
    md5: bytes
    size: int
    checksums: dict[str, str]  # verified x-amz-checksum-<algorithm> headers


class _Reader:
    """Line and exact-length reads over a chunk iterator (for aws-chunked framing)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._buffer = chunks, bytearray()

    def _fill(self) -> bool:
        chunk = next(self._chunks, b"")
        self._buffer += chunk
        return bool(chunk)

    def line(self) -> bytes | None:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > 65536 or not self._fill():
                if not self._buffer:
                    return None
                raise S3Error("IncompleteBody", "Malformed aws-chunked body")
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 2]
        return line

    def exact(self, size: int) -> Iterator[bytes]:
        while size > 0:
            if not self._buffer and not self._fill():
                raise S3Error("IncompleteBody", "The aws-chunked body ended inside a chunk")
            piece = bytes(self._buffer[:size])
            del self._buffer[:len(piece)]
            size -= len(piece)
            yield piece


def _aws_chunked(raw: Iterator[bytes], trailers: dict[str, str]) -> Iterator[bytes]:
    """Decode ``Content-Encoding: aws-chunked`` (``<hex>[;chunk-signature=..]\\r\\n<data>\\r\\n``... ``0\\r\\n``,
    trailing headers, ``\\r\\n``); chunk signatures are not verified (nor is any SigV4 signature)."""
    reader = _Reader(raw)
    while True:
        header = reader.line()
        try:
            size = int((header or b"").split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise S3Error("IncompleteBody", "Malformed aws-chunked chunk header") from None
        if size == 0:
            break
        yield from reader.exact(size)
        if reader.line() != b"":
            raise S3Error("IncompleteBody", "Malformed aws-chunked body: no CRLF after a chunk")
    while line := reader.line():
        name, _, value = line.decode("latin-1").partition(":")
        trailers[name.strip().lower()] = value.strip()


def request_body(request: Request) -> Body:
    """The payload of a PUT (PutObject, UploadPart), streamed."""
    if request.header("Transfer-Encoding"):
        raise S3Error("NotImplemented", "A header you provided implies functionality that is not implemented", 501,
                      headers={"Connection": "close"}, Header="Transfer-Encoding")
    if request.header("Content-Length") is None:
        raise S3Error("MissingContentLength", "You must provide the Content-Length HTTP header.", 411)
    encoding = request.header("Content-Encoding") or ""
    if (request.header("x-amz-content-sha256") or "").startswith("STREAMING-") or "aws-chunked" in encoding:
        decoded = request.header("x-amz-decoded-content-length")
        if decoded is None or not decoded.isdigit():
            raise S3Error("MissingContentLength", "aws-chunked bodies need x-amz-decoded-content-length", 411)
        trailers: dict[str, str] = {}
        return Body(_aws_chunked(request.stream(), trailers), int(decoded), trailers)
    return Body(request.stream(), request.content_length)


def _checksum_algorithm(request: Request | None) -> str | None:
    if request is None:
        return None
    trailer = (request.header("x-amz-trailer") or "").strip().lower()
    for algorithm in CHECKSUMS:
        if request.header(f"x-amz-checksum-{algorithm}") or trailer == f"x-amz-checksum-{algorithm}":
            return algorithm
    return None


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def receive(body: Body, fd: int, offset: int = 0, request: Request | None = None) -> Written:
    """Write ``body`` to ``fd`` at ``offset`` while computing its MD5 (and the checksum the client sent, if any);
    verify the length, ``Content-MD5`` and checksum."""
    md5 = hashlib.md5()
    algorithm = _checksum_algorithm(request)
    checksum = CHECKSUMS[algorithm]() if algorithm else None
    size = 0
    for chunk in body.chunks:
        if size + len(chunk) > body.length:
            raise S3Error("IncompleteBody", "The request body is longer than its declared length")
        md5.update(chunk)
        if checksum is not None:
            checksum.update(chunk)
        _pwrite_all(fd, chunk, offset + size)
        size += len(chunk)
    if size != body.length:
        raise S3Error("IncompleteBody", "You did not provide the number of bytes specified by the Content-Length "
                      "HTTP header")
    _verify_md5(request, md5.digest())
    verified = {}
    if algorithm and checksum is not None and request is not None:
        name = f"x-amz-checksum-{algorithm}"
        expected = request.header(name) or body.trailers.get(name, "")
        actual = base64.b64encode(checksum.digest()).decode("ascii")
        if expected != actual:
            raise S3Error("BadDigest", f"The {algorithm.upper()} you specified did not match the calculated checksum.")
        verified[name] = actual
    return Written(md5.digest(), size, verified)


def _verify_md5(request: Request | None, digest: bytes) -> None:
    expected = request.header("Content-MD5") if request is not None else None
    if not expected:
        return
    try:
        wanted = base64.b64decode(expected, validate=True)
    except (binascii.Error, ValueError):
        raise S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.") from None
    if wanted != digest:
        raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.")


class FileBody:
    """A byte range of an open file as a response (or copy) body: read in chunks, the descriptor closed once sent
    or dropped."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self.fd, self.start, self.length = fd, start, length

    def __iter__(self) -> Iterator[bytes]:
        offset, end = self.start, self.start + self.length
        while offset < end and self.fd >= 0:
            chunk = os.pread(self.fd, min(CHUNK, end - offset), offset)
            if not chunk:
                logger.warning("file shrank while being sent (%d of %d bytes sent)", offset - self.start, self.length)
                return
            offset += len(chunk)
            yield chunk

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------- buckets


def list_buckets(request: Request) -> Response:
    root = _root()
    prefix = request.arg("prefix") or ""
    after = _decode_token(request.arg("continuation-token"), "continuation-token")[0] if request.arg(
        "continuation-token") else ""
    limit = _int_arg(request, "max-buckets", 10000, 1, 10000)
    with os.scandir(root) as entries:
        names = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False) and _BUCKET_NAME.match(e.name)
                       and e.name.startswith(prefix) and e.name > after)
    page, truncated = names[:limit], len(names) > limit
    with _db() as db:
        created = dict(db.execute("SELECT name, created FROM s3_buckets").fetchall())
    region = request.scope.region or LOCAL_REGION
    buckets = "".join(f"<Bucket>{_el('Name', name)}"
                      f"{_el('CreationDate', _iso(created.get(name) or _mtime(root / name)))}"
                      f"{_el('BucketRegion', region)}</Bucket>" for name in page)
    tail = (_el("ContinuationToken", _encode_token(page[-1], False)) if truncated else "") + (
        _el("Prefix", prefix) if prefix else "")
    return _xml("ListAllMyBucketsResult", f"{_owner_xml()}<Buckets>{buckets}</Buckets>{tail}")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def create_bucket(request: Request, bucket: str) -> Response:
    if not _NEW_BUCKET_NAME.match(bucket):
        raise S3Error("InvalidBucketName", "The specified bucket is not valid.", BucketName=bucket)
    data = request.body(MAX_XML_BYTES)
    if data.strip():
        _parse_xml(data)  # CreateBucketConfiguration: the location constraint is accepted, there is one region
    path = _bucket_dir(bucket, must_exist=False)
    if path.is_dir():
        if (request.scope.region or LOCAL_REGION) != "us-east-1":  # us-east-1 answers 200 to its owner (legacy)
            raise S3Error("BucketAlreadyOwnedByYou", "Your previous request to create the named bucket succeeded "
                          "and you already own it.", 409, BucketName=bucket)
        return Response(200, {"Location": f"/{bucket}"})
    try:
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise S3Error("InvalidBucketName", "A file of that name is in the artifact store", BucketName=bucket) \
                from None
    with _db(write=True) as db:
        db.execute("INSERT OR REPLACE INTO s3_buckets (name, created) VALUES (?, ?)", (bucket, time.time()))
    logger.info("created bucket %s", bucket)
    return Response(200, {"Location": f"/{bucket}"})


def head_bucket(request: Request, bucket: str) -> Response:
    _bucket_dir(bucket)
    return Response(200, {"x-amz-bucket-region": request.scope.region or LOCAL_REGION,
                          "x-amz-access-point-alias": "false", "Content-Type": "application/xml"})


def delete_bucket(request: Request, bucket: str) -> Response:
    import shutil

    path = _bucket_dir(bucket)
    if next(_walk(path, Bounds(), _markers(bucket)), None) is not None:
        raise S3Error("BucketNotEmpty", "The bucket you tried to delete is not empty", 409, BucketName=bucket)
    with _db(write=True) as db:
        db.execute("DELETE FROM s3_uploads WHERE bucket = ?", (bucket,))
        db.execute("DELETE FROM s3_objects WHERE bucket = ?", (bucket,))
        db.execute("DELETE FROM s3_buckets WHERE name = ?", (bucket,))
    shutil.rmtree(path)  # only empty directories and in-progress upload temp files are left
    logger.info("deleted bucket %s", bucket)
    return Response(204)


def get_bucket_location(request: Request, bucket: str) -> Response:
    _bucket_dir(bucket)
    region = request.scope.region or LOCAL_REGION
    return _xml("LocationConstraint", "" if region == "us-east-1" else escape(region))


def get_bucket_versioning(request: Request, bucket: str) -> Response:
    _bucket_dir(bucket)
    return _xml("VersioningConfiguration", "")


# -------------------------------------------------------------------------------------------------- objects


def _open_object(bucket: str, key: str) -> tuple[Path, int, os.stat_result]:
    """Open the object's file (the directory for a marker); NoSuchKey if there is none."""
    path = _object_path(bucket, key)
    if key.endswith("/"):
        if not path.is_dir() or key not in _rows(bucket, [key]):
            raise _no_such_key(key)
        return path, -1, path.stat()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise _no_such_key(key) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _no_such_key(key)
    return path, fd, st


def _etag_matches(header: str, etag: str) -> bool:
    wanted = {value.strip().removeprefix("W/").strip('"') for value in header.split(",")}
    return "*" in wanted or etag.strip('"') in wanted


def _preconditions(request: Request, info: ObjectInfo, prefix: str = "") -> bool:
    """Raise 412 for a failed If-Match/If-Unmodified-Since; ``True`` for 304 (If-None-Match/If-Modified-Since).
    ``prefix`` ``x-amz-copy-source-`` checks a copy's source (where every failure is a 412)."""
    mtime = int(info.mtime)
    if_match = request.header(f"{prefix}If-Match")
    if if_match is not None and not _etag_matches(if_match, info.etag):
        raise _precondition_failed(f"{prefix}If-Match")
    unmodified = _parse_http_date(request.header(f"{prefix}If-Unmodified-Since"))
    if if_match is None and unmodified is not None and mtime > unmodified:
        raise _precondition_failed(f"{prefix}If-Unmodified-Since")
    none_match = request.header(f"{prefix}If-None-Match")
    modified = _parse_http_date(request.header(f"{prefix}If-Modified-Since"))
    not_modified = (none_match is not None and _etag_matches(none_match, info.etag)) or (
        none_match is None and modified is not None and mtime <= modified)
    if not_modified and prefix:
        raise _precondition_failed(f"{prefix}If-None-Match" if none_match else f"{prefix}If-Modified-Since")
    return not_modified


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (inclusive) of a single ``bytes=`` range; ``None`` to send the whole object (no range, or a
    form S3 ignores); InvalidRange (416) if it is unsatisfiable."""
    match = _RANGE.match((value or "").strip())
    if not match or not (match[1] or match[2]):
        return None
    if match[1]:
        start = int(match[1])
        end = int(match[2]) if match[2] else max(start, size - 1)
        if end < start:
            return None  # syntactically invalid: ignored, as RFC 9110 says
    else:
        start, end = max(0, size - int(match[2])), size - 1
        if int(match[2]) == 0:
            start = size
    if start >= size:
        raise S3Error("InvalidRange", "The requested range is not satisfiable", 416,
                      headers={"Content-Range": f"bytes */{size}"}, RangeRequested=value, ActualObjectSize=size)
    return start, min(end, size - 1)


def _object_headers(info: ObjectInfo, request: Request, full: bool) -> dict[str, str]:
    headers = {"ETag": info.etag, "Last-Modified": _http_date(info.mtime), "Accept-Ranges": "bytes",
               "Content-Type": info.content_type}
    for name, value in info.headers.items():
        if name.startswith("x-amz-checksum-"):
            wanted = full and info.parts is None and (request.header("x-amz-checksum-mode") or "").upper() == "ENABLED"
            if wanted:
                headers[name] = value
                headers["x-amz-checksum-type"] = "FULL_OBJECT"
        elif name != "content-type" and not (name == "x-amz-storage-class" and value == "STANDARD"):
            headers[name] = value
    for param, header in RESPONSE_OVERRIDES.items():
        if request.arg(param):
            headers[header] = request.arg(param) or ""
    return headers


def get_object(request: Request, bucket: str, key: str) -> Response:
    """GetObject and HeadObject: conditional, one byte range (206), the file streamed."""
    path, fd, st = _open_object(bucket, key)
    body: FileBody | None = None
    try:
        info = describe(bucket, key, path, st, _rows(bucket, [key]).get(key))
        if _preconditions(request, info):
            return Response(304, {"ETag": info.etag, "Last-Modified": _http_date(info.mtime)})
        span = parse_range(request.header("Range"), info.size)
        start, end = span if span else (0, info.size - 1)
        headers = _object_headers(info, request, span is None)
        status = 200
        if span:
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{info.size}"
        length = end - start + 1
        if request.method == "HEAD" or fd < 0:
            return Response(status, headers, (), length)
        body, fd = FileBody(fd, start, length), -1
        return Response(status, headers, body, length)
    finally:
        if fd >= 0:
            os.close(fd)


def _check_put_preconditions(request: Request, bucket: str, key: str, path: Path) -> None:
    """Conditional writes: ``If-None-Match: *`` (create only) and ``If-Match`` (checked before the body is read;
    not atomic with the rename)."""
    none_match, if_match = request.header("If-None-Match"), request.header("If-Match")
    if none_match is None and if_match is None:
        return
    exists = path.is_file()
    if none_match is not None and none_match.strip() == "*" and exists:
        raise _precondition_failed("If-None-Match")
    if if_match is not None:
        if not exists:
            raise _no_such_key(key)
        info = describe(bucket, key, path, path.stat(), _rows(bucket, [key]).get(key))
        if not _etag_matches(if_match, info.etag):
            raise _precondition_failed("If-Match")


def put_object(request: Request, bucket: str, key: str) -> Response:
    path = _object_path(bucket, key)
    body = request_body(request)
    if body.length > MAX_PUT_BYTES:
        raise S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size",
                      ProposedSize=body.length, MaxSizeAllowed=MAX_PUT_BYTES)
    _check_put_preconditions(request, bucket, key, path)
    headers = _stored_headers(request)
    if key.endswith("/"):
        return _put_marker(bucket, key, path, body, headers)
    written, st = store_object(bucket, key, path, body, headers, request)
    logger.debug("PUT s3://%s/%s (%d bytes)", bucket, key, written.size)
    return Response(200, {"ETag": f'"{written.md5.hex()}"', **written.checksums})


def _put_marker(bucket: str, key: str, path: Path, body: Body, headers: dict[str, str]) -> Response:
    """``dir/`` with no bytes: the directory, plus a row so that it lists (and HEADs) as a zero-byte object."""
    if body.length:
        raise _bad_key(key, "a key ending in '/' names a directory and cannot hold bytes")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise _key_conflict(key) from None
    _save(bucket, key, path.stat(), f'"{EMPTY_MD5}"', headers)
    return Response(200, {"ETag": f'"{EMPTY_MD5}"'})


def store_object(bucket: str, key: str, path: Path, body: Body, headers: dict[str, str],
                 request: Request | None = None) -> tuple[Written, os.stat_result]:
    """Stream ``body`` into a temp file beside ``path``, record its metadata, rename it into place."""
    if path.is_dir():
        raise _key_conflict(key)
    _make_parents(path, key)
    tmp, fd = _open_new(path.parent)
    try:
        written = receive(body, fd, 0, request)
        st = os.fstat(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    _install(tmp, path, key)
    _save(bucket, key, st, f'"{written.md5.hex()}"', {**headers, **written.checksums})
    return written, st


def _install(tmp: Path, path: Path, key: str) -> None:
    try:
        os.replace(tmp, path)
    except (IsADirectoryError, NotADirectoryError, FileExistsError):
        tmp.unlink(missing_ok=True)
        raise _key_conflict(key) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def delete_key(bucket: str, key: str) -> None:
    """Delete one object (nothing to do if there is none, as in S3); prune the directories it leaves empty."""
    path = _object_path(bucket, key)
    bucket_dir = _bucket_dir(bucket)
    if key.endswith("/"):
        _forget(bucket, key)
        with contextlib.suppress(OSError):
            if path != bucket_dir:
                path.rmdir()
        _prune(path.parent, bucket_dir, bucket)
        return
    if path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        _forget(bucket, key)
        _prune(path.parent, bucket_dir, bucket)


def delete_object(request: Request, bucket: str, key: str) -> Response:
    delete_key(bucket, key)
    return Response(204)


def delete_objects(request: Request, bucket: str) -> Response:
    _bucket_dir(bucket)
    root = _parse_xml(request.body(MAX_XML_BYTES))
    quiet = (root.findtext("Quiet") or "").strip().lower() == "true"
    keys = [obj.findtext("Key") or "" for obj in root.findall("Object")]
    if not keys or len(keys) > MAX_KEYS:
        raise S3Error("MalformedXML", f"A Delete request names 1 to {MAX_KEYS} objects")
    results = []
    for key in keys:
        try:
            delete_key(bucket, key)
            if not quiet:
                results.append(f"<Deleted>{_el('Key', key)}</Deleted>")
        except S3Error as exc:
            results.append(f"<Error>{_el('Key', key)}{_el('Code', exc.code)}{_el('Message', exc.message)}</Error>")
    return _xml("DeleteResult", "".join(results))


def _copy_source(request: Request) -> tuple[str, str]:
    source = urllib.parse.unquote(request.header("x-amz-copy-source") or "").partition("?")[0].lstrip("/")
    bucket, _, key = source.partition("/")
    if not bucket or not key:
        raise S3Error("InvalidArgument", "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
                      ArgumentName="x-amz-copy-source", ArgumentValue=source)
    return bucket, key


def _open_copy_source(request: Request) -> tuple[str, str, int, ObjectInfo]:
    bucket, key = _copy_source(request)
    path, fd, st = _open_object(bucket, key)
    try:
        if fd < 0:
            raise _bad_key(key, "a directory marker cannot be copied")
        info = describe(bucket, key, path, st, _rows(bucket, [key]).get(key))
        _preconditions(request, info, "x-amz-copy-source-")
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return bucket, key, fd, info


def copy_object(request: Request, bucket: str, key: str) -> Response:
    path = _object_path(bucket, key)
    src_bucket, src_key, fd, info = _open_copy_source(request)
    source = FileBody(fd, 0, info.size)
    try:
        replace = (request.header("x-amz-metadata-directive") or "COPY").upper() == "REPLACE"
        if (src_bucket, src_key) == (bucket, key) and not replace:
            raise S3Error("InvalidRequest", "This copy request is illegal because it is trying to copy an object to "
                          "itself without changing the object's metadata, storage class, website redirect location "
                          "or encryption attributes.")
        if info.size > MAX_PUT_BYTES:
            raise S3Error("InvalidRequest", "The specified copy source is larger than the maximum allowable size for "
                          f"a copy source: {MAX_PUT_BYTES}")
        checksums = {k: v for k, v in info.headers.items() if k.startswith("x-amz-checksum-")}
        headers = {**_stored_headers(request), **checksums} if replace else dict(info.headers)
        written, st = store_object(bucket, key, path, Body(iter(source), info.size), headers)
    finally:
        source.close()
    logger.debug("COPY s3://%s/%s -> s3://%s/%s", src_bucket, src_key, bucket, key)
    return _xml("CopyObjectResult", _el("LastModified", _iso(st.st_mtime)) + _el("ETag", f'"{written.md5.hex()}"'))


# -------------------------------------------------------------------------------------------------- listing


@dataclass
class Bounds:
    """Which keys a listing still wants: under ``prefix``, after ``after``, not under ``skip`` (a common prefix
    already returned). The walk consults it as it goes, so a rolled-up directory is never descended into."""

    prefix: str = ""
    after: str = ""
    skip: str = ""

    def wants_key(self, key: str) -> bool:
        return key.startswith(self.prefix) and key > self.after and not (self.skip and key.startswith(self.skip))

    def wants_dir(self, dir_key: str) -> bool:
        """Whether any key under ``dir_key`` (ending in ``/``) may be wanted."""
        if not (dir_key.startswith(self.prefix) or self.prefix.startswith(dir_key)):
            return False
        if self.skip and dir_key.startswith(self.skip):
            return False
        return not (self.after > dir_key and not self.after.startswith(dir_key))


def _entries(directory: Path, root: Path) -> list[tuple[str, os.DirEntry[str], bool]]:
    """A directory's entries in S3 key order (a directory sorts as ``name/``), temp and odd files left out."""
    entries = []
    with os.scandir(directory) as scan:
        for entry in scan:
            name = entry.name
            if name.startswith(TEMP_PREFIX):
                continue
            try:
                name.encode("utf-8")
                is_dir = entry.is_dir(follow_symlinks=False)
                if entry.is_symlink() and not _symlink_file_inside(entry, root):
                    continue  # symlinked directories are not followed, links out of the store not served
            except (UnicodeEncodeError, OSError):
                logger.debug("skipping %s in a listing (not a UTF-8 name or unreadable)", entry.path)
                continue
            entries.append((name + "/" if is_dir else name, entry, is_dir))
    entries.sort(key=lambda item: item[0])
    return entries


def _symlink_file_inside(entry: os.DirEntry[str], root: Path) -> bool:
    target = Path(entry.path).resolve()
    return target.is_relative_to(root) and target.is_file()


def _walk(bucket_dir: Path, bounds: Bounds, markers: set[str]) -> Iterator[tuple[str, os.stat_result]]:
    """``(key, stat)`` of every object under the bucket that ``bounds`` wants, in key order, lazily."""
    base = bounds.prefix.rpartition("/")[0]
    if base:
        try:
            check_key(base)
        except S3Error:
            return  # no stored key can have such a prefix
    start = bucket_dir / base if base else bucket_dir
    if start.is_symlink() or not start.is_dir():
        return
    yield from _walk_dir(start, f"{base}/" if base else "", bounds, markers, _root())


def _walk_dir(directory: Path, dir_key: str, bounds: Bounds, markers: set[str],
              root: Path) -> Iterator[tuple[str, os.stat_result]]:
    try:
        entries = _entries(directory, root)
    except OSError:
        return
    if dir_key and dir_key in markers and bounds.wants_key(dir_key):
        yield dir_key, directory.stat()
    for _sort_key, entry, is_dir in entries:
        if dir_key and not bounds.wants_dir(dir_key):
            return  # the consumer rolled this directory up into a common prefix
        key = dir_key + entry.name
        if is_dir:
            if bounds.wants_dir(key + "/"):
                yield from _walk_dir(Path(entry.path), key + "/", bounds, markers, root)
        elif bounds.wants_key(key):
            try:
                st = entry.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield key, st


def _encode_token(last: str, is_prefix: bool) -> str:
    return base64.urlsafe_b64encode(json.dumps([last, is_prefix]).encode()).decode("ascii")


def _decode_token(token: str | None, name: str) -> tuple[str, bool]:
    try:
        last, is_prefix = json.loads(base64.urlsafe_b64decode((token or "").encode("ascii")))
        return str(last), bool(is_prefix)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise S3Error("InvalidArgument", "The continuation token provided is incorrect", ArgumentName=name) from None


def _int_arg(request: Request, name: str, default: int, low: int = 0, high: int = MAX_KEYS) -> int:
    raw = request.arg(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise S3Error("InvalidArgument", f"Provided {name} not an integer or within integer range",
                      ArgumentName=name, ArgumentValue=raw) from None
    if value < low:
        raise S3Error("InvalidArgument", f"Argument {name} must be an integer between {low} and 2147483647",
                      ArgumentName=name, ArgumentValue=raw)
    return min(value, high)


@dataclass
class Page:
    contents: list[tuple[str, ObjectInfo]]
    prefixes: list[str]
    truncated: bool
    last: tuple[str, bool] | None  # the last key or common prefix returned


def list_page(bucket: str, bounds: Bounds, delimiter: str, max_keys: int) -> Page:
    """One page of a listing: keys and common prefixes in key order, up to ``max_keys`` of them together."""
    bucket_dir = _bucket_dir(bucket)
    found: list[tuple[str, os.stat_result]] = []
    prefixes: list[str] = []
    last, truncated = None, False
    for key, st in _walk(bucket_dir, bounds, _markers(bucket)):
        if len(found) + len(prefixes) >= max_keys:
            truncated = max_keys > 0
            break
        rest = key[len(bounds.prefix):]
        cut = rest.find(delimiter) if delimiter else -1
        if cut >= 0:
            common = bounds.prefix + rest[:cut + len(delimiter)]
            prefixes.append(common)
            bounds.skip, last = common, (common, True)
        else:
            found.append((key, st))
            last = (key, False)
    rows = _rows(bucket, [key for key, _ in found])
    contents = [(key, describe(bucket, key, bucket_dir / key, st, rows.get(key))) for key, st in found]
    return Page(contents, prefixes, truncated, last)


def _contents_xml(key: str, info: ObjectInfo, encode: Callable[[str], str], owner: bool) -> str:
    checksum = "".join(_el("ChecksumAlgorithm", name.removeprefix("x-amz-checksum-").upper())
                       + _el("ChecksumType", "FULL_OBJECT") for name in info.headers
                       if name.startswith("x-amz-checksum-") and info.parts is None)
    storage_class = info.headers.get("x-amz-storage-class", "STANDARD")
    return (f"<Contents>{_el('Key', encode(key))}{_el('LastModified', _iso(info.mtime))}{_el('ETag', info.etag)}"
            f"{checksum}{_el('Size', info.size)}{_el('StorageClass', storage_class)}"
            f"{_owner_xml() if owner else ''}</Contents>")


def _listing_args(request: Request) -> tuple[str, str, int, Callable[[str], str]]:
    encoding = request.arg("encoding-type")
    if encoding not in (None, "", "url"):
        raise S3Error("InvalidArgument", "Invalid Encoding Method specified in Request", ArgumentName="encoding-type",
                      ArgumentValue=encoding)
    encode: Callable[[str], str] = (lambda s: urllib.parse.quote(s, safe="/")) if encoding == "url" else str
    return request.arg("prefix") or "", request.arg("delimiter") or "", _int_arg(request, "max-keys", MAX_KEYS), encode


def _listing_common(bucket: str, prefix: str, delimiter: str, max_keys: int, encode: Callable[[str], str],
                    page: Page, owner: bool) -> str:
    contents = "".join(_contents_xml(key, info, encode, owner) for key, info in page.contents)
    prefixes = "".join(f"<CommonPrefixes>{_el('Prefix', encode(p))}</CommonPrefixes>" for p in page.prefixes)
    return (_el("Name", bucket) + _el("Prefix", encode(prefix)) + (_el("Delimiter", encode(delimiter)) if delimiter
            else "") + _el("MaxKeys", max_keys) + (_el("EncodingType", "url") if encode is not str else "")
            + _el("IsTruncated", page.truncated) + contents + prefixes)


def list_objects_v2(request: Request, bucket: str) -> Response:
    prefix, delimiter, max_keys, encode = _listing_args(request)
    token, start_after = request.arg("continuation-token"), request.arg("start-after") or ""
    bounds = Bounds(prefix, start_after)
    if token is not None:
        last, is_prefix = _decode_token(token, "continuation-token")
        bounds.after, bounds.skip = max(last, start_after), (last if is_prefix else "")
    page = list_page(bucket, bounds, delimiter, max_keys)
    inner = _listing_common(bucket, prefix, delimiter, max_keys, encode, page,
                            (request.arg("fetch-owner") or "").lower() == "true")
    inner += _el("KeyCount", len(page.contents) + len(page.prefixes))
    if token is not None:
        inner += _el("ContinuationToken", token)
    if page.truncated and page.last:
        inner += _el("NextContinuationToken", _encode_token(*page.last))
    if start_after:
        inner += _el("StartAfter", encode(start_after))
    return _xml("ListBucketResult", inner)


def list_objects(request: Request, bucket: str) -> Response:
    """ListObjects (v1): ``marker`` instead of a token; ``NextMarker`` only with a delimiter, as S3 does."""
    prefix, delimiter, max_keys, encode = _listing_args(request)
    marker = request.arg("marker") or ""
    bounds = Bounds(prefix, marker, marker if delimiter and marker.endswith(delimiter) else "")
    page = list_page(bucket, bounds, delimiter, max_keys)
    inner = _listing_common(bucket, prefix, delimiter, max_keys, encode, page, True) + _el("Marker", encode(marker))
    if page.truncated and page.last and delimiter:
        inner += _el("NextMarker", encode(page.last[0]))
    return _xml("ListBucketResult", inner)


# ------------------------------------------------------------------------------------------------ multipart


def _assembly(parent: Path, upload_id: str) -> Path:
    return parent / f"{TEMP_PREFIX}{upload_id}"


def _part_file(parent: Path, upload_id: str, number: int) -> Path:
    return parent / f"{TEMP_PREFIX}{upload_id}-{number}"


def _upload(request: Request, bucket: str, key: str) -> sqlite3.Row:
    upload_id = request.arg("uploadId") or ""
    with _db() as db:
        row = db.execute("SELECT * FROM s3_uploads WHERE upload_id = ?", (upload_id,)).fetchone()
    if row is None or (row["bucket"], row["key"]) != (bucket, key):
        raise _no_such_upload(upload_id)
    return row


def create_multipart_upload(request: Request, bucket: str, key: str) -> Response:
    path = _object_path(bucket, key)
    if key.endswith("/") or path.is_dir():
        raise _key_conflict(key)
    _make_parents(path, key)
    upload_id = base64.urlsafe_b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes).decode("ascii").rstrip("=")
    with _db(write=True) as db:
        db.execute("INSERT INTO s3_uploads (upload_id, bucket, key, headers, initiated) VALUES (?, ?, ?, ?, ?)",
                   (upload_id, bucket, key, json.dumps(_stored_headers(request)), time.time()))
    logger.debug("multipart upload %s to s3://%s/%s", upload_id, bucket, key)
    return _xml("InitiateMultipartUploadResult", _el("Bucket", bucket) + _el("Key", key) + _el("UploadId", upload_id))


def _part_number(request: Request) -> int:
    raw = request.arg("partNumber") or ""
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PART_NUMBER:
        raise S3Error("InvalidArgument", f"Part number must be an integer between 1 and {MAX_PART_NUMBER}, inclusive",
                      ArgumentName="partNumber", ArgumentValue=raw)
    return int(raw)


def _claim_part_size(upload_id: str, size: int) -> int:
    """The upload's part size: the size of the first part to arrive (parts of that size go into the assembly file)."""
    with _db(write=True) as db:
        db.execute("UPDATE s3_uploads SET part_size = ? WHERE upload_id = ? AND part_size IS NULL", (size, upload_id))
        row = db.execute("SELECT part_size FROM s3_uploads WHERE upload_id = ?", (upload_id,)).fetchone()
    if row is None:
        raise _no_such_upload(upload_id)
    return int(row[0])


def write_part(upload: sqlite3.Row, path: Path, number: int, body: Body, request: Request | None) -> Written:
    """Store one part: in place in the assembly file if it has the upload's part size, else in a file of its own."""
    upload_id = upload["upload_id"]
    part_size = _claim_part_size(upload_id, body.length) if body.length else -1
    in_place = body.length == part_size
    if in_place:
        target, fd = _open_new(path.parent, _assembly(path.parent, upload_id).name, flags=0)
        offset: int | None = (number - 1) * part_size
    else:
        target, fd = _open_new(path.parent)
        offset = None
    try:
        written = receive(body, fd, offset or 0, request)
    except BaseException:
        if in_place:  # the region may hold a half-written copy: never complete with the old row for it
            with _db(write=True) as db:
                db.execute("DELETE FROM s3_parts WHERE upload_id = ? AND part_number = ?", (upload_id, number))
        else:
            target.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    if not in_place:
        os.replace(target, _part_file(path.parent, upload_id, number))
        target = _part_file(path.parent, upload_id, number)
    try:
        with _db(write=True) as db:
            db.execute("INSERT OR REPLACE INTO s3_parts (upload_id, part_number, size, md5, offset, last_modified) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (upload_id, number, written.size, written.md5.hex(), offset,
                                                     time.time()))
    except sqlite3.IntegrityError:  # aborted (or completed) while this part was being received
        if not in_place:
            target.unlink(missing_ok=True)
        raise _no_such_upload(upload_id) from None
    return written


def upload_part(request: Request, bucket: str, key: str) -> Response:
    upload = _upload(request, bucket, key)
    number = _part_number(request)
    path = _object_path(bucket, key)
    body = request_body(request)
    if body.length > MAX_PUT_BYTES:
        raise S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size",
                      ProposedSize=body.length, MaxSizeAllowed=MAX_PUT_BYTES)
    written = write_part(upload, path, number, body, request)
    return Response(200, {"ETag": f'"{written.md5.hex()}"', **written.checksums})


def upload_part_copy(request: Request, bucket: str, key: str) -> Response:
    upload = _upload(request, bucket, key)
    number = _part_number(request)
    path = _object_path(bucket, key)
    _, _, fd, info = _open_copy_source(request)
    source = FileBody(fd, 0, info.size)
    try:
        source.start, source.length = _copy_range_of(request.header("x-amz-copy-source-range"), info.size)
        written = write_part(upload, path, number, Body(iter(source), source.length), None)
    finally:
        source.close()
    return _xml("CopyPartResult", _el("LastModified", _iso(time.time())) + _el("ETag", f'"{written.md5.hex()}"'))


def _copy_range_of(value: str | None, size: int) -> tuple[int, int]:
    """``(start, length)`` of UploadPartCopy's ``x-amz-copy-source-range`` (the whole source without one)."""
    if not value:
        return 0, size
    match = _RANGE.match(value.strip())
    if not match or not match[1] or not match[2] or not int(match[1]) <= int(match[2]) < size:
        raise S3Error("InvalidArgument", f"Range specified is not valid for source object of size: {size}",
                      ArgumentName="x-amz-copy-source-range", ArgumentValue=value)
    return int(match[1]), int(match[2]) - int(match[1]) + 1


def _completed_parts(request: Request) -> list[tuple[int, str]]:
    root = _parse_xml(request.body(MAX_XML_BYTES))
    try:
        listed = [(int(part.findtext("PartNumber") or ""), (part.findtext("ETag") or "").strip().strip('"'))
                  for part in root.findall("Part")]
    except ValueError:
        raise S3Error("MalformedXML", "A Part has no valid PartNumber") from None
    if not listed:
        raise S3Error("MalformedXML", "You must specify at least one part")
    numbers = [number for number, _ in listed]
    if numbers != sorted(set(numbers)):
        raise S3Error("InvalidPartOrder", "The list of parts was not in ascending order. The parts list must be "
                      "specified in order by part number.")
    return listed


def _plan(upload_id: str, listed: list[tuple[int, str]]) -> list[tuple[sqlite3.Row, int]]:
    """The stored parts the completion names, each with its offset in the object; checks ETags and sizes."""
    with _db() as db:
        stored = {row["part_number"]: row for row in
                  db.execute("SELECT * FROM s3_parts WHERE upload_id = ?", (upload_id,))}
    plan, offset = [], 0
    for index, (number, etag) in enumerate(listed):
        row = stored.get(number)
        if row is None or row["md5"] != etag:
            raise S3Error("InvalidPart", "One or more of the specified parts could not be found. The part may not "
                          "have been uploaded, or the specified entity tag may not match the part's entity tag.",
                          UploadId=upload_id, PartNumber=number, ETag=etag)
        if index < len(listed) - 1 and row["size"] < MIN_PART_BYTES:
            raise S3Error("EntityTooSmall", "Your proposed upload is smaller than the minimum allowed size",
                          ProposedSize=row["size"], MinSizeAllowed=MIN_PART_BYTES, PartNumber=number, ETag=etag)
        plan.append((row, offset))
        offset += row["size"]
    return plan


def _copy_range(src: int, src_offset: int, dst: int, dst_offset: int, length: int) -> None:
    """Copy bytes between files in the kernel (``copy_file_range``), falling back to read/write."""
    while length > 0:
        try:
            copied = os.copy_file_range(src, dst, min(length, 1 << 30), src_offset, dst_offset)
        except OSError:
            copied = 0
        if copied <= 0:
            chunk = os.pread(src, min(length, CHUNK), src_offset)
            if not chunk:
                raise S3Error("InternalError", "A stored part is shorter than recorded", 500)
            _pwrite_all(dst, chunk, dst_offset)
            copied = len(chunk)
        src_offset, dst_offset, length = src_offset + copied, dst_offset + copied, length - copied


def _copy_part(parent: Path, upload_id: str, row: sqlite3.Row, dst: int, dst_offset: int) -> None:
    in_place = row["offset"] is not None
    source = _assembly(parent, upload_id) if in_place else _part_file(parent, upload_id, row["part_number"])
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _copy_range(src, row["offset"] if in_place else 0, dst, dst_offset, row["size"])
    finally:
        os.close(src)


def _assemble(parent: Path, upload_id: str, plan: list[tuple[sqlite3.Row, int]]) -> Path:
    """A temp file holding the object. When every part but the last sits in the assembly file at its final offset
    (the usual case: equal parts), that file *is* the object: the last part is copied in, the rest truncated."""
    total = sum(row["size"] for row, _ in plan)
    assembly = _assembly(parent, upload_id)
    last, last_offset = plan[-1]
    fast = assembly.is_file() and all(row["offset"] == offset for row, offset in plan[:-1]) and (
        last["offset"] in (None, last_offset))
    if fast:
        fd = os.open(assembly, os.O_RDWR | os.O_CLOEXEC)
        try:
            if last["offset"] is None:
                _copy_part(parent, upload_id, last, fd, last_offset)
            os.ftruncate(fd, total)
        finally:
            os.close(fd)
        return assembly
    logger.info("multipart upload %s: parts not in place, concatenating %d bytes", upload_id, total)
    tmp, fd = _open_new(parent)
    try:
        for row, offset in plan:
            _copy_part(parent, upload_id, row, fd, offset)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return tmp


def _drop_upload(upload_id: str, parent: Path) -> None:
    with _db(write=True) as db:
        db.execute("DELETE FROM s3_parts WHERE upload_id = ?", (upload_id,))
        db.execute("DELETE FROM s3_uploads WHERE upload_id = ?", (upload_id,))
    for leftover in parent.glob(f"{TEMP_PREFIX}{upload_id}*"):
        leftover.unlink(missing_ok=True)


def complete_multipart_upload(request: Request, bucket: str, key: str) -> Response:
    upload = _upload(request, bucket, key)
    upload_id = upload["upload_id"]
    path = _object_path(bucket, key)
    plan = _plan(upload_id, _completed_parts(request))
    if path.is_dir():
        raise _key_conflict(key)
    tmp = _assemble(path.parent, upload_id, plan)
    st = tmp.stat()
    etag = f'"{hashlib.md5(b"".join(bytes.fromhex(row["md5"]) for row, _ in plan)).hexdigest()}-{len(plan)}"'
    _install(tmp, path, key)
    _save(bucket, key, st, etag, json.loads(upload["headers"]), parts=len(plan))
    _drop_upload(upload_id, path.parent)
    logger.debug("completed multipart upload %s: s3://%s/%s (%d parts, %d bytes)", upload_id, bucket, key, len(plan),
                 st.st_size)
    location = f"http://{request.header('Host') or '127.0.0.1'}/{bucket}/{urllib.parse.quote(key)}"
    return _xml("CompleteMultipartUploadResult",
                _el("Location", location) + _el("Bucket", bucket) + _el("Key", key) + _el("ETag", etag))


def abort_multipart_upload(request: Request, bucket: str, key: str) -> Response:
    upload = _upload(request, bucket, key)
    path = _object_path(bucket, key)
    _drop_upload(upload["upload_id"], path.parent)
    _prune(path.parent, _bucket_dir(bucket), bucket)
    return Response(204)


def list_parts(request: Request, bucket: str, key: str) -> Response:
    upload = _upload(request, bucket, key)
    marker = _int_arg(request, "part-number-marker", 0, 0, MAX_PART_NUMBER)
    max_parts = _int_arg(request, "max-parts", 1000, 0, 1000)
    with _db() as db:
        rows = db.execute("SELECT * FROM s3_parts WHERE upload_id = ? AND part_number > ? ORDER BY part_number LIMIT ?",
                          (upload["upload_id"], marker, max_parts + 1)).fetchall()
    page, truncated = rows[:max_parts], len(rows) > max_parts
    parts = "".join(f"<Part>{_el('PartNumber', r['part_number'])}{_el('LastModified', _iso(r['last_modified']))}"
                    f"{_el('ETag', chr(34) + r['md5'] + chr(34))}{_el('Size', r['size'])}</Part>" for r in page)
    inner = (_el("Bucket", bucket) + _el("Key", key) + _el("UploadId", upload["upload_id"])
             + _el("PartNumberMarker", marker) + _el("MaxParts", max_parts) + _el("IsTruncated", truncated)
             + (_el("NextPartNumberMarker", page[-1]["part_number"]) if page else "")
             + _owner_xml("Initiator") + _owner_xml() + _el("StorageClass", "STANDARD") + parts)
    return _xml("ListPartsResult", inner)


# -------------------------------------------------------------------------------------------------- routing


Handler = Callable[..., Response]

BUCKET_ROUTES: dict[tuple[str, str | None], Handler] = {
    ("PUT", None): create_bucket,
    ("HEAD", None): head_bucket,
    ("DELETE", None): delete_bucket,
    ("GET", "location"): get_bucket_location,
    ("GET", "versioning"): get_bucket_versioning,
    ("POST", "delete"): delete_objects,
}


def _subresource(query: dict[str, list[str]]) -> str | None:
    extra = [k for k in query if k not in PARAMS and not k.lower().startswith(("x-amz-", "response-"))]
    return extra[0] if extra else None


def _target(request: Request) -> tuple[str, str]:
    """``(bucket, key)`` of a path-style request target."""
    try:
        path = urllib.parse.unquote(request.raw_path, errors="strict")
    except UnicodeDecodeError:
        raise S3Error("InvalidURI", "Couldn't parse the specified URI.") from None
    if not path.startswith("/"):
        raise S3Error("InvalidURI", "Couldn't parse the specified URI.")
    bucket, _, key = path[1:].partition("/")
    return bucket, key


def _bucket_handler(method: str, sub: str | None, query: dict[str, list[str]]) -> Handler | None:
    if (method, sub) == ("GET", None):
        return list_objects_v2 if (query.get("list-type") or [""])[0] == "2" else list_objects
    return BUCKET_ROUTES.get((method, sub))


def _object_handler(request: Request, sub: str | None) -> Handler | None:
    method, upload = request.method, request.arg("uploadId") is not None
    copy = request.header("x-amz-copy-source") is not None
    if sub == "uploads":
        return create_multipart_upload if method == "POST" else None
    if sub is not None:
        return None
    if method == "PUT":
        return (upload_part_copy if copy else upload_part) if upload else (copy_object if copy else put_object)
    if method == "POST":
        return complete_multipart_upload if upload else None
    if method in ("GET", "HEAD") and not upload and request.arg("partNumber") is not None:
        return None  # reads by part number: S3 would need the part boundaries, which are not kept
    return {"GET": list_parts if upload else get_object, "HEAD": get_object,
            "DELETE": abort_multipart_upload if upload else delete_object}.get(method)


def _dispatch(request: Request) -> Response:
    bucket, key = _target(request)
    sub = _subresource(request.query)
    if not bucket:
        if (request.method, sub) == ("GET", None):
            return list_buckets(request)
        raise S3Error("MethodNotAllowed", "The specified method is not allowed against this resource.", 405)
    handler = _object_handler(request, sub) if key else _bucket_handler(request.method, sub, request.query)
    if handler is None:
        what = f"{request.method} {'object' if key else 'bucket'}" + (f" ?{sub}" if sub else "")
        raise S3Error("NotImplemented", f"{what} is not implemented by the local S3 service", 501)
    return handler(request, bucket, key) if key else handler(request, bucket)


def handle(request: Request) -> Response:
    """Answer one S3 request; every failure is an S3 XML error."""
    request_id = uuid.uuid4().hex[:16].upper()
    try:
        response = _dispatch(request)
    except S3Error as exc:
        if exc.status >= 500:
            logger.warning("%s %s: %s %s", request.method, request.raw_path, exc.code, exc.message)
        response = _error_response(exc, request.raw_path, request_id)
    except Exception as exc:  # noqa: BLE001 -- still an S3 error the SDK parses (and retries, as for S3's 500s)
        logger.exception("%s %s failed", request.method, request.raw_path)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        response = _error_response(S3Error("InternalError", f"The local S3 service failed: {reason}", 500),
                                   request.raw_path, request_id)
    response.headers.setdefault("x-amz-request-id", request_id)
    response.headers.setdefault("x-amz-id-2", base64.b64encode(request_id.encode()).decode("ascii"))
    return response
