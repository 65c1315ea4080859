"""Local training jobs run under SageMaker's own training toolkit (``train`` of the PyTorch training image).

Tiny user scripts (no torch training) in a ``sourcedir.tar.gz`` built like the CLI's bundles, in the artifact store
of a temporary ``MLOPS_HOME``, run through :func:`pipelines.local.jobs.runtime.run_training_job` as the engine's
``_step_training`` calls it. The probe script dumps its ``sys.argv``, interpreter and every ``SM_*`` variable; the
expectation is computed by the toolkit itself (``Environment().to_env_vars()`` / ``to_cmd_args()`` for the same job
dir), not written down here.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import io
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

from pipelines.local.jobs import environment as job_env
from pipelines.local.jobs import runtime as jobs
from pipelines.local.storage.store import ArtifactStore
from pipelines.packaging import deterministic_tar_gz

BUCKET = "s3://mlops-local/toolkit-test"

PROBE = '''
import json, os, sys
out = os.environ["SM_OUTPUT_DATA_DIR"]
probe = {"argv": sys.argv, "executable": sys.executable, "prefix": sys.prefix,
         "env": {k: v for k, v in os.environ.items() if k.startswith("SM_")}}
try:
    import mlops_probe_pkg
    probe["probe_pkg"] = mlops_probe_pkg.__file__
except ImportError:
    probe["probe_pkg"] = None
ckpt = os.environ["SM_CHECKPOINT_DIR"]
before = os.path.join(ckpt, "before.txt")
probe["checkpoint_before"] = open(before).read() if os.path.exists(before) else None
with open(os.path.join(ckpt, "written.txt"), "w") as fh:
    fh.write("written by the job")
with open(os.path.join(out, "probe.json"), "w") as fh:
    json.dump(probe, fh)
print("epoch=1 valid_accuracy=0.5000;", flush=True)
if os.environ.get("PROBE_FAIL"):
    raise ValueError("probe failure " + os.environ["PROBE_FAIL"])
if os.environ.get("PROBE_WAIT"):
    print("waiting to be stopped", flush=True)
    import time
    time.sleep(120)
'''

ARGPARSE = '''
import argparse
parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, required=True)
parser.parse_args()
'''

HYPERPARAMETERS = {"epochs": "3", "batch_size": '"64"', "lr": "0.001", "optimizer": '"adamw"', "arch": "resnet18",
                   "sagemaker_container_log_level": "20", "sagemaker_region": '"us-east-1"'}


@pytest.fixture
def store(tmp_path, monkeypatch) -> ArtifactStore:
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "home"))
    artifacts = ArtifactStore()
    artifacts.put_bytes(f"{BUCKET}/data/train/sample.txt", b"one record")
    return artifacts


def _wheel() -> bytes:
    """A minimal pure-Python wheel ``mlops-probe-pkg 0.1`` (installed by the toolkit's pip step)."""
    files = {"mlops_probe_pkg/__init__.py": b"VALUE = 42\n",
             "mlops_probe_pkg-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: mlops-probe-pkg\nVersion: 0.1\n",
             "mlops_probe_pkg-0.1.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for name, data in files.items()]
    files["mlops_probe_pkg-0.1.dist-info/RECORD"] = ("\n".join([*record, "mlops_probe_pkg-0.1.dist-info/RECORD,,"])
                                                      + "\n").encode()
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return raw.getvalue()


def _bundle(store: ArtifactStore, files: dict[str, bytes]) -> str:
    uri = f"{BUCKET}/code/{hashlib.sha256(repr(sorted(files.items())).encode()).hexdigest()[:12]}/sourcedir.tar.gz"
    store.put_bytes(uri, deterministic_tar_gz(files))
    return uri


def _request(bundle: str, program: str = "probe.py", hyperparameters: dict[str, str] | None = None,
             **extra) -> dict:
    return {
        "AlgorithmSpecification": {"TrainingImage": "pytorch-training:2.5-cpu", "TrainingInputMode": "File",
                                   "MetricDefinitions": [{"Name": "valid_accuracy",
                                                          "Regex": r"valid_accuracy=([0-9\.]+)"}]},
        "HyperParameters": {**(HYPERPARAMETERS if hyperparameters is None else hyperparameters),
                            "sagemaker_program": json.dumps(program),
                            "sagemaker_submit_directory": json.dumps(bundle)},
        "RoleArn": "arn:aws:iam::000000000000:role/MLOpsLocalExecutionRole",
        "InputDataConfig": [{"ChannelName": "train", "ContentType": "text/plain", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": f"{BUCKET}/data/train", "S3DataDistributionType": "FullyReplicated"}}}],
        "OutputDataConfig": {"S3OutputPath": f"{BUCKET}/output"},
        "ResourceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 5},
        "StoppingCondition": {"MaxRuntimeInSeconds": 300},
        **extra,
    }


def _run(store: ArtifactStore, tmp_path: Path, request: dict, name: str = "toolkit-job", **kwargs) -> dict:
    return jobs.run_training_job(request, name, tmp_path / "runs" / name, store, tmp_path / f"{name}.log", **kwargs)


def _probe(job_dir: Path) -> dict:
    return json.loads((Path(job_dir) / "output" / "data" / "probe.json").read_text())


@pytest.fixture
def toolkit_expectation(monkeypatch):
    """``compute(job_dir, job_name)``: what the toolkit computes for a job dir, in this process -- its env vars,
    argv and ``Environment``.

    The toolkit binds its paths at import time from ``SAGEMAKER_BASE_DIR`` (and creates dirs under ``$HOME`` when
    it is unset), hence the variable is set first and the module (re)loaded; the toolkit modules this loads are
    dropped afterwards. The process environment is the job's as far as the toolkit reads it (its inputs,
    ``SAGEMAKER_TRAINING_MODULE``, ``TRAINING_JOB_NAME``); what ``Environment()`` writes there is undone.
    """
    loaded = {name for name in sys.modules if name.startswith("sagemaker_training")}

    def compute(job_dir: Path, job_name: str):
        for key in [k for k in os.environ if k.startswith("SM_")] + list(jobs.TOOLKIT_INPUT_ENV):
            monkeypatch.setenv(key, "")  # recorded, so that the value Environment() writes is undone afterwards
            monkeypatch.delenv(key)
        monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(job_dir))
        monkeypatch.setenv("SAGEMAKER_TRAINING_MODULE", jobs.FRAMEWORK_MODULE)
        monkeypatch.setenv("TRAINING_JOB_NAME", job_name)
        environment = importlib.reload(importlib.import_module("sagemaker_training.environment"))
        env = environment.Environment()
        return env.to_env_vars(), env.to_cmd_args(), env

    yield compute
    for name in [n for n in sys.modules if n.startswith("sagemaker_training") and n not in loaded]:
        del sys.modules[name]


def test_script_gets_the_toolkit_env_argv_and_training_env(store, tmp_path, toolkit_expectation):
    bundle = _bundle(store, {"probe.py": PROBE.encode()})
    result = _run(store, tmp_path, _request(bundle))
    job_dir = Path(result["LocalJobDir"])
    probe = _probe(job_dir)
    expected_env, expected_args, environment = toolkit_expectation(job_dir, "toolkit-job")

    # the documented exceptions (jobs module docstring): two engine stand-ins, one set by the PyTorch toolkit
    import torch
    expected_env.update({"SM_CHECKPOINT_DIR": str(job_dir / "checkpoints"), "SM_STUDIO_LOCAL_MODE": "True",
                         "SM_DLC_TORCH_VERSION": torch.__version__})
    assert probe["env"] == expected_env
    assert probe["argv"] == ["probe.py", *expected_args]
    assert expected_args == ["--arch", "resnet18", "--batch_size", "64", "--epochs", "3", "--lr", "0.001",
                             "--optimizer", "adamw"]  # sorted, JSON-decoded: the toolkit's own rendering
    training_env = json.loads(probe["env"]["SM_TRAINING_ENV"])
    assert set(training_env) == set(environment.properties()) and len(training_env) == len(environment)
    assert training_env["module_dir"] == bundle and probe["env"]["SM_MODULE_NAME"] == "probe"
    assert training_env["job_name"] == "toolkit-job" and training_env["current_host"] == "algo-1"
    assert Path(probe["prefix"]) == job_env.location(job_dir) != Path(sys.prefix)
    assert not job_env.location(job_dir).exists()  # removed with the job
    assert (job_dir / "output" / "success").is_file()
    assert result["TrainingJobStatus"] == "Completed"
    assert [m["Value"] for m in result["FinalMetricDataList"]] == [0.5]
    assert store.exists(result["ModelArtifacts"]["S3ModelArtifacts"]) and store.exists(result["OutputDataUri"])


def test_requirements_are_installed_by_the_toolkit_into_the_job_environment(store, tmp_path):
    wheel = "wheels/mlops_probe_pkg-0.1-py3-none-any.whl"
    bundle = _bundle(store, {"probe.py": PROBE.encode(), wheel: _wheel(),
                             "requirements.txt": f"psutil\n./{wheel}\n".encode()})
    # no package index at all: an already satisfied requirement and a local wheel need none
    result = _run(store, tmp_path, _request(bundle, Environment={"PIP_NO_INDEX": "1"}))
    probe = _probe(Path(result["LocalJobDir"]))
    log = Path(result["LogPath"]).read_text()
    assert "Installing dependencies from requirements.txt" in log  # the toolkit's own step
    assert "Requirement already satisfied: psutil" in log and "Successfully installed mlops-probe-pkg-0.1" in log
    assert probe["prefix"] != sys.prefix and probe["executable"].startswith(probe["prefix"])
    assert Path(probe["probe_pkg"]).is_relative_to(probe["prefix"])
    assert importlib.util.find_spec("mlops_probe_pkg") is None  # nothing landed in the engine's environment


@pytest.mark.parametrize("program, files, hyperparameters, script_exit", [
    ("probe.py", {"probe.py": PROBE.encode()}, None, 1),
    ("train.py", {"train.py": ARGPARSE.encode()}, {"epochs": '"three"'}, 2),
], ids=["raises", "argparse-error"])
def test_failing_script_gives_the_toolkit_failure_reason(store, tmp_path, program, files, hyperparameters,
                                                         script_exit):
    request = _request(_bundle(store, files), program, hyperparameters, Environment={"PROBE_FAIL": "4321"})
    with pytest.raises(jobs.JobError) as failed:
        _run(store, tmp_path, request)
    reason = str(failed.value)
    failure = (tmp_path / "runs" / "toolkit-job" / "output" / "failure").read_text()
    assert reason == f"AlgorithmError: {failure}, exit code: 1"  # the toolkit (train) exits 1 on a ClientError
    assert failure.startswith(f"ExecuteUserScriptError:\nExitCode {script_exit}\nErrorMessage ")
    assert f'Command "{job_env.location(tmp_path / "runs" / "toolkit-job")}/bin/python {program} ' in failure
    if script_exit == 1:
        # the toolkit reads stderr in chunks; an unbuffered traceback (the image sets PYTHONUNBUFFERED) may reach
        # it as "ValueError" and ": probe failure 4321" in two reads, which it keeps as two lines
        assert "ValueError" in failure and "probe failure 4321" in failure
    else:  # argparse's "error:" is none of the error names the toolkit looks for: its ErrorMessage stays empty
        assert 'ErrorMessage ""' in failure
        assert "argument --epochs: invalid int value: 'three'" in (tmp_path / "toolkit-job.log").read_text()


def test_checkpoints_round_trip_through_the_checkpoint_s3_uri(store, tmp_path):
    ckpt = f"{BUCKET}/checkpoints/job"
    store.put_bytes(f"{ckpt}/before.txt", b"from an earlier attempt")
    bundle = _bundle(store, {"probe.py": PROBE.encode()})
    result = _run(store, tmp_path, _request(bundle, CheckpointConfig={"S3Uri": ckpt}))
    assert _probe(Path(result["LocalJobDir"]))["checkpoint_before"] == "from an earlier attempt"
    assert store.path(f"{ckpt}/written.txt").read_text() == "written by the job"
    assert store.path(f"{ckpt}/before.txt").read_text() == "from an earlier attempt"
    assert result["CheckpointConfig"] == {"S3Uri": ckpt}


@pytest.mark.parametrize("how", ["failed", "stopped"])
def test_checkpoints_are_uploaded_when_the_job_fails_or_is_stopped(store, tmp_path, how):
    ckpt = f"{BUCKET}/checkpoints/{how}"
    bundle = _bundle(store, {"probe.py": PROBE.encode()})
    env = {"PROBE_FAIL": "1"} if how == "failed" else {"PROBE_WAIT": "1"}
    request = _request(bundle, Environment=env,
                       CheckpointConfig={"S3Uri": ckpt, "LocalPath": "/opt/ml/checkpoints/custom"})
    expected = jobs.JobError if how == "failed" else jobs.JobStopped
    with pytest.raises(expected):
        _run(store, tmp_path, request, on_line=lambda line: line == "waiting to be stopped")
    probe = _probe(tmp_path / "runs" / "toolkit-job")
    assert probe["env"]["SM_CHECKPOINT_DIR"] == str(tmp_path / "runs" / "toolkit-job" / "checkpoints" / "custom")
    assert store.path(f"{ckpt}/written.txt").read_text() == "written by the job"
