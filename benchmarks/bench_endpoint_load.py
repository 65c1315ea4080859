"""Local endpoint server under load and hostile clients (issue 11): bursts, idle/slow-loris connections, overload,
shutdown. Loopback only; about a minute.

Starts ``python -m pipelines.local.serving.endpoint_server`` from ``--root`` (default: this checkout; point it at
another checkout, e.g. ``git worktree add /tmp/before HEAD~1``, to measure an older server the same way) on a tiny model
whose handler sleeps ``--work-ms`` per request, and measures, sampling the server's thread count throughout:

- ``burst``: ``--burst`` clients connect at once (a barrier) and POST one request each: connect and answer latency,
  statuses, resets/timeouts, how many waited >= 1 s (a dropped SYN is retransmitted after 1 s).
- ``held``: ``--idle`` silent connections + ``--loris`` slow-loris ones (a head trickled a byte every 0.5 s) held for
  ``--hold-s``; requests are timed meanwhile; how many the server still holds at the end.
- ``overload``: ``--clients`` keep-alive clients send requests for ``--seconds``: throughput, 200/503, latency.
- ``shutdown``: one idle connection + one request in flight (1 s), then SIGTERM: time to exit, exit code, answer.

Writes JSON to ``benchmarks/results/endpoint_load.json`` (``--out``). Server settings: ``--server-env KEY=VALUE``
(``MLOPS_ENDPOINT_*``, see docs/LIMITS.md), e.g. ``--server-env MLOPS_ENDPOINT_WORKERS=4``. The handler here sleeps
instead of computing, and the server runs handlers on one inference thread by default: for figures comparable with
a server that slept on every request thread, add ``--server-env MLOPS_ENDPOINT_INFERENCE_THREADS=<workers>``.
Latency and throughput of a real model (and TorchServe): ``benchmarks/bench_endpoint.py``.

    .venv/bin/python benchmarks/bench_endpoint_load.py [--root DIR] [--burst 200] [--hold-s 12] [--clients 32]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import report_file

ROOT = Path(__file__).resolve().parents[1]

HANDLER = '''
import json, time


def model_fn(model_dir):
    return {}


def input_fn(body, content_type):
    return json.loads(body)


def predict_fn(data, model):
    time.sleep(float(data.get("sleep", 0)))
    return {"echo": data.get("x")}


def output_fn(prediction, accept):
    return json.dumps(prediction)
'''


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)  # noqa: E731
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "max": round(ordered[-1], 4)}


class Server:
    """One endpoint server process on the tiny model."""

    def __init__(self, root: Path, workdir: Path, env: dict[str, str]) -> None:
        model = workdir / "model"
        (model / "code").mkdir(parents=True, exist_ok=True)
        (model / "code" / "handler.py").write_text(HANDLER)
        self.state_dir = workdir / f"state-{time.monotonic_ns()}"
        self.log = open(workdir / "server.log", "ab")  # noqa: SIM115 -- closed in stop()
        full_env = {**os.environ, **env, "SAGEMAKER_PROGRAM": "handler.py", "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(root)}
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.local.serving.endpoint_server", "--port", "0",
                                      "--model-dir", str(model), "--state-dir", str(self.state_dir), "--name", "bench"],
                                     cwd=root, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = self._wait_ready()
        self.process = psutil.Process(self.proc.pid)

    def _wait_ready(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                state = json.loads((self.state_dir / "server.json").read_text())
                if state.get("state") == "ready":
                    return int(state["port"])
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def threads(self) -> int:
        try:
            return self.process.num_threads()
        except psutil.Error:
            return 0

    def stop(self, timeout: float = 30) -> dict[str, Any]:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc: int | str = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = f"SIGKILL after {timeout:.0f}s"
        self.log.close()
        return {"exit_s": round(time.monotonic() - started, 3), "returncode": rc}


@contextmanager
def thread_sampler(server: Server) -> Iterator[dict[str, int]]:
    peak = {"threads_before": server.threads(), "threads_peak": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak["threads_peak"] = max(peak["threads_peak"], server.threads())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
        peak["threads_after"] = server.threads()


def request_bytes(body: dict[str, Any], keep_alive: bool) -> bytes:
    data = json.dumps(body).encode()
    lines = ["POST /invocations HTTP/1.1", "Host: localhost", "Content-Type: application/json",
             "Accept: application/json", f"Content-Length: {len(data)}"] + ([] if keep_alive else ["Connection: close"])
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def one_request(port: int, body: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            connected = time.monotonic() - started
            sock.sendall(request_bytes(body, keep_alive=False))
            response = http.client.HTTPResponse(sock)
            response.begin()
            response.read()
            return {"status": response.status, "connect_s": connected, "total_s": time.monotonic() - started}
    except OSError as exc:
        return {"status": type(exc).__name__, "connect_s": None, "total_s": time.monotonic() - started}


def burst(server: Server, n: int, work_s: float) -> dict[str, Any]:
    barrier = threading.Barrier(n)
    results: list[dict[str, Any]] = []

    def client(i: int) -> None:
        barrier.wait()
        results.append(one_request(server.port, {"x": i, "sleep": work_s}))

    with thread_sampler(server) as threads:
        run_threads([lambda i=i: client(i) for i in range(n)])
    totals = [r["total_s"] for r in results]
    return {"clients": n, "statuses": dict(Counter(str(r["status"]) for r in results)),
            "waited_ge_1s": sum(t >= 1.0 for t in totals),
            "connect_s": percentiles([r["connect_s"] for r in results if r["connect_s"] is not None]),
            "total_s": percentiles(totals), **threads}


def run_threads(targets: list[Callable[[], None]]) -> None:
    workers = [threading.Thread(target=target, daemon=True) for target in targets]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        while True:
            if sock.recv(65536) == b"":
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def held(server: Server, idle: int, loris: int, hold_s: float) -> dict[str, Any]:
    with thread_sampler(server) as threads:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(idle)]
        slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(loris)]
        for sock in slow:
            sock.sendall(b"POST /invocations HTTP/1.1\r\n")
        latencies, statuses = [], Counter()
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline:
            for sock in slow:
                try:
                    sock.sendall(b"X")
                except OSError:
                    pass
            result = one_request(server.port, {"x": 1}, timeout=5)
            statuses[str(result["status"])] += 1
            latencies.append(result["total_s"])
            time.sleep(0.5)
        report = {"idle": idle, "loris": loris, "hold_s": hold_s,
                  "idle_still_open": sum(still_open(s) for s in silent),
                  "loris_still_open": sum(still_open(s) for s in slow),
                  "requests_meanwhile": dict(statuses), "request_s": percentiles(latencies)}
        for sock in silent + slow:
            sock.close()
    return {**report, **threads}


def overload(server: Server, clients: int, seconds: float, work_s: float) -> dict[str, Any]:
    records: list[tuple[int | str, float]] = []
    deadline = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = json.dumps({"x": 1, "sleep": work_s})
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                connection.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                status: int | str = response.status
                if response.getheader("Connection", "").lower() == "close":
                    connection.close()
            except (OSError, http.client.HTTPException) as exc:
                status = type(exc).__name__
                connection.close()
            records.append((status, time.monotonic() - started))
        connection.close()

    with thread_sampler(server) as threads:
        run_threads([client] * clients)
    ok = [t for s, t in records if s == 200]
    busy = [t for s, t in records if s == 503]
    return {"clients": clients, "seconds": seconds, "work_ms": work_s * 1000, "requests": len(records),
            "statuses": dict(Counter(str(s) for s, _ in records)), "ok_per_s": round(len(ok) / seconds, 1),
            "ok_s": percentiles(ok), "rejected_s": percentiles(busy),
            "mean_ok_s": round(statistics.fmean(ok), 4) if ok else None, **threads}


def shutdown(root: Path, workdir: Path, env: dict[str, str]) -> dict[str, Any]:
    server = Server(root, workdir, env)
    idle = socket.create_connection(("127.0.0.1", server.port))
    answer: dict[str, Any] = {}
    in_flight = threading.Thread(target=lambda: answer.update(one_request(server.port, {"x": 1, "sleep": 1.0})))
    in_flight.start()
    time.sleep(0.3)
    stopped = server.stop(timeout=20)
    in_flight.join(timeout=30)
    idle.close()
    return {**stopped, "in_flight_status": answer.get("status"), "in_flight_s": round(answer.get("total_s", 0), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(ROOT),
                        help="checkout whose pipelines/local/serving/endpoint_server.py runs")
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--idle", type=int, default=200)
    parser.add_argument("--loris", type=int, default=100)
    parser.add_argument("--hold-s", type=float, default=12.0, help="> the header timeout (default 10 s)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--work-ms", type=float, default=20.0, help="handler time per request")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "endpoint_load.json"))
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.server_env)
    root = Path(args.root).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(root, Path(tmp), env)
        try:
            report = {"burst": burst(server, args.burst, args.work_ms / 1000),
                      "held": held(server, args.idle, args.loris, args.hold_s),
                      "overload": overload(server, args.clients, args.seconds, args.work_ms / 1000)}
        finally:
            report_stop = server.stop(timeout=20)
        report["stop_after_load"] = report_stop
        report["shutdown"] = shutdown(root, Path(tmp), env)
    result = {"benchmark": "endpoint_load", "root": str(root), "python": platform.python_version(),
              "cpus": os.cpu_count(), "params": vars(args), **report}
    print(json.dumps(result, indent=2))
    report_file.write(args.out, result)


if __name__ == "__main__":
    main()
