"""Local endpoint latency and throughput on a real image model: bare forward vs the in-process handler chain vs HTTP.

Measures, on one model directory as training writes it (``model.pth`` with random weights, ``model_config.json``,
``code/inference.py``) and one 640x480 JPEG drawn with PIL:

- ``bare``: ``network(x)`` on a preprocessed tensor, in this process (the floor);
- ``chain``: the SageMaker toolkit's handler chain in this process (``endpoint_server.load`` + ``Loaded.invoke``:
  ``input_fn`` -> ``predict_fn`` -> ``output_fn`` on the JPEG bytes), no HTTP;
- HTTP servers, each a separate process on loopback, with 1/4/8 keep-alive clients (one ``http.client`` connection
  per client thread, ``POST /invocations`` ``image/jpeg``) for ``--seconds`` each: requests/s, p50, p99:
  ``ours`` (this checkout, micro-batching off: ``MLOPS_ENDPOINT_MAX_BATCH=1``), ``ours-batch`` (the defaults:
  batches of up to 8, waiting up to 10 ms while smaller than the last one), ``ours-batch-nowait`` (batching,
  ``MLOPS_ENDPOINT_MAX_BATCH_WAIT_MS=0``), ``ours-2x1`` (two inference threads of one intra-op thread each, no
  batching), and ``before`` (``--before FILE``: a copy of an older
  ``endpoint_server.py``, run as a script against this checkout, e.g. ``git show HEAD:pipelines/local/serving/
  endpoint_server.py > /tmp/before.py``);
- ``torchserve-*`` (when ``torchserve`` is in the venv and ``java`` on PATH, unless ``--no-torchserve``): the
  PyTorch inference container's own entry point (``tests/support/torchserve_serve.py``) on the same model, in its
  default configuration (one worker per CPU, torch's default threads) and tuned to one thread per worker
  (``OMP_NUM_THREADS=1``). TorchServe's system-metrics collector is switched off (it starts a Python process every
  minute). TorchServe runs one configuration at a time, alternating with ``ours-batch`` in the same rounds.

Every figure is measured ``--rounds`` times, variants alternating within each round (order rotated per round), and
the median over rounds is reported, so that the ratios compare variants under the same background load. Ratios
(``ratios`` in the JSON): sequential p50 / bare forward p50 and chain / bare (per round, then the median);
throughput at 8 clients vs ``before`` and vs the best TorchServe configuration; batching's throughput gain at 8
clients; p99 at 8 clients with batching / p99 at 1 client, and / p99 at 8 clients without batching.

    .venv/bin/python benchmarks/bench_endpoint.py --before /tmp/before.py --out benchmarks/results/endpoint.json
    .venv/bin/python benchmarks/bench_endpoint.py --arch resnet50 --seconds 5   # the bigger model

Defaults (resnet18 at 224 px, 3 s per point, 2 rounds) take about 3 minutes on 2 CPUs without TorchServe, about 2
more with it (its start-up is most of that).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import report_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench_endpoint")
HEADERS = {"Content-Type": "image/jpeg", "Accept": "application/json"}
CLIENTS = (1, 4, 8)
VENV_BIN = Path(sys.executable).parent
#: The environment servers start with: taken before the in-process handler chain is loaded (the toolkit's
#: ``initialize`` prepends the model's ``code/`` to ``PYTHONPATH``, ``load`` sets ``SAGEMAKER_PROGRAM``).
BASE_ENV = dict(os.environ)


# ------------------------------------------------------------------------------------------------ inputs


def make_model(directory: Path, arch: str, image_size: int, num_classes: int) -> Path:
    """A model directory as the trainer writes it (random weights) with the serving code in ``code/``."""
    from training.model import build_model, save_model
    from training.serving_code import write_serving_code

    network = build_model(arch, num_classes, weights=None)
    config = {"arch": arch, "num_classes": num_classes, "classes": [f"class_{i:02d}" for i in range(num_classes)],
              "hidden_units": 0, "dropout": 0.0, "image_size": image_size,
              "resize_size": round(image_size * 256 / 224), "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225], "weights_file": "model.pth"}
    save_model(network, config, directory)
    write_serving_code(directory, ROOT)
    return directory


def make_jpeg(width: int = 640, height: int = 480, seed: int = 0) -> bytes:
    """A photo-sized JPEG with photo-like content (gradients, shapes, sensor noise), quality 90."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 200, y / height * 180, (x + y) / (width + height) * 220], axis=-1)
    image = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(10, 160))
        draw.ellipse((x0, y0, x0 + size, y0 + size), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8), "RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def summary(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50_ms": None, "p99_ms": None, "n": 0}
    ordered = sorted(seconds)
    pick = lambda q: round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)  # noqa: E731
    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99), "n": len(ordered)}


# ------------------------------------------------------------------------------------------------ in process


