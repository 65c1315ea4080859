"""Throughput of the local S3 service against a plain file copy of the same file, in the same run.

Starts the service (``server.up()``) under a temporary MLOPS_HOME and moves one file of ``--size-mb`` through it
with boto3's managed transfers -- ``upload_file`` / ``download_file`` with the default TransferConfig (8 MB parts,
10 threads: multipart upload, ranged GETs) and with a threshold above the size (one streamed PutObject, one
GetObject) -- and copies it with ``shutil.copyfile`` and ``cp``. Prints one JSON object: seconds and MB/s of each,
the ratios to ``shutil.copyfile`` and ``cp``, the server's and the client's CPU seconds, and the server process's RSS
(sampled, and its kernel high-water mark VmHWM).

Usage: ``python benchmarks/bench_s3.py [--size-mb 1024] [--dir /tmp] [--no-verify]``
"""

from __future__ import annotations

import argparse
import filecmp
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3  # noqa: E402
import psutil  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402

from pipelines.local.api import server  # noqa: E402

logger = logging.getLogger("bench_s3")
MB = 1024 * 1024
BUCKET = "bench-s3"


class RssSampler:
    """Samples a process's RSS in the background; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.process, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def vm_hwm(pid: int) -> int | None:
    """The kernel's peak-RSS mark of a process (Linux), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def make_file(path: Path, size: int) -> None:
    block = os.urandom(16 * MB)
    with open(path, "wb") as handle:
        remaining = size
        while remaining > 0:
            handle.write(block[:remaining])
            remaining -= min(len(block), remaining)


def cpu_seconds(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return times.user + times.system


def timed(label: str, size: int, action: Callable[[], object], pid: int | None = None) -> dict[str, Any]:
    """Run ``action``; its seconds and MB/s, and with ``pid`` the server's peak RSS and CPU seconds meanwhile."""
    os.sync()  # no dirty pages from the previous phase (or from making the source) flushed during this one
    sampler = RssSampler(pid) if pid else None
    process = psutil.Process(pid) if pid else None
    cpu, client_cpu, start = cpu_seconds(process), time.process_time(), time.perf_counter()
    if sampler:
        with sampler:
            action()
    else:
        action()
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {"seconds": round(seconds, 3), "mb_s": round(size / MB / seconds, 1)}
    if sampler:
        result["server_peak_rss_mb"] = round(sampler.peak / MB, 1)
        result["server_cpu_s"] = round(cpu_seconds(process) - cpu, 2)
        result["client_cpu_s"] = round(time.process_time() - client_cpu, 2)
    logger.info("%s: %.2fs, %.0f MB/s", label, seconds, size / MB / seconds)
    return result


def fresh(path: Path) -> Path:
    path.unlink(missing_ok=True)
    return path


def baselines(source: Path, work: Path, size: int) -> dict[str, Any]:
    copy = work / "copy.bin"
    results = {"shutil_copyfile": timed("shutil.copyfile", size, lambda: shutil.copyfile(source, fresh(copy)))}
    results["cp"] = timed("cp", size, lambda: subprocess.run(["cp", str(source), str(fresh(copy))], check=True))
    copy.unlink()
    return results


def transfers(source: Path, work: Path, size: int, pid: int, verify: bool) -> dict[str, Any]:
    s3 = boto3.client("s3")
    results: dict[str, Any] = {}
    back = work / "back.bin"
    for mode, config in (("multipart", TransferConfig()), ("single_request", TransferConfig(
            multipart_threshold=size + 1, max_concurrency=1))):
        key = f"bench/{mode}.bin"
        results[f"upload_file_{mode}"] = timed(f"upload_file ({mode})", size, lambda k=key, c=config: s3.upload_file(
            str(source), BUCKET, k, Config=c), pid)
        results[f"download_file_{mode}"] = timed(f"download_file ({mode})", size, lambda k=key, c=config: (
            s3.download_file(BUCKET, k, str(fresh(back)), Config=c)), pid)
        if verify and not filecmp.cmp(source, back, shallow=False):
            raise SystemExit(f"{mode}: the downloaded file differs from the source")
        s3.delete_object(Bucket=BUCKET, Key=key)
    back.unlink(missing_ok=True)
    return results


def ratios(results: dict[str, Any], baseline: str) -> dict[str, float]:
    base = results[baseline]["mb_s"]
    return {name: round(value["mb_s"] / base, 3) for name, value in results.items() if name != baseline}


def run(size_mb: int, directory: str | None, verify: bool) -> dict[str, Any]:
    size = size_mb * MB
    with tempfile.TemporaryDirectory(prefix="bench-s3-", dir=directory) as tmp:
        work = Path(tmp)
        os.environ["MLOPS_HOME"] = str(work / "mlops")
        url = server.up()
        try:
            os.environ.update(server.client_environment(url))
            pid = int(server.status()["pid"])  # type: ignore[index]
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            source = work / "source.bin"
            make_file(source, size)
            idle_rss = psutil.Process(pid).memory_info().rss
            results = {**baselines(source, work, size), **transfers(source, work, size, pid, verify)}
            hwm = vm_hwm(pid)
            log = (work / "mlops" / "api" / "server.log").read_text(errors="replace")
        finally:
            server.down()
    return {"size_mb": size_mb, "results": results, "ratio_vs_shutil_copyfile": ratios(results, "shutil_copyfile"),
            "ratio_vs_cp": ratios(results, "cp"),
            "server_rss_mb": {"idle": round(idle_rss / MB, 1), "peak_vmhwm": round(hwm / MB, 1) if hwm else None},
            "multipart_completed_without_copy": "concatenating" not in log,
            "environment": {"python": platform.python_version(), "boto3": boto3.__version__,
                            "cpus": os.cpu_count(), "tmp": directory or tempfile.gettempdir()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--dir", default=None, help="where the temporary files go (default: the system temp dir)")
    parser.add_argument("--no-verify", action="store_true", help="skip comparing the downloaded file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    print(json.dumps(run(args.size_mb, args.dir, not args.no_verify), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
