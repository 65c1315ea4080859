"""A local SageMaker inference endpoint served through SageMaker's own PyTorch inference toolkit.

What answers a request is the code the PyTorch inference containers run: ``sagemaker-pytorch-inference``'s
``HandlerService`` (a ``sagemaker-inference`` ``Transformer`` with ``DefaultPytorchInferenceHandler``), called the
way TorchServe's Python worker calls it (``ts.context.Context`` + ``RequestProcessor``, ``handle([{"body": ...}],
context)``, status and content type read back from the context). So the handler is resolved exactly as on AWS:
``SAGEMAKER_PROGRAM`` (default ``inference.py``) is imported from ``<model_dir>/code`` -- the extracted
``model.tar.gz`` -- with the toolkit's defaults for whatever ``model_fn``/``input_fn``/``predict_fn``/``output_fn``
it does not define; a model archive without ``code/`` gets the toolkit's default handler, as on AWS.

What is not the container: TorchServe's Java frontend. Its part here is done in Python, as it does it: it puts
``<model_dir>/code`` on ``PYTHONPATH`` before the worker starts (``torchserve.py`` ``_set_python_path``; here
``sys.path``), passes the request headers as request properties and answers with the status, content type and
body the handler service left in the context. ``tests/test_torchserve.py`` runs the same ``model.tar.gz`` under real
TorchServe and compares the answers.

Routes:

- ``GET /ping`` -- 200 when a model is loaded, 503 otherwise (the container contract).
- ``POST /invocations`` -- the container contract: the toolkit's own status and body, unchanged.
- ``POST /endpoints/{EndpointName}/invocations`` -- the SageMaker runtime API (``InvokeEndpoint``), so that
  ``boto3.client("sagemaker-runtime", endpoint_url=<server url>)`` and the SDK's ``Predictor`` work unchanged:
  ``Content-Type``, ``Accept`` and ``X-Amzn-SageMaker-Custom-Attributes`` go to the container; the response carries
  ``x-Amzn-Invoked-Production-Variant``; a container 4xx/5xx becomes ``ModelError`` (HTTP 424 with
  ``OriginalStatusCode``, ``OriginalMessage``, ``LogStreamArn``) and an unknown endpoint ``ValidationError``, as AWS
  answers them. Bodies larger than ``--max-body-bytes`` (default 6 MB, SageMaker's real-time payload limit) get 413.

Admin routes (loopback clients with the token from ``<state-dir>/admin.token`` only):

- ``POST /_mlops/reload`` ``{"model_dir", "environment"}`` -- loads the new model in this process, on the new
  generation's own inference thread(s), while the old ones keep serving; then the inference queue switches to the
  new generation (requests the old threads hold finish on the old model). ``/ping`` stays 200 throughout; if loading
  fails, the old model keeps serving and the error comes back as a 500.
- ``GET /_mlops/status`` -- what is loaded (generation, directories, load time, the thread that loaded it) and
  the inference engine (threads, batch settings, how many batches of each size ran).

Run in the background by :mod:`pipelines.local.serving.endpoints`::

    python -m pipelines.local.serving.endpoint_server --port P --model-dir DIR \
        --state-dir $MLOPS_HOME/endpoints/<name> \
        --name <name>

It writes ``<state-dir>/server.json`` (``pid``, ``port``, ``url``, ``state``, ``settings``) once it listens, and
removes it on a clean shutdown.

Connections (:class:`EndpointHTTPServer`; every limit is a flag with an ``MLOPS_ENDPOINT_*`` env default, listed in
docs/LIMITS.md "Endpoint server"): one reactor thread holds all connections that wait on their client, with
deadlines for the request head, idle keep-alive and closing, and answers ``/ping``; a bounded set of request threads
reads complete requests (body under a deadline) and hands them to the inference queue; HTTP/1.1 keep-alive, with
``TCP_NODELAY`` and one write per response. A full pool and queue get 503 at once; connections never add threads.
SIGTERM/SIGINT drains: stop listening, close idle and incomplete connections, let the requests in flight finish
within ``--drain-timeout``, exit 0.

Inference (:class:`InferenceEngine`): one inference thread by default (``--inference-threads``), which loads the
model itself and is the only thread that runs torch (``torch.set_num_threads`` = ``--intra-op-threads``), so that
the process never holds more OpenMP threads than CPUs. Requests queued together are micro-batched (``--max-batch``,
``--max-batch-wait-ms``) when the handler module has ``predict_batch_fn``: see :meth:`Loaded.invoke_batch` for how
a batch keeps the toolkit's contract (its own ``transform`` for each request's ``input_fn``/``output_fn``, one
batched predict between them, per-request ``predict_fn`` if that fails).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import email.utils
import errno
import hmac
import http.server
import io
import ipaddress
import json
import logging
import os
import queue
import re
import secrets
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from http import HTTPStatus
from pathlib import Path
from typing import Any

from pipelines.local.serving import xgboost_model

logger = logging.getLogger("pipelines.local.serving.endpoint_server")

DEFAULT_MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker real-time inference payload limit
DEFAULT_VARIANT = "AllTraffic"
JSON = "application/json"
STATE_FILE = "server.json"
TOKEN_FILE = "admin.token"
TOKEN_HEADER = "X-MLOps-Token"
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
INVOKED_VARIANT = "x-Amzn-Invoked-Production-Variant"
#: Request headers the SageMaker runtime forwards to the container.
FORWARDED_HEADERS = ("Content-Type", "Accept", CUSTOM_ATTRIBUTES)
_RUNTIME_PATH = re.compile(r"^/endpoints/([^/]+)/invocations$")
_DRAIN_LIMIT = 64 * 1024 * 1024  # read and discard at most this much of a refused body, so the client sees the 413


class HandlerLoadError(RuntimeError):
    """The inference handler module or the model could not be loaded."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str | None
    headers: dict[str, str] = field(default_factory=dict)


