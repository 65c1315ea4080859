"""Processing and training jobs as local subprocesses under SageMaker's container contract.

Each job gets a working directory standing in for the container's ``/opt/ml`` (``runs/<execution>/<step>/``).

Training runs SageMaker's own training toolkit, as the PyTorch training image does: its command ``train``
(``sagemaker_training.cli.train:main``) with ``SAGEMAKER_TRAINING_MODULE=sagemaker_pytorch_container.training:main``.
The engine lays out what the platform provides -- ``input/config/{hyperparameters,inputdataconfig,resourceconfig}
.json``, ``input/data/<channel>/``, ``model/``, ``output/data/``, the checkpoint dir -- and the toolkit does the rest
exactly as in the container: reads the config (``SAGEMAKER_BASE_DIR`` = the job dir, the toolkit's own switch for "not
/opt/ml"), pip-installs the bundle's ``requirements.txt``, sets every ``SM_*`` variable (``SM_TRAINING_ENV`` with all
its keys), runs ``python <sagemaker_program> --name value ...`` (its argv, sorted, JSON-decoded values), and on failure
writes ``output/failure`` (``ExecuteUserScriptError:\nExitCode ...``), which becomes the ``FailureReason``
``AlgorithmError: <failure>, exit code: <n>``. The toolkit runs with the interpreter of a fresh per-job Python
environment (:mod:`pipelines.local.jobs.environment`), so installs land there, never in the engine's venv. Afterwards
``model/`` is packed as ``<S3OutputPath>/<job>/output/model.tar.gz`` and ``output/data`` as ``output.tar.gz``; with a
``CheckpointConfig`` the checkpoint dir is filled from its ``S3Uri`` before the run and copied back after it, also when
the job fails or is stopped.

Differences from the real container, all known ones:

- paths: every ``SM_*`` directory (and the paths in ``SM_TRAINING_ENV``) is under the job dir, not ``/opt/ml``;
  the job dir is *also* ``/opt/ml`` inside the job's private mount namespace (:mod:`pipelines.local.jobs.sandbox`,
  processing and training jobs), so hard-coded ``/opt/ml/...`` paths work; without a namespace (not Linux, none
  allowed) only the remapping holds and the job log warns. ``CheckpointConfig.LocalPath`` must be under ``/opt/ml``;
- ``SM_CHECKPOINT_DIR`` (the checkpoint dir) is set by the engine: neither SageMaker nor the toolkit sets it, and a
  script's ``/opt/ml/checkpoints`` default cannot be remapped otherwise;
- ``SM_STUDIO_LOCAL_MODE=True`` (SageMaker's own local-mode switch): the toolkit skips its wait for the DNS name
  ``algo-1`` (15 minutes of retries otherwise); that is all it changes (``sagemaker_pytorch_container.training``,
  ``sagemaker_training.entry_point.run``);
- the code bundle (``sagemaker_submit_directory``) is extracted into ``code/`` by the engine (from the artifact
  store, with :func:`training.archives.safe_extract`); the toolkit finds ``code/`` filled and skips its boto3 S3
  download (``files.download_and_extract``). ``hyperparameters.json``, ``SM_MODULE_DIR`` and ``module_dir`` keep the
  ``s3://`` URI, as on SageMaker;
- host name: the image's entrypoint preloads (``LD_PRELOAD``) a ``gethostname()`` that returns ``current_host``;
  here ``socket.gethostname()`` is the machine's name (``SM_CURRENT_HOST`` and the config still say ``algo-1``);
- interpreter and packages: the image's environment (:mod:`pipelines.local.jobs.envs`: scikit-learn, XGBoost...
  at the image's version, built once with uv) or, for PyTorch images and unknown ones, the engine's Python and
  packages (seen through the job environment), not the image's ``/opt/conda`` (e.g. ``SM_DLC_TORCH_VERSION``, set
  by the PyTorch toolkit, is the engine's torch); of the image's ``ENV`` only :data:`IMAGE_ENV` is reproduced
  (not ``LANG``/``LC_ALL``, ``LD_LIBRARY_PATH``, CUDA's); the engine's
  own environment is inherited (minus the toolkit's inputs and ``SM_*``), besides ``TRAINING_JOB_NAME``/``_ARN``;
- GPUs: the toolkit counts them with ``nvidia-smi`` (all of the machine's, ``CUDA_VISIBLE_DEVICES`` aside);
- one host only (the toolkit's MPI/torchrun/smddp launchers are not set up); a bundle with a root ``setup.py``
  would be pip-installed by the toolkit, which may need the package index for build isolation;
- checkpoints are synced before and after the run, not continuously: an engine killed with SIGKILL uploads
  nothing; a stop or ``MaxRuntimeInSeconds`` kills the process tree at once (SageMaker sends SIGTERM first);
- intermediate output (``sagemaker_s3_output``): the engine pre-creates ``output/intermediate`` (so the toolkit
  leaves the sync to "the platform") and uploads it after the job to the toolkit's key
  ``<sagemaker_s3_output>/<job>/output/intermediate/``, instead of while the job runs.

What a training job runs (:func:`training_command`): its ``ContainerEntrypoint`` (``@step`` functions run the SDK's
``job_driver.sh`` this way), else the toolkit (script mode), else the built-in XGBoost algorithm
(:mod:`pipelines.local.jobs.xgboost_algorithm`); other built-in algorithms fail with a clear error.

Processing: every ``/opt/ml/...`` path of the request (inputs' and outputs' ``LocalPath``, the entrypoint and its
arguments) is rewritten into the job directory (which is also ``/opt/ml`` in its namespace); ``python``/``python3``
is the job environment's, over the image's environment; inputs are copied from the artifact store before the run and
the outputs uploaded to their ``S3Uri`` after it.

Logs (stdout + stderr) go to a file per job and, line by line, to an ``on_line`` callback (progress view, tuner).

Lifetime and outcome of a job's processes (:func:`run_command`, any job kind):

- every job runs under a guard process in a session of its own (see :data:`GUARD_SOURCE`): it dies with the engine,
  ``kill -9`` included, and takes every process of the job with it (grandchildren such as the toolkit's user script
  and DataLoader workers too); what a job leaves running when its command exits is killed, as a container's end does;
- the recorded outcome is the job's own exit status (``Popen.returncode``; psutil never reaps our direct child): a
  job stopped (``stop``, pruning) raises :class:`JobStopped`; one that reaches ``StoppingCondition.
  MaxRuntimeInSeconds`` (processing, training, each tuning trial) raises :class:`MaxRuntimeExceeded` -- SageMaker's
  ``Stopped`` with secondary status ``MaxRuntimeExceeded``; one killed by a signal otherwise fails with the signal
  named (``killed by SIGKILL``). Only exit status 0 is a success.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipelines.local.engine.resolver import decode_hyperparameter
from pipelines.local.jobs import environment as job_env
from pipelines.local.jobs import envs, images, sandbox, warm
from pipelines.local.storage import store as store_mod
from pipelines.local.storage.store import ArtifactStore
from training.archives import safe_extract

logger = logging.getLogger(__name__)

OnLine = Callable[[str], bool | None]
CURRENT_HOST = "algo-1"
#: ISA-L's compression level for ``model.tar.gz``/``output.tar.gz`` (0-3; 1: as small as zlib's 9, ~15x faster).
PACK_LEVEL = 1
ENABLE_WARM_HINT = f"{warm.ENABLE_ENV}=0 starts every process cold"


class JobError(RuntimeError):
    """A job could not run or exited with an error; ``str()`` is the failure reason."""


class JobStopped(RuntimeError):
    """A job was stopped on request (``stop``, pruning, or its MaxRuntimeInSeconds)."""


class MaxRuntimeExceeded(JobStopped):
    """A job hit its ``StoppingCondition.MaxRuntimeInSeconds``.

    SageMaker reports such a job as ``Stopped`` with the secondary status ``MaxRuntimeExceeded`` ("The job stopped
    because it exceeded the maximum allowed runtime", botocore's DescribeTrainingJob documentation); ``str()`` says
    both, with the limit.
    """

    SECONDARY_STATUS = "MaxRuntimeExceeded"

    def __init__(self, seconds: float) -> None:
        super().__init__(f"{self.SECONDARY_STATUS}: The job stopped because it exceeded the maximum allowed runtime "
                         f"(MaxRuntimeInSeconds={seconds:g})")
        self.seconds = seconds


class JobControl:
    """A stop switch shared by the engine and its running jobs; ``stop()`` kills every running job's process tree."""

    def __init__(self) -> None:
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen[str]] = set()

    def register(self, proc: subprocess.Popen[str]) -> None:
        with self._lock:
            self._procs.add(proc)

    def unregister(self, proc: subprocess.Popen[str]) -> None:
        with self._lock:
            self._procs.discard(proc)

    def stop(self) -> None:
        self.stop_event.set()
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            kill_tree(proc)

    @property
    def stopped(self) -> bool:
        return self.stop_event.is_set()


