"""Processing and training jobs as local subprocesses under SageMaker's container contract.

Each job gets a working directory standing in for the container's ``/opt/ml`` (``runs/<execution>/<step>/``):

- training: ``input/config/{hyperparameters,inputdataconfig,resourceconfig}.json``, ``input/data/<channel>/``,
  ``model/``, ``output/data/``, ``checkpoints/``, ``code/`` (the extracted ``sagemaker_submit_directory``); the
  script runs as ``python <sagemaker_program> --name value ...`` with the ``SM_*`` environment the SageMaker training
  toolkit sets; afterwards ``model/`` is packed as ``<S3OutputPath>/<job>/output/model.tar.gz`` and ``output/data``
  as ``output.tar.gz``, as SageMaker does;
- processing: every ``/opt/ml/...`` path of the request (inputs' and outputs' ``LocalPath``, the entrypoint and its
  arguments) is rewritten into the job directory; inputs are copied from the artifact store before the run and the
  outputs uploaded to their ``S3Uri`` after it.

Logs (stdout + stderr) go to a file per job and, line by line, to an ``on_line`` callback (progress view, tuner).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipelines.local import store as store_mod
from pipelines.local.resolver import decode_hyperparameter, hyperparameter_arg
from pipelines.local.store import ArtifactStore
from training.archives import safe_extract

logger = logging.getLogger(__name__)

OnLine = Callable[[str], bool | None]
CURRENT_HOST = "algo-1"


class JobError(RuntimeError):
    """A job could not run or exited with an error; ``str()`` is the failure reason."""


class JobStopped(RuntimeError):
    """A job was stopped on request (``stop``, pruning, or its MaxRuntimeInSeconds)."""


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
            kill_tree(proc.pid)

    @property
    def stopped(self) -> bool:
        return self.stop_event.is_set()


def kill_tree(pid: int) -> None:
    """Kill a process and all its descendants (DataLoader workers included)."""
    try:
        import psutil

        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
    except Exception:  # noqa: BLE001 -- the process may already be gone
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def run_command(cmd: list[str], *, cwd: Path, env: Mapping[str, str], log_path: Path,
                on_line: OnLine | None = None, control: JobControl | None = None,
                timeout_s: float | None = None) -> int:
    """Run ``cmd``, teeing stdout+stderr line by line to ``log_path`` and ``on_line``.

    ``on_line`` returning True kills the process (``JobStopped``); so do ``control.stop()`` and ``timeout_s``.
    Returns the exit code otherwise. The child stays in the engine's process group, so killing the engine's group
    kills its jobs too.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stop_reason: list[str] = []
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1, errors="replace")
        except OSError as exc:
            raise JobError(f"cannot start {cmd[0]}: {exc}") from exc
        if control is not None:
            control.register(proc)
        done = threading.Event()

        def watchdog() -> None:
            deadline = time.monotonic() + timeout_s if timeout_s else None
            while not done.wait(0.2):
                if control is not None and control.stopped:
                    stop_reason.append("stopped on request")
                    kill_tree(proc.pid)
                    return
                if deadline is not None and time.monotonic() > deadline:
                    stop_reason.append(f"MaxRuntimeInSeconds ({timeout_s:.0f}s) exceeded")
                    kill_tree(proc.pid)
                    return

        watcher = threading.Thread(target=watchdog, daemon=True)
        watcher.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if on_line is not None and not stop_reason:
                    try:
                        if on_line(line.rstrip("\n")):
                            stop_reason.append("stopped early (pruned)")
                            kill_tree(proc.pid)
                    except Exception:  # noqa: BLE001 -- a broken observer must not break the job
                        logger.exception("log observer failed")
            code = proc.wait()
        finally:
            done.set()
            if control is not None:
                control.unregister(proc)
            if proc.poll() is None:
                kill_tree(proc.pid)
        if stop_reason:
            log.write(f"[engine] job {stop_reason[0]}\n")
            raise JobStopped(stop_reason[0])
        log.write(f"[engine] exit code {code}\n")
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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
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
                 and not ln.startswith("[engine]")]
        tail = " | ".join(lines[-3:])
    return f"AlgorithmError: exit code {code}: {tail}"[-2000:]


def _arn(kind: str, name: str) -> str:
    return f"arn:aws:sagemaker:{store_mod.LOCAL_REGION}:{store_mod.LOCAL_ACCOUNT}:{kind}/{name.lower()}"


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _num_gpus() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001
        return 0


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

