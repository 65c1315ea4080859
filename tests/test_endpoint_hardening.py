"""The local endpoint server under hostile or heavy clients (issue 11), all on loopback and bounded in seconds:

- clients that trickle their request line/headers/body, or connect and say nothing, are disconnected on deadlines;
  idle keep-alive connections are closed after their timeout; hundreds of such connections never add threads;
- a full worker pool answers 503 at once (TorchServe's body on ``/invocations``, ``ModelError`` on InvokeEndpoint);
- a burst of 200 connects is answered (200 or 503), never reset or left hanging;
- SIGTERM (``endpoints delete``) drains: the request in flight gets its 200, idle connections are closed, the
  process exits 0 without SIGKILL, and a request longer than the drain deadline cannot hold the shutdown;
- a 100k-deep JSON body is a 400 with its reason, from the project's handler directly and through the server.

Load figures (latency, throughput, threads) are in ``benchmarks/bench_endpoint_load.py``, not here.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import psutil
import pytest
from test_local_endpoints import HANDLER_ENV, tiny_model

from inference import inference as project_handler
from pipelines.local.serving import endpoint_server, endpoints

WORKERS, QUEUE = 2, 2
TIMEOUT_S = 1.0  # header, body and keep-alive timeout of the shared server
SMALL = {"MLOPS_ENDPOINT_WORKERS": str(WORKERS), "MLOPS_ENDPOINT_QUEUE_SIZE": str(QUEUE),
         "MLOPS_ENDPOINT_HEADER_TIMEOUT_S": str(TIMEOUT_S), "MLOPS_ENDPOINT_BODY_TIMEOUT_S": str(TIMEOUT_S),
         "MLOPS_ENDPOINT_KEEPALIVE_TIMEOUT_S": str(TIMEOUT_S)}
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[endpoints.LocalEndpoint]:
    """One small endpoint (2 workers, 2 queued, 1 s timeouts) for the connection tests; started once."""
    tmp = tmp_path_factory.mktemp("hardening")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLOPS_HOME", str(tmp / "mlops"))
        for key, value in SMALL.items():
            patch.setenv(key, value)
        endpoint = endpoints.deploy("hardened", tiny_model(tmp, 1), environment=HANDLER_ENV, startup_timeout=60)
        try:
            yield endpoint
        finally:
            endpoints.delete("hardened")


@pytest.fixture
def mlops_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "mlops"))
    yield tmp_path / "mlops"
    for endpoint in endpoints.list_endpoints():
        endpoints.delete(endpoint.name)


def connect(endpoint: endpoints.LocalEndpoint) -> socket.socket:
    return socket.create_connection(("127.0.0.1", endpoint.port), timeout=5)


def request_bytes(body: bytes, path: str = "/invocations", keep_alive: bool = True) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Accept: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{'' if keep_alive else 'Connection: close' + chr(13) + chr(10)}\r\n").encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def post(url: str, body: bytes, path: str = "/invocations", timeout: float = 30) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{url}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server ends this connection (EOF, possibly after an answer, or a reset) within ``within`` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def threads(endpoint: endpoints.LocalEndpoint) -> int:
    return psutil.Process(endpoint.pid).num_threads()


# ------------------------------------------------------------------------------------------ 1. timeouts, threads


def test_settings_come_from_flags_and_env_and_reach_server_json(server):
    settings = endpoint_server.ServerSettings.from_env({"MLOPS_ENDPOINT_WORKERS": "3",
                                                        "MLOPS_ENDPOINT_DRAIN_TIMEOUT_S": "2.5"})
    assert (settings.workers, settings.drain_timeout_s, settings.queue_size) == (3, 2.5, 100)
    with pytest.raises(ValueError, match="MLOPS_ENDPOINT_WORKERS='many' is not an integer"):
        endpoint_server.ServerSettings.from_env({"MLOPS_ENDPOINT_WORKERS": "many"})
    with pytest.raises(ValueError, match="queue_size must be > 0"):
        endpoint_server.ServerSettings(queue_size=0)
    written = json.loads((server.state_dir / endpoint_server.STATE_FILE).read_text())["settings"]
    assert written["workers"] == WORKERS and written["header_timeout_s"] == TIMEOUT_S and written["backlog"] >= 128


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the listen backlog")
def test_listen_backlog_is_at_least_128(server):
    listing = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True, text=True).stdout
    backlog = int(listing.split()[2])  # Send-Q of a listening socket: its backlog (capped by somaxconn)
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert backlog >= min(128, somaxconn), listing


def test_trickled_headers_and_silent_connections_are_disconnected(server):
    loris = []
    for _ in range(20):
        sock = connect(server)
        sock.sendall(b"POST /invocations HTTP/1.1\r\n")
        loris.append(sock)
    silent = [connect(server) for _ in range(20)]
    started = time.monotonic()
    dropped: set[int] = set()
    while time.monotonic() - started < TIMEOUT_S + 2 and len(dropped) < len(loris):
        for i, sock in enumerate(loris):  # one header byte per socket every 0.2 s: each byte is "activity"
            if i not in dropped:
                try:
                    sock.sendall(b"X")
                except OSError:
                    dropped.add(i)
        time.sleep(0.2)
    assert all(closed_by_server(sock, within=TIMEOUT_S + 2) for sock in loris + silent)
    assert time.monotonic() - started < TIMEOUT_S + 4
    for sock in loris + silent:
        sock.close()


def test_trickled_body_gets_408(server):
    sock = connect(server)
    sock.sendall(request_bytes(b'{"x": 1}' + b" " * 92)[:-100])  # headers say 100 body bytes
    started = time.monotonic()
    status = None
    while status is None and time.monotonic() - started < TIMEOUT_S + 3:
        try:
            sock.sendall(b" ")
        except OSError:
            break
        sock.settimeout(0.2)
        try:
            data = sock.recv(65536, socket.MSG_PEEK)
        except TimeoutError:
            continue
        status = int(data.split()[1]) if data else 0
    assert status == 408 and time.monotonic() - started < TIMEOUT_S + 2
    sock.close()


def test_keep_alive_reuses_the_connection_then_closes_it_when_idle(server):
    sock = connect(server)
    for x in (1, 2):  # two requests on one connection, then a ping (answered without a worker)
        sock.sendall(request_bytes(json.dumps({"x": x}).encode()))
        status, headers, body = read_response(sock)
        assert (status, json.loads(body)) == (200, {"version": 1, "echo": x})
        assert headers.get("connection", "").lower() != "close"
    sock.sendall(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert read_response(sock)[0] == 200
    started = time.monotonic()
    assert closed_by_server(sock, within=TIMEOUT_S + 2)
    assert time.monotonic() - started >= TIMEOUT_S - 0.2  # not before the keep-alive timeout
    sock.close()


def test_hundreds_of_idle_and_slow_connections_add_no_threads(server):
    before = threads(server)
    held = [connect(server) for _ in range(200)]
    for sock in held[:100]:
        sock.sendall(b"POST /invocations HTTP/1.1\r\nContent-Le")  # slow-loris: a head that never ends
    time.sleep(0.3)
    assert post(server.url, b'{"x": 5}', timeout=5) == (200, b'{"version": 1, "echo": 5}')  # still served
    during = threads(server)
    assert during <= before + 1, (before, during)
    assert during <= WORKERS + 4  # workers + reactor + main thread (+ slack), whatever the connection count
    assert all(closed_by_server(sock, within=TIMEOUT_S + 2) for sock in held)
    for sock in held:
        sock.close()


@pytest.fixture
def bare_server() -> Iterator[endpoint_server.EndpointHTTPServer]:
    """An in-process server with no model loaded (no toolkit import): for the limits the reactor enforces alone."""
    settings = endpoint_server.ServerSettings(max_connections=3, max_header_bytes=1024, header_timeout_s=5)
    server = endpoint_server.EndpointHTTPServer(("127.0.0.1", 0), max_body_bytes=1024, token="t", name="bare",
                                                settings=settings)
    server.start()
    yield server
    server.drain()
    server.server_close()


def test_connection_limit_and_oversized_head_are_answered_not_dropped(bare_server):
    port = bare_server.server_address[1]
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    extra = socket.create_connection(("127.0.0.1", port), timeout=5)
    status, headers, body = read_response(extra)
    assert status == 503 and headers["connection"] == "close" and b"too many connections (3 open)" in body
    assert closed_by_server(extra, within=1)
    held[0].sendall(b"GET /ping HTTP/1.1\r\nX-Padding: " + b"p" * 2000 + b"\r\n\r\n")
    status, _, body = read_response(held[0])
    assert status == 431 and b"exceed 1024 bytes" in body
    held[1].sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(held[1])[0] == 503  # answered by the reactor: no model loaded yet
    for sock in [*held, extra]:
        sock.close()


# --------------------------------------------------------------------------------------------- back-pressure


def test_full_pool_answers_503_at_once_in_both_shapes(server, monkeypatch):
    results: list[tuple[int, bytes]] = []
    slow = [threading.Thread(target=lambda: results.append(post(server.url, b'{"x": 0, "sleep": 1.5}')))
            for _ in range(WORKERS + QUEUE)]
    for thread in slow:
        thread.start()
    time.sleep(0.4)  # all running or queued
    started = time.monotonic()
    status, body = post(server.url, b'{"x": 1}', timeout=5)
    assert time.monotonic() - started < 0.5
    assert status == 503 and json.loads(body)["type"] == "ServiceUnavailableException"
    assert "no worker to serve inference request" in json.loads(body)["message"]

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    runtime = boto3.client("sagemaker-runtime", region_name="us-east-1", endpoint_url=server.url)
    with pytest.raises(runtime.exceptions.ModelError) as busy:
        runtime.invoke_endpoint(EndpointName="hardened", Body=b'{"x": 1}', ContentType="application/json")
    error = busy.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 424 and error["OriginalStatusCode"] == 503
    assert error["Error"]["Message"].startswith("Received server error (503) from primary with message")
    with urllib.request.urlopen(f"{server.url}/ping", timeout=1) as ping:  # health checks never wait for workers
        assert ping.status == 200
    for thread in slow:
        thread.join(timeout=10)
    assert [status for status, _ in results] == [200] * (WORKERS + QUEUE)  # the admitted ones all finished


def test_burst_of_200_connects_is_answered_not_reset(server):
    before = threads(server)
    n = 200
    barrier = threading.Barrier(n)
    outcomes: list[tuple[int | str, float]] = []

    def client(i: int) -> None:
        barrier.wait()
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(request_bytes(json.dumps({"x": i}).encode(), keep_alive=False))
                outcome: int | str = read_response(sock)[0]
        except OSError as exc:  # a reset or a timeout: what must not happen
            outcome = type(exc).__name__
        outcomes.append((outcome, time.monotonic() - started))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(timeout=30)
    statuses = [outcome for outcome, _ in outcomes]
    assert len(statuses) == n and set(statuses) <= {200, 503}, sorted(map(str, statuses))
    assert statuses.count(200) >= WORKERS + QUEUE
    latencies = sorted(seconds for _, seconds in outcomes)
    # A connect that overflows the listen backlog is retried by the kernel after 1 s: (almost) none may wait that.
    assert sum(seconds >= 1.0 for seconds in latencies) <= n // 50 and latencies[-1] < 5.0, latencies[-10:]
    assert threads(server) <= before + 1


# ------------------------------------------------------------------------------------------ 2. graceful shutdown


def test_delete_drains_the_request_in_flight_and_closes_idle_connections(mlops_home, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLOPS_ENDPOINT_DRAIN_TIMEOUT_S", "10")
    endpoint = endpoints.deploy("drain", tiny_model(tmp_path, 1), environment=HANDLER_ENV, startup_timeout=60)
    child = endpoints._CHILDREN[endpoint.pid]  # noqa: SLF001 -- to read the server's exit code
    idle = socket.create_connection(("127.0.0.1", endpoint.port), timeout=5)  # connected, says nothing
    kept = socket.create_connection(("127.0.0.1", endpoint.port), timeout=5)  # idle between keep-alive requests
    kept.sendall(request_bytes(b'{"x": 0}'))
    assert read_response(kept)[0] == 200
    answer: list[tuple[int, bytes]] = []
    in_flight = threading.Thread(target=lambda: answer.append(post(endpoint.url, b'{"x": 1, "sleep": 2}')))
    in_flight.start()
    time.sleep(0.5)
    started = time.monotonic()
    with caplog.at_level("INFO", logger=endpoints.logger.name):
        assert endpoints.delete("drain") is True
    elapsed = time.monotonic() - started
    in_flight.join(timeout=10)
    assert answer == [(200, b'{"version": 1, "echo": 1}')]
    assert 1.0 <= elapsed < 5.0, elapsed  # waited for the request, not for the idle connections
    assert child.returncode == 0 and "killing it" not in caplog.text
    assert closed_by_server(idle, within=0.5) and closed_by_server(kept, within=0.5)
    idle.close()
    kept.close()


def test_drain_deadline_bounds_the_shutdown(mlops_home, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLOPS_ENDPOINT_DRAIN_TIMEOUT_S", "1")
    endpoint = endpoints.deploy("stuck", tiny_model(tmp_path, 1), environment=HANDLER_ENV, startup_timeout=60)
    child = endpoints._CHILDREN[endpoint.pid]  # noqa: SLF001
    answer: list[object] = []

    def stuck() -> None:
        try:
            answer.append(post(endpoint.url, b'{"x": 1, "sleep": 60}', timeout=30))
        except OSError as exc:
            answer.append(type(exc).__name__)

    client = threading.Thread(target=stuck)
    client.start()
    time.sleep(0.5)
    started = time.monotonic()
    with caplog.at_level("INFO", logger=endpoints.logger.name):
        endpoints.delete("stuck")
    elapsed = time.monotonic() - started
    client.join(timeout=10)
    assert elapsed < 4.0, elapsed  # the drain deadline (1 s) + exit, not the request's 60 s nor SIGKILL's wait
    assert child.returncode == 0 and "killing it" not in caplog.text
    assert answer and answer[0] != (200, b'{"version": 1, "echo": 1}')  # cut off, and the client knows at once


# ------------------------------------------------------------------------------------------------ 4. deep JSON


@pytest.mark.parametrize("body", [DEEP_JSON, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
                                  b'{"instances": ' + b"[" * 40 + b"]" * 40 + b"}"])
def test_project_input_fn_refuses_deep_json_with_400(body):
    with pytest.raises(project_handler.InvalidRequest, match=r"JSON body nests \d+ levels deep; the limit is 32 "
                                                             r"levels \(INFERENCE_MAX_JSON_DEPTH\)") as info:
        project_handler.input_fn(body, "application/json")
    assert info.value.status_code == 400


def test_project_input_fn_json_limits_are_configurable(monkeypatch):
    # Brackets inside strings do not count; depth within the limit reaches the normal schema checks.
    with pytest.raises(project_handler.InvalidImage, match="invalid base64"):
        project_handler.input_fn(json.dumps({"image": "[" * 1000}).encode(), "application/json")
    with pytest.raises(project_handler.InvalidRequest, match="base64-encoded image string, got list"):
        project_handler.input_fn(b'{"instances": [' + b"[" * 30 + b"]" * 30 + b"]}", "application/json")
    monkeypatch.setenv("INFERENCE_MAX_JSON_BYTES", "1000")
    with pytest.raises(project_handler.PayloadTooLarge, match=r"JSON body is 1002 bytes; the limit is 1000 bytes"):
        project_handler.input_fn(json.dumps("x" * 1000).encode(), "application/json")
    monkeypatch.delenv("INFERENCE_MAX_JSON_BYTES")
    monkeypatch.setenv("INFERENCE_MAX_JSON_DEPTH", "1000000")  # above the parser's recursion limit: still a 400
    with pytest.raises(project_handler.InvalidRequest, match="nests too deeply to parse"):
        project_handler.input_fn(DEEP_JSON, "application/json")


def _project_model_dir(tmp_path: Path) -> Path:
    """The trainer's model dir for a 2-class resnet18: model.pth, model_config.json, the handler in code/."""
    from training.model import build_model, save_model
    from training.serving_code import write_serving_code

    config = {"arch": "resnet18", "num_classes": 2, "classes": ["circle", "square"], "hidden_units": 0,
              "dropout": 0.0, "image_size": 32, "resize_size": 36, "weights_file": "model.pth"}
    model_dir = tmp_path / "project-model"
    save_model(build_model("resnet18", 2), config, model_dir)
    write_serving_code(model_dir)
    return model_dir


