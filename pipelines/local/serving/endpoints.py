"""Local endpoints: background :mod:`pipelines.local.serving.endpoint_server` processes, one per endpoint name.

State lives under ``$MLOPS_HOME/endpoints/<name>/`` (``server.log``, ``server.json``, ``admin.token``, extracted
``models/``) and in the SQLite table ``endpoints`` (pid, port, what is deployed).

- :func:`deploy` starts the server (or, when one is already running, swaps its model in place through the
  loopback admin route, so requests in flight finish on the old model and ``/ping`` never fails). A stale record
  (the server died) is detected and the server is restarted, on its old port when that port is still free.
- :func:`materialize` turns a SageMaker container definition (``ModelDataUrl``, ``Environment``) into a local model
  directory, reading ``s3://`` URIs from the artifact store. The handler comes from ``code/`` inside the model
  archive, as in the PyTorch inference containers; ``SAGEMAKER_SUBMIT_DIRECTORY`` is ignored, as they ignore it.
- :func:`invoke`, :func:`list_endpoints`, :func:`delete`.

``code/requirements.txt`` in the model archive (a timm model's pins timm) is installed as the PyTorch inference
container installs it at start (``sagemaker_pytorch_serving_container.torchserve._install_requirements``:
``sys.executable -m pip install -r code/requirements.txt``, the start fails when pip fails): the server then runs
in an environment of its own, ``$MLOPS_HOME/endpoints/<name>/env`` (created fresh at every server start by
:mod:`pipelines.local.jobs.environment`, over the engine's packages, so a missing requirement lands there, not in the
engine's virtualenv; when the engine's packages already satisfy every line, pip is not run at all), and pip's
failure fails the deploy with its output.
A model without ``requirements.txt`` is served by the engine's interpreter. A model swap into a running server
installs the new model's requirements into that server's environment; a server running on the engine's
interpreter refuses a model whose requirements the engine lacks (delete the endpoint and deploy again).

The server's URL is the ``endpoint_url`` for ``boto3.client("sagemaker-runtime", endpoint_url=...)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from pipelines.local.jobs import environment as jobenv
from pipelines.local.serving import endpoint_server, xgboost_model
from pipelines.local.storage.store import ArtifactStore, connect, mlops_home
from training.archives import is_archive, safe_extract
from training.serving_code import install_requirements, requirements_path, unsatisfied_requirements

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_STARTUP_TIMEOUT_S = 180.0
KEEP_MODEL_DIRS = 2  # the serving model and the one before it
LOG_MAX_BYTES = 10 * 1024 * 1024  # server.log is rotated at (re)start above this size
LOG_KEEP = 3
STOP_GRACE_S = 5.0  # after the server's drain deadline, before SIGKILL
ENV_DIR = "env"  # the server's own Python environment, for a model whose code/ has requirements.txt
_NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS endpoints (
        name TEXT PRIMARY KEY,
        pid INTEGER,
        pid_create_time REAL,
        port INTEGER,
        url TEXT,
        state_dir TEXT NOT NULL,
        model_dir TEXT,
        code_dir TEXT,
        program TEXT,
        environment TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        deployed_at REAL NOT NULL
    )""",
)

# Popen objects of the servers this process started, so they can be reaped (no zombies in long-lived parents).
_CHILDREN: dict[int, subprocess.Popen] = {}


class EndpointError(RuntimeError):
    """A local endpoint could not be deployed, reached or stopped."""


class EndpointNotFound(EndpointError, LookupError):
    """No local endpoint with that name."""


@dataclass(frozen=True)
class Deployment:
    """What a server needs: the extracted model archive (its ``code/`` holds the handler) and the container's
    environment (``SAGEMAKER_PROGRAM``...)."""

    model_dir: Path
    environment: dict[str, str]

    @property
    def code_dir(self) -> Path:
        return self.model_dir / "code"

    @property
    def program(self) -> str:
        return self.environment.get("SAGEMAKER_PROGRAM") or "inference.py"


@dataclass(frozen=True)
class LocalEndpoint:
    name: str
    pid: int | None
    port: int | None
    url: str | None
    state_dir: Path
    model_dir: str | None
    code_dir: str | None
    program: str | None
    created_at: float
    deployed_at: float
    alive: bool

    @property
    def log_path(self) -> Path:
        return self.state_dir / "server.log"


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"invalid endpoint name {name!r}: letters, digits and hyphens, at most 63 characters, "
                         "starting and ending with a letter or digit")
    return name