# --- job processes --------------------------------------------------------------------------------------------
#
# Every job runs under a *guard*: a tiny stdlib-only Python process (below, run with ``python -I -S -c``) that the
# engine starts in a new session (``start_new_session``: the guard leads the job's session and process group) and
# that starts the job's command. The guard
#
# - asks the kernel for SIGTERM when the engine dies (``prctl(PR_SET_PDEATHSIG)``, which covers ``kill -9`` of the
#   engine; it fires when the engine *thread* that started the guard ends, and that thread waits for the job), and
#   re-checks the engine's pid after asking (the engine may already be gone);
# - is a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), so descendants whose parent died (the training
#   toolkit's user script, DataLoader workers, daemonised helpers -- even those that called ``setsid``) are
#   re-parented to it rather than to init, and reaps them;
# - on that signal (or SIGHUP/SIGINT) kills with SIGKILL every process of the job -- its session and all its
#   descendants -- and exits; when the job's command exits it kills what the command left behind (as the end of a
#   container does) and exits with the command's status: the same exit code, or death by the same signal, so
#   ``Popen.returncode`` is the job's own (``-9`` for SIGKILL).
#
# The engine's stop (:func:`kill_tree`) kills the guard's process group and the guard's descendants directly, and
# only ``Popen.wait()`` reaps the guard (psutil never waits on our direct child: it would steal its exit status).

GUARD_SOURCE = r'''
import os, signal, sys, time

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
ME = os.getpid()


def table():
    procs = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/" + name + "/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        if fields[0] not in (b"Z", b"X"):
            procs[int(name)] = (int(fields[1]), int(fields[3]))  # ppid, session
    return procs


def others():
    """The job's processes but the guard: its session and every descendant of the guard."""
    procs = table()
    found = {pid for pid, (_ppid, sid) in procs.items() if sid == ME}
    children = {}
    for pid, (ppid, _sid) in procs.items():
        children.setdefault(ppid, []).append(pid)
    stack = [ME]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(ME)
    return found


def reap():
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_job(dying):
    if not os.path.isdir("/proc"):  # no process table to read: the group, and only when the guard goes too
        if dying:
            os.killpg(0, signal.SIGKILL)
        return
    for _ in range(100):
        pids = others()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)
        reap()


def on_signal(signum, frame):
    kill_job(True)
    os._exit(128 + signum)


def watch_engine(engine):
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):  # not Linux: poll the parent instead
        import threading

        def poll():
            while os.getppid() == engine:
                time.sleep(0.5)
            os.kill(ME, signal.SIGTERM)
        threading.Thread(target=poll, daemon=True).start()
    if os.getppid() != engine:  # the engine died before we asked
        os._exit(1)


def exit_like(status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            import resource
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        os.kill(ME, sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def main():
    engine, path, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)
    watch_engine(engine)
    try:
        child = os.posix_spawn(path, argv, os.environ)
    except OSError as exc:
        sys.stderr.write("cannot start %s: %s\n" % (argv[0], exc))
        os._exit(127)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            break
    kill_job(False)
    reap()
    exit_like(status)


main()
'''