class InProcess:
    """The bare network and the toolkit's handler chain, both loaded on (and run by) the calling thread."""

    def __init__(self, model_dir: Path, jpeg: bytes) -> None:
        import torch
        from PIL import Image

        from pipelines.local.serving import endpoint_server
        from training.model import eval_transform, load_model

        self.network, config = load_model(model_dir)
        self.network.eval()
        self.x = eval_transform(config)(Image.open(io.BytesIO(jpeg)).convert("RGB"))[None]
        self.torch = torch
        self.loaded = endpoint_server.load(model_dir, 1, {"SAGEMAKER_PROGRAM": "inference.py"})
        self.jpeg = jpeg
        self.bare(3)
        self.chain(3)

    def bare(self, n: int) -> dict[str, Any]:
        times = []
        with self.torch.inference_mode():
            for _ in range(n):
                started = time.perf_counter()
                self.network(self.x)
                times.append(time.perf_counter() - started)
        return summary(times)

    def chain(self, n: int) -> dict[str, Any]:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            response = self.loaded.invoke(self.jpeg, dict(HEADERS))
            times.append(time.perf_counter() - started)
            if response.status != 200:
                raise RuntimeError(f"handler chain answered {response.status}: {response.body[:300]!r}")
        return summary(times)


# --------------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One HTTP server process (ours, an older copy of ours, or TorchServe) on the model."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], workdir: Path, port: int | None = None,
                 state_dir: Path | None = None) -> None:
        self.name, self.port, self.state_dir = name, port, state_dir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, jpeg: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            if self.port is None and self.state_dir is not None:
                try:
                    state = json.loads((self.state_dir / "server.json").read_text())
                    self.port = int(state["port"]) if state.get("state") == "ready" else None
                except (OSError, ValueError, KeyError):
                    pass
            if self.port is not None and self._answers(jpeg):
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready within {timeout:.0f}s: "
                           f"{self.log_path.read_text(errors='replace')[-2000:]}")

    def _answers(self, jpeg: bytes) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.request("POST", "/invocations", jpeg, HEADERS)
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def engine_info(self) -> dict[str, Any] | None:
        """Our server's ``/_mlops/status`` engine part (batch sizes seen), ``None`` for others."""
        if self.state_dir is None or not (self.state_dir / "admin.token").is_file():
            return None
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            conn.request("GET", "/_mlops/status", headers={"X-MLOps-Token": (self.state_dir / "admin.token")
                                                           .read_text().strip()})
            return json.loads(conn.getresponse().read()).get("engine")
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        with _suppress_lookup():
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with _suppress_lookup():
            os.killpg(self.proc.pid, signal.SIGKILL)  # TorchServe's java and workers share the session
        self.log.close()


class _suppress_lookup:  # noqa: N801 -- a tiny context manager
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, *_: Any) -> bool:
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError))


