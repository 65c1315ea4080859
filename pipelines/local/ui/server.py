"""The UI's HTTP server: stdlib ``ThreadingHTTPServer`` on 127.0.0.1 only.

Guards: the ``Host`` header must name this server on loopback (no DNS rebinding), every POST must carry the
per-server token (form field ``token`` or header ``X-UI-Token``) that the pages embed, bodies are bounded. A bad
request is answered 4xx with its reason (HTML for pages, JSON for ``/api/``); a failing handler is a 500 with the
reason and the server keeps serving.
"""

from __future__ import annotations

import hmac
import http.server
import json
import logging
import mimetypes
import secrets
import signal
import threading
import traceback
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from pipelines.local.api.protocol import send
from pipelines.local.ui import assets, html
from pipelines.local.ui import pages_endpoints as _pages_endpoints  # noqa: F401 -- registers its routes
from pipelines.local.ui import pages_jobs as _pages_jobs  # noqa: F401 -- registers its routes
from pipelines.local.ui import pages_models as _pages_models  # noqa: F401 -- registers its routes
from pipelines.local.ui import pages_runs as _pages_runs  # noqa: F401 -- registers its routes
from pipelines.local.ui.reader import Reader, split_s3
from pipelines.local.ui.web import ROUTES, App, HttpError, Request, Response, bad_request, redirect, route

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
MAX_BODY = 16 * 2**20
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
            "frame-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'self'")
#: Artifacts (the profiler report's HTML...) run sandboxed: their scripts cannot reach the UI's origin.
ARTIFACT_CSP = "sandbox allow-scripts; default-src 'self' 'unsafe-inline' data: blob:; frame-ancestors 'self'"
NOT_FOUND_CODES = {"ResourceNotFound", "ResourceNotFoundException", "NoSuchKey", "NoSuchBucket", "404", "NotFound"}


@route("GET", "/")
def _home(app: App, req: Request) -> Response:
    return redirect("/executions")


@route("GET", "/static/ui.css")
def _css(app: App, req: Request) -> Response:
    return Response(200, assets.CSS.encode(), "text/css; charset=utf-8", {"Cache-Control": "max-age=300"})


@route("GET", "/static/ui.js")
def _js(app: App, req: Request) -> Response:
    return Response(200, assets.JS.encode(), "text/javascript; charset=utf-8", {"Cache-Control": "max-age=300"})


@route("GET", "/favicon.ico")
def _favicon(app: App, req: Request) -> Response:
    return Response(204, b"", "image/x-icon")


@route("GET", "/artifact")
def artifact(app: App, req: Request) -> Response:
    """An S3 object (S3 GetObject), streamed: reports, plots, images."""
    uri = str(req.arg("uri", required=True))
    try:
        bucket, key = split_s3(uri)
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    answer = app.reader.s3.get_object(Bucket=bucket, Key=key)
    kind = answer.get("ContentType") or ""
    if not kind or kind in ("binary/octet-stream", "application/octet-stream"):
        kind = mimetypes.guess_type(key)[0] or "application/octet-stream"
    body = answer["Body"]

    def chunks() -> Any:
        try:
            while chunk := body.read(1 << 16):
                yield chunk
        finally:
            body.close()

    return Response(200, chunks(), kind, {"Content-Security-Policy": ARTIFACT_CSP}, length=answer["ContentLength"])


class UiHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App) -> None:
        super().__init__(address, UiHandler)
        self.app = app

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server_address[1]}"


