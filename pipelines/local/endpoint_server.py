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

- ``POST /_mlops/reload`` ``{"model_dir", "environment"}`` -- loads the new model in this process while requests
  in flight keep using the old one, then swaps the reference atomically. ``/ping`` stays 200 throughout; if loading
  fails, the old model keeps serving and the error comes back as a 500.
- ``GET /_mlops/status`` -- what is loaded (generation, directories, load time).

Run in the background by :mod:`pipelines.local.endpoints`::

    python -m pipelines.local.endpoint_server --port P --model-dir DIR --state-dir $MLOPS_HOME/endpoints/<name> \
        --name <name>

It writes ``<state-dir>/server.json`` (``pid``, ``port``, ``url``, ``state``) once it listens, and removes it on a
clean shutdown (SIGTERM/SIGINT: stop accepting, finish the requests in flight, exit 0).
"""

from __future__ import annotations

import argparse
import errno
import hmac
import http.server
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("pipelines.local.endpoint_server")

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


@dataclass
class Loaded:
    """One model generation: the toolkit's handler service, initialised on ``model_dir``. Requests take a reference
    once and keep it to the end, so a swap never changes the model under a running request."""

    generation: int
    model_dir: str
    program: str
    service: Any
    loaded_at: float = field(default_factory=time.time)

    @property
    def code_dir(self) -> str:
        return str(Path(self.model_dir) / "code")

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
        try:
            results = self.service.handle([{"body": body}], self._context([processor]))
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

    def info(self) -> dict[str, Any]:
        code_dir = Path(self.code_dir).resolve()
        from_code = sorted(name for name, module in list(sys.modules.items())
                           if (file := getattr(module, "__file__", None))
                           and Path(file).resolve().is_relative_to(code_dir))
        return {"generation": self.generation, "model_dir": self.model_dir, "code_dir": self.code_dir,
                "program": self.program, "handler": "sagemaker_pytorch_serving_container.handler_service",
                "modules_from_code_dir": from_code, "loaded_at": self.loaded_at}


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
    logger.info("generation %d: model from %s loaded by the inference toolkit (%s) in %.2fs", generation, model_dir,
                program, time.monotonic() - started)
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


class EndpointHTTPServer(http.server.ThreadingHTTPServer):
    # Non-daemon request threads + block_on_close: server_close() waits for the requests in flight.
    daemon_threads = False
    block_on_close = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], *, max_body_bytes: int, token: str, name: str = "",
                 variant: str = DEFAULT_VARIANT) -> None:
        super().__init__(address, RequestHandler)
        self.current: Loaded | None = None
        self.max_body_bytes = max_body_bytes
        self.token = token
        self.name = name
        self.variant = variant
        self.reload_lock = threading.Lock()
        self.generation = 0

    def swap(self, model_dir: str, environment: dict[str, str] | None = None) -> Loaded:
        """Load a new generation next to the serving one, then swap the reference (one reload at a time)."""
        with self.reload_lock:
            new = load(model_dir, self.generation + 1, environment)
            self.generation = new.generation
            self.current = new  # atomic: requests already running keep their own reference to the old one
        logger.info("now serving generation %d (%s)", new.generation, new.model_dir)
        return new

    def log_stream_arn(self) -> str:
        from pipelines import arns
        from pipelines.local.store import LOCAL_ACCOUNT, LOCAL_REGION

        return arns.arn("logs", LOCAL_REGION, LOCAL_ACCOUNT,
                        f"log-group:/aws/sagemaker/Endpoints/{self.name}:log-stream:{self.variant}/local")


class RequestHandler(http.server.BaseHTTPRequestHandler):
    server: EndpointHTTPServer
    server_version = "mlops-local-endpoint/1.1"
    timeout = 120  # seconds a connection may sit idle or trickle its request

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
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, reason: str) -> None:
        self._send(status, json.dumps({"error": reason}).encode("utf-8"))

    # ------------------------------------------------------------------------------------------------- routing

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0]
        if path == "/ping":
            if self.server.current is None:
                self._error(503, "model not loaded yet")
            else:
                self._send(200, b"\n", "text/plain")
        elif path == "/_mlops/status":
            if self._admin_allowed():
                current = self.server.current
                self._send(200, json.dumps({"pid": os.getpid(), "loaded": current.info() if current else None})
                           .encode())
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

    def _read_body(self, runtime: bool) -> bytes | None:
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
        if length > self.server.max_body_bytes:
            self.close_connection = True
            if length <= _DRAIN_LIMIT:  # read the refused body so the client is not reset before it sees the 413
                remaining = length
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            message = (f"request body of {length} bytes exceeds the endpoint's limit of "
                       f"{self.server.max_body_bytes} bytes")
            if runtime:
                self._send(*_runtime_error("ValidationError", 413, message))
            else:
                self._error(413, message)
            return None
        return self.rfile.read(length) if length else b""

    # --------------------------------------------------------------------------------------------- invocations

    def _container_headers(self) -> dict[str, str]:
        return {key: value for key in FORWARDED_HEADERS if (value := self.headers.get(key)) is not None}

    def _call(self, body: bytes) -> Response | None:
        state = self.server.current  # one reference for the whole request: a swap cannot change it midway
        if state is None:
            return None
        response = state.invoke(body, self._container_headers())
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
        from pipelines.local.store import LOCAL_ACCOUNT

        if name != self.server.name:
            self._send(*_runtime_error("ValidationError", 400, f"Endpoint {name} of account {LOCAL_ACCOUNT} not "
                                       "found."))
            return
        response = self._call(body)
        if response is None:
            self._send(*_runtime_error("ModelNotReadyException", 429, f"Model for endpoint {name} is not ready "
                                       "yet."))
            return
        if response.status >= 400:
            self._send(*model_error(response, name, self.server.log_stream_arn()))
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
    server = _bind(args.host, args.port, max_body_bytes=args.max_body_bytes, token=_new_token(state_dir),
                   name=args.name, variant=args.variant)
    port = server.server_address[1]
    url = f"http://{args.host}:{port}"
    state: dict[str, Any] = {"pid": os.getpid(), "port": port, "host": args.host, "url": url, "state": "loading",
                             "name": args.name, "started_at": time.time()}
    _write_json_atomic(state_path, state)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: shutting down after the requests in flight", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True)
    thread.start()
    logger.info("endpoint %s listening on %s (pid %d)", args.name or "-", url, os.getpid())
    rc = 0
    try:
        server.swap(args.model_dir, environment)
        state["state"] = "ready"
        _write_json_atomic(state_path, state)
        while not stop.wait(0.5):
            pass
    except Exception as exc:
        logger.error("endpoint failed to start: %s", exc, exc_info=not isinstance(exc, HandlerLoadError))
        state.update(state="failed", error=str(exc))
        _write_json_atomic(state_path, state)
        rc = 1
    finally:
        server.shutdown()
        server.server_close()  # joins the request threads still running
        if rc == 0:
            state_path.unlink(missing_ok=True)
        logger.info("endpoint %s stopped", args.name or "-")
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