#: The guard's source travels in this variable (removed before the job starts), so that ``ps`` shows a short line.
GUARD_ENV = "MLOPS_JOB_GUARD"
GUARD_BOOT = f"import os; exec(os.environ.pop({GUARD_ENV!r}))"


def describe_exit(code: int) -> str:
    """``exit code 3`` or, for a process killed by a signal (``Popen.returncode`` < 0), ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a job started by :func:`run_command`: its guard, the guard's process group and descendants.

    Never waits for the guard itself (our direct child): only ``proc.wait()`` reaps it, so its exit status is the
    job's. Descendants are waited for (briefly) by psutil; they are not our children.
    """
    descendants: list[Any] = []
    alive = proc.returncode is None
    if alive:
        try:
            import psutil

            descendants = psutil.Process(proc.pid).children(recursive=True)
        except Exception:  # noqa: BLE001 -- gone already, or psutil missing: the group kill still runs
            descendants = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the guard leads the job's process group (start_new_session)
    except OSError:
        pass
    for child in descendants:
        try:
            child.kill()
        except Exception:  # noqa: BLE001 -- already gone
            pass
    if alive:
        try:
            proc.kill()
        except OSError:
            pass
    if descendants:
        import psutil

        psutil.wait_procs(descendants, timeout=5)


def _executable(name: str, cwd: Path, env: Mapping[str, str]) -> str:
    """The path ``execvp`` would run for ``name``; :class:`JobError` (``cannot start ...``) when there is none."""
    if os.sep in name:
        path = Path(cwd, name)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    else:
        found = shutil.which(name, path=env.get("PATH", os.defpath))
        if found:
            return found
    raise JobError(f"cannot start {name}: no such executable file")


def _spawn(cmd: list[str], cwd: Path, env: Mapping[str, str]) -> subprocess.Popen[str]:
    """Start ``cmd`` under the job guard, in a new session, stdout+stderr on one pipe, no stdin (as a container)."""
    guard = [sys.executable, "-I", "-S", "-c", GUARD_BOOT, str(os.getpid()), _executable(cmd[0], cwd, env), *cmd]
    try:
        return subprocess.Popen(guard, cwd=cwd, env={**env, GUARD_ENV: GUARD_SOURCE}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                errors="replace", start_new_session=True)
    except OSError as exc:
        raise JobError(f"cannot start {cmd[0]}: {exc}") from exc


class _Stop:
    """Why a job was stopped; the first reason wins."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: JobStopped | None = None

    def set(self, reason: JobStopped) -> bool:
        with self._lock:
            if self.reason is not None:
                return False
            self.reason = reason
            return True


def _watchdog(proc: subprocess.Popen[str], done: threading.Event, stop: _Stop, control: JobControl | None,
              timeout_s: float | None) -> None:
    """Stop the job on ``control.stop()`` or at its deadline; once the guard is gone, kill what is left of its
    group (a leftover holding the log pipe would keep the reader waiting)."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    while not done.wait(0.1):
        if proc.poll() is not None:
            kill_tree(proc)
            continue
        reason: JobStopped | None = None
        if control is not None and control.stopped:
            reason = JobStopped("stopped on request")
        elif deadline is not None and time.monotonic() > deadline:
            reason = MaxRuntimeExceeded(float(timeout_s or 0))
        if reason is not None:
            if stop.set(reason):
                logger.info("job pid %s: %s", proc.pid, reason)
            kill_tree(proc)
            return


def _pump(proc: subprocess.Popen[str], log: Any, on_line: OnLine | None, stop: _Stop) -> None:
    """Tee the job's output to the log and ``on_line``; ``on_line`` returning True stops the job (pruned)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        log.flush()
        if on_line is None or stop.reason is not None:
            continue
        try:
            if on_line(line.rstrip("\n")):
                stop.set(JobStopped("stopped early (pruned)"))
                kill_tree(proc)
        except Exception:  # noqa: BLE001 -- a broken observer must not break the job
            logger.exception("log observer failed")


def _sandboxed(cmd: list[str], cwd: Path, env: Mapping[str, str], opt_ml: Path | None, log: Any) -> list[str]:
    """``cmd`` run with ``opt_ml`` mounted at ``/opt/ml`` (:mod:`sandbox`); unchanged, with a warning in the log,
    where no mechanism works here. The job's own executable is checked first (the wrapper's would be found)."""
    if opt_ml is None:
        return cmd
    _executable(cmd[0], cwd, env)
    box = sandbox.detect()
    if box.warning:
        log.write(f"[engine] warning: {box.warning}\n")
    return sandbox.wrap(cmd, opt_ml, sandbox=box)


def run_command(cmd: list[str], *, cwd: Path, env: Mapping[str, str], log_path: Path,
                on_line: OnLine | None = None, control: JobControl | None = None,
                timeout_s: float | None = None, opt_ml: Path | None = None) -> int:
    """Run ``cmd`` (under the job guard, above), teeing stdout+stderr line by line to ``log_path`` and ``on_line``.

    With ``opt_ml`` (the job directory) the job sees that directory at ``/opt/ml`` (:func:`sandbox.wrap`).
    ``on_line`` returning True kills the job (:class:`JobStopped`, "pruned"); so does ``control.stop()``, and
    ``timeout_s`` (:class:`MaxRuntimeExceeded`). A job killed while ``control`` is stopped is stopped, whatever its
    exit status. Otherwise returns the job's own exit status: ``Popen.returncode``, negative for a signal.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stop = _Stop()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = _spawn(_sandboxed(cmd, cwd, env, opt_ml, log), cwd, env)
        if control is not None:
            control.register(proc)
        done = threading.Event()
        threading.Thread(target=_watchdog, args=(proc, done, stop, control, timeout_s), daemon=True).start()
        try:
            _pump(proc, log, on_line, stop)
            code = proc.wait()
        finally:
            done.set()
            if control is not None:
                control.unregister(proc)
            kill_tree(proc)  # what the job left in its group, also after a normal exit
        if stop.reason is None and control is not None and control.stopped and code != 0:
            stop.set(JobStopped("stopped on request"))
        if stop.reason is not None:
            log.write(f"[engine] job {stop.reason} ({describe_exit(code)})\n")
            raise stop.reason
        log.write(f"[engine] {describe_exit(code)}\n")
    return code


