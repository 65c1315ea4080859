"""The engine's side of warm starts (:mod:`pipelines.local.jobs.zygote`): zygotes started on first use, one per set
of load-time settings (:func:`zygote.load_time_env` of the job's environment), ended with the engine process.

Only jobs over the project's own environment use one (PyTorch images and unknown ones; an image environment such as
scikit-learn's starts cold): that is where torch is preloaded. A zygote listens once it has preloaded (~3 s on 2
cores); a process that asks before starts cold, so a zygote never makes a job slower than it was. An execution's
runner starts the zygote for the engine's own settings before its first step (:meth:`Zygotes.prestart`); a job
with other load-time settings (its ``Environment`` sets ``OMP_NUM_THREADS``, say) starts one of its own.
``MLOPS_WARM_START=0`` turns warm starts off (every process starts cold, as before).

Each zygote lives in a directory of its own under the system's temporary directory (a UNIX socket path has at most
107 bytes): its socket and the job environment it runs in (:func:`pipelines.local.jobs.environment.create`, the
same as a job's); directories of engines that are gone are removed when a new zygote starts. Its log --- what it
preloaded, each fork, each cold start and why --- is ``$MLOPS_HOME/zygotes/<that directory's name>.log``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipelines.local.jobs import environment as job_env
from pipelines.local.jobs import envs, zygote
from pipelines.local.storage import store

logger = logging.getLogger(__name__)

ENABLE_ENV = "MLOPS_WARM_START"
PREFIX = "mlops-zygote-"
SOCKET_ENV = zygote.SOCKET_ENV


class _Running:
    def __init__(self, root: Path, proc: subprocess.Popen[bytes]) -> None:
        self.root = root
        self.proc = proc
        self.socket = str(root / "zygote.sock")
        self.log = log_dir() / f"{root.name}.log"


class Zygotes:
    """The zygotes of this engine process, by load-time settings."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[tuple[tuple[str, str], ...], _Running] = {}
        self._registered = False

    @staticmethod
    def enabled(env: Mapping[str, str]) -> bool:
        return sys.platform == "linux" and env.get(ENABLE_ENV, os.environ.get(ENABLE_ENV, "1")) != "0"

    def prestart(self, env: Mapping[str, str] | None = None) -> None:
        """Start the zygote for ``env`` (default: this process's, what jobs inherit) now, so that it has preloaded
        by the time the first jobs ask (an execution's runner calls this before its first step)."""
        self.socket_for(os.environ if env is None else env)

    def socket_for(self, env: Mapping[str, str]) -> str | None:
        """The socket of the zygote serving processes with ``env`` (started now if there is none), or None.

        The socket appears once the zygote has preloaded; until then the job's processes start cold."""
        if not self.enabled(env):
            return None
        key = tuple(sorted(zygote.load_time_env(dict(env)).items()))
        with self._lock:
            running = self._running.get(key)
            if running is None or running.proc.poll() is not None:
                try:
                    running = self._start(env)
                except (OSError, RuntimeError) as exc:
                    logger.warning("warm starts unavailable (%s): jobs start cold", exc)
                    return None
                self._running[key] = running
            return running.socket

    def ready(self, env: Mapping[str, str], timeout_s: float = 120.0) -> str:
        """:meth:`socket_for`, once the zygote listens (tests, benchmarks); RuntimeError if it does not."""
        sock = self.socket_for(env)
        deadline = time.monotonic() + timeout_s
        while sock is not None and time.monotonic() < deadline:
            if Path(sock).exists():
                return sock
            running = next((r for r in self._running.values() if r.socket == sock), None)
            if running is None or running.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"no zygote listening for these settings (see {log_dir()})")

    def _start(self, env: Mapping[str, str]) -> _Running:
        _remove_stale()
        root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        jenv = job_env.create(root / "env")
        base = {k: v for k, v in os.environ.items() if k not in zygote.load_time_env(os.environ)}
        base.update(zygote.load_time_env(dict(env)))
        base.pop(SOCKET_ENV, None)
        log_path = log_dir() / f"{root.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            cmd = [str(jenv.python), str(Path(zygote.__file__)), "--socket", str(root / "zygote.sock"),
                   "--parent", str(os.getpid())]
            proc = subprocess.Popen(cmd, cwd=root, env=jenv.environ(base),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        if not self._registered:
            atexit.register(self.stop)
            self._registered = True
        logger.info("started zygote %d (%s) for warm job starts", proc.pid, root)
        return _Running(root, proc)

    def stop(self) -> None:
        """End every zygote (and the processes it forked) and remove its directory."""
        with self._lock:
            running, self._running = list(self._running.values()), {}
        for item in running:
            if item.proc.poll() is None:
                item.proc.terminate()
                try:
                    item.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    item.proc.kill()
                    item.proc.wait()
            shutil.rmtree(item.root, ignore_errors=True)


JOB_STEP_TYPES = ("Training", "Processing", "Tuning")
IMAGE_KEYS = ("TrainingImage", "ImageUri")


def _mappings(node: Any) -> Iterator[Mapping[str, Any]]:
    """Every JSON object in ``node``, outermost first."""
    if isinstance(node, Mapping):
        yield node
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            yield from _mappings(item)


def uses_project_environment(definition: str | Mapping[str, Any]) -> bool:
    """Whether a pipeline definition has a job that runs over the project's environment (a PyTorch image, an
    unknown one, or one named by an expression): only then is a zygote worth starting before the first step."""
    data = json.loads(definition) if isinstance(definition, str) else definition
    jobs = (step for step in _mappings(data.get("Steps") or []) if step.get("Type") in JOB_STEP_TYPES)
    for image in (found[key] for step in jobs for found in _mappings(step.get("Arguments") or {})
                  for key in IMAGE_KEYS if key in found):
        if not isinstance(image, str):
            return True
        try:
            if envs.spec_for(image) is None:
                return True
        except envs.EnvironmentUnavailable:
            continue
    return False


def log_dir() -> Path:
    """Where zygotes' logs go: ``$MLOPS_HOME/zygotes/``."""
    return store.mlops_home() / "zygotes"


def _remove_stale() -> None:
    """Directories of zygotes whose engine process is gone."""
    pattern = re.compile(rf"{re.escape(PREFIX)}(\d+)-")
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        match = pattern.match(path.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            shutil.rmtree(path, ignore_errors=True)


#: This engine process's zygotes.
ZYGOTES = Zygotes()
