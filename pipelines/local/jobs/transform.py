"""Batch transform jobs: a resolved CreateTransformJob request run locally, through the local endpoint's serving path.

What answers each request is what answers a local endpoint's ``/invocations``: SageMaker's PyTorch inference
toolkit, loaded by :func:`pipelines.local.serving.endpoint_server.load` on the extracted ``model.tar.gz`` (its
``code/`` holds ``SAGEMAKER_PROGRAM`` with ``model_fn``/``input_fn``/``predict_fn``/``output_fn``, the toolkit's
defaults fill in the rest) and called per request by ``Loaded.invoke`` -- ``HandlerService.handle`` as TorchServe's
worker calls it, with the request's ``Content-Type`` and ``Accept``. That runs in a *worker* subprocess (this module
run as ``python -m pipelines.local.jobs.transform <config.json>``) under :func:`runtime.run_command` (job guard,
log file, ``on_line``, stop), never in the engine's process. The worker also does the platform's part, as batch
transform does it in front of the container (AWS "Batch Transform" docs; the SDK's local mode,
``sagemaker.local.entities._LocalTransformJob``, for the container environment):

- inputs: every object under ``S3DataSource.S3Uri`` (``S3Prefix``: key-prefix semantics, as :func:`runtime.fetch`)
  or listed by a manifest (``ManifestFile``: ``[{"prefix": ...}, "rel/key", ...]``); ``CompressionType`` ``None``
  or ``Gzip``;
- ``SplitType``: ``None`` (the whole object is one request) or ``Line`` (one record per line; blank lines are
  skipped; every record is sent with a ``\\n`` ending). ``RecordIO``/``TFRecord`` are refused with a JobError;
- ``BatchStrategy``: ``MultiRecord`` (default, as the SDK's local mode: as many records per request as fit in
  ``MaxPayloadInMB``, default 6, 0 = no limit) or ``SingleRecord``; a record over the limit fails the job;
  ``MaxConcurrentTransforms`` requests in flight at once (threads, as the endpoint server's workers);
- the container's environment: the model's ``Environment``, ``SAGEMAKER_BATCH=True``,
  ``SAGEMAKER_MAX_PAYLOAD_IN_MB``, ``SAGEMAKER_BATCH_STRATEGY`` (``SINGLE_RECORD``/``MULTI_RECORD``),
  ``SAGEMAKER_MAX_CONCURRENT_TRANSFORMS``, then the request's ``Environment``;
- outputs: ``<S3OutputPath>/<object's name relative to the input prefix>.out``; ``AssembleWith`` ``Line`` ends every
  answer with a newline (one that has one keeps it), ``None`` concatenates them. Only objects transformed
  completely are uploaded, also when a later object fails the job;
- ``DataProcessing`` for CSV (``text/csv``) and JSON (``application/json``, ``application/jsonlines``) input:
  ``InputFilter`` before the request, ``JoinSource`` ``Input`` (CSV: the answer's columns appended to the input
  row; JSON: ``SageMakerOutput`` added to an input object, else ``{"SageMakerInput", "SageMakerOutput"}``) and
  ``OutputFilter`` after it. Filters are the JSONPath subset AWS documents: ``$``, ``.name``, ``['a','b']``,
  ``[0,2]``, ``[1:]``, ``[0,5:]``, ``[-1]``, ``*``. With joining or an output filter every record needs its own
  answer: a multi-record answer must have one line (or one JSON array element) per record.

A model answer of HTTP 4xx/5xx fails the job with the model's message (``ModelError: ...``). A model whose image is
not a PyTorch inference image and whose container has no ``SAGEMAKER_PROGRAM`` (e.g. the built-in XGBoost
algorithm, which runs its own server) cannot be served by that path: JobError naming the image. Not done locally:
``ModelClientConfig`` retries and timeouts, several instances, ``DataCaptureConfig``, KMS.
"""

from __future__ import annotations

