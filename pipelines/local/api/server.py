"""The local AWS service's HTTP server, and ``local up`` / ``local down`` / ``local status``.

One port on 127.0.0.1 for every service. A request is routed by the service of its SigV4 credential scope
(``Credential=<key>/<date>/<region>/<service>/aws4_request``): ``s3``, ``sagemaker`` (the SageMaker API, and the
SageMaker runtime's ``/endpoints/{name}/invocations``, which signs as ``sagemaker`` too), ``lambda``, ``sts``,
``events`` (EventBridge).
Unsigned requests and requests signed with another access key than the local one (env ``MLOPS_ACCESS_KEY_ID``,
default ``local``) are refused with 403; signatures themselves are not verified (there is no secret to protect on
loopback, only mistakes to catch: a client still pointed at real credentials).

Run: ``python -m pipelines.local.api.server [--port P]``; it writes ``$MLOPS_HOME/api/server.json`` (pid, port, url)
once listening. :func:`up` starts it in the background (idempotent), :func:`down` stops it, :func:`status` reads it.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from pipelines.local.api.protocol import BodyTooLarge, Request, Response, parse_scope, send

logger = logging.getLogger("pipelines.local.api")

DEFAULT_ACCESS_KEY = "local"
STATE_FILE = "server.json"
SDK_CONFIG_FILE = "sagemaker-config.yaml"
LOOPBACK = "127.0.0.1"
#: SigV4 service name -> module with ``handle(request) -> Response``.
SERVICES = {"s3": "s3", "sagemaker": "sagemaker", "lambda": "lambda_", "sts": "sts", "events": "events"}


def access_key() -> str:
    return os.environ.get("MLOPS_ACCESS_KEY_ID") or DEFAULT_ACCESS_KEY


def _service_module(service: str) -> Any:
    return importlib.import_module(f"pipelines.local.api.{SERVICES[service]}")


class AwsHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True


class AwsRequestHandler(http.server.BaseHTTPRequestHandler):
    server_version = "mlops-local-aws/1.0"
    protocol_version = "HTTP/1.1"  # keep-alive: boto3 reuses connections
    timeout = 300
    _continue_pending = False  # an ``Expect: 100-continue`` request whose body no service has read yet

    class _ContinueOnRead:
        """The body of an ``Expect: 100-continue`` request: ``100 Continue`` goes out on its first read."""

        def __init__(self, handler: AwsRequestHandler) -> None:
            self._handler = handler

        def _continue(self) -> None:
            if self._handler._continue_pending:
                self._handler._continue_pending = False
                self._handler.send_response_only(100)
                self._handler.end_headers()

        def read(self, size: int = -1) -> bytes:
            self._continue()
            return self._handler.rfile.read(size)

        def __getattr__(self, name: str) -> Any:  # readinto, readline, ...: the body is being read too
            self._continue()
            return getattr(self._handler.rfile, name)

    def parse_request(self) -> bool:
        self._continue_pending = False
        return super().parse_request()

    def handle_expect_100(self) -> bool:
        """Defer ``100 Continue`` until a service reads the body, so that a request refused before (403,
        NoSuchBucket, EntityTooLarge) is answered at once and the client never sends its body."""
        self._continue_pending = int(self.headers.get("Content-Length") or 0) > 0
        return True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET  # noqa: N815

    def _request(self) -> Request | None:
        path, raw_path, query = Request.parse_target(self.path)
        scope = parse_scope(self.headers, query)
        if scope is None:
            self._plain(403, "request is not signed with AWS SigV4: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                             f"(the local key is {access_key()!r})")
            return None
        if scope.access_key != access_key():
            self._plain(403, f"access key {scope.access_key!r} is not the local service's ({access_key()!r}): "
                             "set AWS_ACCESS_KEY_ID accordingly")
            return None
        if scope.service not in SERVICES:
            self._plain(400, f"service {scope.service!r} is not served locally (served: {', '.join(SERVICES)})")
            return None
        length = int(self.headers.get("Content-Length") or 0)
        rfile: Any = self._ContinueOnRead(self) if self._continue_pending else self.rfile
        host, port = self.server.server_address[:2]
        return Request(self.command, path, raw_path, query, self.headers, rfile, length, scope,
                       listen_url=f"http://{host}:{port}")

    def _handle(self) -> None:
        request = self._request()
        if request is None:
            self.close_connection = True
            return
        try:
            response = _service_module(request.scope.service).handle(request)
        except BodyTooLarge as exc:
            self.close_connection = True
            response = Response(413, {"Content-Type": "text/plain"}, str(exc).encode())
        except Exception as exc:  # noqa: BLE001 -- a bug in one handler must not take the service down
            logger.error("%s %s failed:\n%s", self.command, self.path, traceback.format_exc())
            response = Response(500, {"Content-Type": "text/plain"}, f"internal error: {exc}".encode())
        if self._continue_pending:  # answered before the body was asked for: the client may still send it
            self.close_connection = True
        else:
            try:
                request.drain()
            except OSError:
                self.close_connection = True
        self._write(response)

    def _write(self, response: Response) -> None:
        send(self, response.status, response.headers, response.body, response.length)

    def _plain(self, status: int, message: str) -> None:
        data = message.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# ------------------------------------------------------------------------------------------------ process control


def state_path() -> Path:
    from pipelines.local.storage.store import mlops_home

    path = mlops_home() / "api"
    path.mkdir(parents=True, exist_ok=True)
    return path / STATE_FILE


def _read_state() -> dict[str, Any]:
    try:
        return json.loads(state_path().read_text())
    except (OSError, ValueError):
        return {}


def _alive(state: dict[str, Any]) -> bool:
    pid = state.get("pid")
    if not pid:
        return False
    try:
        import psutil

        proc = psutil.Process(int(pid))
        return proc.status() != psutil.STATUS_ZOMBIE and "pipelines.local.api.server" in " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 -- gone, recycled or not ours
        return False


def _answers(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
        return True
    return False


def status() -> dict[str, Any] | None:
    """``{"pid", "port", "url"}`` of the running service, or ``None``."""
    state = _read_state()
    return state if _alive(state) and state.get("url") and _answers(state["url"]) else None


def up(port: int = 0, timeout: float = 60.0) -> str:
    """Start the service in the background unless it runs already; return its URL."""
    running = status()
    if running:
        return str(running["url"])
    path = state_path()
    path.unlink(missing_ok=True)
    log = open(path.with_name("server.log"), "ab")  # noqa: SIM115 -- handed to the child
    cmd = [sys.executable, "-m", "pipelines.local.api.server", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True, env=dict(os.environ))
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the local AWS service exited with {proc.returncode}; "
                               f"see {path.with_name('server.log')}")
        state = _read_state()
        if state.get("pid") == proc.pid and _answers(state.get("url", "http://127.0.0.1:0")):
            return str(state["url"])
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the local AWS service did not start within {timeout:.0f}s")


def down(timeout: float = 15.0) -> bool:
    """Stop the running service; ``False`` if none ran."""
    state = _read_state()
    if not _alive(state):
        state_path().unlink(missing_ok=True)
        return False
    pid = int(state["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(state):
        time.sleep(0.05)
    if _alive(state):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    state_path().unlink(missing_ok=True)
    return True


def sdk_config_path() -> Path:
    """The SageMaker Python SDK defaults file of the local service (``SAGEMAKER_USER_CONFIG_OVERRIDE``)."""
    return state_path().with_name(SDK_CONFIG_FILE)


def write_sdk_config() -> Path:
    """The SDK's own defaults file, naming the local default bucket ``sagemaker-<region>-<account>``: the SDK asks
    STS for the account at a hard-coded regional STS URL (``sagemaker.session.generate_default_sagemaker_bucket_name``
    passes ``endpoint_url``, which wins over ``AWS_ENDPOINT_URL``), and with its default bucket configured it does
    not ask. Telemetry off: its requests go to a public URL, with no timeout."""
    from pipelines.local.storage.store import LOCAL_ACCOUNT, LOCAL_REGION

    path = sdk_config_path()
    text = ("SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n"
            f"      Session:\n        DefaultS3Bucket: sagemaker-{LOCAL_REGION}-{LOCAL_ACCOUNT}\n")
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def client_environment(url: str) -> dict[str, str]:
    """The environment that points every AWS client (and every job) at the local service: the endpoint URL, the
    local credentials and region, and the SageMaker SDK's defaults file (see :func:`write_sdk_config`)."""
    from pipelines.local.storage.store import LOCAL_REGION

    return {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": access_key(), "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_DEFAULT_REGION": LOCAL_REGION, "AWS_REGION": LOCAL_REGION,
            "SAGEMAKER_USER_CONFIG_OVERRIDE": str(sdk_config_path())}


def serve(host: str, port: int) -> int:
    server = AwsHTTPServer((host, port), AwsRequestHandler)
    url = f"http://{host}:{server.server_address[1]}"
    write_sdk_config()
    tmp = state_path().with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "port": server.server_address[1], "url": url}))
    tmp.replace(state_path())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    logger.info("local AWS service listening on %s (pid %d)", url, os.getpid())
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The local AWS service (S3, SageMaker, runtime, Lambda, STS)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--allow-non-loopback", action="store_true",
                        help="bind another address than 127.0.0.1 (the service has no real authentication)")
    args = parser.parse_args(argv)
    if args.host != LOOPBACK and not args.allow_non_loopback:
        parser.error(f"refusing to bind {args.host}: the local service has no authentication; "
                     "pass --allow-non-loopback to do it anyway")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return serve(args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