def _link_or_copy_tree(src: Path, dest: Path) -> None:
    """Copy a tree using hard links where possible (fast, no extra disk), falling back to real copies."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dest, dirs_exist_ok=True, copy_function=link)


def fetch(artifacts: ArtifactStore, uri: str, dest: Path) -> Path:
    """Materialise what ``uri`` names (a file, or every object under an S3 prefix) inside directory ``dest``."""
    src = artifacts.path(uri)
    dest.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        _link_or_copy_tree(src, dest)
        return dest
    if src.is_file():
        try:
            os.link(src, dest / src.name)
        except OSError:
            shutil.copy2(src, dest / src.name)
        return dest
    # S3Prefix semantics: every key starting with the prefix (e.g. ``.../data`` matching ``.../data-2024/...``)
    parent = src.parent
    matches = sorted(parent.glob(src.name + "*")) if parent.is_dir() else []
    if not matches:
        raise JobError(f"input {uri} does not exist (looked in {src})")
    for match in matches:
        if match.is_dir():
            _link_or_copy_tree(match, dest / match.name)
        else:
            shutil.copy2(match, dest / match.name)
    return dest


def _tar_dir(src: Path, target: Path) -> None:
    """``src`` as a gzip'd tarball at ``target`` (written beside it, then renamed into place).

    Compressed with ISA-L (:mod:`isal.igzip`, a standard gzip stream any reader takes): model weights hardly
    compress, and zlib spends ~1.4 s on a 45 MB resnet18 ``model.pth`` for 7 %, ISA-L ~0.1 s for as much
    (``benchmarks/bench_startup.py``, ``packing``)."""
    from isal import igzip

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with igzip.open(tmp, "wb", compresslevel=PACK_LEVEL) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path in sorted(src.rglob("*")):
            tar.add(path, arcname=path.relative_to(src).as_posix(), recursive=False)
    tmp.replace(target)


def _failure_message(job_dir: Path, log_path: Path, code: int) -> str:
    failure = job_dir / "output" / "failure"
    if failure.is_file():
        text = failure.read_text(errors="replace").strip()
        if text:
            return text[-2000:]
    tail = ""
    if log_path.is_file():
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()
                 and not ln.startswith(("[engine]", "$ "))]
        tail = " | ".join(lines[-3:])
    return f"AlgorithmError: {describe_exit(code)}: {tail}"[-2000:]


def _arn(kind: str, name: str) -> str:
    from pipelines.arns import sagemaker_arn

    return sagemaker_arn(store_mod.LOCAL_REGION, store_mod.LOCAL_ACCOUNT, kind, name.lower())


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def final_metrics(log_text: str, metric_definitions: list[Mapping[str, str]]) -> list[dict[str, Any]]:
    """``FinalMetricDataList``: the last value of every metric definition found in the log."""
    out = []
    for definition in metric_definitions or []:
        values = re.findall(definition["Regex"], log_text)
        if values:
            value = values[-1][0] if isinstance(values[-1], tuple) else values[-1]
            try:
                out.append({"MetricName": definition["Name"], "Value": float(value), "Timestamp": time.time()})
            except ValueError:
                continue
    return out


# --- training -------------------------------------------------------------------------------------------------

#: The SageMaker PyTorch training image's framework entry point (its Dockerfile's ``ENV SAGEMAKER_TRAINING_MODULE``).
FRAMEWORK_MODULE = "sagemaker_pytorch_container.training:main"
#: The rest of that image's Python-related ``ENV`` (aws/deep-learning-containers pytorch/training/docker/2.5).
IMAGE_ENV = {"SAGEMAKER_TRAINING_MODULE": FRAMEWORK_MODULE, "PYTHONDONTWRITEBYTECODE": "1",
             "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "UTF-8", "DLC_CONTAINER_TYPE": "training"}
#: What the toolkit reads from the environment (sagemaker_training.params, environment.BASE_PATH_ENV): never
#: inherited from the engine's own environment, and neither is any ``SM_*`` variable.
TOOLKIT_INPUT_ENV = ("SAGEMAKER_BASE_DIR", "SAGEMAKER_PROGRAM", "SAGEMAKER_SUBMIT_DIRECTORY",
                     "SAGEMAKER_CONTAINER_LOG_LEVEL", "SAGEMAKER_REGION", "SAGEMAKER_JOB_NAME", "SAGEMAKER_S3_OUTPUT",
                     "SAGEMAKER_TRAINING_MODULE", "CURRENT_HOST", "TRAINING_JOB_NAME", "TRAINING_JOB_ARN")
DEFAULT_CHECKPOINT_PATH = "/opt/ml/checkpoints"
#: SageMaker's FailureReason carries the first 1024 characters of /opt/ml/output/failure.
FAILURE_FILE_CHARS = 1024


class _Layout:
    """The ``/opt/ml`` stand-in of one training job."""

    def __init__(self, root: Path, checkpoints: Path) -> None:
        self.root = root
        self.config = root / "input" / "config"
        self.data = root / "input" / "data"
        self.model = root / "model"
        self.output = root / "output"
        self.output_data = self.output / "data"
        self.code = root / "code"
        self.checkpoints = checkpoints

    @classmethod
    def create(cls, job_dir: Path, request: Mapping[str, Any]) -> _Layout:
        root = _fresh_dir(Path(job_dir))
        local = str((request.get("CheckpointConfig") or {}).get("LocalPath") or DEFAULT_CHECKPOINT_PATH)
        checkpoints = Path(remap(local, root))
        if not checkpoints.resolve().is_relative_to(root.resolve()):
            raise JobError(f"CheckpointConfig.LocalPath {local} is outside /opt/ml: not supported locally")
        layout = cls(root, checkpoints)
        for d in (layout.config, layout.data, layout.model, layout.output_data, layout.code, checkpoints):
            d.mkdir(parents=True, exist_ok=True)
        return layout


def _install_code(hyperparameters: Mapping[str, str], code_dir: Path, artifacts: ArtifactStore) -> None:
    """Extract ``sagemaker_submit_directory`` into ``code/`` (the toolkit then skips its own S3 download)."""
    program = decode_hyperparameter(hyperparameters.get("sagemaker_program", ""))
    submit_dir = decode_hyperparameter(hyperparameters.get("sagemaker_submit_directory", ""))
    if not program or not submit_dir:
        raise JobError("training request has no sagemaker_program/sagemaker_submit_directory hyperparameters: "
                       "the local engine runs script-mode (framework) estimators only")
    bundle = artifacts.path(str(submit_dir))
    if not bundle.is_file():
        raise JobError(f"code bundle {submit_dir} not found in the artifact store ({bundle})")
    safe_extract(bundle, code_dir)
    entry = (code_dir / str(program)).resolve()
    if not entry.is_file() or not entry.is_relative_to(code_dir.resolve()):
        raise JobError(f"sagemaker_program {program!r} is not a file of {submit_dir}")


def _fetch_channels(request: Mapping[str, Any], data_dir: Path, artifacts: ArtifactStore) -> dict[str, Any]:
    """Materialise every S3 channel under ``input/data/<channel>``; return ``inputdataconfig.json``."""
    default_mode = (request.get("AlgorithmSpecification") or {}).get("TrainingInputMode", "File")
    channels: dict[str, Any] = {}
    for channel in request.get("InputDataConfig") or []:
        name = channel["ChannelName"]
        source = channel.get("DataSource", {}).get("S3DataSource") or {}
        uri = source.get("S3Uri")
        if not uri:
            raise JobError(f"channel {name} has no S3DataSource.S3Uri (only S3 data sources run locally)")
        fetch(artifacts, str(uri), data_dir / name)
        channels[name] = {"ContentType": channel.get("ContentType", ""),
                          "TrainingInputMode": channel.get("InputMode", default_mode),
                          "S3DistributionType": source.get("S3DataDistributionType", "FullyReplicated"),
                          "RecordWrapperType": channel.get("RecordWrapperType", "None")}
    return channels


def _resource_config(resource: Mapping[str, Any]) -> dict[str, Any]:
    """``resourceconfig.json`` of a one-instance job."""
    instance_type = str(resource.get("InstanceType", "local"))
    return {"current_host": CURRENT_HOST, "current_instance_type": instance_type,
            "current_group_name": "homogeneousCluster", "hosts": [CURRENT_HOST],
            "instance_groups": [{"instance_group_name": "homogeneousCluster", "instance_type": instance_type,
                                 "hosts": [CURRENT_HOST]}],
            "network_interface_name": "eth0"}


def _write_input_config(layout: _Layout, hyperparameters: Mapping[str, str], channels: Mapping[str, Any],
                        resource_config: Mapping[str, Any]) -> None:
    for name, content in (("hyperparameters.json", hyperparameters), ("inputdataconfig.json", channels),
                          ("resourceconfig.json", resource_config)):
        (layout.config / name).write_text(json.dumps(content, indent=2))


def _container_env(request: Mapping[str, Any], job_name: str, layout: _Layout) -> dict[str, str]:
    """The training container's environment, before the toolkit adds its ``SM_*`` variables.

    The engine's environment (minus the toolkit's inputs and ``SM_*``), the image's ``ENV``, the request's
    ``Environment``, the platform's job variables, then the local stand-ins (module docstring, "Differences").
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_") and k not in TOOLKIT_INPUT_ENV}
    env.update(IMAGE_ENV)
    if envs.spec_for((request.get("AlgorithmSpecification") or {}).get("TrainingImage")) is not None:
        # Another framework's image (scikit-learn, XGBoost script mode): its framework module is not installable;
        # without one the toolkit runs the entry point itself, which is all those modules do.
        env.pop("SAGEMAKER_TRAINING_MODULE")
    env.update({str(k): str(v) for k, v in (request.get("Environment") or {}).items()})
    env.update({"TRAINING_JOB_NAME": job_name, "TRAINING_JOB_ARN": _arn("training-job", job_name),
                "SAGEMAKER_BASE_DIR": str(layout.root), "SM_STUDIO_LOCAL_MODE": "True",
                "SM_CHECKPOINT_DIR": str(layout.checkpoints)})
    return env