import concurrent.futures
import csv
import functools
import glob
import gzip
import io
import json
import logging
import os
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipelines.local.jobs.runtime import (
    TOOLKIT_INPUT_ENV,
    JobControl,
    JobError,
    OnLine,
    _arn,
    _failure_message,
    _fresh_dir,
    described_request_fields,
    run_command,
)
from pipelines.local.storage.store import ArtifactStore

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[3]
MB = 1024 * 1024
DEFAULT_MAX_PAYLOAD_MB = 6
SUPPORTED_SPLIT_TYPES = ("None", "Line")
CSV, JSON, JSONLINES = "text/csv", "application/json", "application/jsonlines"
_KINDS = {CSV: "csv", JSON: "json", JSONLINES: "jsonlines", "application/x-jsonlines": "jsonlines"}
#: Temp files of the artifact store and the local S3 (``.name.pid.tid.tmp``, ``.s3tmp-<uuid>``): never inputs.
_TEMP_FILE = re.compile(r"^\.(s3tmp-.*|.*\.tmp)$")


# --- settings -------------------------------------------------------------------------------------------------


def _kind(mime: str | None) -> str | None:
    """``csv``, ``json``, ``jsonlines`` or None for a MIME type (parameters ignored)."""
    return _KINDS.get((mime or "").split(";", 1)[0].strip().lower())


def _choice(value: Any, field: str, allowed: tuple[str, ...], default: str, *, local: tuple[str, ...] = ()) -> str:
    """``value`` (None: ``default``) if it is one of ``allowed``; :class:`JobError` otherwise."""
    text = default if value in (None, "") else str(value)
    if text in allowed:
        return text
    if text in local:
        raise JobError(f"{field} {text} is not supported by local batch transform (supported: {', '.join(allowed)})")
    raise JobError(f"invalid {field} {text!r}: must be one of {', '.join(allowed + local)}")


@dataclass(frozen=True)
class TransformSettings:
    """How a transform job splits, batches, sends and assembles records (validated by :meth:`from_request`)."""

    split_type: str = "None"
    compression: str = "None"
    content_type: str | None = None
    accept: str | None = None
    assemble_with: str = "None"
    batch_strategy: str = "MultiRecord"
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_MB * MB  # 0: no limit
    max_concurrent: int = 1
    input_filter: str = "$"
    join_source: str = "None"
    output_filter: str = "$"

    @property
    def input_kind(self) -> str | None:
        return _kind(self.content_type)

    @property
    def output_kind(self) -> str | None:
        return _kind(self.accept or self.content_type)

    @property
    def per_record(self) -> bool:
        """Whether every record's answer is handled on its own (joined with its input, or filtered)."""
        return self.join_source == "Input" or self.output_filter != "$"

    @classmethod
    def from_request(cls, request: Mapping[str, Any]) -> TransformSettings:
        source = request.get("TransformInput") or {}
        output = request.get("TransformOutput") or {}
        processing = request.get("DataProcessing") or {}
        payload_mb = int(request.get("MaxPayloadInMB") if request.get("MaxPayloadInMB") is not None
                         else DEFAULT_MAX_PAYLOAD_MB)
        if not 0 <= payload_mb <= 100:
            raise JobError(f"MaxPayloadInMB must be between 0 and 100, got {payload_mb}")
        settings = cls(
            split_type=_choice(source.get("SplitType"), "SplitType", SUPPORTED_SPLIT_TYPES, "None",
                               local=("RecordIO", "TFRecord")),
            compression=_choice(source.get("CompressionType"), "CompressionType", ("None", "Gzip"), "None"),
            content_type=source.get("ContentType") or None, accept=output.get("Accept") or None,
            assemble_with=_choice(output.get("AssembleWith"), "AssembleWith", ("None", "Line"), "None"),
            batch_strategy=_choice(request.get("BatchStrategy"), "BatchStrategy", ("MultiRecord", "SingleRecord"),
                                   "MultiRecord"),
            max_payload_bytes=payload_mb * MB, max_concurrent=max(1, int(request.get("MaxConcurrentTransforms") or 1)),
            input_filter=str(processing.get("InputFilter") or "$").strip(),
            join_source=_choice(processing.get("JoinSource"), "DataProcessing.JoinSource", ("None", "Input"), "None"),
            output_filter=str(processing.get("OutputFilter") or "$").strip())
        settings.validate_data_processing()
        return settings

    def validate_data_processing(self) -> None:
        parse_json_path(self.input_filter)
        parse_json_path(self.output_filter)
        if self.input_filter == "$" and not self.per_record:
            return
        if self.input_kind is None:
            raise JobError(f"DataProcessing (InputFilter/JoinSource/OutputFilter) needs CSV or JSON input "
                           f"(ContentType {CSV}, {JSON} or {JSONLINES}), not {self.content_type!r}")
        if self.split_type != "Line" and self.input_kind != "json":
            raise JobError(f"DataProcessing on {self.content_type} input needs SplitType Line (one record per line)")


