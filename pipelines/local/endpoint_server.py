"""A local SageMaker inference endpoint: the container's HTTP contract, served from one process.

Routes (SageMaker's serving-container contract):

- ``GET /ping`` -- 200 when a model is loaded, 503 otherwise.
- ``POST /invocations`` -- ``Content-Type``/``Accept`` and the body go to the handler module's ``model_fn``,
  ``input_fn``, ``predict_fn``, ``output_fn`` (or ``transform_fn``), as the SageMaker PyTorch inference toolkit
  calls them. An exception carrying an HTTP ``status_code``/``status`` (4xx/5xx) becomes that status with a JSON
  ``{"error": reason}`` body; any other exception a 500 with the reason. The server keeps serving either way.
  Bodies larger than ``--max-body-bytes`` get 413 before the handler sees them.

Admin routes (loopback clients with the token from ``<state-dir>/admin.token`` only):

- ``POST /_mlops/reload`` ``{"model_dir", "code_dir", "program", "environment"}`` -- loads the new model in this
  process while requests in flight keep using the old one, then swaps the reference atomically. ``/ping`` stays 200
  throughout; if loading fails, the old model keeps serving and the error comes back as a 500.
- ``GET /_mlops/status`` -- what is loaded (generation, directories, load time).

Run in the background by :mod:`pipelines.local.endpoints`::

    python -m pipelines.local.endpoint_server --port P --model-dir DIR --code-dir DIR --program inference.py \
        --state-dir $MLOPS_HOME/endpoints/<name>

It writes ``<state-dir>/server.json`` (``pid``, ``port``, ``url``, ``state``) once it listens, and removes it on a
clean shutdown (SIGTERM/SIGINT: stop accepting, finish the requests in flight, exit 0).
"""

from __future__ import annotations

import argparse
import errno
import hmac
import http.server
import importlib.util
import ipaddress
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger("pipelines.local.endpoint_server")

DEFAULT_MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker real-time inference payload limit
JSON = "application/json"
STATE_FILE = "server.json"
TOKEN_FILE = "admin.token"
TOKEN_HEADER = "X-MLOps-Token"
_DRAIN_LIMIT = 64 * 1024 * 1024  # read and discard at most this much of a refused body, so the client sees the 413


class HandlerLoadError(RuntimeError):
    """The inference handler module or the model could not be loaded."""


@dataclass(frozen=True)
class Loaded:
    """Everything one model generation needs; requests take a reference once and keep it to the end."""

    generation: int
    model: Any
    module: ModuleType
    model_dir: str
    code_dir: str
    program: str
    loaded_at: float = field(default_factory=time.time)

    def info(self) -> dict[str, Any]:
        return {"generation": self.generation, "model_dir": self.model_dir, "code_dir": self.code_dir,
                "program": self.program, "handler": self.module.__name__, "loaded_at": self.loaded_at}


def _bundle_top_names(code_dir: Path) -> set[str]:
    """Top-level module/package names a code bundle provides (``inference``, ``training``...)."""
    names = set()
    for entry in code_dir.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
        elif entry.suffix == ".py":
            names.add(entry.stem)
    return names