def image_environment(image_uri: str | None, log_path: Path) -> envs.ImageEnvironment | None:
    """The environment of the job's image (built once and cached, :mod:`envs`), ``None`` for the project's own;
    what was chosen goes to the job's log. :class:`JobError` naming the package when it cannot be built."""
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"[engine] {message}\n")

    try:
        return envs.for_image(image_uri, log=say)
    except envs.EnvironmentUnavailable as exc:
        raise JobError(str(exc)) from exc


#: The built-in XGBoost algorithm, run with the open-source ``xgboost`` package (``python <it> train``).
XGBOOST_ALGORITHM = Path(__file__).with_name("xgboost_algorithm.py")

Command = Callable[[job_env.JobEnvironment], list[str]]


def _python_in(jenv: job_env.JobEnvironment, argv: list[str]) -> list[str]:
    """``argv`` with a leading ``python``/``python3[.x]`` (a container's interpreter) replaced by the job's."""
    if argv and re.fullmatch(r"python(3(\.\d+)?)?", Path(argv[0]).name):
        return [str(jenv.python), *argv[1:]]
    return argv


def training_command(request: Mapping[str, Any], hyperparameters: Mapping[str, str], root: Path) -> Command:
    """What the training image would run: its ``ContainerEntrypoint``; the training toolkit (script mode,
    ``sagemaker_program``); or the built-in XGBoost algorithm. :class:`JobError` for other built-in algorithms."""
    spec = request.get("AlgorithmSpecification") or {}
    entrypoint = [str(x) for x in spec.get("ContainerEntrypoint") or []]
    if entrypoint:
        argv = [remap(x, root) for x in entrypoint + [str(x) for x in spec.get("ContainerArguments") or []]]
        return lambda jenv: _python_in(jenv, argv)
    if decode_hyperparameter(hyperparameters.get("sagemaker_program", "")):
        return lambda jenv: [str(jenv.python), str(jenv.train)]
    uri = str(spec.get("TrainingImage") or "")
    image = images.parse(uri)
    if image.algorithm and image.framework == "xgboost":
        return lambda jenv: [str(jenv.python), str(XGBOOST_ALGORITHM), "train"]
    if image.algorithm:
        raise JobError(f"the built-in {image.framework} algorithm ({uri}) does not run locally: of SageMaker's "
                       "built-in algorithms only XGBoost does (through the open-source xgboost package)")
    if spec.get("AlgorithmName"):
        raise JobError(f"algorithm resource {spec['AlgorithmName']!r} does not run locally (no image to run)")
    raise JobError("training request has no sagemaker_program/sagemaker_submit_directory hyperparameters and no "
                   "ContainerEntrypoint: the local engine runs script-mode (framework) estimators, built-in "
                   "XGBoost and explicit entrypoints")


