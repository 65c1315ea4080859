"""Engine semantics measured in issue 11, each on a tiny definition of its own (the engine runs any definition):

1. a stopped job is recorded ``Stopped``, never ``Succeeded``, and a later start does not reuse it from the cache;
   cache hits follow SageMaker's key semantics (arguments, not data content) and need their outputs;
2. job processes (grandchildren included) die when the engine is killed with SIGKILL;
3. ``MaxRuntimeInSeconds`` stops processing jobs, training jobs and tuning trials with SageMaker's
   ``MaxRuntimeExceeded``; the pipeline's processing steps have one;
4. two engines starting a tuning step together on a fresh ``MLOPS_HOME`` both succeed.

Jobs are small Python scripts (sleeping where a job must be caught running); everything stays on this machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from pipelines.packaging import deterministic_tar_gz

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "SemanticsPipeline"
BASE = "s3://mlops-local/semantics"
ROLE = "arn:aws:iam::000000000000:role/MLOpsLocalExecutionRole"

#: A processing script: with ``<control>/kill`` present it kills itself (SIGKILL); with ``<control>/sleep`` it starts
#: a grandchild, writes both pids and sleeps; otherwise it copies the input data to its output.
WORK = '''
import argparse, json, os, pathlib, subprocess, sys, time
parser = argparse.ArgumentParser()
for flag in ("--control", "--data", "--out"):
    parser.add_argument(flag)
args, _rest = parser.parse_known_args()  # a training job also gets its hyperparameters
control = pathlib.Path(args.control or "/nonexistent")
if (control / "kill").exists():
    import signal
    os.kill(os.getpid(), signal.SIGKILL)
if (control / "sleep").exists():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    tmp = control / ".pids.tmp"
    tmp.write_text(json.dumps([os.getpid(), child.pid]))
    tmp.replace(control / ("pids-" + os.environ.get("PROCESSING_JOB_NAME", os.environ.get("TRAINING_JOB_NAME", ""))))
    print("sleeping", flush=True)
    time.sleep(300)
if args.out:
    text = (pathlib.Path(args.data) / "input.txt").read_text()
    (pathlib.Path(args.out) / "result.txt").write_text(text)
else:  # a training job
    (pathlib.Path(os.environ["SM_MODEL_DIR"]) / "model.txt").write_text("model")
print("epoch=1 valid_accuracy=0.5000;", flush=True)
'''

#: Runs a definition file in a process of its own: ``driver.py DEFINITION [EXECUTION_ID] [GO_FILE]``; with a go
#: file, it touches ``GO_FILE.ready`` and waits for ``GO_FILE`` first (two drivers then start together).
DRIVER = '''
import json, os, sys, time
from pathlib import Path
from pipelines.local.engine.core import LocalEngine
import pipelines.local.engine.tuner  # imported up front (optuna: ~1 s), so that two drivers reach its storage together
definition = Path(sys.argv[1]).read_text()
execution_id = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
if len(sys.argv) > 3:
    go = Path(sys.argv[3])
    Path(f"{go}.ready.{os.getpid()}").touch()
    while not go.exists():
        time.sleep(0.002)
result = LocalEngine(definition, pipeline_name="SemanticsPipeline").start(execution_id=execution_id)
print(json.dumps({"status": result["status"], "failure_reason": result["failure_reason"]}))
sys.exit(0 if result["status"] == "Succeeded" else 1)
'''


# --- definitions ------------------------------------------------------------------------------------------------

def _s3_input(name: str, uri: str, local: str) -> dict[str, Any]:
    return {"InputName": name, "AppManaged": False,
            "S3Input": {"S3Uri": uri, "LocalPath": local, "S3DataType": "S3Prefix", "S3InputMode": "File",
                        "S3DataDistributionType": "FullyReplicated"}}


def processing_step(control: Path, *, max_runtime: int | None = None, cache: bool = True) -> dict[str, Any]:
    """A ProcessingStep running ``WORK`` with outputs under the execution's id (as the project's pipeline does)."""
    output = {"Std:Join": {"On": "/", "Values": [BASE, {"Get": "Execution.PipelineExecutionId"}, "result"]}}
    arguments: dict[str, Any] = {
        "ProcessingResources": {"ClusterConfig": {"InstanceCount": 1, "InstanceType": "ml.m5.large",
                                                  "VolumeSizeInGB": 1}},
        "AppSpecification": {
            "ImageUri": "local", "ContainerEntrypoint": ["python3", "/opt/ml/processing/input/code/work.py"],
            "ContainerArguments": ["--control", str(control), "--data", "/opt/ml/processing/input/data",
                                   "--out", "/opt/ml/processing/output"]},
        "RoleArn": ROLE,
        "ProcessingInputs": [_s3_input("code", f"{BASE}/code", "/opt/ml/processing/input/code"),
                             _s3_input("data", f"{BASE}/data", "/opt/ml/processing/input/data")],
        "ProcessingOutputConfig": {"Outputs": [{"OutputName": "result", "AppManaged": False, "S3Output": {
            "S3Uri": output, "LocalPath": "/opt/ml/processing/output", "S3UploadMode": "EndOfJob"}}]},
    }
    if max_runtime:
        arguments["StoppingCondition"] = {"MaxRuntimeInSeconds": max_runtime}
    return {"Name": "Work", "Type": "Processing", "Arguments": arguments,
            "CacheConfig": {"Enabled": cache, "ExpireAfter": "P30D"}}


def training_request(bundle: str, *, max_runtime: int = 300) -> dict[str, Any]:
    """A CreateTrainingJob request running ``WORK`` (as ``train.py``) under the training toolkit."""
    return {
        "AlgorithmSpecification": {"TrainingImage": "pytorch-training:2.5-cpu", "TrainingInputMode": "File",
                                   "MetricDefinitions": [{"Name": "valid_accuracy",
                                                          "Regex": r"valid_accuracy=([0-9\.]+)"}]},
        "HyperParameters": {"sagemaker_program": '"train.py"', "sagemaker_submit_directory": json.dumps(bundle)},
        "RoleArn": ROLE,
        "InputDataConfig": [{"ChannelName": "train", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": f"{BASE}/data", "S3DataDistributionType": "FullyReplicated"}}}],
        "OutputDataConfig": {"S3OutputPath": f"{BASE}/training"},
        "ResourceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 1},
        "StoppingCondition": {"MaxRuntimeInSeconds": max_runtime},
    }


def tuning_arguments(bundle: str, *, max_runtime: int = 300) -> dict[str, Any]:
    """A CreateHyperParameterTuningJob request: one trial of ``training_request``."""
    definition = training_request(bundle, max_runtime=max_runtime)
    definition["StaticHyperParameters"] = definition.pop("HyperParameters")
    return {
        "HyperParameterTuningJobConfig": {
            "Strategy": "Random", "TrainingJobEarlyStoppingType": "Off",
            "HyperParameterTuningJobObjective": {"Type": "Maximize", "MetricName": "valid_accuracy"},
            "ResourceLimits": {"MaxNumberOfTrainingJobs": 1, "MaxParallelTrainingJobs": 1},
            "ParameterRanges": {"CategoricalParameterRanges": [{"Name": "optimizer", "Values": ["adam", "sgd"]}]}},
        "TrainingJobDefinition": definition,
    }


def definition_of(*steps: dict[str, Any]) -> str:
    return json.dumps({"Version": "2020-12-01", "Metadata": {}, "Parameters": [], "PipelineExperimentConfig": None,
                       "Steps": list(steps)})


# --- fixtures and helpers ---------------------------------------------------------------------------------------

@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``MLOPS_HOME`` whose artifact store holds ``WORK`` (code prefix and training bundle) and data."""
    home = tmp_path / "home"
    monkeypatch.setenv("MLOPS_HOME", str(home))
    from pipelines.local.storage.store import ArtifactStore

    store = ArtifactStore(home / "artifacts")  # creates no database: the home stays fresh for the engines
    store.put_bytes(f"{BASE}/code/work.py", WORK.encode())
    store.put_bytes(f"{BASE}/bundle/sourcedir.tar.gz", deterministic_tar_gz({"train.py": WORK.encode()}))
    store.put_bytes(f"{BASE}/data/input.txt", b"data v1")
    (tmp_path / "control").mkdir()
    return home


