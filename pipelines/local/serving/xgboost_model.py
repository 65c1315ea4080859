"""Serving a built-in XGBoost algorithm model: the endpoint server's and batch transform's handler for it.

The SageMaker XGBoost container serves its ``xgboost-model`` itself (its own server, not the PyTorch inference
toolkit). Locally the model is served by :mod:`pipelines.local.jobs.xgboost_algorithm` (``load_model``/``predict``,
the container's serving contract: CSV without the label, libsvm, ``text/csv``/``application/json`` answers) running
in the image's environment (:mod:`pipelines.local.jobs.envs`, the one that has ``xgboost`` at the image's version):
a child process of this file, run as a script with that environment's interpreter, that reads requests on stdin and
writes answers on stdout, one at a time.

:class:`XGBoostLoaded` is the engine side: the same ``invoke(body, headers) -> Response`` and ``info()`` as the
PyTorch path's ``endpoint_server.Loaded``, so the endpoint server and batch transform call it alike.
:func:`wanted` says whether a model is one (its image is XGBoost and it names no ``SAGEMAKER_PROGRAM``: script-mode
XGBoost models with their own ``model_fn`` are not served locally).

Wire format (both ways): one JSON header line, then exactly ``length`` bytes of body. Request header
``{"content_type", "accept", "length"}``; answer ``{"status", "content_type", "length"}``.

This file is also the child (stdlib only at import time: it runs in an environment without this project).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

#: The model's container image, put into the serving environment by the engine (endpoints, transform): what decides
#: which server a model gets, as the image does on SageMaker.
IMAGE_ENV = "MLOPS_CONTAINER_IMAGE"
ALGORITHM = Path(__file__).resolve().parents[1] / "jobs" / "xgboost_algorithm.py"


def _read_frame(stream: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    line = stream.readline()
    if not line:
        return None
    header = json.loads(line)
    length = int(header.get("length", 0))
    body = stream.read(length) if length else b""
    if len(body) != length:
        raise EOFError(f"expected {length} bytes, got {len(body)}")
    return header, body


def _write_frame(stream: BinaryIO, header: dict[str, Any], body: bytes) -> None:
    stream.write(json.dumps({**header, "length": len(body)}).encode() + b"\n")
    stream.write(body)
    stream.flush()


# ----------------------------------------------------------------------------------------------------- the child

def _status_of(exc: Exception) -> int:
    """The container's answer to a failed request: the status its error carries (415 payload, 406 accept, 400
    prediction), else 500."""
    return int(getattr(exc, "status", 500))


def _child(model_dir: str) -> int:
    import os

    # The answers get a descriptor of their own; fd 1 becomes stderr, so nothing xgboost prints (from Python or
    # from its C++ library) can corrupt them.
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    stdin = sys.stdin.buffer
    sys.path.insert(0, str(ALGORITHM.parent))
    import xgboost_algorithm  # the image environment's xgboost underneath

    model = xgboost_algorithm.load_model(model_dir)
    _write_frame(stdout, {"status": 200, "content_type": "text/plain"}, b"ready")
    while (frame := _read_frame(stdin)) is not None:
        header, body = frame
        try:
            answer, content_type = xgboost_algorithm.predict(model, body, header.get("content_type") or "text/csv",
                                                             header.get("accept") or "text/csv")
            _write_frame(stdout, {"status": 200, "content_type": content_type}, answer)
        except Exception as exc:  # noqa: BLE001 -- every failure is an answer, as the container's server gives
            sys.stderr.write(f"xgboost serving: {type(exc).__name__}: {exc}\n")
            _write_frame(stdout, {"status": _status_of(exc), "content_type": "text/plain"},
                         f"{type(exc).__name__}: {exc}".encode())
    return 0


# ---------------------------------------------------------------------------------------------- the engine side

def wanted(environment: dict[str, str] | None) -> bool:
    """Whether a model with this serving ``environment`` is a built-in XGBoost one (served here)."""
    from pipelines.local.jobs import images

    environment = environment or {}
    image = images.parse(environment.get(IMAGE_ENV, ""))
    return image.framework == "xgboost" and not environment.get("SAGEMAKER_PROGRAM")


class XGBoostLoaded:
    """A loaded XGBoost model behind a child process in the image's environment (one request at a time)."""

    def __init__(self, generation: int, model_dir: str, environment: dict[str, str]) -> None:
        import subprocess

        from pipelines.local.jobs import envs

        self.generation, self.model_dir, self.loaded_at = generation, model_dir, time.time()
        self.program = "xgboost-model"
        self.environment = envs.for_image(environment.get(IMAGE_ENV))
        if self.environment is None:
            raise RuntimeError(f"no XGBoost environment for image {environment.get(IMAGE_ENV)!r}")
        self._lock = threading.Lock()
        self._proc = subprocess.Popen([str(self.environment.python), str(Path(__file__).resolve()), model_dir],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        ready = _read_frame(self._proc.stdout)  # type: ignore[arg-type]
        if ready is None:
            code = self._proc.wait()
            raise RuntimeError(f"the XGBoost model in {model_dir} could not be loaded (exit {code}; see the log)")

    def invoke(self, body: bytes, headers: dict[str, str]) -> Any:
        from pipelines.local.serving.endpoint_server import Response

        lowered = {k.lower(): v for k, v in headers.items()}
        with self._lock:
            if self._proc.poll() is not None:
                return Response(503, b"the XGBoost model server exited", None)
            _write_frame(self._proc.stdin, {"content_type": lowered.get("content-type"),  # type: ignore[arg-type]
                                            "accept": lowered.get("accept")}, body)
            frame = _read_frame(self._proc.stdout)  # type: ignore[arg-type]
        if frame is None:
            return Response(503, b"the XGBoost model server exited", None)
        header, answer = frame
        return Response(int(header["status"]), answer, header.get("content_type"))

    def info(self) -> dict[str, Any]:
        return {"generation": self.generation, "model_dir": self.model_dir, "program": self.program,
                "handler": "xgboost (SageMaker XGBoost container contract)",
                "environment": str(self.environment.root), "loaded_at": self.loaded_at}

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()  # type: ignore[union-attr]
            try:
                self._proc.wait(timeout=5)
            except Exception:  # noqa: BLE001
                self._proc.kill()


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1]))