def _torchserve_body(value: Any) -> bytes:
    """Encode one handler result the way TorchServe's worker does (``otf_message_handler.create_predict_response``)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    try:
        import torch

        if isinstance(value, torch.Tensor):
            import io

            buffer = io.BytesIO()
            torch.save(value, buffer)
            return buffer.getvalue()
    except ImportError:  # pragma: no cover - torch is always there in this project
        pass
    return json.dumps(value, indent=2).encode("utf-8")


def _purge_modules(code_dir: Path) -> None:
    """Forget modules an earlier generation imported under names this ``code_dir`` provides (``inference``,
    ``training``...), so the toolkit's ``importlib.import_module`` loads this model's code, not a cached copy."""
    provided = {entry.stem if entry.suffix == ".py" else entry.name for entry in code_dir.iterdir()
                if entry.suffix == ".py" or (entry / "__init__.py").is_file()} if code_dir.is_dir() else set()
    for name in list(sys.modules):
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if name.split(".", 1)[0] in provided and file and not Path(file).resolve().is_relative_to(code_dir):
            del sys.modules[name]


class _Deferred(BaseException):  # noqa: N818 -- not an error: a way out of the toolkit's transform
    """Raised by the stand-in ``predict_fn`` of a batch's first pass to leave the toolkit's ``Transformer.transform``
    with what ``input_fn`` returned. A ``BaseException``, so the toolkit's ``except Exception`` (which turns errors
    into answers) lets it through."""

    def __init__(self, data: Any) -> None:
        super().__init__()
        self.data = data


def _capture(data: Any, _model: Any) -> Any:
    raise _Deferred(data)


def _constant(value: Any) -> Callable[[Any, Any], Any]:
    """A two-argument handler function (``input_fn(body, content_type)``, ``predict_fn(data, model)``) that
    returns ``value``."""

    def constant(_first: Any, _second: Any) -> Any:
        return value

    return constant


@dataclass
class Loaded:
    """One model generation: the toolkit's handler service, initialised on ``model_dir``. Requests take a reference
    once and keep it to the end, so a swap never changes the model under a running request.

    ``batch_fn``: the handler module's ``predict_batch_fn(inputs, model) -> [prediction, ...]`` when it has one
    next to its own ``predict_fn`` (and no ``transform_fn``): then :meth:`invoke_batch` runs several requests with
    one batched predict. ``loaded_on``: the thread that ran ``model_fn`` (the inference thread that serves it).
    """

    generation: int
    model_dir: str
    program: str
    service: Any
    loaded_at: float = field(default_factory=time.time)
    batch_fn: Callable[..., Any] | None = None
    loaded_on: str = ""

    @property
    def code_dir(self) -> str:
        return str(Path(self.model_dir) / "code")

    @property
    def transformer(self) -> Any:
        """The ``sagemaker_inference`` ``Transformer`` inside the handler service."""
        return self.service._service  # noqa: SLF001 -- DefaultHandlerService keeps it there

    def _context(self, processors: list[Any] | None = None) -> Any:
        from ts.context import Context

        gpu = 0 if _cuda_available() else None
        context = Context("model", self.model_dir, {"model": {"modelName": "model"}}, 1, gpu, _ts_version())
        context.request_processor = processors
        return context

    def invoke(self, body: bytes, headers: dict[str, str]) -> Response:
        """One request through ``HandlerService.handle``, as TorchServe's worker makes it."""
        from ts.context import RequestProcessor

        processor = RequestProcessor(dict(headers))
        outcome = self._transform(self.service.handle, body, processor, self._context([processor]))
        assert isinstance(outcome, Response)  # noqa: S101 -- handle() never raises _Deferred
        return outcome

    def _transform(self, run: Callable[[list[dict[str, bytes]], Any], Any], body: bytes, processor: Any,
                   context: Any) -> Response | _Deferred:
        """``run([{"body": body}], context)`` (``HandlerService.handle`` or a ``Transformer.transform``) and the
        answer TorchServe's worker makes of its result."""
        try:
            results = run([{"body": body}], context)
        except _Deferred as deferred:
            return deferred
        except MemoryError:  # TorchServe answers these itself
            return Response(507, b"Out of resources", None)
        except Exception:  # noqa: BLE001 -- TorchServe: "Invoking custom service failed." -> 503
            logger.warning("invoking the handler service failed:\n%s", traceback.format_exc().rstrip())
            return Response(503, b"Prediction failed", None)
        if not isinstance(results, list) or len(results) != 1:
            return Response(503, b"Invalid model predict output", None)
        response_headers = dict(processor.get_response_headers())
        content_type = response_headers.pop("content-type", None)
        status = processor.get_response_status_code() or 200
        return Response(status, _torchserve_body(results[0]), content_type, response_headers)

    def _view(self, **functions: Callable[..., Any]) -> Any:
        """A shallow copy of the toolkit's ``Transformer`` with some handler functions replaced; its
        ``transform`` is the toolkit's own (headers, ``Accept`` default, UTF-8 decoding, error mapping)."""
        view = copy.copy(self.transformer)
        view.__dict__.update(functions)
        view._transform_fn = view._default_transform_fn  # noqa: SLF001 -- bound to the view, so it calls the above
        return view

    def invoke_batch(self, requests: list[tuple[bytes, dict[str, str]]]) -> list[Response]:
        """Several requests, one batched predict, each answered as :meth:`invoke` would answer it alone.

        Three passes through the toolkit's own ``Transformer.transform``, each request with its own context:
        (1) ``input_fn`` (a stand-in ``predict_fn`` leaves with its result; an ``input_fn`` error is that request's
        answer), (2) one ``predict_batch_fn`` on the inputs that parsed, (3) ``output_fn`` on each request's own
        prediction (a stand-in ``input_fn`` and ``predict_fn`` hand back pass 1's and 2's results). If
        ``predict_batch_fn`` fails, pass 3 runs the module's ``predict_fn`` per request instead, so that a request
        which cannot be predicted gets its own error and the others their answers.
        """
        if self.batch_fn is None or len(requests) < 2:
            return [self.invoke(body, headers) for body, headers in requests]
        from ts.context import RequestProcessor

        capture = self._view(_predict_fn=_capture)
        answers: list[Response | None] = [None] * len(requests)
        parsed: list[tuple[int, Any, Any, Any]] = []  # (index, processor, context, input_fn's result)
        for index, (body, headers) in enumerate(requests):
            processor = RequestProcessor(dict(headers))
            context = self._context([processor])
            outcome = self._transform(capture.transform, body, processor, context)
            if isinstance(outcome, _Deferred):
                parsed.append((index, processor, context, outcome.data))
            else:
                answers[index] = outcome
        predictions = self._predict_batch([data for *_, data in parsed]) if len(parsed) > 1 else None
        for position, (index, processor, context, data) in enumerate(parsed):
            functions = {"_input_fn": _constant(data)}
            if predictions is not None:
                functions["_predict_fn"] = _constant(predictions[position])
            answer = self._transform(self._view(**functions).transform, requests[index][0], processor, context)
            assert isinstance(answer, Response)  # noqa: S101 -- no stand-in raises _Deferred in this pass
            answers[index] = answer
        return [answer or Response(503, b"Prediction failed", None) for answer in answers]

    def _predict_batch(self, inputs: list[Any]) -> list[Any] | None:
        """``predict_batch_fn`` on several requests' inputs (called as the toolkit calls handler functions, with
        the context if it takes one); ``None`` if it fails or answers the wrong number of predictions."""
        transformer = self.transformer
        try:
            predictions = list(transformer._run_handler_function(self.batch_fn, inputs, transformer._model))  # noqa: SLF001
            if len(predictions) != len(inputs):
                raise ValueError(f"predict_batch_fn returned {len(predictions)} predictions for {len(inputs)} "
                                 "inputs")
        except Exception:  # noqa: BLE001 -- every request then gets its own predict_fn (and its own error)
            logger.warning("predict_batch_fn failed on %d requests; predicting them one by one:\n%s", len(inputs),
                           traceback.format_exc().rstrip())
            return None
        return predictions

    def info(self) -> dict[str, Any]:
        code_dir = Path(self.code_dir).resolve()
        from_code = sorted(name for name, module in list(sys.modules.items())
                           if (file := getattr(module, "__file__", None))
                           and Path(file).resolve().is_relative_to(code_dir))
        return {"generation": self.generation, "model_dir": self.model_dir, "code_dir": self.code_dir,
                "program": self.program, "handler": "sagemaker_pytorch_serving_container.handler_service",
                "modules_from_code_dir": from_code, "loaded_at": self.loaded_at, "loaded_on": self.loaded_on,
                "batch_predict": self.batch_fn is not None}


def _batch_fn(transformer: Any) -> Callable[..., Any] | None:
    """The user module's ``predict_batch_fn`` if the toolkit serves that module's ``input_fn``/``predict_fn``/
    ``output_fn`` chain (the default ``transform_fn``) with its own ``predict_fn``; else ``None`` (no batching)."""
    from sagemaker_inference.transformer import Transformer

    environment = getattr(transformer, "_environment", None)
    module = sys.modules.get(environment.module_name) if environment is not None else None
    batch_fn = getattr(module, "predict_batch_fn", None)
    default_transform = getattr(transformer._transform_fn, "__func__", None) is Transformer._default_transform_fn  # noqa: SLF001
    own_predict = module is not None and transformer._predict_fn is getattr(module, "predict_fn", None)  # noqa: SLF001
    return batch_fn if callable(batch_fn) and default_transform and own_predict else None


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        return False


def _ts_version() -> str:
    try:
        from importlib.metadata import version

        return version("torchserve")
    except Exception:  # noqa: BLE001
        return "unknown"