# --- JSONPath (the subset batch transform documents) ----------------------------------------------------------

Step = tuple[str, Any]
_NAME_STEP = re.compile(r"\.(\*|[^.\[\]]+)")
_BRACKET_STEP = re.compile(r"\[([^\]]*)\]")


@functools.cache
def parse_json_path(expr: str) -> tuple[Step, ...]:
    """The steps of a filter: ``("key", name)``, ``("keys", [names])``, ``("all", None)``, ``("index", i)`` or
    ``("indices", [int | slice])``; :class:`JobError` for what batch transform's JSONPath subset does not have."""
    expr = (expr or "$").strip()
    if not expr.startswith("$"):
        raise JobError(f"JSONPath {expr!r} must start with $")
    steps: list[Step] = []
    pos = 1
    while pos < len(expr):
        match = _NAME_STEP.match(expr, pos) or _BRACKET_STEP.match(expr, pos)
        if match is None:
            raise JobError(f"JSONPath {expr!r}: cannot parse {expr[pos:]!r} (supported: $, .name, ['a','b'], "
                           "[0,2], [1:], [0,5:], *)")
        steps.append(_step(match.group(0), match.group(1).strip(), expr))
        pos = match.end()
    return tuple(steps)


def _step(token: str, inner: str, expr: str) -> Step:
    if inner == "*":
        return ("all", None)
    if token.startswith("."):
        return ("key", inner)
    items = [item.strip() for item in inner.split(",")]
    if all(len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"" for item in items):
        names = [item[1:-1] for item in items]
        return ("key", names[0]) if len(names) == 1 else ("keys", names)
    try:
        picks = [_index(item) for item in items]
    except ValueError:
        raise JobError(f"JSONPath {expr!r}: [{inner}] is neither names nor indexes/slices") from None
    return ("index", picks[0]) if len(picks) == 1 and isinstance(picks[0], int) else ("indices", picks)


def _index(item: str) -> int | slice:
    if ":" not in item:
        return int(item)
    parts = item.split(":")
    if len(parts) > 3:
        raise ValueError(item)
    return slice(*(int(part) if part.strip() else None for part in parts))


def apply_json_path(expr: str, value: Any) -> Any:
    """``value`` filtered by ``expr`` (a CSV row is a JSON array of its fields)."""
    for kind, arg in parse_json_path(expr):
        value = _apply_step(expr, kind, arg, value)
    return value


def _apply_step(expr: str, kind: str, arg: Any, value: Any) -> Any:
    if kind == "all":
        if isinstance(value, dict | list):
            return list(value.values()) if isinstance(value, dict) else list(value)
        raise JobError(f"JSONPath {expr!r}: * applied to {type(value).__name__}")
    if kind in ("key", "keys"):
        names = [arg] if kind == "key" else arg
        missing = [name for name in names if not isinstance(value, dict) or name not in value]
        if missing:
            raise JobError(f"JSONPath {expr!r}: no {', '.join(map(repr, missing))} in the record")
        return value[arg] if kind == "key" else {name: value[name] for name in names}
    if not isinstance(value, list):
        raise JobError(f"JSONPath {expr!r}: indexes applied to {type(value).__name__}, not an array")
    try:
        if kind == "index":
            return value[arg]
        out: list[Any] = []
        for pick in arg:
            if isinstance(pick, slice):
                out.extend(value[pick])
            else:
                out.append(value[pick])
        return out
    except IndexError:
        raise JobError(f"JSONPath {expr!r}: index out of range for a record of {len(value)} fields") from None


# --- records --------------------------------------------------------------------------------------------------


def _decode(data: bytes, kind: str | None) -> Any:
    """A CSV record as its list of fields, a JSON record as its value; any other answer as text (or its JSON)."""
    text = data.decode("utf-8")
    if kind == "csv":
        return next(csv.reader([text]), [])
    try:
        return json.loads(text)
    except ValueError:
        if kind in ("json", "jsonlines"):
            raise JobError(f"not valid JSON: {text[:200]!r}") from None
        return text


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict | list) else str(value)


def _encode(value: Any, kind: str | None) -> bytes:
    if kind == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="").writerow([_csv_cell(v) for v in value] if isinstance(value, list)
                                                       else [_csv_cell(value)])
        return buffer.getvalue().encode("utf-8")
    return json.dumps(value).encode("utf-8")