def endpoints_root() -> Path:
    path = mlops_home() / "endpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_dir(name: str) -> Path:
    return endpoints_root() / validate_name(name)


@contextlib.contextmanager
def _locked(name: str) -> Iterator[Path]:
    """Serialize deploy/delete of one endpoint across processes."""
    directory = state_dir(name)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield directory
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _db():
    return contextlib.closing(connect(SCHEMA))


def _row(name: str) -> dict[str, Any] | None:
    with _db() as conn:
        row = conn.execute("SELECT * FROM endpoints WHERE name = ?", (name,)).fetchone()
    return dict(row) if row else None


def _to_endpoint(row: dict[str, Any]) -> LocalEndpoint:
    return LocalEndpoint(row["name"], row["pid"], row["port"], row["url"], Path(row["state_dir"]), row["model_dir"],
                         row["code_dir"], row["program"], row["created_at"], row["deployed_at"],
                         _alive(row["pid"], row["pid_create_time"]))


# ------------------------------------------------------------------------------------------------- processes


def _alive(pid: int | None, create_time: float | None) -> bool:
    """Whether ``pid`` is still *our* server (not a zombie, not a recycled pid)."""
    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False
        return "pipelines.local.serving.endpoint_server" in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _stop_timeout(directory: Path | None) -> float:
    """How long to wait after SIGTERM before SIGKILL: the server's drain deadline (from its ``server.json``,
    else the default) plus :data:`STOP_GRACE_S` for the interpreter to exit."""
    settings = _read_json(directory / endpoint_server.STATE_FILE).get("settings") if directory else None
    try:
        drain = float((settings or {})["drain_timeout_s"])
    except (KeyError, TypeError, ValueError):
        drain = endpoint_server.ServerSettings().drain_timeout_s
    return drain + STOP_GRACE_S


def _stop_process(pid: int | None, create_time: float | None, timeout: float | None = None) -> bool:
    """SIGTERM (the server drains: requests in flight finish, idle connections close), SIGKILL only if it is
    still there after ``timeout`` (default: the default drain deadline + grace). Whether SIGTERM sufficed."""
    if not _alive(pid, create_time):
        _CHILDREN.pop(pid or -1, None)
        return True
    assert pid is not None
    timeout = _stop_timeout(None) if timeout is None else timeout
    logger.info("stopping endpoint server pid %d", pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid, create_time):
        time.sleep(0.05)
    graceful = not _alive(pid, create_time)
    if not graceful:
        logger.warning("endpoint server pid %d still running %.0fs after SIGTERM; killing it", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)
        if graceful and child.returncode not in (0, None):
            logger.warning("endpoint server pid %d exited with code %s", pid, child.returncode)
    return graceful


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no server log)"
    return "\n".join(text[-lines:]) or "(server log is empty)"


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds (TIME_WAIT is no obstacle)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def rotate_log(path: Path, max_bytes: int = LOG_MAX_BYTES, keep: int = LOG_KEEP) -> None:
    """Before a server (re)starts: move a log above ``max_bytes`` to ``.1`` (older ones to ``.2``...), keep ``keep``."""
    try:
        if path.stat().st_size <= max_bytes:
            return
    except FileNotFoundError:
        return
    for index in range(keep, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if index == keep:
            older.unlink(missing_ok=True)
        else:
            newer = path.with_name(f"{path.name}.{index + 1}")
            if older.exists():
                older.replace(newer)
    path.replace(path.with_name(f"{path.name}.1"))


def _port_free_soon(port: int, wait_s: float = 2.0) -> bool:
    """Whether ``port`` is (or within ``wait_s`` becomes) free: a SIGKILLed server's listening socket is released by
    the kernel a few tens of milliseconds after the process is already reported dead."""
    deadline = time.monotonic() + wait_s
    while not _port_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _http(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
          timeout: float = 60.0) -> tuple[int, bytes, str]:
    method = "POST" if data is not None else "GET"
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), exc.headers.get("Content-Type", "") if exc.headers else ""


def _endpoint_environment(directory: Path) -> jobenv.JobEnvironment | None:
    """The environment the endpoint's current server runs in, when it has one of its own."""
    root = directory / ENV_DIR
    if not (root / "pyvenv.cfg").is_file():
        return None
    paths = sysconfig.get_paths(scheme="venv", vars={"base": str(root), "platbase": str(root)})
    bin_dir = Path(paths["scripts"])
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    return jobenv.JobEnvironment(root=root, python=python, bin_dir=bin_dir, site_packages=Path(paths["purelib"]))