def metric_definitions(algorithm_specification: Mapping[str, Any]) -> list[Mapping[str, str]]:
    """The job's ``MetricDefinitions``; for the built-in XGBoost algorithm without any, the algorithm's own (what
    SageMaker uses for its ``validation:rmse``-style names)."""
    defined = list(algorithm_specification.get("MetricDefinitions") or [])
    if defined:
        return defined
    image = images.parse(str(algorithm_specification.get("TrainingImage") or ""))
    if image.algorithm and image.framework == "xgboost":
        from pipelines.local.jobs import xgboost_algorithm

        return xgboost_algorithm.metric_definitions()
    return []


def _run_in_job_env(command: Command, env: Mapping[str, str], root: Path, log_path: Path, *,
                    base: envs.ImageEnvironment | None, on_line: OnLine | None, control: JobControl | None,
                    timeout_s: float | None, warm_start: bool = True) -> int:
    """Run ``command`` in a fresh job environment beside the job dir (over ``base``, the image's environment, or
    the engine's), with the job dir at ``/opt/ml``; return its exit code."""
    try:
        jenv = job_env.create(job_env.location(root), base=base)
    except (OSError, RuntimeError) as exc:
        raise JobError(f"cannot create the job's Python environment: {exc}") from exc
    env = jenv.environ(env)
    if warm_start and base is None and (sock := warm.ZYGOTES.socket_for(env)):
        env[warm.SOCKET_ENV] = sock
        with open(log_path, "a", encoding="utf-8") as log:
            log.write("[engine] warm start: the job's python processes fork from a zygote that has imported torch "
                      f"(pipelines.local.jobs.zygote; {ENABLE_WARM_HINT})\n")
    try:
        return run_command(command(jenv), cwd=root, env=env, log_path=log_path, on_line=on_line,
                           control=control, timeout_s=timeout_s, opt_ml=root)
    finally:
        jenv.remove()


def _copy_tree_atomic(src: Path, dest: Path) -> None:
    """Copy every file of ``src`` into ``dest`` (real copies, each replaced atomically); nothing is deleted."""
    for path in sorted(src.rglob("*")):
        if path.is_file():
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            shutil.copy2(path, tmp)
            tmp.replace(target)


def _sync_checkpoints(request: Mapping[str, Any], layout: _Layout, artifacts: ArtifactStore, *,
                      upload: bool) -> None:
    """CheckpointConfig: ``S3Uri`` -> checkpoints dir before the run, and back after it (spot resume)."""
    uri = (request.get("CheckpointConfig") or {}).get("S3Uri")
    if not uri:
        return
    remote = artifacts.path(str(uri))
    if upload:
        _copy_tree_atomic(layout.checkpoints, remote)
    elif remote.is_dir():
        _copy_tree_atomic(remote, layout.checkpoints)


