"""Background sampler of system utilisation for the trainer (``profiler/system_metrics.jsonl``).

Every ``interval_s`` a daemon thread appends one JSON object per line::

    {"timestamp": 1700000000.123,   # time.time()
     "cpu_percent": 87.5,           # system-wide CPU utilisation since the previous sample (psutil)
     "memory_percent": 41.2,        # system memory in use (psutil.virtual_memory().percent)
     "rss_mb": 812.4,               # resident memory of the trainer process plus its DataLoader workers
     "gpu_utilization": 93,         # % (torch.cuda.utilization(), needs pynvml), null without CUDA/NVML
     "gpu_memory_mb": 2048.0}       # memory reserved by torch's CUDA allocator, null without CUDA

Lines are flushed as written, so a killed job keeps what it sampled.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import psutil

logger = logging.getLogger(__name__)


class SystemMonitor:
    """Samples CPU/memory (and GPU when ``cuda``) every ``interval_s`` into ``path`` (JSON lines, appended)."""

    def __init__(self, path: str | Path, interval_s: float = 0.5, cuda: bool = False) -> None:
        if interval_s <= 0:
            raise ValueError(f"system monitor interval must be > 0 s, got {interval_s}")
        self.path = Path(path)
        self.interval_s = float(interval_s)
        self.cuda = cuda
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()
        self._gpu_util_available = cuda
        self._cpu_max = 0.0
        self._rss_max = 0.0

    def sample(self) -> dict[str, Any]:
        """One measurement (also usable without the thread)."""
        rss = 0
        for proc in [self._process, *self._children()]:
            try:
                rss += proc.memory_info().rss
            except psutil.Error:  # a worker exited between listing and reading
                continue
        row: dict[str, Any] = {
            "timestamp": round(time.time(), 3),
            "cpu_percent": psutil.cpu_percent(interval=None),
            "memory_percent": psutil.virtual_memory().percent,
            "rss_mb": round(rss / 2**20, 1),
            "gpu_utilization": None,
            "gpu_memory_mb": None,
        }
        if self.cuda:
            import torch

            row["gpu_memory_mb"] = round(torch.cuda.memory_reserved() / 2**20, 1)
            if self._gpu_util_available:
                try:
                    row["gpu_utilization"] = int(torch.cuda.utilization())
                except Exception as exc:  # no pynvml / NVML: report null, say so once
                    self._gpu_util_available = False
                    logger.info("GPU utilisation unavailable (%s); gpu_utilization will be null", exc)
        self._cpu_max = max(self._cpu_max, row["cpu_percent"])
        self._rss_max = max(self._rss_max, row["rss_mb"])
        return row

    def _children(self) -> list[psutil.Process]:
        try:
            return self._process.children(recursive=True)
        except psutil.Error:
            return []

    def _run(self) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            while not self._stop.is_set():
                try:
                    fh.write(json.dumps(self.sample()) + "\n")
                    fh.flush()
                    self.samples += 1
                except Exception:  # monitoring must never take training down
                    logger.exception("system monitor sample failed; stopping the monitor")
                    return
                self._stop.wait(self.interval_s)

    def start(self) -> SystemMonitor:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        psutil.cpu_percent(interval=None)  # prime: the first call has no reference interval
        self._thread = threading.Thread(target=self._run, name="system-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def summary(self) -> dict[str, Any]:
        return {"samples": self.samples, "interval_s": self.interval_s, "max_cpu_percent": self._cpu_max,
                "max_rss_mb": self._rss_max}

    def __enter__(self) -> SystemMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