def _install(name: str, requirements: Path, environment: jobenv.JobEnvironment, env: dict[str, str]) -> None:
    try:
        install_requirements(requirements, environment.python, env=env)
    except RuntimeError as exc:
        raise EndpointError(f"endpoint {name!r}: {exc}") from exc


def _server_interpreter(name: str, directory: Path, deployment: Deployment,
                        env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The interpreter a new server runs with, and its environment variables: for a model with
    ``code/requirements.txt`` a fresh per-endpoint environment with the requirements installed (as the PyTorch
    inference container does at start), else the engine's interpreter."""
    shutil.rmtree(directory / ENV_DIR, ignore_errors=True)
    requirements = requirements_path(deployment.model_dir)
    if requirements is None:
        return sys.executable, env
    environment = jobenv.create(directory / ENV_DIR)
    env = environment.environ(env)
    # A fresh environment sees exactly the engine's packages: when they satisfy every line, pip would only print
    # "Requirement already satisfied" (seconds on a small machine), so it is skipped.
    missing = unsatisfied_requirements(requirements)
    if missing:
        started = time.monotonic()
        _install(name, requirements, environment, env)
        logger.info("endpoint %s: installed %s (%s) into %s in %.1fs", name, requirements, ", ".join(missing),
                    environment.root, time.monotonic() - started)
    else:
        logger.info("endpoint %s: %s already satisfied by the engine's packages", name, requirements)
    return str(environment.python), env


def _prepare_swap(name: str, directory: Path, deployment: Deployment) -> None:
    """Before a model swap into the running server: the new model's ``code/requirements.txt`` is installed into the
    server's own environment, or, for a server on the engine's interpreter, must already be satisfied."""
    requirements = requirements_path(deployment.model_dir)
    if requirements is None:
        return
    environment = _endpoint_environment(directory)
    if environment is not None:
        _install(name, requirements, environment, environment.environ(dict(os.environ)))
        return
    missing = unsatisfied_requirements(requirements)
    if missing:
        raise EndpointError(f"endpoint {name!r} runs on the engine's interpreter, which lacks {', '.join(missing)} "
                            f"({requirements}); it keeps serving the previous model. Delete the endpoint and deploy "
                            "again: a new server installs the requirements into an environment of its own")


def _start_server(name: str, directory: Path, deployment: Deployment, port: int, timeout: float,
                  max_body_bytes: int, variant: str) -> tuple[int, float, int, str]:
    state_path = directory / endpoint_server.STATE_FILE
    state_path.unlink(missing_ok=True)
    log_path = directory / "server.log"
    rotate_log(log_path)
    env = dict(os.environ)
    env.update(deployment.environment)
    python, env = _server_interpreter(name, directory, deployment, env)
    cmd = [python, "-m", "pipelines.local.serving.endpoint_server", "--port", str(port),
           "--model-dir", str(deployment.model_dir), "--state-dir", str(directory), "--name", name,
           "--variant", variant, "--max-body-bytes", str(max_body_bytes)]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting endpoint {name}: {deployment.model_dir}\n"
                  .encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=directory, env=env, start_new_session=True, close_fds=True)
    _CHILDREN[proc.pid] = proc
    create_time = psutil.Process(proc.pid).create_time()
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            _CHILDREN.pop(proc.pid, None)
            raise EndpointError(f"endpoint {name!r} server exited with code {code} during startup. Last lines of "
                                f"{log_path}:\n{_log_tail(log_path)}")
        state = _read_json(state_path)
        if state.get("pid") == proc.pid and state.get("state") == "ready":
            url = state["url"]
            with contextlib.suppress(OSError):
                if _http(f"{url}/ping", timeout=5)[0] == 200:
                    logger.info("endpoint %s is up at %s (pid %d)", name, url, proc.pid)
                    return proc.pid, create_time, int(state["port"]), url
        if time.monotonic() > deadline:
            _stop_process(proc.pid, create_time)
            raise EndpointError(f"endpoint {name!r} did not become healthy within {timeout:.0f}s (GET /ping). "
                                f"Last lines of {log_path}:\n{_log_tail(log_path)}")
        time.sleep(0.1)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _reload(name: str, row: dict[str, Any], deployment: Deployment, timeout: float) -> None:
    directory = Path(row["state_dir"])
    _prepare_swap(name, directory, deployment)
    try:
        token = (directory / endpoint_server.TOKEN_FILE).read_text().strip()
    except OSError as exc:
        raise EndpointError(f"cannot read the admin token of endpoint {name!r}: {exc}") from exc
    payload = json.dumps({"model_dir": str(deployment.model_dir), "environment": deployment.environment}).encode()
    try:
        status, body, _ = _http(f"{row['url']}/_mlops/reload", data=payload, timeout=timeout,
                                headers={"Content-Type": "application/json", endpoint_server.TOKEN_HEADER: token})
    except OSError as exc:
        raise EndpointError(f"endpoint {name!r} did not answer the model swap: {exc}") from exc
    if status != 200:
        raise EndpointError(f"endpoint {name!r} could not load the new model (it keeps serving the previous one): "
                            f"HTTP {status} {_error_text(body)}. Log: {directory / 'server.log'}")
    logger.info("endpoint %s swapped to generation %s (%s)", name, json.loads(body).get("generation"),
                deployment.model_dir)


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:2000]