def _run_job(request: Mapping[str, Any], env: Mapping[str, str], layout: _Layout, artifacts: ArtifactStore,
             log_path: Path, command: Command, *, on_line: OnLine | None, control: JobControl | None) -> int:
    timeout = (request.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds")
    base = image_environment((request.get("AlgorithmSpecification") or {}).get("TrainingImage"), log_path)
    _sync_checkpoints(request, layout, artifacts, upload=False)
    # A ContainerEntrypoint (the SDK's @step jobs) starts cold: its bootstrap pip-installs the function's requirements
    # (numpy 2, pandas 3) and then imports pandas in the same process, which a warm one does over the preloaded numpy
    # 1.26 (docs/JOB_ENVIRONMENTS.md, Warm starts; zygote.ShadowWatch says so when it happens elsewhere).
    entrypoint = bool((request.get("AlgorithmSpecification") or {}).get("ContainerEntrypoint"))
    try:
        return _run_in_job_env(command, env, layout.root, log_path, base=base, on_line=on_line, control=control,
                               timeout_s=float(timeout) if timeout else None, warm_start=not entrypoint)
    finally:  # also when the job failed or was stopped: that is what resuming relies on
        _sync_checkpoints(request, layout, artifacts, upload=True)


def training_failure_reason(job_dir: Path, log_path: Path, code: int) -> str:
    """SageMaker's ``FailureReason`` shape: ``AlgorithmError: <output/failure>, exit code: <n>``.

    The toolkit writes ``output/failure`` (``ExecuteUserScriptError:\\nExitCode ...`` when the script fails); when it
    could not (killed, crashed at start) the last log lines stand in.
    A toolkit killed by a signal ends with ``killed by SIGKILL`` (the signal's name) instead of the exit code.
    """
    failure = Path(job_dir) / "output" / "failure"
    text = failure.read_text(errors="replace").strip() if failure.is_file() else ""
    if not text and log_path.is_file():
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith(("[engine]", "$ "))]
        text = " | ".join(lines[-3:])
    ending = f"exit code: {code}" if code >= 0 else describe_exit(code)  # killed by a signal: named
    if text.startswith(("ClientError:", "AlgorithmError:")):  # a built-in algorithm names its error class itself
        return f"{text[:FAILURE_FILE_CHARS]}, {ending}"
    return f"AlgorithmError: {text[:FAILURE_FILE_CHARS]}, {ending}"


def _upload_outputs(request: Mapping[str, Any], job_name: str, layout: _Layout, hyperparameters: Mapping[str, str],
                    artifacts: ArtifactStore) -> tuple[str, str]:
    """``model/`` -> ``model.tar.gz``, ``output/data`` -> ``output.tar.gz`` under ``<S3OutputPath>/<job>/output/``."""
    output_path = str((request.get("OutputDataConfig") or {}).get("S3OutputPath", "")).rstrip("/")
    if not output_path:
        raise JobError("training request has no OutputDataConfig.S3OutputPath")
    model_uri = f"{output_path}/{job_name}/output/model.tar.gz"
    _tar_dir(layout.model, artifacts.path(model_uri))
    output_uri = f"{output_path}/{job_name}/output/output.tar.gz"
    _tar_dir(layout.output_data, artifacts.path(output_uri))
    intermediate = layout.output / "intermediate"
    s3_output = decode_hyperparameter(hyperparameters.get("sagemaker_s3_output", ""))
    if s3_output and intermediate.is_dir() and any(intermediate.iterdir()):
        artifacts.copy_in(intermediate, f"{str(s3_output).rstrip('/')}/{job_name}/output/intermediate")
    return model_uri, output_uri


@functools.cache
def described_request_fields(create: str, describe: str) -> frozenset[str]:
    """The members of the ``create`` request (``CreateTrainingJob``) that ``describe`` (``DescribeTrainingJob``)
    returns, from botocore's SageMaker model."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    return (frozenset(model.operation_model(create).input_shape.members)
            & frozenset(model.operation_model(describe).output_shape.members))


def _describe(request: Mapping[str, Any], job_name: str, layout: _Layout, log_path: Path, started: float,
              hyperparameters: Mapping[str, str], uris: tuple[str, str]) -> dict[str, Any]:
    """DescribeTrainingJob: the request's fields as SageMaker echoes them (DebugHookConfig, CheckpointConfig...),
    then the job's outcome."""
    log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    definitions = metric_definitions(request.get("AlgorithmSpecification") or {})
    ended = time.time()
    fields = described_request_fields("CreateTrainingJob", "DescribeTrainingJob")
    described = {k: v for k, v in request.items() if k in fields}
    return {
        "AlgorithmSpecification": {}, "InputDataConfig": [], "OutputDataConfig": {}, "StoppingCondition": {},
        **described,
        "TrainingJobName": job_name,
        "TrainingJobArn": _arn("training-job", job_name),
        "TrainingJobStatus": "Completed",
        "SecondaryStatus": "Completed",
        "HyperParameters": dict(hyperparameters),
        "RoleArn": request.get("RoleArn"),
        "ResourceConfig": dict(request.get("ResourceConfig") or request.get("HyperParameterTuningResourceConfig")
                               or {}),
        "ModelArtifacts": {"S3ModelArtifacts": uris[0]},
        "OutputDataUri": uris[1],
        "FinalMetricDataList": final_metrics(log_text, definitions),
        "TrainingStartTime": started,
        "TrainingEndTime": ended,
        "TrainingTimeInSeconds": int(ended - started),
        "BillableTimeInSeconds": int(ended - started),
        "LocalJobDir": str(layout.root),
        "LogPath": str(log_path),
    }