def test_deep_json_through_the_server_is_400_not_500(mlops_home, tmp_path, monkeypatch):
    endpoint = endpoints.deploy("deep", _project_model_dir(tmp_path), startup_timeout=120,
                                environment={"SAGEMAKER_PROGRAM": "inference.py", "INFERENCE_MAX_JSON_BYTES": "300000"})
    status, body = post(endpoint.url, DEEP_JSON)
    first = body.decode("utf-8", "replace").split("\n", 1)[0]
    assert (status, first) == (400, "JSON body nests 100000 levels deep; the limit is 32 levels "
                                    "(INFERENCE_MAX_JSON_DEPTH)")
    status, body = post(endpoint.url, json.dumps({"image": "A" * 300_000}).encode())
    assert status == 413 and b"INFERENCE_MAX_JSON_BYTES" in body
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    runtime = boto3.client("sagemaker-runtime", region_name="us-east-1", endpoint_url=endpoint.url)
    with pytest.raises(runtime.exceptions.ModelError) as deep:
        runtime.invoke_endpoint(EndpointName="deep", Body=DEEP_JSON, ContentType="application/json")
    assert deep.value.response["OriginalStatusCode"] == 400
    assert "INFERENCE_MAX_JSON_DEPTH" in deep.value.response["OriginalMessage"]