class UiHandler(http.server.BaseHTTPRequestHandler):
    server_version = "mlops-local-studio/1.0"
    protocol_version = "HTTP/1.1"
    timeout = 120
    server: UiHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _method_not_allowed(self) -> None:
        self._send(_error_response(self.path, HttpError(405, f"method {self.command} is not served here")))

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def _handle(self) -> None:
        try:
            request = self._request()
            response = self._dispatch(request)
        except HttpError as exc:
            response = _error_response(self.path, exc)
        except ClientError as exc:
            response = _error_response(self.path, _from_client_error(exc))
        except (ParamValidationError, ValueError) as exc:
            response = _error_response(self.path, HttpError(400, str(exc)))
        except BotoCoreError as exc:
            response = _error_response(self.path, HttpError(502, f"the local AWS service: {exc}"))
        except Exception as exc:  # one failing page must not take the UI down
            logger.error("%s %s failed:\n%s", self.command, self.path, traceback.format_exc())
            response = _error_response(self.path, HttpError(500, f"internal error: {type(exc).__name__}: {exc}"))
        self._send(response)

    def _request(self) -> Request:
        port = self.server.server_address[1]
        if (self.headers.get("Host") or "") not in (f"{LOOPBACK}:{port}", f"localhost:{port}"):
            raise HttpError(403, f"Host {self.headers.get('Host')!r} is not this server (127.0.0.1:{port})")
        parts = urlsplit(self.path)
        body = b""
        if self.command == "POST":
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise HttpError(411, "a POST needs a Content-Length")
            if int(length) > MAX_BODY:
                self.close_connection = True
                raise HttpError(413, f"request body over {MAX_BODY // 2**20} MiB")
            body = self.rfile.read(int(length))
        request = Request(self.command, parts.path, parse_qs(parts.query, keep_blank_values=True), self.headers, body)
        if self.command == "POST":
            request.parse_form()
            sent = self.headers.get("X-UI-Token") or request.arg("token") or ""
            if not hmac.compare_digest(sent, self.server.app.token):
                raise HttpError(403, "missing or wrong UI token (reload the page)")
        return request

    def _dispatch(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        handler = ROUTES.get((method, request.path))
        if handler is None:
            if any(path == request.path for _, path in ROUTES):
                raise HttpError(405, f"{request.method} {request.path} is not served (try GET or POST)")
            raise HttpError(404, f"no page {request.path}")
        return self.server.app.reader.call(lambda: handler(self.server.app, request))

    def _send(self, response: Response) -> None:
        headers = {"Content-Type": response.content_type, "X-Content-Type-Options": "nosniff",
                   "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
                   "Content-Security-Policy": PAGE_CSP, **response.headers}
        send(self, response.status, headers, response.body, response.length)


def _from_client_error(exc: ClientError) -> HttpError:
    error = exc.response.get("Error", {})
    code, message = str(error.get("Code", "")), str(error.get("Message", ""))
    text = f"{exc.operation_name}: {code}: {message}"
    if code in NOT_FOUND_CODES or "does not exist" in message or "not found" in message.lower():
        return HttpError(404, text)
    if code in ("ValidationException", "InvalidParameterValueException"):
        return HttpError(400, text)
    if code == "ConflictException":
        return HttpError(409, text)
    return HttpError(502, text)


def _error_response(path: str, error: HttpError) -> Response:
    if path.startswith("/api/"):
        return Response(error.status, json.dumps({"error": error.reason}).encode(), "application/json")
    body = html.page(f"{error.status}", "", html.Markup('<p class="error" id="error">') + error.reason +
                     html.Markup('</p><p><a href="/executions">back to the executions</a></p>'), token="")
    return Response(error.status, body)


def make_server(port: int = 0, reader: Reader | None = None) -> UiHTTPServer:
    """A UI server bound to 127.0.0.1:``port`` (0: a free port), not yet serving."""
    return UiHTTPServer((LOOPBACK, port), App(reader or Reader(), secrets.token_urlsafe(24)))


def serve(port: int = 0, open_browser: bool = False, announce: Callable[[str], None] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; ``announce(url)`` once listening. The local AWS service is started first (on
    demand, as every CLI command does), so a problem with it shows at once."""
    from pipelines.run import local_clients

    reader = Reader(local_clients())
    server = make_server(port, reader)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    logger.info("local Studio on %s", server.url)
    if announce is not None:
        announce(server.url)
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0