def run_training_job(request: Mapping[str, Any], job_name: str, job_dir: Path, artifacts: ArtifactStore,
                     log_path: Path, *, on_line: OnLine | None = None, control: JobControl | None = None,
                     extra_env: Mapping[str, str] | None = None,
                     prepare: Callable[[Path], Mapping[str, str] | None] | None = None) -> dict[str, Any]:
    """Run a resolved CreateTrainingJob request under the SageMaker training toolkit; return the
    DescribeTrainingJob-shaped result.

    ``prepare(job_dir)`` runs once the job directory is laid out (e.g. to write the Debugger hook config) and may
    return extra environment variables (applied after ``extra_env``). Raises :class:`JobError` (with the failure
    reason) or :class:`JobStopped`.
    """
    started = time.time()
    layout = _Layout.create(Path(job_dir), request)
    hyperparameters = {str(k): str(v) for k, v in (request.get("HyperParameters") or {}).items()}
    command = training_command(request, hyperparameters, layout.root)
    if decode_hyperparameter(hyperparameters.get("sagemaker_program", "")):
        _install_code(hyperparameters, layout.code, artifacts)
    channels = _fetch_channels(request, layout.data, artifacts)
    resource = request.get("ResourceConfig") or request.get("HyperParameterTuningResourceConfig") or {}
    _write_input_config(layout, hyperparameters, channels, _resource_config(resource))
    if decode_hyperparameter(hyperparameters.get("sagemaker_s3_output", "")):
        (layout.output / "intermediate").mkdir()  # the toolkit leaves the sync to "the platform" (the engine)
    env = _container_env(request, job_name, layout)
    env.update({str(k): str(v) for k, v in (extra_env or {}).items()})
    if prepare is not None:
        env.update({str(k): str(v) for k, v in (prepare(layout.root) or {}).items()})
    code = _run_job(request, env, layout, artifacts, log_path, command, on_line=on_line, control=control)
    if code != 0:
        raise JobError(training_failure_reason(layout.root, log_path, code))
    uris = _upload_outputs(request, job_name, layout, hyperparameters, artifacts)
    return _describe(request, job_name, layout, log_path, started, hyperparameters, uris)


# --- processing -----------------------------------------------------------------------------------------------

_OPT_ML = re.compile(r"(^|[=:,\s])/opt/ml(?=/|$)")


def remap(value: str, job_dir: Path) -> str:
    """Rewrite ``/opt/ml`` at the start of a path (or after ``=``/``:``/``,``) into ``job_dir``."""
    return _OPT_ML.sub(lambda m: m.group(1) + str(job_dir), value)


def run_processing_job(request: Mapping[str, Any], job_name: str, job_dir: Path, artifacts: ArtifactStore,
                       log_path: Path, *, on_line: OnLine | None = None,
                       control: JobControl | None = None) -> dict[str, Any]:
    """Run a resolved CreateProcessingJob request; return the DescribeProcessingJob-shaped result (inputs and
    outputs keyed by name, as the pipeline's property references expect)."""
    started = time.time()
    job_dir = _fresh_dir(Path(job_dir))
    inputs: dict[str, Any] = {}
    for item in request.get("ProcessingInputs") or []:
        name = item.get("InputName", "")
        s3 = item.get("S3Input")
        if not s3:
            raise JobError(f"processing input {name!r}: only S3Input is supported locally")
        local = Path(remap(str(s3["LocalPath"]), job_dir))
        if not local.is_relative_to(job_dir):
            raise JobError(f"processing input {name!r}: LocalPath {s3['LocalPath']} is outside /opt/ml")
        fetch(artifacts, str(s3["S3Uri"]), local)
        inputs[name] = item
    outputs: dict[str, Any] = {}
    output_dirs: list[tuple[str, Path, str]] = []
    for item in (request.get("ProcessingOutputConfig") or {}).get("Outputs") or []:
        name = item.get("OutputName", "")
        s3 = item.get("S3Output")
        if not s3:
            raise JobError(f"processing output {name!r}: only S3Output is supported locally")
        local = Path(remap(str(s3["LocalPath"]), job_dir))
        local.mkdir(parents=True, exist_ok=True)
        output_dirs.append((name, local, str(s3["S3Uri"])))
        outputs[name] = item
    config_dir = job_dir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "processingjobconfig.json").write_text(json.dumps({"ProcessingJobName": job_name, **request},
                                                                    indent=2, default=str))
    (config_dir / "resourceconfig.json").write_text(json.dumps({"current_host": CURRENT_HOST,
                                                                "hosts": [CURRENT_HOST]}))

    app = request.get("AppSpecification") or {}
    entrypoint = [str(x) for x in app.get("ContainerEntrypoint") or []]
    arguments = [str(x) for x in app.get("ContainerArguments") or []]
    if not entrypoint:
        raise JobError("AppSpecification.ContainerEntrypoint is required to run a processing job locally "
                       "(the image's default entrypoint is unknown without Docker)")
    cmd = [remap(x, job_dir) for x in entrypoint + arguments]
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (request.get("Environment") or {}).items()})
    env["PYTHONUNBUFFERED"] = "1"
    env["PROCESSING_JOB_NAME"] = job_name
    timeout = (request.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds")
    base = image_environment(app.get("ImageUri"), log_path)
    code = _run_in_job_env(lambda jenv: _python_in(jenv, cmd), env, job_dir, log_path, base=base, on_line=on_line,
                           control=control, timeout_s=float(timeout) if timeout else None)
    if code != 0:
        raise JobError(_failure_message(job_dir, log_path, code))
    for _name, local, uri in output_dirs:
        artifacts.copy_in(local, uri)
    return {
        "ProcessingJobName": job_name,
        "ProcessingJobArn": _arn("processing-job", job_name),
        "ProcessingJobStatus": "Completed",
        "ExitMessage": "",
        "ProcessingInputs": inputs,
        "ProcessingOutputConfig": {"Outputs": outputs},
        "AppSpecification": app,
        "Environment": request.get("Environment", {}),
        "ProcessingResources": request.get("ProcessingResources", {}),
        "RoleArn": request.get("RoleArn"),
        "ProcessingStartTime": started,
        "ProcessingEndTime": time.time(),
        "LocalJobDir": str(job_dir),
        "LogPath": str(log_path),
    }