def our_server(name: str, model_dir: Path, workdir: Path, settings: dict[str, str], script: Path | None) -> Server:
    state_dir = workdir / f"state-{name}"
    entry = [str(script)] if script else ["-m", "pipelines.local.serving.endpoint_server"]
    cmd = [sys.executable, *entry, "--port", "0", "--model-dir", str(model_dir), "--state-dir", str(state_dir),
           "--name", name]
    env = {**BASE_ENV, **settings, "SAGEMAKER_PROGRAM": "inference.py",
           "PYTHONPATH": os.pathsep.join([str(ROOT), BASE_ENV.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return Server(name, cmd, env, workdir, state_dir=state_dir)


def torchserve_missing() -> str | None:
    if shutil.which("java") is None:
        return "java not on PATH (apt-get install -y openjdk-17-jre-headless)"
    if not (VENV_BIN / "torchserve").exists():
        return f"torchserve not installed in {VENV_BIN}"
    return None


def torchserve(name: str, model_dir: Path, workdir: Path, settings: dict[str, str]) -> Server:
    base = workdir / name
    shutil.copytree(model_dir, base / "model")
    port = free_port()
    env = {**BASE_ENV, **settings, "SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_BASE_DIR": str(base),
           "SAGEMAKER_BIND_TO_PORT": str(port), "TS_DISABLE_SYSTEM_METRICS": "true",
           "TS_METRICS_ADDRESS": f"http://127.0.0.1:{free_port()}",
           "PATH": f"{VENV_BIN}{os.pathsep}{BASE_ENV.get('PATH', '')}"}
    return Server(name, [sys.executable, str(ROOT / "tests" / "support" / "torchserve_serve.py")], env, base,
                  port=port)


# ------------------------------------------------------------------------------------------------------ load


def load_point(port: int, clients: int, seconds: float, body: bytes) -> dict[str, Any]:
    """``clients`` threads, each with one keep-alive connection, POST for ``seconds`` (after one warm-up each)."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    reconnects = [0]
    lock = threading.Lock()
    start_barrier = threading.Barrier(clients + 1)
    stop_at = [float("inf")]

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine: list[float] = []
        seen: Counter[str] = Counter()

        def one() -> tuple[str, float]:
            started = time.perf_counter()
            try:
                conn.request("POST", "/invocations", body, HEADERS)
                response = conn.getresponse()
                response.read()
                if response.will_close:
                    conn.close()
                    reconnects[0] += 1
                return str(response.status), time.perf_counter() - started
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                return type(exc).__name__, time.perf_counter() - started

        one()  # warm-up (and the connection)
        start_barrier.wait()
        while time.perf_counter() < stop_at[0]:
            status, elapsed = one()
            seen[status] += 1
            if status == "200":
                mine.append(elapsed)
        conn.close()
        with lock:
            latencies.extend(mine)
            statuses.update(seen)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start_barrier.wait()
    started = time.perf_counter()
    stop_at[0] = started + seconds
    for thread in threads:
        thread.join(timeout=seconds + 300)
    elapsed = time.perf_counter() - started
    return {"clients": clients, "req_per_s": round(len(latencies) / elapsed, 2), **summary(latencies),
            "statuses": dict(statuses), "reconnects": reconnects[0]}


# ---------------------------------------------------------------------------------------------------- rounds


def measure_servers(servers: list[Server], clients: tuple[int, ...], seconds: float, body: bytes, rounds: int,
                    raw: dict[str, list[dict[str, Any]]], between: Callable[[int], None] | None = None) -> None:
    """``rounds`` rounds over ``servers`` (order rotated per round), every client count each; appends to ``raw``."""
    for number in range(rounds):
        if between is not None:
            between(number)
        order = servers[number % len(servers):] + servers[:number % len(servers)]
        for server in order:
            for count in clients:
                point = load_point(server.port, count, seconds, body)  # type: ignore[arg-type]
                point["round"] = number
                raw.setdefault(server.name, []).append(point)
                logger.info("round %d %-22s %d client(s): %6.2f req/s  p50 %7.1f ms  p99 %7.1f ms  %s", number,
                            server.name, count, point["req_per_s"], point["p50_ms"] or -1, point["p99_ms"] or -1,
                            point["statuses"])


def medians(raw: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> clients -> the median over rounds of req/s, p50 and p99."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, points in raw.items():
        for count in sorted({p["clients"] for p in points}):
            mine = [p for p in points if p["clients"] == count and p["p50_ms"] is not None]
            if mine:
                out.setdefault(name, {})[str(count)] = {
                    key: round(statistics.median(p[key] for p in mine), 2) for key in ("req_per_s", "p50_ms", "p99_ms")}
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    http_ = results["http"]
    bare = results["in_process"]["bare_p50_ms"]
    get = lambda name, clients, key: http_.get(name, {}).get(str(clients), {}).get(key)  # noqa: E731
    out: dict[str, Any] = {"chain_p50_vs_bare": results["in_process"]["chain_vs_bare"],
                           "sequential_p50_vs_bare": {name: ratio(get(name, 1, "p50_ms"), bare) for name in http_}}
    full = max(CLIENTS)
    ts = {name: get(name, full, "req_per_s") for name in http_ if name.startswith("torchserve")}
    ts_best = max(ts, key=lambda n: ts[n] or 0) if ts else None
    for name in ("ours", "ours-batch", "ours-batch-nowait", "ours-2x1"):
        if name not in http_:
            continue
        out[f"{name}_throughput_{full}_vs_before"] = ratio(get(name, full, "req_per_s"), get("before", full,
                                                                                                "req_per_s"))
        if ts_best:
            paired = results.get("torchserve_pairs", {}).get(ts_best, {})
            out[f"{name}_throughput_{full}_vs_best_torchserve"] = ratio(get(name, full, "req_per_s"), ts[ts_best])
            out["best_torchserve"] = ts_best
            out[f"ours-batch_vs_{ts_best}_same_rounds"] = paired.get("ratio")
    for name in ("ours-batch", "ours-batch-nowait"):
        if name in http_:
            out[f"{name}_throughput_gain_{full}"] = ratio(get(name, full, "req_per_s"), get("ours", full, "req_per_s"))
            out[f"{name}_p99_{full}_vs_p99_1"] = ratio(get(name, full, "p99_ms"), get(name, 1, "p99_ms"))
            out[f"{name}_p99_{full}_vs_ours_p99_{full}"] = ratio(get(name, full, "p99_ms"), get("ours", full, "p99_ms"))
    return out


def in_process_rounds(model_dir: Path, jpeg: bytes, rounds: int, n: int) -> tuple[InProcess, Callable[[int], None],
                                                                                  list[dict[str, Any]]]:
    """The in-process figures, measured at the start of every round (so they alternate with the servers')."""
    local = InProcess(model_dir, jpeg)
    rows: list[dict[str, Any]] = []

    def measure(number: int) -> None:
        bare, chain = local.bare(n), local.chain(n)
        rows.append({"round": number, "bare": bare, "chain": chain})
        logger.info("round %d bare forward p50 %.1f ms, handler chain p50 %.1f ms (%.2fx)", number, bare["p50_ms"],
                    chain["p50_ms"], chain["p50_ms"] / bare["p50_ms"])

    return local, measure, rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-endpoint-"))
    jpeg = make_jpeg()
    model_dir = make_model(workdir / "model", args.arch, args.image_size, args.num_classes)
    _, measure_local, local_rows = in_process_rounds(model_dir, jpeg, args.rounds, args.forwards)
    variants = {"ours": {"MLOPS_ENDPOINT_MAX_BATCH": "1"}, "ours-batch": {},
                "ours-batch-nowait": {"MLOPS_ENDPOINT_MAX_BATCH_WAIT_MS": "0"},
                "ours-2x1": {"MLOPS_ENDPOINT_INFERENCE_THREADS": "2", "MLOPS_ENDPOINT_MAX_BATCH": "1"}}
    wanted = ["ours-batch", *[name for name in args.variants.split(",") if name in variants and name != "ours-batch"]]
    servers = [our_server(name, model_dir, workdir, variants[name], None) for name in wanted]
    if args.before:
        servers.insert(0, our_server("before", model_dir, workdir, {}, Path(args.before).resolve()))
    raw: dict[str, list[dict[str, Any]]] = {}
    pairs: dict[str, Any] = {}
    try:
        for server in servers:
            server.wait_ready(jpeg, 120)
        measure_servers(servers, CLIENTS, args.seconds, jpeg, args.rounds, raw, between=measure_local)
        engines = {server.name: server.engine_info() for server in servers}
        reference = next(s for s in servers if s.name == "ours-batch")
        for name, settings in torchserve_configs(args):
            ts = torchserve(name, model_dir, workdir, settings)
            try:
                ts.wait_ready(jpeg, 300)
                paired: dict[str, list[dict[str, Any]]] = {}
                measure_servers([ts, reference], (1, max(CLIENTS)), args.seconds, jpeg, args.rounds, paired)
                raw[name] = paired[name]
                pairs[name] = {"ours-batch": medians(paired)["ours-batch"], name: medians(paired)[name]}
                pairs[name]["ratio"] = ratio(pairs[name]["ours-batch"][str(max(CLIENTS))]["req_per_s"],
                                             pairs[name][name][str(max(CLIENTS))]["req_per_s"])
            except RuntimeError as exc:
                logger.warning("%s: %s", name, exc)
                pairs[name] = {"error": str(exc)[:500]}
            finally:
                ts.stop()
    finally:
        for server in servers:
            server.stop()
    bare = statistics.median(r["bare"]["p50_ms"] for r in local_rows)
    results: dict[str, Any] = {
        "in_process": {"bare_p50_ms": round(bare, 2),
                       "chain_p50_ms": round(statistics.median(r["chain"]["p50_ms"] for r in local_rows), 2),
                       "chain_vs_bare": round(statistics.median(r["chain"]["p50_ms"] / r["bare"]["p50_ms"]
                                                                for r in local_rows), 3)},
        "http": medians(raw), "torchserve_pairs": pairs, "engines": engines,
        "raw": {"in_process": local_rows, "http": raw}}
    results["ratios"] = ratios(results)
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def torchserve_configs(args: argparse.Namespace) -> list[tuple[str, dict[str, str]]]:
    if args.no_torchserve:
        return []
    missing = torchserve_missing()
    if missing:
        logger.warning("skipping TorchServe: %s", missing)
        return []
    configs = {"torchserve-default": {}, "torchserve-1thread": {"OMP_NUM_THREADS": "1"}}
    return [(name, configs[name]) for name in args.torchserve_configs.split(",") if name in configs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0, help="per load point")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--forwards", type=int, default=30, help="in-process calls per round (bare, chain)")
    parser.add_argument("--variants", default="ours,ours-batch,ours-batch-nowait,ours-2x1",
                        help="which of our configurations to run (ours-batch always runs)")
    parser.add_argument("--before", default="", help="an older endpoint_server.py to measure as 'before'")
    parser.add_argument("--no-torchserve", action="store_true")
    parser.add_argument("--torchserve-configs", default="torchserve-default,torchserve-1thread")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "endpoint.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    started = time.monotonic()
    results = run(args)
    import torch

    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args),
               "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                           "torch": torch.__version__, "platform": platform.platform()},
               "elapsed_s": round(time.monotonic() - started, 1), **results}
    report_file.write(args.out, results)
    print(json.dumps({"in_process": results["in_process"], "http": results["http"], "ratios": results["ratios"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