def split_records(data: bytes, split_type: str) -> list[bytes]:
    """``Line``: every non-blank line without its line ending; ``None``: the whole object."""
    if split_type == "None":
        return [data]
    return [line for line in (raw.rstrip(b"\r\n") for raw in data.splitlines()) if line.strip()]


def _payload(record: bytes, settings: TransformSettings) -> bytes:
    """What a record contributes to a request: after ``InputFilter``; a Line record ends with ``\\n``."""
    if settings.input_filter != "$":
        kind = settings.input_kind
        record = _encode(apply_json_path(settings.input_filter, _decode(record, kind)), kind)
    return record + b"\n" if settings.split_type == "Line" else record


def make_batches(sizes: list[int], settings: TransformSettings) -> list[list[int]]:
    """Record indexes per request: one each (``SingleRecord``, ``SplitType None``) or as many as fit in the
    payload limit (``MultiRecord``); a record over the limit fails the job, as on SageMaker."""
    limit = settings.max_payload_bytes
    batches: list[list[int]] = []
    total = 0
    for index, size in enumerate(sizes):
        if limit and size > limit:
            raise JobError(f"record {index + 1} is {size} bytes, over MaxPayloadInMB ({limit // MB} MB)")
        if settings.batch_strategy == "MultiRecord" and batches and (not limit or total + size <= limit):
            batches[-1].append(index)
            total += size
        else:
            batches.append([index])
            total = size
    return batches


def _answers(body: bytes, count: int) -> list[bytes]:
    """A multi-record answer, one per record: its lines, or the elements of a JSON array."""
    if count == 1:
        return [body.rstrip(b"\r\n")]
    lines = [line for line in body.splitlines() if line.strip()]
    if len(lines) == count:
        return lines
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if isinstance(value, list) and len(value) == count:
        return [json.dumps(item).encode("utf-8") for item in value]
    raise JobError(f"the model answered {len(lines)} line(s) to a request of {count} records: with JoinSource Input "
                   "or an OutputFilter every record needs its own answer line")


def _joined(record: bytes, answer: bytes, settings: TransformSettings) -> bytes:
    """One record's output: its answer, joined with the input (``JoinSource Input``), through ``OutputFilter``."""
    output = _decode(answer, settings.output_kind)
    if settings.join_source == "Input":
        kind = "csv" if settings.input_kind == "csv" else "json"
        source = _decode(record, kind)
        if kind == "csv":
            value: Any = list(source) + (output if isinstance(output, list) else [output])
        else:
            value = ({**source, "SageMakerOutput": output} if isinstance(source, dict)
                     else {"SageMakerInput": source, "SageMakerOutput": output})
    else:
        kind = "csv" if settings.output_kind == "csv" else "json"
        value = output
    return _encode(apply_json_path(settings.output_filter, value), kind)


def _assemble(parts: Iterable[bytes], assemble_with: str) -> bytes:
    if assemble_with == "Line":
        return b"".join(part if part.endswith(b"\n") else part + b"\n" for part in parts)
    return b"".join(parts)


def transform_object(invoke: Callable[[bytes], bytes], data: bytes, settings: TransformSettings,
                     ) -> tuple[bytes, int, int]:
    """One input object's ``.out`` content: split, batch, send (``invoke``), assemble. Returns it with the number
    of records and requests."""
    if settings.compression == "Gzip":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise JobError(f"CompressionType Gzip, but the object is not gzip data: {exc}") from exc
    records = split_records(data, settings.split_type)
    if not records:
        return b"", 0, 0
    payloads = [_payload(record, settings) for record in records]
    batches = make_batches([len(p) for p in payloads], settings)
    bodies = [b"".join(payloads[i] for i in batch) for batch in batches]
    if settings.max_concurrent > 1 and len(bodies) > 1:
        with concurrent.futures.ThreadPoolExecutor(settings.max_concurrent, "transform") as pool:
            answers = list(pool.map(invoke, bodies))
    else:
        answers = [invoke(body) for body in bodies]
    if not settings.per_record:
        return _assemble(answers, settings.assemble_with), len(records), len(bodies)
    outputs = [_joined(records[i], answer, settings) for batch, body in zip(batches, answers, strict=True)
               for i, answer in zip(batch, _answers(body, len(batch)), strict=True)]
    return _assemble(outputs, settings.assemble_with), len(records), len(bodies)


