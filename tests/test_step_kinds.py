"""Step kinds (issue 13), each on a tiny definition run by the engine in-process:

- a step kind the engine cannot run (Callback, or a type SageMaker does not have) fails *that step* with a reason;
  independent steps run, dependants do not;
- a Model step creates the model through the local SageMaker API (``DescribeModel`` sees it) and a later step reads
  ``Steps.M.ModelName``;
- ``JsonGet`` with ``S3Uri`` (``JsonGet(s3_uri=...)``) reads an object no step produced;
- ``RetryPolicies``: a throttled attempt is retried (SageMaker's default for ``Step.THROTTLING``), a policy's
  ``MaxAttempts`` bounds the attempts, and job failures are not retried by step-level exception types;
- ``ParallelismConfiguration`` becomes the engine's step concurrency: with 1, two independent steps never overlap;
- ``ExpireAfter`` in every form SageMaker accepts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_engine_semantics import BASE, ROLE, _s3_input, definition_of

WRITE = '''
import json, os, pathlib, sys, time
out = pathlib.Path("/opt/ml/processing/output")
start = time.time()
time.sleep(float(os.environ.get("SLEEP_S", "0")))
(out / "span.json").write_text(json.dumps({"args": sys.argv[1:], "start": start, "end": time.time()}))
'''


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("MLOPS_HOME", str(home))
    from pipelines.local.storage.store import ArtifactStore

    store = ArtifactStore(home / "artifacts")
    store.put_bytes(f"{BASE}/code/write.py", WRITE.encode())
    store.put_bytes(f"{BASE}/metrics/evaluation.json", json.dumps({"metrics": {"accuracy": 0.91}}).encode())
    store.put_bytes(f"{BASE}/model/model.tar.gz", b"not really a model")
    return home


def _store() -> Any:
    from pipelines.local.storage.store import ArtifactStore

    return ArtifactStore()


def write_step(name: str, *args: Any, sleep_s: float = 0, depends_on: list[str] | None = None) -> dict[str, Any]:
    """A ProcessingStep that hard-codes ``/opt/ml/processing/output`` and writes its argv and its time span."""
    step: dict[str, Any] = {"Name": name, "Type": "Processing", "Arguments": {
        "ProcessingResources": {"ClusterConfig": {"InstanceCount": 1, "InstanceType": "ml.m5.large",
                                                  "VolumeSizeInGB": 1}},
        "AppSpecification": {"ImageUri": "local",
                             "ContainerEntrypoint": ["python3", "/opt/ml/processing/input/code/write.py"],
                             "ContainerArguments": list(args)},
        "Environment": {"SLEEP_S": str(sleep_s)},
        "RoleArn": ROLE,
        "ProcessingInputs": [_s3_input("code", f"{BASE}/code", "/opt/ml/processing/input/code")],
        "ProcessingOutputConfig": {"Outputs": [{"OutputName": "out", "AppManaged": False, "S3Output": {
            "S3Uri": {"Std:Join": {"On": "/", "Values": [BASE, {"Get": "Execution.PipelineExecutionId"}, name]}},
            "LocalPath": "/opt/ml/processing/output", "S3UploadMode": "EndOfJob"}}]}}}
    if depends_on:
        step["DependsOn"] = depends_on
    return step


def _run(*steps: dict[str, Any], max_workers: int = 2) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    from pipelines.local.engine.core import LocalEngine

    engine = LocalEngine(definition_of(*steps), pipeline_name="StepKinds", max_workers=max_workers)
    result = engine.start()
    return result, {s["step_name"]: s for s in engine.records.steps(result["execution_id"])}


def _span(execution_id: str, step: str) -> dict[str, Any]:
    return json.loads(_store().path(f"{BASE}/{execution_id}/{step}/span.json").read_text())


def test_a_step_kind_the_engine_cannot_run_fails_only_that_step(home):
    callback = {"Name": "Ask", "Type": "Callback", "Arguments": {"QueueUrl": "https://sqs/q"}, "OutputParameters": []}
    odd = {"Name": "Odd", "Type": "QuantumAnnealing", "Arguments": {}}
    # As on SageMaker, a failure starts no new step, and the steps already running finish.
    result, steps = _run(write_step("Independent", "x", sleep_s=1), callback, odd,
                         write_step("AfterAsk", "y", depends_on=["Ask"]), max_workers=3)
    assert result["status"] == "Failed"
    assert steps["Independent"]["status"] == "Succeeded", steps["Independent"]
    assert steps["Ask"]["status"] == "Failed" and "Callback" in steps["Ask"]["failure_reason"]
    assert "SQS" in steps["Ask"]["failure_reason"] or "queue" in steps["Ask"]["failure_reason"].lower()
    assert steps["Odd"]["status"] == "Failed" and "QuantumAnnealing" in steps["Odd"]["failure_reason"]
    assert "AfterAsk" not in steps or steps["AfterAsk"]["status"] != "Succeeded"


def test_model_step_creates_the_model_and_exposes_describe_model(home):
    model = {"Name": "M", "Type": "Model", "Arguments": {
        "ExecutionRoleArn": ROLE,
        "PrimaryContainer": {"Image": "683313688378.dkr.ecr.us-east-1.amazonaws.com/sagemaker-xgboost:1.7-1",
                             "ModelDataUrl": f"{BASE}/model/model.tar.gz", "Environment": {"A": "1"}}}}
    reader = write_step("Reader", "--model", {"Get": "Steps.M.ModelName"})
    result, steps = _run(model, reader)
    assert result["status"] == "Succeeded", result
    name = json.loads(steps["M"]["properties"])["ModelName"] if isinstance(steps["M"]["properties"], str) \
        else steps["M"]["properties"]["ModelName"]
    from pipelines.local.engine.steps.base import local_client

    described = local_client("sagemaker").describe_model(ModelName=name)
    assert described["PrimaryContainer"]["ModelDataUrl"] == f"{BASE}/model/model.tar.gz"
    assert described["PrimaryContainer"]["Environment"] == {"A": "1"}
    assert _span(result["execution_id"], "Reader")["args"] == ["--model", name]


def _condition(left: Any, right: Any) -> dict[str, Any]:
    return {"Name": "Check", "Type": "Condition", "Arguments": {
        "Conditions": [{"Type": "GreaterThanOrEqualTo", "LeftValue": left, "RightValue": right}],
        "IfSteps": [write_step("Good", "good")], "ElseSteps": [write_step("Bad", "bad")]}}


def test_json_get_reads_an_s3_uri(home):
    get = {"Std:JsonGet": {"S3Uri": f"{BASE}/metrics/evaluation.json", "Path": "metrics.accuracy"}}
    result, steps = _run(_condition(get, 0.9))
    assert result["status"] == "Succeeded", result
    assert steps["Good"]["status"] == "Succeeded" and steps.get("Bad", {}).get("status") in (None, "NotExecuted")

    joined = {"Std:JsonGet": {"S3Uri": {"Std:Join": {"On": "/", "Values": [BASE, "metrics", "evaluation.json"]}},
                              "Path": "metrics.accuracy"}}
    result, steps = _run(_condition(joined, 0.95))
    assert steps["Bad"]["status"] == "Succeeded" and steps.get("Good", {}).get("status") in (None, "NotExecuted")

    missing = {"Std:JsonGet": {"S3Uri": f"{BASE}/metrics/nothing.json", "Path": "metrics.accuracy"}}
    result, steps = _run(_condition(missing, 0.9))
    assert result["status"] == "Failed"
    assert "nothing.json" in steps["Check"]["failure_reason"]


def _throttled_once(monkeypatch: pytest.MonkeyPatch, times: int) -> list[str]:
    """The processing job's first ``times`` calls fail as SageMaker's API does when throttling."""
    from botocore.exceptions import ClientError

    from pipelines.local.jobs import runtime

    real = runtime.run_processing_job
    calls: list[str] = []

    def flaky(request: Any, job_name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(job_name)
        if len(calls) <= times:
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}},
                              "CreateProcessingJob")
        return real(request, job_name, *args, **kwargs)

    monkeypatch.setattr(runtime, "run_processing_job", flaky)
    return calls


def test_retry_policies_follow_sagemaker(home, monkeypatch):
    calls = _throttled_once(monkeypatch, 1)
    result, steps = _run(write_step("W", "a"))  # no policy: SageMaker retries throttling by default
    assert result["status"] == "Succeeded", result
    assert len(calls) == 2 and steps["W"]["attempt"] == 2

    step = write_step("W", "b")
    step["RetryPolicies"] = [{"ExceptionType": ["Step.THROTTLING"], "IntervalSeconds": 1, "BackoffRate": 1.0,
                              "MaxAttempts": 1}]
    calls = _throttled_once(monkeypatch, 5)
    result, steps = _run(step)
    assert result["status"] == "Failed"
    assert len(calls) == 2, calls  # the first attempt and MaxAttempts=1 retry
    assert "Rate exceeded" in steps["W"]["failure_reason"]

    from pipelines.local.engine import retry

    with pytest.raises(ValueError, match="ExceptionType"):
        retry.parse({"Name": "W", "RetryPolicies": [{"ExceptionType": ["Step.NOPE"], "MaxAttempts": 1}]})


def test_parallelism_configuration_bounds_concurrent_steps(home):
    from pipelines.local.api.sagemaker_pipelines import runner_environment

    env = runner_environment("http://127.0.0.1:1", {"MaxParallelExecutionSteps": 1})
    assert env["MLOPS_MAX_WORKERS"] == "1"

    result, _ = _run(write_step("A", "a", sleep_s=1.5), write_step("B", "b", sleep_s=1.5), max_workers=1)
    a, b = _span(result["execution_id"], "A"), _span(result["execution_id"], "B")
    assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)

    result, _ = _run(write_step("A", "a", sleep_s=1.5), write_step("B", "b", sleep_s=1.5), max_workers=2)
    a, b = _span(result["execution_id"], "A"), _span(result["execution_id"], "B")
    assert a["start"] < b["end"] and b["start"] < a["end"], (a, b)  # both ran at once


@pytest.mark.parametrize(("text", "seconds"), [
    ("P30D", 30 * 86400), ("PT12H", 12 * 3600), ("PT1.5H", 5400), ("P1DT12H", 36 * 3600), ("P2W", 14 * 86400),
    ("T12H", 12 * 3600), ("30d", 30 * 86400), ("12h", 12 * 3600), ("1d12h", 36 * 3600), ("90m", 5400),
    ("2w", 14 * 86400),
])
def test_expire_after_forms(text, seconds):
    from pipelines.local.storage.executions import parse_iso_duration

    assert parse_iso_duration(text) == seconds


@pytest.mark.parametrize("text", ["30 days", "", "P", "PT", "forever", "-1d"])
def test_expire_after_rejects(text):
    from pipelines.local.storage.executions import parse_iso_duration

    with pytest.raises(ValueError):
        parse_iso_duration(text)