def load_handler(code_dir: Path, program: str, generation: int) -> ModuleType:
    """Import ``code_dir/program`` as the handler module, with ``code_dir`` first on ``sys.path`` so the bundle's
    own packages (``training``) are the ones it imports, even when an earlier bundle provided the same names."""
    code_dir = code_dir.resolve()
    path = (code_dir / program).resolve()
    if not path.is_relative_to(code_dir):
        raise HandlerLoadError(f"SAGEMAKER_PROGRAM {program!r} points outside the code directory {code_dir}")
    if not path.is_file():
        files = sorted(p.name for p in code_dir.iterdir()) if code_dir.is_dir() else "(no such directory)"
        raise HandlerLoadError(f"handler {program!r} not found in {code_dir} (SAGEMAKER_PROGRAM / "
                               f"SAGEMAKER_SUBMIT_DIRECTORY); files there: {files}")
    provided = _bundle_top_names(code_dir)
    for name in list(sys.modules):
        module = sys.modules.get(name)
        top = name.split(".", 1)[0]
        file = getattr(module, "__file__", None)
        if top in provided and file and not Path(file).resolve().is_relative_to(code_dir):
            del sys.modules[name]  # an older bundle's copy: the new handler must import this bundle's
    if str(code_dir) in sys.path:
        sys.path.remove(str(code_dir))
    sys.path.insert(0, str(code_dir))
    module_name = path.stem if generation == 1 and path.stem not in sys.modules else f"{path.stem}_g{generation}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise HandlerLoadError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise HandlerLoadError(f"importing handler {path} failed: {type(exc).__name__}: {exc}") from exc
    if not callable(getattr(module, "model_fn", None)):
        raise HandlerLoadError(f"handler {path} defines no model_fn(model_dir)")
    if not callable(getattr(module, "transform_fn", None)):
        missing = [fn for fn in ("input_fn", "predict_fn", "output_fn") if not callable(getattr(module, fn, None))]
        if missing:
            raise HandlerLoadError(f"handler {path} defines neither transform_fn nor {', '.join(missing)}")
    return module


def load(model_dir: str | Path, code_dir: str | Path, program: str, generation: int,
         current: Loaded | None = None, environment: dict[str, str] | None = None) -> Loaded:
    """Load handler (reused when code dir and program are unchanged) and model; raise :class:`HandlerLoadError`."""
    model_dir, code_dir = Path(model_dir).resolve(), Path(code_dir).resolve()
    if not model_dir.is_dir():
        raise HandlerLoadError(f"model directory {model_dir} does not exist")
    if environment:
        os.environ.update({str(k): str(v) for k, v in environment.items()})
    if current is not None and current.code_dir == str(code_dir) and current.program == program:
        module = current.module
    else:
        module = load_handler(code_dir, program, generation)
    started = time.monotonic()
    try:
        model = module.model_fn(str(model_dir))
    except Exception as exc:
        raise HandlerLoadError(f"model_fn({model_dir}) failed: {type(exc).__name__}: {exc}") from exc
    logger.info("generation %d: model from %s loaded with %s in %.2fs", generation, model_dir, module.__name__,
                time.monotonic() - started)
    return Loaded(generation, model, module, str(model_dir), str(code_dir), program)


def _http_status(exc: BaseException) -> int | None:
    for attr in ("status_code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
            return value
    return None


def _encode_output(result: Any, accept: str) -> tuple[bytes, str]:
    content_type = JSON if "*" in accept else accept
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], str):
        result, content_type = result
    if isinstance(result, bytes | bytearray | memoryview):
        return bytes(result), content_type
    if isinstance(result, str):
        return result.encode("utf-8"), content_type
    return json.dumps(result).encode("utf-8"), JSON


class EndpointHTTPServer(http.server.ThreadingHTTPServer):
    # Non-daemon request threads + block_on_close: server_close() waits for the requests in flight.
    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], *, max_body_bytes: int, token: str) -> None:
        super().__init__(address, RequestHandler)
        self.current: Loaded | None = None
        self.max_body_bytes = max_body_bytes
        self.token = token
        self.reload_lock = threading.Lock()
        self.generation = 0

    def swap(self, model_dir: str, code_dir: str, program: str, environment: dict[str, str] | None = None) -> Loaded:
        """Load a new generation next to the serving one, then swap the reference (one reload at a time)."""
        with self.reload_lock:
            new = load(model_dir, code_dir, program, self.generation + 1, self.current, environment)
            self.generation = new.generation
            self.current = new  # atomic: requests already running keep their own reference to the old one
        logger.info("now serving generation %d (%s)", new.generation, new.model_dir)
        return new