# --- the worker (a subprocess: the model's code runs here) ----------------------------------------------------


class ModelError(JobError):
    """The model answered a request with an HTTP error status."""


def _model_message(body: bytes) -> str:
    """The toolkit's error body is ``<message>\\n<traceback>``: the message."""
    text = body.decode("utf-8", "replace")
    return text.split("\nTraceback (most recent call last):", 1)[0].strip()[:1000] or "(empty answer)"


def _invoker(loaded: Any, settings: TransformSettings) -> Callable[[bytes], bytes]:
    """One request through the endpoint server's handler chain (``Loaded.invoke``), its body or :class:`ModelError`."""
    headers = {key: value for key, value in (("Content-Type", settings.content_type), ("Accept", settings.accept))
               if value}

    def invoke(body: bytes) -> bytes:
        response = loaded.invoke(body, headers)
        if response.status >= 400:
            _say(f"the model answered HTTP {response.status}:\n{response.body.decode('utf-8', 'replace').rstrip()}")
            raise ModelError(f"the model answered HTTP {response.status}: {_model_message(response.body)}")
        return response.body

    return invoke


def _say(text: str) -> None:
    sys.stdout.write(f"[transform] {text}\n")
    sys.stdout.flush()


def _fail(failure: Path, reason: str) -> int:
    _say(f"failed: {reason}")
    failure.parent.mkdir(parents=True, exist_ok=True)
    failure.write_text(reason)
    return 1


def _work(config: Mapping[str, Any]) -> int:
    """Load the model as the endpoint server does, transform every object into ``output_dir``; 0 or 1."""
    from pipelines.local.serving import endpoint_server

    settings = TransformSettings(**config["settings"])
    failure, output_dir = Path(config["failure"]), Path(config["output_dir"])
    try:
        loaded = endpoint_server.load(config["model_dir"], 1, config["environment"])
    except endpoint_server.HandlerLoadError as exc:
        return _fail(failure, f"AlgorithmError: {exc}")
    invoke = _invoker(loaded, settings)
    for number, item in enumerate(config["objects"], 1):
        name = item["name"]
        started = time.monotonic()
        try:
            data, records, requests = transform_object(invoke, Path(item["path"]).read_bytes(), settings)
        except ModelError as exc:
            return _fail(failure, f"ModelError: {name}: {exc}")
        except (JobError, OSError, UnicodeDecodeError) as exc:
            return _fail(failure, f"ClientError: {name}: {exc}")
        target = output_dir / f"{name}.out"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        _say(f"{number}/{len(config['objects'])} {name}: {records} record(s) in {requests} request(s), "
             f"{len(data)} bytes out in {time.monotonic() - started:.2f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The worker: ``python -m pipelines.local.jobs.transform <config.json>`` (written by the engine)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m pipelines.local.jobs.transform <config.json>\n")
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
    return _work(json.loads(Path(args[0]).read_text()))


# --- the engine's side ----------------------------------------------------------------------------------------


def _container(model: Mapping[str, Any]) -> dict[str, Any]:
    containers = ([model["PrimaryContainer"]] if model.get("PrimaryContainer") else []) + list(
        model.get("Containers") or [])
    if len(containers) != 1:
        raise JobError(f"model {model.get('ModelName')!r} has {len(containers)} containers: local batch transform "
                       "serves a single-container model (no inference pipelines)")
    return dict(containers[0])


def _check_servable(model_name: str, container: Mapping[str, Any]) -> None:
    """PyTorch inference images, and any container with a ``SAGEMAKER_PROGRAM`` handler, go through the
    PyTorch inference toolkit; built-in XGBoost models through :mod:`pipelines.local.serving.xgboost_model`;
    anything else (another built-in algorithm's own server) cannot be served locally."""
    from pipelines.local.serving import xgboost_model

    image = str(container.get("Image") or "")
    environment = {**(container.get("Environment") or {}), xgboost_model.IMAGE_ENV: image}
    repository = image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0].lower()
    if "pytorch" in repository or environment.get("SAGEMAKER_PROGRAM") or xgboost_model.wanted(environment):
        return
    raise JobError(f"model {model_name!r}: image {image or '(none)'} cannot be served locally: the local serving "
                   "paths are SageMaker's PyTorch inference toolkit (a PyTorch inference image or a "
                   "SAGEMAKER_PROGRAM handler: model_fn/input_fn/predict_fn/output_fn in code/ of model.tar.gz) "
                   "and the built-in XGBoost algorithm's")