# ------------------------------------------------------------------------------------------------- public API


def materialize(endpoint_name: str, container: dict[str, Any], store: ArtifactStore | None = None) -> Deployment:
    """The local model directory for a SageMaker container definition (``ModelDataUrl``/``Environment``).

    ``ModelDataUrl`` (``model.tar.gz``, or a directory) is extracted safely into a fresh
    ``$MLOPS_HOME/endpoints/<name>/models/<id>/`` -- the container's ``/opt/ml/model``, whose ``code/`` holds the
    handler named by ``SAGEMAKER_PROGRAM``.
    """
    store = store or ArtifactStore()
    directory = state_dir(endpoint_name)
    environment = {str(k): str(v) for k, v in (container.get("Environment") or {}).items()}
    model_url = container.get("ModelDataUrl") or ((container.get("ModelDataSource") or {}).get("S3DataSource")
                                                   or {}).get("S3Uri")
    if not model_url:
        raise EndpointError(f"container for endpoint {endpoint_name!r} has no ModelDataUrl: nothing to serve")
    source = store.path(model_url)
    if not source.exists():
        raise EndpointError(f"model data {model_url} not found in the local artifact store ({source})")
    model_dir = directory / "models" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    if source.is_dir():
        shutil.copytree(source, model_dir)
    elif is_archive(source):
        safe_extract(source, model_dir)
    else:
        model_dir.mkdir(parents=True)
        shutil.copy2(source, model_dir / source.name)
    if environment.get("SAGEMAKER_SUBMIT_DIRECTORY"):
        logger.warning("endpoint %s: SAGEMAKER_SUBMIT_DIRECTORY=%s is ignored, as the PyTorch inference containers "
                       "ignore it; the handler must be in code/ inside %s", endpoint_name,
                       environment["SAGEMAKER_SUBMIT_DIRECTORY"], model_url)
    if container.get("Image"):  # which server the model gets (the XGBoost container's or the PyTorch toolkit)
        environment[xgboost_model.IMAGE_ENV] = str(container["Image"])
    return Deployment(model_dir=model_dir, environment=environment)