class RequestHandler(http.server.BaseHTTPRequestHandler):
    server: EndpointHTTPServer
    server_version = "mlops-local-endpoint/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        logger.info("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------------------------------------ responses

    def _send(self, status: int, body: bytes, content_type: str = JSON) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"))

    def _error(self, status: int, reason: str) -> None:
        self._send_json(status, {"error": reason})

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
                self._send_json(200, {"pid": os.getpid(), "loaded": current.info() if current else None})
        else:
            self._error(404, f"no route GET {path}; use GET /ping or POST /invocations")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        if body is None:
            return
        if path == "/invocations":
            self._invoke(body)
        elif path == "/_mlops/reload":
            if self._admin_allowed():
                self._reload(body)
        else:
            self._error(404, f"no route POST {path}; use POST /invocations")

    def _read_body(self) -> bytes | None:
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
            self._error(413, f"request body of {length} bytes exceeds the endpoint's limit of "
                             f"{self.server.max_body_bytes} bytes")
            return None
        return self.rfile.read(length) if length else b""

    # --------------------------------------------------------------------------------------------- invocations

    def _invoke(self, body: bytes) -> None:
        state = self.server.current  # one reference for the whole request: a swap cannot change it midway
        if state is None:
            self._error(503, "model not loaded yet")
            return
        content_type = self.headers.get("Content-Type") or "application/octet-stream"
        accept = self.headers.get("Accept") or JSON
        if accept.strip() in ("*/*", ""):
            accept = JSON
        handler = state.module
        try:
            if callable(getattr(handler, "transform_fn", None)):
                result = handler.transform_fn(state.model, body, content_type, accept)
            else:
                data = handler.input_fn(body, content_type)
                prediction = handler.predict_fn(data, state.model)
                result = handler.output_fn(prediction, accept)
            payload, response_type = _encode_output(result, accept)
        except Exception as exc:
            status = _http_status(exc)
            if status is not None and status < 500:
                logger.warning("invocation refused (%d): %s", status, exc)
                self._error(status, str(exc) or type(exc).__name__)
            else:
                logger.error("invocation failed: %s", "".join(traceback.format_exception(exc)).rstrip())
                self._error(status or 500, f"{type(exc).__name__}: {exc}")
            return
        self._send(200, payload, response_type)

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
            model_dir, code_dir = request["model_dir"], request["code_dir"]
            program = request.get("program") or "inference.py"
            environment = request.get("environment") or {}
        except (ValueError, KeyError, TypeError) as exc:
            self._error(400, f"reload needs a JSON body with model_dir and code_dir: {exc}")
            return
        try:
            new = self.server.swap(model_dir, code_dir, program, environment)
        except Exception as exc:  # the old generation keeps serving
            logger.error("reload failed, still serving generation %s: %s",
                         self.server.current.generation if self.server.current else None,
                         "".join(traceback.format_exception(exc)).rstrip())
            self._error(500, f"{type(exc).__name__}: {exc}")
            return
        self._send_json(200, new.info())


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
    server = _bind(args.host, args.port, max_body_bytes=args.max_body_bytes, token=_new_token(state_dir))
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
        server.swap(args.model_dir, args.code_dir, args.program, environment)
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
    parser = argparse.ArgumentParser(description="Local SageMaker-style inference endpoint (/ping, /invocations)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model-dir", required=True, help="extracted model.tar.gz (model_fn's model_dir)")
    parser.add_argument("--code-dir", required=True, help="extracted SAGEMAKER_SUBMIT_DIRECTORY")
    parser.add_argument("--program", default="inference.py", help="SAGEMAKER_PROGRAM, relative to --code-dir")
    parser.add_argument("--state-dir", required=True, help="where server.json and admin.token are written")
    parser.add_argument("--name", default="", help="endpoint name (for logs)")
    parser.add_argument("--environment", default="", help="JSON object of env vars to set before loading")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