def _materialize_model(container: Mapping[str, Any], model_dir: Path, artifacts: ArtifactStore) -> Path:
    """``ModelDataUrl`` extracted into ``model_dir`` (the container's ``/opt/ml/model``), as the endpoint does."""
    import shutil

    from training.archives import UnsafeArchiveError, is_archive, safe_extract

    url = container.get("ModelDataUrl") or ((container.get("ModelDataSource") or {}).get("S3DataSource")
                                            or {}).get("S3Uri")
    if not url:
        raise JobError("the model's container has no ModelDataUrl: nothing to serve")
    source = artifacts.path(str(url))
    if not source.exists():
        raise JobError(f"model data {url} not found in the local artifact store ({source})")
    try:
        if source.is_dir():
            shutil.copytree(source, model_dir)
        elif is_archive(source):
            safe_extract(source, model_dir)
        else:
            model_dir.mkdir(parents=True)
            shutil.copy2(source, model_dir / source.name)
    except (UnsafeArchiveError, OSError, EOFError) as exc:
        raise JobError(f"cannot extract model data {url}: {exc}") from exc
    return model_dir


def _files_under(root: Path) -> list[Path]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [p for p in files if not _TEMP_FILE.match(p.name)]


def _prefix_objects(uri: str, artifacts: ArtifactStore) -> list[tuple[str, Path]]:
    """``S3Prefix``: every object whose key starts with the prefix, named relative to the prefix's "directory"."""
    src = artifacts.path(uri)
    if src.is_dir():
        root, matches = src, [src]
    else:
        root = src.parent
        matches = sorted(root.glob(glob.escape(src.name) + "*")) if root.is_dir() else []
    objects = [(path.relative_to(root).as_posix(), path) for match in matches for path in _files_under(match)]
    if not objects:
        raise JobError(f"transform input {uri} matches no object (looked in {src})")
    return objects


def _manifest_objects(uri: str, artifacts: ArtifactStore) -> list[tuple[str, Path]]:
    """``ManifestFile``: ``[{"prefix": "s3://bucket/prefix/"}, "relative/key", ...]``."""
    try:
        entries = json.loads(artifacts.path(uri).read_text())
        prefix = str(entries[0]["prefix"])
        names = [str(name) for name in entries[1:]]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise JobError(f"manifest {uri} is not [{{\"prefix\": ...}}, \"key\", ...]: {exc}") from exc
    objects = []
    for name in names:
        path = artifacts.path(prefix + name)
        if not path.is_file():
            raise JobError(f"manifest {uri}: object {prefix + name} does not exist")
        objects.append((name, path))
    return objects


def _input_objects(request: Mapping[str, Any], artifacts: ArtifactStore) -> list[tuple[str, Path]]:
    source = ((request.get("TransformInput") or {}).get("DataSource") or {}).get("S3DataSource") or {}
    uri = source.get("S3Uri")
    if not uri:
        raise JobError("TransformInput.DataSource.S3DataSource.S3Uri is required")
    data_type = source.get("S3DataType") or "S3Prefix"
    if data_type not in ("S3Prefix", "ManifestFile"):
        raise JobError(f"S3DataType {data_type} is not supported by local batch transform (S3Prefix, ManifestFile)")
    objects = (_manifest_objects if data_type == "ManifestFile" else _prefix_objects)(str(uri), artifacts)
    for name, _path in objects:
        pure = PurePosixPath(name)
        if not name or pure.is_absolute() or ".." in pure.parts:
            raise JobError(f"input object name {name!r} would leave S3OutputPath")
    return objects