def deploy(endpoint_name: str, model_dir: str | Path, *, environment: dict[str, str] | None = None,
           startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S, variant: str = endpoint_server.DEFAULT_VARIANT,
           max_body_bytes: int = endpoint_server.DEFAULT_MAX_BODY_BYTES) -> LocalEndpoint:
    """Serve the extracted model archive ``model_dir`` (its ``code/`` holds the handler ``SAGEMAKER_PROGRAM`` of
    ``environment``) through SageMaker's PyTorch inference toolkit as ``endpoint_name``: start a server, or swap
    the model of the running one without dropping requests.

    Raises :class:`EndpointError` (with the server log's tail) if the server does not come up within
    ``startup_timeout`` seconds or the new model cannot be loaded (a running endpoint then keeps its old model).
    """
    validate_name(endpoint_name)
    deployment = Deployment(Path(model_dir).resolve(), {str(k): str(v) for k, v in (environment or {}).items()})
    if not deployment.model_dir.is_dir():
        raise EndpointError(f"model directory {deployment.model_dir} does not exist")
    with _locked(endpoint_name) as directory:
        row = _row(endpoint_name)
        now = time.time()
        if row and _alive(row["pid"], row["pid_create_time"]):
            _reload(endpoint_name, row, deployment, startup_timeout)
            pid, create_time, port, url = row["pid"], row["pid_create_time"], row["port"], row["url"]
        else:
            if row:
                logger.warning("endpoint %s: server pid %s is gone; starting a new one", endpoint_name, row["pid"])
            port = row["port"] if row and row["port"] and _port_free_soon(row["port"]) else 0
            pid, create_time, port, url = _start_server(endpoint_name, directory, deployment, port, startup_timeout,
                                                        max_body_bytes, variant)
        with _db() as conn:
            conn.execute(
                "INSERT INTO endpoints (name, pid, pid_create_time, port, url, state_dir, model_dir, code_dir, program,"
                " environment, created_at, deployed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE"
                " SET pid=excluded.pid, pid_create_time=excluded.pid_create_time, port=excluded.port,"
                " url=excluded.url, state_dir=excluded.state_dir, model_dir=excluded.model_dir,"
                " code_dir=excluded.code_dir, program=excluded.program, environment=excluded.environment,"
                " deployed_at=excluded.deployed_at",
                (endpoint_name, pid, create_time, port, url, str(directory), str(deployment.model_dir),
                 str(deployment.code_dir), deployment.program, json.dumps(deployment.environment), now, now))
        _prune_model_dirs(directory, keep={deployment.model_dir, Path(row["model_dir"]) if row and row["model_dir"]
                                           else deployment.model_dir})
    return get(endpoint_name)


def _prune_model_dirs(directory: Path, keep: set[Path]) -> None:
    models = directory / "models"
    if not models.is_dir():
        return
    entries = sorted((p for p in models.iterdir() if p.is_dir()), key=lambda p: p.name)
    for old in entries[:-KEEP_MODEL_DIRS]:
        if old.resolve() not in {k.resolve() for k in keep}:
            shutil.rmtree(old, ignore_errors=True)


def get(endpoint_name: str) -> LocalEndpoint:
    row = _row(validate_name(endpoint_name))
    if row is None:
        raise EndpointNotFound(f"no local endpoint named {endpoint_name!r}")
    return _to_endpoint(row)


def list_endpoints() -> list[LocalEndpoint]:
    with _db() as conn:
        rows = conn.execute("SELECT * FROM endpoints ORDER BY name").fetchall()
    return [_to_endpoint(dict(r)) for r in rows]


def invoke(endpoint_name: str, body: bytes, content_type: str = "application/x-image",
           accept: str = "application/json", timeout: float = 60.0) -> tuple[int, bytes]:
    """``POST /invocations`` on a local endpoint; returns ``(HTTP status, response body)``."""
    endpoint = get(endpoint_name)
    if not endpoint.alive or not endpoint.url:
        raise EndpointError(f"endpoint {endpoint_name!r} is not running (server pid {endpoint.pid} is gone); deploy "
                            f"it again. Last lines of {endpoint.log_path}:\n{_log_tail(endpoint.log_path, 15)}")
    status, payload, _ = _http(f"{endpoint.url}/invocations", data=body, timeout=timeout,
                               headers={"Content-Type": content_type, "Accept": accept})
    return status, payload


def server_status(endpoint_name: str, timeout: float = 5.0) -> dict[str, Any]:
    """The running server's ``/_mlops/status`` (pid and the loaded generation)."""
    endpoint = get(endpoint_name)
    token = (endpoint.state_dir / endpoint_server.TOKEN_FILE).read_text().strip()
    status, body, _ = _http(f"{endpoint.url}/_mlops/status", timeout=timeout,
                            headers={endpoint_server.TOKEN_HEADER: token})
    if status != 200:
        raise EndpointError(f"endpoint {endpoint_name!r} status: HTTP {status} {_error_text(body)}")
    return json.loads(body)


def delete(endpoint_name: str) -> bool:
    """Stop the endpoint's server (requests in flight finish first) and remove its state; ``False`` if unknown."""
    with _locked(endpoint_name) as directory:
        row = _row(endpoint_name)
        if row is not None:
            _stop_process(row["pid"], row["pid_create_time"], _stop_timeout(directory))
            with _db() as conn:
                conn.execute("DELETE FROM endpoints WHERE name = ?", (endpoint_name,))
        for child in list(directory.iterdir()):
            if child.name != ".lock":
                shutil.rmtree(child) if child.is_dir() else child.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (directory / ".lock").unlink()
        directory.rmdir()
    if row is not None:
        logger.info("deleted local endpoint %s", endpoint_name)
    return row is not None