def load(model_dir: str | Path, generation: int, environment: dict[str, str] | None = None) -> Loaded:
    """Initialise the PyTorch inference toolkit's handler service on ``model_dir``; raise :class:`HandlerLoadError`.

    ``environment`` (the model's container environment: ``SAGEMAKER_PROGRAM``, ...) is set first, as the container
    has it from the start; ``<model_dir>/code`` goes first on ``sys.path`` (TorchServe's ``PYTHONPATH``).
    """
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise HandlerLoadError(f"model directory {model_dir} does not exist")
    container_env = {**os.environ, **(environment or {})}  # the server starts with the model's in its environment
    if xgboost_model.wanted(container_env):  # the XGBoost container's own server, not the PyTorch toolkit
        try:
            return xgboost_model.XGBoostLoaded(generation, str(model_dir), container_env)  # type: ignore[return-value]
        except Exception as exc:
            raise HandlerLoadError(f"loading the XGBoost model from {model_dir} failed: {exc}") from exc
    if environment:
        os.environ.update({str(k): str(v) for k, v in environment.items()})
    code_dir = model_dir / "code"
    program = os.environ.get("SAGEMAKER_PROGRAM") or "inference.py"
    if not code_dir.is_dir():
        logger.warning("%s has no code/ directory: the toolkit's default PyTorch handler serves it (TorchScript "
                       "only), as in the SageMaker PyTorch inference container", model_dir)
    elif not (code_dir / program).is_file():
        logger.warning("SAGEMAKER_PROGRAM %s is not in %s: the toolkit's default PyTorch handler serves the model",
                       program, code_dir)
    _purge_modules(code_dir)
    for entry in [p for p in sys.path if p.endswith(f"{os.sep}code") and p != str(code_dir)]:
        sys.path.remove(entry)  # an earlier generation's code/
    if str(code_dir) not in sys.path:
        sys.path.insert(0, str(code_dir))
    try:
        from sagemaker_pytorch_serving_container.handler_service import HandlerService
    except ImportError as exc:
        raise HandlerLoadError(f"SageMaker's PyTorch inference toolkit is not installed ({exc}); "
                               "pip install sagemaker-pytorch-inference torchserve") from exc
    started = time.monotonic()
    loaded = Loaded(generation, str(model_dir), program, HandlerService())
    try:
        loaded.service.initialize(loaded._context())  # noqa: SLF001 -- our own dataclass
    except Exception as exc:
        raise HandlerLoadError(f"loading the model from {model_dir} with SAGEMAKER_PROGRAM={program} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
    loaded.batch_fn = _batch_fn(loaded.transformer)
    loaded.loaded_on = threading.current_thread().name
    logger.info("generation %d: model from %s loaded by the inference toolkit (%s) in %.2fs on thread %s%s",
                generation, model_dir, program, time.monotonic() - started, loaded.loaded_on,
                " (batched predict: predict_batch_fn)" if loaded.batch_fn else "")
    return loaded


def _runtime_error(code: str, status: int, message: str, **members: Any) -> tuple[int, bytes, dict[str, str]]:
    """An AWS rest-json error (botocore reads the code from ``x-amzn-ErrorType`` and the members from the body)."""
    body = json.dumps({"__type": code, "message": message, "Message": message, **members}).encode("utf-8")
    return status, body, {"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.sagemaker/"}


def model_error(response: Response, endpoint_name: str, log_stream_arn: str) -> tuple[int, bytes, dict[str, str]]:
    """What the SageMaker runtime makes of a container error: ``ModelError``, HTTP 424."""
    original = response.body.decode("utf-8", "replace")
    kind = "client" if response.status < 500 else "server"
    message = (f'Received {kind} error ({response.status}) from primary with message "{original}". See '
               f"{log_stream_arn} for more information.")
    return _runtime_error("ModelError", 424, message, OriginalStatusCode=response.status, OriginalMessage=original,
                          LogStreamArn=log_stream_arn, ErrorCode=f"{kind.upper()}_ERROR_FROM_MODEL")



def _unknown_endpoint(name: str) -> tuple[int, bytes, dict[str, str]]:
    from pipelines.local.storage.store import LOCAL_ACCOUNT

    return _runtime_error("ValidationError", 400, f"Endpoint {name} of account {LOCAL_ACCOUNT} not found.")


def _json_error(reason: str) -> bytes:
    return json.dumps({"error": reason}).encode("utf-8")


# ------------------------------------------------------------------------------------------------ settings

def _cpus() -> int:
    """CPUs this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


#: Request threads: they read bodies, wait for the inference thread(s) and write answers, so they cost no CPU while
#: they wait; enough of them that the requests of 8+ clients can be in the inference queue together (batching).
DEFAULT_WORKERS = max(16, 2 * _cpus())
#: ServerSettings field -> (environment variable with its default, help). docs/LIMITS.md "Endpoint server" lists them.
_SETTING_HELP: dict[str, tuple[str, str]] = {
    "workers": ("MLOPS_ENDPOINT_WORKERS", "request threads (body, hand-off to the inference queue, response)"),
    "queue_size": ("MLOPS_ENDPOINT_QUEUE_SIZE", "complete requests that may wait for a busy worker; more get 503"),
    "max_connections": ("MLOPS_ENDPOINT_MAX_CONNECTIONS", "open client connections; a connection beyond gets 503"),
    "backlog": ("MLOPS_ENDPOINT_BACKLOG", "listen backlog (the kernel caps it at net.core.somaxconn)"),
    "header_timeout_s": ("MLOPS_ENDPOINT_HEADER_TIMEOUT_S",
                         "seconds to receive a request line and headers (from the connect, or from the first byte "
                         "of a request on a kept-alive connection)"),
    "body_timeout_s": ("MLOPS_ENDPOINT_BODY_TIMEOUT_S", "seconds to receive a request body once its headers are in"),
    "send_timeout_s": ("MLOPS_ENDPOINT_SEND_TIMEOUT_S", "seconds to send a response to a client that stops reading"),
    "keepalive_timeout_s": ("MLOPS_ENDPOINT_KEEPALIVE_TIMEOUT_S", "seconds an idle keep-alive connection stays open"),
    "drain_timeout_s": ("MLOPS_ENDPOINT_DRAIN_TIMEOUT_S", "on SIGTERM, seconds the requests in flight get to finish"),
    "max_header_bytes": ("MLOPS_ENDPOINT_MAX_HEADER_BYTES", "bytes of request line + headers; more get 431"),
    "inference_threads": ("MLOPS_ENDPOINT_INFERENCE_THREADS",
                          "threads that load the model and run the handler (input_fn, predict_fn, output_fn)"),
    "intra_op_threads": ("MLOPS_ENDPOINT_INTRA_OP_THREADS",
                         "torch.set_num_threads in each inference thread; 0: OMP_NUM_THREADS or the CPUs, divided "
                         "by the inference threads"),
    "max_batch": ("MLOPS_ENDPOINT_MAX_BATCH",
                  "requests one batched predict may take from the queue (1: no batching; needs a handler module "
                  "with predict_batch_fn)"),
    "max_batch_wait_ms": ("MLOPS_ENDPOINT_MAX_BATCH_WAIT_MS",
                          "milliseconds a batch smaller than the previous one waits for more requests (0: never "
                          "wait, take only those already queued)"),
}
#: Settings for which 0 is meaningful (auto, no wait); all the others must be > 0.
_ZERO_ALLOWED = frozenset({"intra_op_threads", "max_batch_wait_ms"})


@dataclass(frozen=True)
class ServerSettings:
    """How the server treats connections and runs the model: CLI flags of this module, whose defaults come from the
    env vars above."""

    workers: int = DEFAULT_WORKERS
    queue_size: int = 100  # TorchServe's default job_queue_size
    max_connections: int = 1024
    backlog: int = 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    send_timeout_s: float = 30.0
    keepalive_timeout_s: float = 60.0
    drain_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024
    inference_threads: int = 1
    intra_op_threads: int = 0
    max_batch: int = 8
    max_batch_wait_ms: float = 10.0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not (value >= 0 if item.name in _ZERO_ALLOWED else value > 0):
                raise ValueError(f"{item.name} must be {'>=' if item.name in _ZERO_ALLOWED else '>'} 0, got "
                                 f"{value!r}")

    def torch_threads(self) -> int:
        """The intra-op thread budget of one inference thread (``intra_op_threads``, or its automatic value)."""
        if self.intra_op_threads:
            return self.intra_op_threads
        try:
            total = int(os.environ.get("OMP_NUM_THREADS", "") or _cpus())
        except ValueError:
            total = _cpus()
        return max(1, total // self.inference_threads)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerSettings:
        """Defaults overridden by ``MLOPS_ENDPOINT_*``; raises ``ValueError`` for a value that is not a number."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in fields(cls):
            variable = _SETTING_HELP[item.name][0]
            raw = environ.get(variable, "").strip()
            if raw:
                kind = type(item.default)
                try:
                    values[item.name] = kind(raw)
                except ValueError:
                    raise ValueError(f"{variable}={raw!r} is not {'an integer' if kind is int else 'a number'}") \
                        from None
        return cls(**values)


def _flag(name: str) -> str:
    return "--" + name.removesuffix("_s").replace("_", "-")


def add_setting_arguments(parser: argparse.ArgumentParser, defaults: ServerSettings) -> None:
    for item in fields(ServerSettings):
        variable, text = _SETTING_HELP[item.name]
        parser.add_argument(_flag(item.name), dest=item.name, type=type(item.default),
                            default=getattr(defaults, item.name), help=f"{text} (default %(default)s, env {variable})")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(**{item.name: getattr(args, item.name) for item in fields(ServerSettings)})


# ------------------------------------------------------------------------------------------------ inference


_IDLE_RESET_S = 0.05  # an inference thread idle this long: the next batch waits for nobody


@dataclass(eq=False)
class _Job:
    """One request waiting for, or in, an inference thread; ``done`` is set once ``response`` is there."""

    body: bytes
    headers: dict[str, str]
    done: threading.Event = field(default_factory=threading.Event)
    response: Response | None = None


class _Generation:
    """The inference threads of one loaded model: the first loads it (on itself), all of them then serve it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.loaded: Any = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.retired = False
        self.threads: list[threading.Thread] = []
        self.running = 0


def _set_torch_threads(count: int) -> None:
    """``torch.set_num_threads`` for the calling thread (its OpenMP team), if torch is there."""
    try:
        import torch
    except ImportError:  # pragma: no cover - the XGBoost path needs no torch
        return
    torch.set_num_threads(count)


class InferenceEngine:
    """Where the handler runs: ``inference_threads`` threads (default one), each with ``torch_threads()`` intra-op
    threads, fed by one queue of requests from the request threads.

    Why not the request threads themselves: every thread that runs a torch operator gets its own OpenMP team. With
    the model loaded on one thread and requests run on others, the process holds more OpenMP threads than CPUs, and
    libgomp then stops spin-waiting between parallel regions (about +50% per forward on 2 CPUs). So the model is
    loaded on the thread that runs it, and only those threads ever touch torch.

    Batching (``max_batch`` > 1, for a handler whose module has ``predict_batch_fn``): an inference thread takes the
    first request waiting and, with it, up to ``max_batch`` - 1 more: those already queued and, while the batch is
    smaller than the previous one, those that arrive within ``max_batch_wait_ms`` (:meth:`_take`);
    :meth:`Loaded.invoke_batch` runs them. A lone client therefore never waits for company, while under load the
    requests of the clients just answered share the next predict.

    A reload (:meth:`load`) starts the new generation's threads, which load the new model while the old threads keep
    serving; then, under the queue's lock, the new generation becomes the one that takes requests: the old threads
    finish what they took and exit. A request is therefore never served by an older model than the one before it.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._cond = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._serving: _Generation | None = None
        self._stopped = False
        self.batches: collections.Counter[int] = collections.Counter()  # batch size -> how many
        self._demand = 1  # the size of the last batch: how many requests a batch waits for (max_batch_wait_ms)

    def load(self, model_dir: str, generation: int, environment: dict[str, str] | None) -> Any:
        """Load a new model on new inference threads and make it the one that serves; raise what loading raised
        (the old model keeps serving then)."""
        new = _Generation(generation)
        for index in range(self.settings.inference_threads):
            thread = threading.Thread(target=self._run, args=(new, index, model_dir, environment), daemon=True,
                                      name=f"inference-{generation}-{index}")
            new.threads.append(thread)
            new.running += 1
            thread.start()
        new.ready.wait()
        with self._cond:
            if new.error is None:
                old, self._serving = self._serving, new
                if old is not None:
                    old.retired = True
            else:
                new.retired = True
            self._cond.notify_all()
        if new.error is not None:
            raise new.error
        return new.loaded

    def submit(self, body: bytes, headers: dict[str, str]) -> Response | None:
        """Queue one request and wait for its answer; ``None`` when no model is loaded (or the engine stopped)."""
        job = _Job(body, headers)
        with self._cond:
            if self._serving is None or self._stopped:
                return None
            self._jobs.append(job)
            self._cond.notify_all()
        job.done.wait()
        return job.response

    def stop(self) -> None:
        """The inference threads exit after the batch they hold."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def info(self) -> dict[str, Any]:
        with self._cond:
            serving = self._serving
            return {"inference_threads": [t.name for t in serving.threads if t.is_alive()] if serving else [],
                    "intra_op_threads": self.settings.torch_threads(), "max_batch": self.settings.max_batch,
                    "max_batch_wait_ms": self.settings.max_batch_wait_ms, "queued": len(self._jobs),
                    "batches": {str(size): count for size, count in sorted(self.batches.items())}}

    # ---------------------------------------------------------------------------------------- inference threads

    def _run(self, generation: _Generation, index: int, model_dir: str, environment: dict[str, str] | None) -> None:
        _set_torch_threads(self.settings.torch_threads())  # before anything creates this thread's OpenMP team
        if index == 0:
            try:
                generation.loaded = load(model_dir, generation.number, environment)
            except BaseException as exc:  # noqa: BLE001 -- handed to the thread that asked for the load
                generation.error = exc
            finally:
                generation.ready.set()
        else:
            generation.ready.wait()
        try:
            if generation.error is None:
                while (batch := self._take(generation)) is not None:
                    self._serve(generation.loaded, batch)
        finally:
            self._retire(generation)

    def _take(self, generation: _Generation) -> list[_Job] | None:
        """The next batch for one of ``generation``'s threads (waiting for work); ``None`` once it is retired.

        A batch takes every request already queued (up to ``max_batch``); it waits for more (at most
        ``max_batch_wait_ms``) only while it is smaller than the previous batch, i.e. when clients that were just
        answered are likely to come back at once. So a lone client never waits, and under load the batches keep
        the size the load gives them instead of alternating between one request and the rest."""
        batchable = getattr(generation.loaded, "batch_fn", None) is not None
        limit = self.settings.max_batch if batchable else 1
        wait_s = self.settings.max_batch_wait_ms / 1000.0
        with self._cond:
            idle_since = time.monotonic()
            while not (self._stopped or generation.retired) and not (generation is self._serving and self._jobs):
                self._cond.wait()
            if self._stopped or generation.retired:
                return None
            if time.monotonic() - idle_since > max(_IDLE_RESET_S, 5 * wait_s):
                self._demand = 1  # the load that made the last batch is gone
            batch = [self._jobs.popleft()]
            deadline = time.monotonic() + wait_s
            while len(batch) < limit:
                if self._jobs:
                    batch.append(self._jobs.popleft())
                    continue
                remaining = deadline - time.monotonic()
                if len(batch) >= self._demand or remaining <= 0 or self._stopped or generation.retired:
                    break
                self._cond.wait(remaining)
            self._demand = len(batch)
            self.batches[len(batch)] += 1
        return batch

    @staticmethod
    def _serve(loaded: Any, batch: list[_Job]) -> None:
        try:
            if len(batch) == 1:
                responses = [loaded.invoke(batch[0].body, batch[0].headers)]
            else:
                responses = loaded.invoke_batch([(job.body, job.headers) for job in batch])
        except BaseException:  # noqa: BLE001 -- a handler's sys.exit() included: the inference thread lives on
            logger.error("serving a batch of %d failed:\n%s", len(batch), traceback.format_exc().rstrip())
            responses = [Response(503, b"Prediction failed", None)] * len(batch)
        for job, response in zip(batch, responses, strict=True):
            job.response = response
            job.done.set()

    def _retire(self, generation: _Generation) -> None:
        """The last thread of a replaced generation closes its model if it can be closed (XGBoost's child)."""
        with self._cond:
            generation.running -= 1
            last = generation.running == 0 and generation.retired and not self._stopped
        close = getattr(generation.loaded, "close", None)
        if last and callable(close):
            with contextlib.suppress(Exception):
                close()


# ---------------------------------------------------------------------------------------------- connections

_TICK_S = 0.1  # how often deadlines are checked
_LINGER_S = 2.0  # after a final answer: how long to read and discard what the client still sends before closing
_RECV_BYTES = 64 * 1024
_ACCEPT_BATCH = 64
_LISTENER, _WAKE = "listener", "wake"
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CONNECTION = re.compile(rb"^connection[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)
_HAS_BODY = re.compile(rb"^(?:content-length[ \t]*:[ \t]*0*[1-9]|transfer-encoding[ \t]*:)", re.IGNORECASE | re.M)


def _raw_response(status: int, body: bytes, content_type: str | None = JSON, *, keep_alive: bool = False,
                  headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response, for what the reactor answers itself."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
             f"Server: {RequestHandler.server_version} {RequestHandler.sys_version}",
             f"Date: {email.utils.formatdate(usegmt=True)}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _request_line(head: bytes | bytearray) -> tuple[str, str, str]:
    """``(method, target, version)`` of a request head, ``""`` for what is missing."""
    words = bytes(head.split(b"\n", 1)[0]).decode("latin-1").split()
    method, target, version = (words + ["", "", ""])[:3]
    return method, target, version


def _keep_alive(head: bytes) -> bool:
    """Whether an HTTP/1.1 client lets the connection stay open (as ``http.server`` decides for ours)."""
    match = _CONNECTION.search(head)
    return _request_line(head)[2] == "HTTP/1.1" and not (match and b"close" in match.group(1).lower())


class _DeadlineReader(io.RawIOBase):
    """What a worker reads a request from: the bytes the reactor already read, then the socket, each ``recv``
    bounded by what is left until ``deadline``. In ``probe`` mode it never touches the socket."""

    def __init__(self, sock: socket.socket, prefix: bytes, deadline: float, restore_timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self._prefix = memoryview(prefix)
        self._deadline = deadline
        self._restore = restore_timeout
        self.probe = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        if self.probe:
            return None  # "would block": BufferedReader then returns only what it holds
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request body deadline passed")
        self._sock.settimeout(remaining)
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._restore)

    def leftover(self, rfile: io.BufferedReader) -> bytearray:
        """What was received beyond the request just handled (a pipelined next request), without waiting."""
        self.probe = True
        rest = bytearray()
        while chunk := rfile.read1(_RECV_BYTES):
            rest += chunk
        return rest


class _SocketWriter(io.RawIOBase):
    """``wfile``: every write is a ``sendall`` (bounded by the socket's send timeout)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        return len(data)


class _Connection:
    """One client connection. The reactor holds it while it waits on its client; a worker while it runs one
    request. ``buffer``: bytes read and not handled yet; ``idle``: no byte of the next request yet."""

    __slots__ = ("sock", "fd", "address", "buffer", "deadline", "idle", "lingering", "counted", "watched")

    def __init__(self, sock: socket.socket, address: tuple[str, int], deadline: float, counted: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.buffer = bytearray()
        self.deadline = deadline
        self.idle = True
        self.lingering = False
        self.counted = counted
        self.watched = False


class EndpointHTTPServer:
    """The container's HTTP side, with bounded threads. One reactor thread holds, with non-blocking sockets and
    deadlines, every connection that waits on its client (connecting, sending its head, idle between keep-alive
    requests, closing) and answers ``GET /ping`` itself; up to ``workers`` threads (started when a request would
    otherwise wait) run complete requests (body read under a deadline, the toolkit's handler, the response). When
    all workers are busy and ``queue_size`` requests wait, the reactor answers 503 at once. Connections cost a
    socket, not a thread: the process has at most ``workers`` + 2 threads of its own, whatever clients do.
    """

    def __init__(self, address: tuple[str, int], *, max_body_bytes: int, token: str, name: str = "",
                 variant: str = DEFAULT_VARIANT, settings: ServerSettings | None = None) -> None:
        self.settings = settings or ServerSettings()
        self.listener = socket.create_server(address, backlog=self.settings.backlog)  # SO_REUSEADDR, like HTTPServer
        self.listener.setblocking(False)
        self.server_address: tuple[str, int] = self.listener.getsockname()[:2]
        self.current: Loaded | None = None
        self.max_body_bytes = max_body_bytes
        self.token = token
        self.name = name
        self.variant = variant
        self.reload_lock = threading.Lock()
        self.generation = 0
        self.draining = False
        self._stopping = False
        self._stop_at = float("inf")
        self._listening = True
        self._accept_paused_until = 0.0
        self._open = 0  # counted connections (reactor thread only)
        self._watched = 0
        self._tasks: queue.SimpleQueue[_Connection | None] = queue.SimpleQueue()
        self._lock = threading.Condition()
        self._active: set[_Connection] = set()  # queued for or held by a worker
        self._handback: collections.deque[tuple[_Connection, bool]] = collections.deque()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._reactor_thread = threading.Thread(target=self._reactor, name="reactor", daemon=True)
        self._workers: list[threading.Thread] = []  # started on demand, up to settings.workers
        self.engine = InferenceEngine(self.settings)  # no thread (and no torch) until a model is loaded

    def swap(self, model_dir: str, environment: dict[str, str] | None = None) -> Loaded:
        """Load a new generation on its own inference threads next to the serving one, then switch the queue to it
        (one reload at a time); requests the old threads hold finish on the old model."""
        with self.reload_lock:
            new = self.engine.load(model_dir, self.generation + 1, environment)
            self.generation = new.generation
            self.current = new
        logger.info("now serving generation %d (%s)", new.generation, new.model_dir)
        return new

    def log_stream_arn(self) -> str:
        from pipelines import arns
        from pipelines.local.storage.store import LOCAL_ACCOUNT, LOCAL_REGION

        return arns.arn("logs", LOCAL_REGION, LOCAL_ACCOUNT,
                        f"log-group:/aws/sagemaker/Endpoints/{self.name}:log-stream:{self.variant}/local")

    # ---------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._selector.register(self.listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._reactor_thread.start()

    def drain(self) -> int:
        """Graceful stop: no new connections, the ones waiting on their client closed at once, the requests in
        flight finish within ``drain_timeout_s`` (answered with ``Connection: close``), then everything stops.
        Returns how many requests had to be cut off at the deadline."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        self.draining = True
        self._wake()
        with self._lock:
            if self._active:
                logger.info("draining: %d request(s) in flight, up to %.1fs", len(self._active),
                            self.settings.drain_timeout_s)
            self._lock.wait_for(lambda: not self._active, timeout=max(0.0, deadline - time.monotonic()))
            cut = list(self._active)
        for conn in cut:
            logger.warning("drain deadline passed: cutting off the request from %s", conn.address[0])
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        # Answered clients get up to _LINGER_S to read their answer before the last sockets close.
        self._stop_at = time.monotonic() + (0.0 if cut else _LINGER_S)
        self._stopping = True
        self._wake()
        if self._reactor_thread.is_alive():
            self._reactor_thread.join(timeout=max(0.1, self._stop_at - time.monotonic() + 1.0))
        self.engine.stop()
        for _ in self._workers:  # the reactor, which starts workers, has stopped
            self._tasks.put(None)
        if not cut:  # a worker still inside a cut-off request is a daemon thread: the process exits anyway
            for worker in self._workers:
                worker.join(timeout=1.0)
        return len(cut)

    def server_close(self) -> None:
        with self._lock:
            left = [key.data for key in list(self._selector.get_map().values()) if isinstance(key.data, _Connection)]
            left += [conn for conn, _ in self._handback] + list(self._active)
        for conn in left:
            with contextlib.suppress(OSError):
                conn.sock.close()
        with contextlib.suppress(OSError):
            self.listener.close()
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full pipe: the reactor is woken anyway
            os.write(self._wake_w, b"x")

    # ------------------------------------------------------------------------------------------------ reactor

    def _reactor(self) -> None:
        next_sweep = 0.0
        while not self._stopping or (self._watched and time.monotonic() < self._stop_at):
            try:
                next_sweep = self._tick(next_sweep)
            except Exception:  # noqa: BLE001 -- the reactor must survive anything one step does
                logger.error("reactor step failed: %s", traceback.format_exc().rstrip())
        for key in list(self._selector.get_map().values()):
            if isinstance(key.data, _Connection):
                self._close(key.data)

    def _tick(self, next_sweep: float) -> float:
        """One round: events, connections handed back by workers, drain start, deadlines (every _TICK_S)."""
        for key, _ in self._selector.select(timeout=_TICK_S):
            if key.data is _LISTENER:
                self._accept()
            elif key.data is _WAKE:
                with contextlib.suppress(OSError):
                    while os.read(self._wake_r, 4096):
                        pass
            else:
                self._guarded(key.data, self._on_readable)
        while self._handback:
            conn, keep = self._handback.popleft()
            self._guarded(conn, self._resume, keep)
        if self.draining and self._listening:
            self._stop_listening()
        now = time.monotonic()
        if now >= next_sweep:
            self._sweep(now)
            next_sweep = now + _TICK_S
        return next_sweep

    def _guarded(self, conn: _Connection, step: Callable[..., None], *args: Any) -> None:
        """One reactor step for one connection: whatever goes wrong closes that connection, never the reactor."""
        try:
            step(conn, *args)
        except Exception:  # noqa: BLE001
            logger.error("connection from %s: %s", conn.address[0], traceback.format_exc().rstrip())
            self._close(conn)

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: the rest waits in the backlog a moment
                logger.warning("accept failed (%s); pausing accepts for %.1fs", exc, _TICK_S)
                self._selector.unregister(self.listener)
                self._accept_paused_until = time.monotonic() + _TICK_S
                return
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            counted = self._open < self.settings.max_connections
            self._open += counted
            conn = _Connection(sock, address, time.monotonic() + self.settings.header_timeout_s, counted)
            self._watch(conn)
            if not counted:
                logger.warning("%s: %d connections open (--max-connections); answering 503", address[0], self._open)
                self._answer(conn, 503, _json_error(f"too many connections ({self.settings.max_connections} open)"))

    def _on_readable(self, conn: _Connection) -> None:
        try:
            chunk = conn.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(conn)
        elif not conn.lingering:  # a lingering connection's bytes are discarded
            conn.buffer += chunk
            self._advance(conn)

    def _advance(self, conn: _Connection) -> None:
        """Act on every complete request head in ``conn.buffer`` (pings are answered here; anything else goes
        to a worker), until the head is incomplete or the connection left the reactor."""
        while conn.watched and not conn.lingering:
            if conn.idle:
                del conn.buffer[:len(conn.buffer) - len(conn.buffer.lstrip(b"\r\n"))]  # RFC 9112 2.2
                if not conn.buffer:
                    return
                conn.idle = False
                conn.deadline = min(conn.deadline, time.monotonic() + self.settings.header_timeout_s)
            end = _HEAD_END.search(conn.buffer)
            if end is None or end.end() > self.settings.max_header_bytes:
                if end is not None or len(conn.buffer) > self.settings.max_header_bytes:
                    self._answer(conn, 431, _json_error(f"request line and headers exceed "
                                                        f"{self.settings.max_header_bytes} bytes"))
                return
            self._route(conn, end.end())

    def _route(self, conn: _Connection, head_len: int) -> None:
        head = bytes(conn.buffer[:head_len])
        method, target, _ = _request_line(head)
        path = target.split("?", 1)[0]
        if method == "GET" and path == "/ping" and not _HAS_BODY.search(head):
            self._ping(conn, head, head_len)
            return
        with self._lock:
            admitted = len(self._active) < self.settings.workers + self.settings.queue_size
            if admitted:
                self._active.add(conn)
            more_workers = len(self._active) > len(self._workers) and len(self._workers) < self.settings.workers
        if more_workers:  # like a ThreadPoolExecutor: a thread only when a request would otherwise wait
            worker = threading.Thread(target=self._work, name=f"worker-{len(self._workers)}", daemon=True)
            self._workers.append(worker)
            worker.start()
        if not admitted:
            logger.warning('%s "%s %s": all %d workers busy and %d requests queued; answering 503', conn.address[0],
                           method, target, self.settings.workers, self.settings.queue_size)
            self._answer(conn, *self._busy(path))
            return
        self._unwatch(conn)
        self._tasks.put(conn)

    def _busy(self, path: str) -> tuple[int, bytes, str, dict[str, str]]:
        """The 503 for a full worker pool: TorchServe's ``ServiceUnavailableException`` body on the container
        routes; on ``InvokeEndpoint`` what the runtime makes of a container's 503, a ``ModelError``."""
        message = (f'Model "model" has no worker to serve inference request: all {self.settings.workers} workers '
                   f"are busy and {self.settings.queue_size} requests wait (--workers, --queue-size)")
        body = json.dumps({"code": 503, "type": "ServiceUnavailableException", "message": message}, indent=2)
        runtime = _RUNTIME_PATH.match(path)
        if runtime is None:
            return 503, body.encode("utf-8"), JSON, {}
        if runtime.group(1) != self.name:
            status, error, headers = _unknown_endpoint(runtime.group(1))
        else:
            status, error, headers = model_error(Response(503, body.encode("utf-8"), JSON), self.name,
                                                 self.log_stream_arn())
        return status, error, JSON, headers

    def _ping(self, conn: _Connection, head: bytes, head_len: int) -> None:
        """``GET /ping`` without a worker, as TorchServe's frontend answers it: never queued behind inferences."""
        loaded = self.current is not None
        status, body, content_type = (200, b"\n", "text/plain") if loaded else \
            (503, _json_error("model not loaded yet"), JSON)
        logger.info('%s "%s" %d -', conn.address[0], bytes(head.split(b"\n", 1)[0]).decode("latin-1").rstrip(),
                    status)
        del conn.buffer[:head_len]
        if not _keep_alive(head) or self.draining:
            self._answer(conn, status, body, content_type)
        elif self._send_now(conn, _raw_response(status, body, content_type, keep_alive=True)):
            self._idle(conn)
        else:
            self._close(conn)

    def _sweep(self, now: float) -> None:
        for key in list(self._selector.get_map().values()):
            conn = key.data
            if isinstance(conn, _Connection) and conn.deadline <= now:
                if not (conn.idle or conn.lingering):
                    logger.info("%s: no complete request head within %.1fs (--header-timeout); closing",
                                conn.address[0], self.settings.header_timeout_s)
                    self._send_now(conn, _raw_response(408, _json_error(
                        f"request line and headers not received within {self.settings.header_timeout_s}s")))
                self._close(conn)
        if self._accept_paused_until and now >= self._accept_paused_until and self._listening:
            self._accept_paused_until = 0.0
            self._selector.register(self.listener, selectors.EVENT_READ, _LISTENER)

    def _stop_listening(self) -> None:
        """Drain starts: no more connections; the ones waiting on their client (idle, stuck) are closed now."""
        self._listening = False
        if not self._accept_paused_until:
            self._selector.unregister(self.listener)
        self.listener.close()
        waiting = [key.data for key in list(self._selector.get_map().values())
                   if isinstance(key.data, _Connection) and not key.data.lingering]
        for conn in waiting:
            self._close(conn)
        logger.info("draining: stopped listening, closed %d idle or incomplete connection(s)", len(waiting))

    # ------------------------------------------------------------------------------------- reactor: one conn

    def _watch(self, conn: _Connection) -> None:
        if not conn.watched:
            self._selector.register(conn.fd, selectors.EVENT_READ, conn)
            conn.watched = True
            self._watched += 1

    def _unwatch(self, conn: _Connection) -> None:
        if conn.watched:
            self._selector.unregister(conn.fd)
            conn.watched = False
            self._watched -= 1

    def _close(self, conn: _Connection) -> None:
        self._unwatch(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()
        if conn.counted:
            conn.counted = False
            self._open -= 1

    @staticmethod
    def _send_now(conn: _Connection, data: bytes) -> bool:
        try:
            return conn.sock.send(data) == len(data)
        except OSError:
            return False

    def _answer(self, conn: _Connection, status: int, body: bytes, content_type: str | None = JSON,
                headers: dict[str, str] | None = None) -> None:
        """The reactor's final answer on a connection, then a lingering close (so the client reads it, no reset)."""
        if self._send_now(conn, _raw_response(status, body, content_type, headers=headers)):
            self._linger(conn)
        else:
            self._close(conn)

    def _linger(self, conn: _Connection) -> None:
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        conn.lingering = True
        conn.buffer.clear()
        conn.deadline = time.monotonic() + _LINGER_S
        self._watch(conn)

    def _idle(self, conn: _Connection) -> None:
        conn.idle = True
        conn.deadline = time.monotonic() + self.settings.keepalive_timeout_s
        self._watch(conn)

    def _resume(self, conn: _Connection, keep: bool) -> None:
        """A worker is done with ``conn``: wait for its next request, or close it."""
        try:
            conn.sock.setblocking(False)
        except OSError:  # closed meanwhile
            self._close(conn)
            return
        if keep and not self.draining:
            self._idle(conn)
            self._advance(conn)  # a pipelined request may be in the buffer already
        else:
            self._linger(conn)

    # ------------------------------------------------------------------------------------------------ workers

    def _work(self) -> None:
        while (conn := self._tasks.get()) is not None:
            keep = False
            try:
                keep = self._serve(conn)
            except OSError as exc:  # the client went away (reset, broken pipe) or the drain cut it off
                logger.info("%s: connection lost: %s", conn.address[0], exc)
            except Exception:  # noqa: BLE001 -- one connection fails, never the worker
                logger.warning("request from %s failed:\n%s", conn.address[0], traceback.format_exc().rstrip())
            finally:
                self._handback.append((conn, keep))
                self._wake()
                with self._lock:
                    self._active.discard(conn)
                    self._lock.notify_all()

    def _serve(self, conn: _Connection) -> bool:
        """One request on ``conn`` (its head is in ``conn.buffer``); whether the connection stays open."""
        if self._stopping:
            return False
        conn.sock.settimeout(self.settings.send_timeout_s)
        reader = _DeadlineReader(conn.sock, bytes(conn.buffer), time.monotonic() + self.settings.body_timeout_s,
                                 self.settings.send_timeout_s)
        conn.buffer = bytearray()
        rfile = io.BufferedReader(reader, _RECV_BYTES)
        handler = RequestHandler(conn, self, rfile)
        handler.handle_one_request()
        if handler.close_connection or self.draining:
            return False
        conn.buffer = reader.leftover(rfile)
        return True


class RequestHandler(http.server.BaseHTTPRequestHandler):
    server: EndpointHTTPServer
    server_version = "mlops-local-endpoint/1.1"
    protocol_version = "HTTP/1.1"  # keep-alive, as TorchServe; every response carries a Content-Length

    def __init__(self, conn: _Connection, server: EndpointHTTPServer, rfile: io.BufferedReader) -> None:
        # Not BaseRequestHandler's constructor, which would serve the connection to its end: a worker calls
        # handle_one_request() once for the complete request head the reactor handed it.
        self.request = self.connection = conn.sock
        self.client_address = conn.address
        self.server = server
        self.rfile = rfile
        self.wfile = _SocketWriter(conn.sock)
        self.close_connection = True
        self._body_after_headers = b""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        logger.info("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------------------------------------ responses

    def _send(self, status: int, body: bytes, content_type: str | None = JSON,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        if self.server.draining:
            self.send_header("Connection", "close")
        self._body_after_headers = body if self.command != "HEAD" else b""
        self.end_headers()  # flush_headers sends the head and the body in one write
        if self._body_after_headers:  # HTTP/0.9: no head was sent
            self.wfile.write(self._body_after_headers)
            self._body_after_headers = b""

    def flush_headers(self) -> None:
        """The head and the body of a response in one ``sendall`` (one segment for a small answer, whatever
        Nagle's algorithm would make of two writes; accepted sockets have ``TCP_NODELAY`` anyway)."""
        data = b"".join(getattr(self, "_headers_buffer", [])) + self._body_after_headers
        self._headers_buffer = []
        self._body_after_headers = b""
        if data:
            self.wfile.write(data)

    def _error(self, status: int, reason: str) -> None:
        self._send(status, _json_error(reason))

    def _send_aws(self, error: tuple[int, bytes, dict[str, str]]) -> None:
        """A rest-json error of the SageMaker runtime: JSON body, ``x-amzn-ErrorType`` header."""
        status, body, headers = error
        self._send(status, body, JSON, headers)

    def _refuse(self, runtime: bool, status: int, message: str) -> None:
        """Answer a request whose body is not read (to its end): the connection closes after the answer."""
        self.close_connection = True
        if runtime:
            self._send_aws(_runtime_error("ValidationError", status, message))
        else:
            self._error(status, message)

    # ------------------------------------------------------------------------------------------------- routing

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in self.headers:
            self.close_connection = True  # a GET body is never read: the connection cannot carry another request
        path = self.path.split("?", 1)[0]
        if path == "/ping":
            if self.server.current is None:
                self._error(503, "model not loaded yet")
            else:
                self._send(200, b"\n", "text/plain")
        elif path == "/_mlops/status":
            if self._admin_allowed():
                current = self.server.current
                self._send(200, json.dumps({"pid": os.getpid(), "loaded": current.info() if current else None,
                                            "engine": self.server.engine.info()}).encode())
        else:
            self._error(404, f"no route GET {path}; use GET /ping, POST /invocations or POST "
                             f"/endpoints/{self.server.name or '<name>'}/invocations")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        runtime = _RUNTIME_PATH.match(path)
        body = self._read_body(runtime is not None)
        if body is None:
            return
        if path == "/invocations":
            self._invoke(body)
        elif runtime is not None:
            self._invoke_endpoint(runtime.group(1), body)
        elif path == "/_mlops/reload":
            if self._admin_allowed():
                self._reload(body)
        else:
            self._error(404, f"no route POST {path}; use POST /invocations or POST "
                             f"/endpoints/{self.server.name or '<name>'}/invocations")

    def _content_length(self) -> int | None:
        if "Transfer-Encoding" in self.headers:  # not honoured: never read another request after such a body
            self.close_connection = True
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True
            self._error(411, "Content-Length header required")
            return None
        try:
            length = int(raw)
            if length < 0:
                raise ValueError(raw)
        except ValueError:
            self.close_connection = True
            self._error(400, f"invalid Content-Length {raw!r}")
            return None
        return length

    def _discard(self, length: int) -> None:
        """Read and drop a refused body, so that the client is not reset before it sees the answer."""
        remaining = length if length <= _DRAIN_LIMIT else 0
        with contextlib.suppress(TimeoutError):
            while remaining > 0 and (chunk := self.rfile.read(min(remaining, 1 << 20))):
                remaining -= len(chunk)

    def _read_body(self, runtime: bool) -> bytes | None:
        length = self._content_length()
        if length is None:
            return None
        if length > self.server.max_body_bytes:
            self._discard(length)
            self._refuse(runtime, 413, f"request body of {length} bytes exceeds the endpoint's limit of "
                                       f"{self.server.max_body_bytes} bytes")
            return None
        try:
            body = self.rfile.read(length) if length else b""
        except TimeoutError:
            self._refuse(runtime, 408, f"request body of {length} bytes not received within "
                                       f"{self.server.settings.body_timeout_s}s (--body-timeout)")
            return None
        if len(body) < length:  # the client went away mid-body: nobody to answer
            logger.warning("%s closed the connection after %d of %d body bytes", self.address_string(), len(body),
                           length)
            self.close_connection = True
            return None
        return body

    # --------------------------------------------------------------------------------------------- invocations

    def _container_headers(self) -> dict[str, str]:
        return {key: value for key in FORWARDED_HEADERS if (value := self.headers.get(key)) is not None}

    def _call(self, body: bytes) -> Response | None:
        """The request through the inference queue (the model that serves it is the one of the inference thread
        that takes it); ``None`` when no model is loaded."""
        if self.server.current is None:
            return None
        response = self.server.engine.submit(body, self._container_headers())
        if response is None:
            return None
        if response.status >= 400:
            logger.warning("invocation answered %d: %s", response.status,
                           response.body[:2000].decode("utf-8", "replace").rstrip())
        return response

    def _invoke(self, body: bytes) -> None:
        response = self._call(body)
        if response is None:
            self._error(503, "model not loaded yet")
            return
        self._send(response.status, response.body, response.content_type, response.headers)

    def _invoke_endpoint(self, name: str, body: bytes) -> None:
        """``InvokeEndpoint`` as the SageMaker runtime answers it."""
        if name != self.server.name:
            self._send_aws(_unknown_endpoint(name))
            return
        response = self._call(body)
        if response is None:
            self._send_aws(_runtime_error("ModelNotReadyException", 429, f"Model for endpoint {name} is not ready "
                                          "yet."))
            return
        if response.status >= 400:
            self._send_aws(model_error(response, name, self.server.log_stream_arn()))
            return
        headers = {INVOKED_VARIANT: self.server.variant}
        for key, value in response.headers.items():
            if key.lower() == CUSTOM_ATTRIBUTES.lower():
                headers[CUSTOM_ATTRIBUTES] = value
        self._send(200, response.body, response.content_type or JSON, headers)


    # -------------------------------------------------------------------------------------------------- admin

    def _admin_allowed(self) -> bool:
        try:
            loopback = ipaddress.ip_address(self.client_address[0]).is_loopback
        except ValueError:
            loopback = False
        token = self.headers.get(TOKEN_HEADER, "")
        if not loopback or not hmac.compare_digest(token.encode(), self.server.token.encode()):
            self._error(403, "admin routes need a loopback client and the token from the endpoint's state dir")
            return False
        return True

    def _reload(self, body: bytes) -> None:
        try:
            request = json.loads(body or b"{}")
            model_dir = request["model_dir"]
            environment = request.get("environment") or {}
        except (ValueError, KeyError, TypeError) as exc:
            self._error(400, f"reload needs a JSON body with model_dir: {exc}")
            return
        try:
            new = self.server.swap(model_dir, environment)
        except Exception as exc:  # the old generation keeps serving
            logger.error("reload failed, still serving generation %s: %s",
                         self.server.current.generation if self.server.current else None,
                         "".join(traceback.format_exception(exc)).rstrip())
            self._error(500, f"{type(exc).__name__}: {exc}")
            return
        self._send(200, json.dumps(new.info()).encode())


# ------------------------------------------------------------------------------------------------------ process


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def _new_token(state_dir: Path) -> str:
    token = secrets.token_urlsafe(32)
    path = state_dir / TOKEN_FILE
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    tmp.replace(path)
    return token


def _bind(host: str, port: int, **kwargs: Any) -> EndpointHTTPServer:
    try:
        return EndpointHTTPServer((host, port), **kwargs)
    except OSError as exc:
        if port == 0 or exc.errno != errno.EADDRINUSE:
            raise
        logger.warning("port %d is in use; picking a free one", port)
        return EndpointHTTPServer((host, 0), **kwargs)


def serve(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    state_path = state_dir / STATE_FILE
    environment = dict(json.loads(args.environment)) if args.environment else {}
    settings = settings_from_args(args)
    server = _bind(args.host, args.port, max_body_bytes=args.max_body_bytes, token=_new_token(state_dir),
                   name=args.name, variant=args.variant, settings=settings)
    port = server.server_address[1]
    url = f"http://{args.host}:{port}"
    state: dict[str, Any] = {"pid": os.getpid(), "port": port, "host": args.host, "url": url, "state": "loading",
                             "name": args.name, "started_at": time.time(), "settings": asdict(settings)}
    _write_json_atomic(state_path, state)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: draining (requests in flight get %.1fs)", signum, settings.drain_timeout_s)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server.start()
    logger.info("endpoint %s listening on %s (pid %d): %s", args.name or "-", url, os.getpid(), asdict(settings))
    rc = 0
    try:
        server.swap(args.model_dir, environment)
        state["state"] = "ready"
        _write_json_atomic(state_path, state)
        while not stop.wait(0.1):
            pass
    except Exception as exc:
        logger.error("endpoint failed to start: %s", exc, exc_info=not isinstance(exc, HandlerLoadError))
        state.update(state="failed", error=str(exc))
        _write_json_atomic(state_path, state)
        rc = 1
    finally:
        cut = server.drain()
        server.server_close()
        if rc == 0:
            state_path.unlink(missing_ok=True)
        logger.info("endpoint %s stopped (%d request(s) cut off at the drain deadline)", args.name or "-", cut)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Local SageMaker inference endpoint (the PyTorch inference "
                                                 "toolkit behind /ping, /invocations and InvokeEndpoint)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model-dir", required=True, help="extracted model.tar.gz (the container's /opt/ml/model)")
    parser.add_argument("--state-dir", required=True, help="where server.json and admin.token are written")
    parser.add_argument("--name", default="", help="endpoint name (InvokeEndpoint's EndpointName)")
    parser.add_argument("--variant", default=DEFAULT_VARIANT, help="production variant name reported to clients")
    parser.add_argument("--environment", default="", help="JSON object of env vars to set before loading")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    try:
        add_setting_arguments(parser, ServerSettings.from_env())
        args = parser.parse_args(argv)
        settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