def _container_env(request: Mapping[str, Any], container: Mapping[str, Any],
                   settings: TransformSettings) -> dict[str, str]:
    """The model's environment, batch transform's ``SAGEMAKER_*`` variables, then the request's ``Environment``."""
    from pipelines.local.serving.xgboost_model import IMAGE_ENV

    env = {str(k): str(v) for k, v in (container.get("Environment") or {}).items()}
    if container.get("Image"):
        env[IMAGE_ENV] = str(container["Image"])
    env.update({"SAGEMAKER_BATCH": "True", "SAGEMAKER_MAX_PAYLOAD_IN_MB": str(settings.max_payload_bytes // MB),
                "SAGEMAKER_BATCH_STRATEGY": "MULTI_RECORD" if settings.batch_strategy == "MultiRecord"
                else "SINGLE_RECORD", "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": str(settings.max_concurrent)})
    env.update({str(k): str(v) for k, v in (request.get("Environment") or {}).items()})
    return env


def _worker_env(container_env: Mapping[str, str], job_name: str) -> dict[str, str]:
    """The worker process's environment: the engine's (minus the toolkit's inputs), the container's, the job's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_") and k not in TOOLKIT_INPUT_ENV}
    env.update(container_env)
    env.update({"TRANSFORM_JOB_NAME": job_name, "TRANSFORM_JOB_ARN": _arn("transform-job", job_name),
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)})
    return env


def _log(log_path: Path, text: str) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"[engine] {text}\n")


def _upload(output_dir: Path, output_path: str, artifacts: ArtifactStore) -> list[str]:
    uris = []
    for path in _files_under(output_dir) if output_dir.is_dir() else []:
        uri = f"{output_path}/{path.relative_to(output_dir).as_posix()}"
        artifacts.copy_in(path, uri)
        uris.append(uri)
    return uris


def _describe(request: Mapping[str, Any], job_name: str, model_name: str, job_dir: Path, log_path: Path,
              started: float) -> dict[str, Any]:
    fields = described_request_fields("CreateTransformJob", "DescribeTransformJob")
    described = {k: v for k, v in request.items() if k in fields}
    return {
        "TransformInput": {}, "TransformOutput": {}, "TransformResources": {},
        **described,
        "TransformJobName": job_name,
        "TransformJobArn": _arn("transform-job", job_name),
        "TransformJobStatus": "Completed",
        "ModelName": model_name,
        "CreationTime": started,
        "TransformStartTime": started,
        "TransformEndTime": time.time(),
        "LocalJobDir": str(job_dir),
        "LogPath": str(log_path),
    }


def run_transform_job(request: Mapping[str, Any], job_name: str, job_dir: Path, artifacts: ArtifactStore,
                      log_path: Path, *, model: Mapping[str, Any], on_line: OnLine | None = None,
                      control: JobControl | None = None) -> dict[str, Any]:
    """Run a resolved CreateTransformJob request against ``model`` (its DescribeModel answer); return the
    DescribeTransformJob-shaped result. Raises :class:`JobError` (the failure reason) or ``JobStopped``."""
    started = time.time()
    settings = TransformSettings.from_request(request)
    model_name = str(request.get("ModelName") or model.get("ModelName") or "")
    container = _container(model)
    _check_servable(model_name, container)
    output_path = str((request.get("TransformOutput") or {}).get("S3OutputPath") or "").rstrip("/")
    if not output_path:
        raise JobError("TransformOutput.S3OutputPath is required")
    objects = _input_objects(request, artifacts)
    job_dir = _fresh_dir(Path(job_dir))
    model_dir = _materialize_model(container, job_dir / "model", artifacts)
    output_dir = job_dir / "output" / "data"
    config = {"settings": asdict(settings), "model_dir": str(model_dir), "output_dir": str(output_dir),
              "failure": str(job_dir / "output" / "failure"),
              "environment": _container_env(request, container, settings),
              "objects": [{"name": name, "path": str(path)} for name, path in objects]}
    config_path = job_dir / "transform.json"
    config_path.write_text(json.dumps(config, indent=2))
    _log(log_path, f"transform job {job_name}: model {model_name} ({container.get('Image') or 'no image'}), "
                   f"{len(objects)} object(s), SplitType {settings.split_type}, {settings.batch_strategy}, "
                   f"AssembleWith {settings.assemble_with} -> {output_path}")
    code = run_command([sys.executable, "-m", "pipelines.local.jobs.transform", str(config_path)], cwd=job_dir,
                       env=_worker_env(config["environment"], job_name), log_path=log_path, on_line=on_line,
                       control=control)
    uploaded = _upload(output_dir, output_path, artifacts)  # the objects done, also when a later one failed
    _log(log_path, f"uploaded {len(uploaded)} of {len(objects)} output object(s) to {output_path}")
    if code != 0:
        raise JobError(_failure_message(job_dir, log_path, code))
    return _describe(request, job_name, model_name, job_dir, log_path, started)


if __name__ == "__main__":
    sys.exit(main())