def run_training_job(request: Mapping[str, Any], job_name: str, job_dir: Path, artifacts: ArtifactStore,
                     log_path: Path, *, on_line: OnLine | None = None, control: JobControl | None = None,
                     extra_env: Mapping[str, str] | None = None,
                     prepare: Callable[[Path], Mapping[str, str] | None] | None = None) -> dict[str, Any]:
    """Run a resolved CreateTrainingJob request; return the DescribeTrainingJob-shaped result.

    ``prepare(job_dir)`` runs once the job directory is laid out (e.g. to write the Debugger hook config) and may
    return extra environment variables. Raises :class:`JobError` (with the failure reason) or :class:`JobStopped`.
    """
    started = time.time()
    job_dir = _fresh_dir(Path(job_dir))
    config_dir = job_dir / "input" / "config"
    data_dir = job_dir / "input" / "data"
    model_dir = job_dir / "model"
    output_dir = job_dir / "output"
    output_data_dir = output_dir / "data"
    checkpoint_dir = job_dir / "checkpoints"
    code_dir = job_dir / "code"
    for d in (config_dir, data_dir, model_dir, output_data_dir, checkpoint_dir, code_dir):
        d.mkdir(parents=True, exist_ok=True)

    hyperparameters: dict[str, str] = {k: str(v) for k, v in (request.get("HyperParameters") or {}).items()}
    program = decode_hyperparameter(hyperparameters.get("sagemaker_program", ""))
    submit_dir = decode_hyperparameter(hyperparameters.get("sagemaker_submit_directory", ""))
    if not program or not submit_dir:
        raise JobError("training request has no sagemaker_program/sagemaker_submit_directory hyperparameters: "
                       "the local engine runs script-mode (framework) estimators only")

    # code
    bundle = artifacts.path(str(submit_dir))
    if not bundle.is_file():
        raise JobError(f"code bundle {submit_dir} not found in the artifact store ({bundle})")
    safe_extract(bundle, code_dir)
    entry = (code_dir / str(program)).resolve()
    if not entry.is_file() or not entry.is_relative_to(code_dir.resolve()):
        raise JobError(f"sagemaker_program {program!r} is not a file of {submit_dir}")

    # channels
    channels: dict[str, Any] = {}
    for channel in request.get("InputDataConfig") or []:
        name = channel["ChannelName"]
        source = channel.get("DataSource", {}).get("S3DataSource") or {}
        uri = source.get("S3Uri")
        if not uri:
            raise JobError(f"channel {name} has no S3DataSource.S3Uri (only S3 data sources run locally)")
        fetch(artifacts, str(uri), data_dir / name)
        channels[name] = {"ContentType": channel.get("ContentType", ""), "TrainingInputMode":
                          channel.get("InputMode", request.get("AlgorithmSpecification", {})
                                      .get("TrainingInputMode", "File")),
                          "S3DistributionType": source.get("S3DataDistributionType", "FullyReplicated"),
                          "RecordWrapperType": channel.get("RecordWrapperType", "None")}
    resource = dict(request.get("ResourceConfig") or request.get("HyperParameterTuningResourceConfig") or {})
    instance_type = str(resource.get("InstanceType", "local"))
    resource_config = {"current_host": CURRENT_HOST, "hosts": [CURRENT_HOST], "network_interface_name": "eth0",
                       "current_instance_type": instance_type, "current_group_name": "homogeneousCluster",
                       "instance_groups": [{"instance_group_name": "homogeneousCluster",
                                            "instance_type": instance_type, "hosts": [CURRENT_HOST]}]}
    (config_dir / "hyperparameters.json").write_text(json.dumps(hyperparameters, indent=2))
    (config_dir / "inputdataconfig.json").write_text(json.dumps(channels, indent=2))
    (config_dir / "resourceconfig.json").write_text(json.dumps(resource_config, indent=2))

    user_hps = {k: decode_hyperparameter(v) for k, v in hyperparameters.items() if not k.startswith("sagemaker_")}
    args: list[str] = []
    for key, value in hyperparameters.items():
        if not key.startswith("sagemaker_"):
            args += [f"--{key}", hyperparameter_arg(value)]

    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (request.get("Environment") or {}).items()})
    num_gpus = _num_gpus()
    env.update({
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join([str(code_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "TRAINING_JOB_NAME": job_name,
        "TRAINING_JOB_ARN": _arn("training-job", job_name),
        "SM_MODEL_DIR": str(model_dir),
        "SM_OUTPUT_DIR": str(output_dir),
        "SM_OUTPUT_DATA_DIR": str(output_data_dir),
        "SM_OUTPUT_INTERMEDIATE_DIR": str(output_dir / "intermediate"),
        "SM_INPUT_DIR": str(job_dir / "input"),
        "SM_INPUT_CONFIG_DIR": str(config_dir),
        "SM_INPUT_DATA_CONFIG": json.dumps(channels),
        "SM_CHECKPOINT_DIR": str(checkpoint_dir),
        "SM_CHANNELS": json.dumps(sorted(channels)),
        "SM_HPS": json.dumps(user_hps),
        "SM_USER_ARGS": json.dumps(args),
        "SM_CURRENT_HOST": CURRENT_HOST,
        "SM_HOSTS": json.dumps([CURRENT_HOST]),
        "SM_NETWORK_INTERFACE_NAME": "eth0",
        "SM_CURRENT_INSTANCE_TYPE": instance_type,
        "SM_RESOURCE_CONFIG": json.dumps(resource_config),
        "SM_NUM_GPUS": str(num_gpus),
        "SM_NUM_CPUS": str(os.cpu_count() or 1),
        "SM_NUM_NEURONS": "0",
        "SM_MODULE_NAME": Path(str(program)).stem,
        "SM_USER_ENTRY_POINT": str(program),
        "SM_MODULE_DIR": str(submit_dir),
        "SM_LOG_LEVEL": str(decode_hyperparameter(hyperparameters.get("sagemaker_container_log_level", "20"))),
        "SM_FRAMEWORK_MODULE": "sagemaker_pytorch_container.training:main",
    })
    for name in channels:
        env[f"SM_CHANNEL_{name.upper()}"] = str(data_dir / name)
    for key, value in user_hps.items():
        env[f"SM_HP_{key.upper().replace('-', '_')}"] = value if isinstance(value, str) else json.dumps(value)
    env.update(dict(extra_env or {}))
    if prepare is not None:
        env.update({str(k): str(v) for k, v in (prepare(job_dir) or {}).items()})
    env["SM_TRAINING_ENV"] = json.dumps({
        "job_name": job_name, "hyperparameters": user_hps, "channel_input_dirs":
        {n: str(data_dir / n) for n in channels}, "model_dir": str(model_dir), "output_data_dir": str(output_data_dir),
        "current_host": CURRENT_HOST, "hosts": [CURRENT_HOST], "num_gpus": num_gpus, "module_dir": str(submit_dir),
        "user_entry_point": str(program)})

    if (code_dir / "requirements.txt").is_file():
        logger.debug("%s: requirements.txt not installed locally (the project environment provides them)", job_name)
    timeout = (request.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds")
    cmd = [sys.executable, str(entry), *args]
    code = run_command(cmd, cwd=code_dir, env=env, log_path=log_path, on_line=on_line, control=control,
                       timeout_s=float(timeout) if timeout else None)
    if code != 0:
        raise JobError(_failure_message(job_dir, log_path, code))

    output_path = str((request.get("OutputDataConfig") or {}).get("S3OutputPath", "")).rstrip("/")
    if not output_path:
        raise JobError("training request has no OutputDataConfig.S3OutputPath")
    model_uri = f"{output_path}/{job_name}/output/model.tar.gz"
    _tar_dir(model_dir, artifacts.path(model_uri))
    output_uri = f"{output_path}/{job_name}/output/output.tar.gz"
    _tar_dir(output_data_dir, artifacts.path(output_uri))
    log_text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    metric_definitions = (request.get("AlgorithmSpecification") or {}).get("MetricDefinitions") or []
    ended = time.time()
    return {
        "TrainingJobName": job_name,
        "TrainingJobArn": _arn("training-job", job_name),
        "TrainingJobStatus": "Completed",
        "SecondaryStatus": "Completed",
        "HyperParameters": hyperparameters,
        "AlgorithmSpecification": request.get("AlgorithmSpecification", {}),
        "RoleArn": request.get("RoleArn"),
        "InputDataConfig": request.get("InputDataConfig", []),
        "OutputDataConfig": request.get("OutputDataConfig", {}),
        "ResourceConfig": resource,
        "StoppingCondition": request.get("StoppingCondition", {}),
        "ModelArtifacts": {"S3ModelArtifacts": model_uri},
        "OutputDataUri": output_uri,
        "FinalMetricDataList": final_metrics(log_text, metric_definitions),
        "TrainingStartTime": started,
        "TrainingEndTime": ended,
        "TrainingTimeInSeconds": int(ended - started),
        "BillableTimeInSeconds": int(ended - started),
        "LocalJobDir": str(job_dir),
        "LogPath": str(log_path),
    }


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
    if Path(cmd[0]).name in ("python", "python3") or re.fullmatch(r"python3(\.\d+)?", Path(cmd[0]).name):
        cmd[0] = sys.executable
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (request.get("Environment") or {}).items()})
    env["PYTHONUNBUFFERED"] = "1"
    env["PROCESSING_JOB_NAME"] = job_name
    timeout = (request.get("StoppingCondition") or {}).get("MaxRuntimeInSeconds")
    code = run_command(cmd, cwd=job_dir, env=env, log_path=log_path, on_line=on_line, control=control,
                       timeout_s=float(timeout) if timeout else None)
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