BUNDLE = f"{BASE}/bundle/sourcedir.tar.gz"


def _driver_env() -> dict[str, str]:
    """The environment of a driver process: this checkout's packages first."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def _engine(definition: str) -> Any:
    from pipelines.local.engine.core import LocalEngine

    return LocalEngine(definition, pipeline_name=PIPELINE, max_workers=1)


def _alive(pids: list[int]) -> list[int]:
    """The pids still running (zombies count as gone)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_gone(pids: list[int], within: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


def _kill(pids: list[int]) -> None:
    for pid in _alive(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _job_pids(control: Path, timeout: float = 120.0) -> list[int]:
    """The pids a sleeping ``WORK`` wrote (its own, its grandchild's), once it has."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(control.glob("pids-*"))
        if found:
            pids = json.loads(found[0].read_text())
            found[0].unlink()
            return pids
        time.sleep(0.05)
    raise AssertionError("the job never started sleeping")


def _processes_of(home: Path) -> list[int]:
    """Every process whose environment names this ``MLOPS_HOME`` (the engine's jobs and their children)."""
    pids = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("MLOPS_HOME") == str(home):
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


# --- 1. stop and cache ------------------------------------------------------------------------------------------

def test_stopped_job_is_stopped_every_time_and_never_reused_from_the_cache(home, tmp_path):
    from pipelines.local.storage.executions import ExecutionStore

    control = tmp_path / "control"
    (control / "sleep").touch()
    engine = _engine(definition_of(processing_step(control)))
    stopper = ExecutionStore()  # another connection, as `stop` from another shell has
    for attempt in range(6):
        execution_id = f"stopped{attempt:05d}"
        grabbed: list[list[int]] = []

        def stop_when_sleeping(execution_id: str = execution_id, grabbed: list[list[int]] = grabbed) -> None:
            grabbed.append(_job_pids(control))
            stopper.request_stop(execution_id)

        thread = threading.Thread(target=stop_when_sleeping, daemon=True)
        thread.start()
        result = engine.start(execution_id=execution_id)
        thread.join(30)
        step = engine.records.step(execution_id, "Work")
        assert (result["status"], step["status"]) == ("Stopped", "Stopped"), (attempt, step["failure_reason"])
        assert step["failure_reason"] == "stopped on request"
        assert step["properties"] is None
        assert "[engine] job stopped on request (killed by SIGKILL)" in Path(step["log_path"]).read_text()
        assert grabbed and _wait_gone(grabbed[0]) == [], "the stopped job's processes are still running"

    (control / "sleep").unlink()
    result = engine.start(execution_id="afterstops00")
    step = engine.records.step("afterstops00", "Work")
    assert result["status"] == "Succeeded", result["failure_reason"]
    assert step["cached_from"] is None  # no stopped run was a cache candidate
    uri = step["properties"]["ProcessingOutputConfig"]["Outputs"]["result"]["S3Output"]["S3Uri"]
    assert engine.artifacts.path(uri + "/result.txt").read_text() == "data v1"


def test_job_killed_by_a_signal_fails_with_the_signal_named_and_is_not_reused(home, tmp_path):
    control = tmp_path / "control"
    (control / "kill").touch()
    engine = _engine(definition_of(processing_step(control)))
    result = engine.start(execution_id="killed000001")
    step = engine.records.step("killed000001", "Work")
    assert (result["status"], step["status"]) == ("Failed", "Failed")
    assert step["failure_reason"].startswith("AlgorithmError: killed by SIGKILL"), step["failure_reason"]
    (control / "kill").unlink()
    assert _run_work(engine, "killed000002") == (None, "data v1")  # a failed run is no cache candidate


def _run_work(engine: Any, execution_id: str, **kwargs: Any) -> tuple[str | None, str]:
    """Run the ``Work`` step's execution; (the execution it was cached from, the result's content)."""
    result = engine.start(execution_id=execution_id, **kwargs)
    assert result["status"] == "Succeeded", result["failure_reason"]
    step = engine.records.step(execution_id, "Work")
    uri = step["properties"]["ProcessingOutputConfig"]["Outputs"]["result"]["S3Output"]["S3Uri"]
    return step["cached_from"], engine.artifacts.path(uri + "/result.txt").read_text()


def test_cache_keys_on_arguments_not_data_and_a_hit_needs_its_outputs(home, tmp_path):
    engine = _engine(definition_of(processing_step(tmp_path / "control")))
    assert _run_work(engine, "cache0000001") == (None, "data v1")
    engine.artifacts.put_bytes(f"{BASE}/data/input.txt", b"data v2")  # new data at the same URI
    assert _run_work(engine, "cache0000002") == ("cache0000001", "data v1")  # as SageMaker: same arguments, a hit
    # the cached run's output is gone (its prefix left empty): not a hit, the step reruns
    engine.artifacts.path(f"{BASE}/cache0000001/result/result.txt").unlink()
    assert _run_work(engine, "cache0000003") == (None, "data v2")
    assert _run_work(engine, "cache0000004") == ("cache0000003", "data v2")


def test_start_no_cache_runs_one_execution_without_lookups(home, tmp_path):
    engine = _engine(definition_of(processing_step(tmp_path / "control")))
    assert _run_work(engine, "nocache00001") == (None, "data v1")
    engine.artifacts.put_bytes(f"{BASE}/data/input.txt", b"data v2")
    assert _run_work(engine, "nocache00002", no_cache=True) == (None, "data v2")
    assert engine.records.get_execution("nocache00002")["no_cache"] == 1
    assert _run_work(engine, "nocache00003") == ("nocache00002", "data v2")  # its result is reusable later


def test_start_no_cache_reaches_the_engine_as_the_local_services_header(local_aws_env):
    """``start --no-cache`` (local target) is the local service's one extension: a header on
    StartPipelineExecution, which the execution record keeps; the global ``--no-cache`` stays off."""
    from pipelines import run
    from pipelines.local.storage.executions import ExecutionStore
    from pipelines.local.storage.store import LOCAL_ROLE_ARN

    args = run.build_parser().parse_args(["start", "--no-cache"])
    assert args.start_no_cache is True and args.no_cache is False
    setup = run.local_clients().sagemaker
    setup.create_pipeline(PipelineName="NoCachePipeline", PipelineDefinition=definition_of(), RoleArn=LOCAL_ROLE_ARN)
    for no_cache in (True, False):
        sm = run.local_clients().sagemaker
        if no_cache:
            sm.meta.events.register("before-sign.sagemaker.StartPipelineExecution", run._no_cache_header)
        arn = sm.start_pipeline_execution(PipelineName="NoCachePipeline")["PipelineExecutionArn"]
        assert ExecutionStore().get_execution(arn)["no_cache"] == int(no_cache)


def test_concurrent_writers_of_one_artifact_never_collide(home):
    from pipelines.local.storage.store import ArtifactStore

    store = ArtifactStore()
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for i in range(200):
                store.put_bytes(f"{BASE}/code/shared.tar.gz", f"{n}-{i}".encode())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# --- 2. jobs die with the engine --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["processing", "training"])
def test_job_processes_die_when_the_engine_is_killed(home, tmp_path, kind):
    control = tmp_path / "control"
    (control / "sleep").touch()
    if kind == "processing":
        step = processing_step(control)
    else:
        step = {"Name": "Work", "Type": "Training", "Arguments": training_request(BUNDLE)}
        step["Arguments"]["HyperParameters"]["control"] = json.dumps(str(control))
    (tmp_path / "definition.json").write_text(definition_of(step))
    (tmp_path / "driver.py").write_text(DRIVER)
    log = open(tmp_path / "engine.log", "w")
    engine = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "definition.json")],
                              cwd=ROOT, env=_driver_env(), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    pids: list[int] = []
    try:
        pids = _job_pids(control)  # the user script and its child: grandchildren (training: deeper) of the engine
        job = [p for p in _processes_of(home) if p not in (engine.pid, os.getpid())]
        assert set(pids) <= set(job)
        if kind == "training":  # the toolkit and the shell it starts the user script with are there too
            assert len(job) >= 4, [psutil.Process(p).cmdline()[:3] for p in job]
        pids = sorted(set(pids) | set(job))
        os.kill(engine.pid, signal.SIGKILL)  # the engine alone: not its process group
        engine.wait(30)
        left = _wait_gone(pids, within=5)
        assert left == [], f"job processes outlived the engine: {left}"
    finally:
        _kill([engine.pid, *pids])
        log.close()


# --- 3. MaxRuntimeInSeconds -------------------------------------------------------------------------------------

def test_processing_step_stops_at_its_max_runtime_with_sagemakers_reason(home, tmp_path):
    control = tmp_path / "control"
    (control / "sleep").touch()
    engine = _engine(definition_of(processing_step(control, max_runtime=1)))
    started = time.monotonic()
    result = engine.start(execution_id="maxruntime01")
    assert time.monotonic() - started < 30
    step = engine.records.step("maxruntime01", "Work")
    reason = ("MaxRuntimeExceeded: The job stopped because it exceeded the maximum allowed runtime "
              "(MaxRuntimeInSeconds=1)")
    assert (step["status"], step["failure_reason"]) == ("Stopped", reason)
    assert result["status"] == "Failed"  # nobody asked the execution to stop
    assert result["failure_reason"] == f"Step Work stopped: {reason}"
    for found in control.glob("pids-*"):  # the job's processes, if it got as far as writing them
        assert _wait_gone(json.loads(found.read_text())) == []


def test_training_job_and_tuning_trial_stop_at_their_max_runtime(home, tmp_path):
    from pipelines.local.engine import tuner
    from pipelines.local.jobs import runtime as jobs
    from pipelines.local.storage.executions import ExecutionStore
    from pipelines.local.storage.store import ArtifactStore

    control = tmp_path / "control"
    (control / "sleep").touch()
    store = ArtifactStore()
    request = training_request(BUNDLE, max_runtime=4)
    request["HyperParameters"]["control"] = json.dumps(str(control))
    with pytest.raises(jobs.MaxRuntimeExceeded, match=r"^MaxRuntimeExceeded: .*\(MaxRuntimeInSeconds=4\)$"):
        jobs.run_training_job(request, "max-runtime-job", tmp_path / "runs" / "job", store, tmp_path / "job.log")
    assert not store.exists(f"{BASE}/training/max-runtime-job/output/model.tar.gz")

    arguments = tuning_arguments(BUNDLE, max_runtime=4)
    arguments["TrainingJobDefinition"]["StaticHyperParameters"]["control"] = json.dumps(str(control))
    records = ExecutionStore()
    with pytest.raises(tuner.TuningError, match="MaxRuntimeExceeded"):
        tuner.run_tuning_job(arguments, "max-runtime-tuning", tmp_path / "runs" / "tuning", store,
                             execution_id="maxruntime02", step_name="Tune", records=records,
                             control=jobs.JobControl())
    (trial,) = records.trials("maxruntime02", "Tune")
    assert trial["status"] == "Stopped"
    assert trial["failure_reason"].startswith("MaxRuntimeExceeded: The job stopped because it exceeded")


def test_pipeline_processing_steps_have_a_max_runtime(monkeypatch):
    from pipelines import packaging
    from pipelines import pipeline as pl

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    code = packaging.code_locations("bucket", "imgclf", packaging.build_code_bundles(ROOT))
    role = "arn:aws:iam::123456789012:role/R"

    def limits(**kwargs: Any) -> dict[str, Any]:
        built = pl.pipeline_definition(pl.get_pipeline("eu-west-1", role, "bucket", code, **kwargs))
        steps = json.loads(built)["Steps"]
        return {s["Name"]: s["Arguments"].get("StoppingCondition") for s in steps if s["Type"] == "Processing"}

    default = limits()
    assert default == {"PrepareData": {"MaxRuntimeInSeconds": 3600}, "EvaluateModel": {"MaxRuntimeInSeconds": 3600}}
    assert default == limits()  # deterministic
    assert list(limits(max_processing_seconds=600).values()) == [{"MaxRuntimeInSeconds": 600}] * 2


# --- 4. two engines on a fresh home -----------------------------------------------------------------------------

def test_two_engines_starting_tuning_together_on_a_fresh_home_both_succeed(home, tmp_path):
    assert not (home / "mlops.db").exists() and not (home / "optuna.db").exists()
    step = {"Name": "Tune", "Type": "Tuning", "Arguments": tuning_arguments(BUNDLE)}
    (tmp_path / "definition.json").write_text(definition_of(step))
    (tmp_path / "driver.py").write_text(DRIVER)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "definition.json"), "",
                               str(go)], cwd=ROOT, env=_driver_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("go.ready.*"))) < 2 and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
            time.sleep(0.01)
        go.touch()  # both engines open the databases and create the Optuna storage at the same moment
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-4000:]
        assert json.loads(output.strip().splitlines()[-1])["status"] == "Succeeded"
