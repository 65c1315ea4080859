"""A user's own SageMaker SDK pipeline script (tests/data/user_pipeline/pipeline.py), run unchanged as a subprocess
against the local AWS service: the SDK's default session and default bucket, ``S3Uploader``, a ``ScriptProcessor``
step whose script also calls S3 itself with boto3, a PyTorch script-mode ``TrainingStep`` fed by the processing
step's output property, parameters used by both, ``upsert``/``start``/``wait``/``list_steps``. What it left is
then checked with boto3: both steps succeeded, the processed CSV (whose values prove the job read its config object
through the local S3) and the model artifact exist, ``DescribeTrainingJob`` answers.

The environment is exactly what ``python -m pipelines.run local up`` tells a user to export
(``server.client_environment``): ``AWS_ENDPOINT_URL``, the local key and region, and ``SAGEMAKER_USER_CONFIG_OVERRIDE``
-- the SDK's own defaults file naming its default bucket. Without that file the SDK would derive the default bucket
from an STS call sent to STS's public regional URL (``sagemaker.session.generate_default_sagemaker_bucket_name``
passes an explicit ``endpoint_url``, which wins over ``AWS_ENDPOINT_URL``): offline an ``EndpointConnectionError``,
online the real account's id.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import boto3
import pytest

from pipelines.local.storage.store import LOCAL_ACCOUNT, LOCAL_REGION, LOCAL_ROLE_ARN

SCRIPT = Path(__file__).resolve().parent / "data" / "user_pipeline" / "pipeline.py"
#: The bucket the SDK's ``Session.default_bucket()`` derives: ``sagemaker-<region>-<account>``.
DEFAULT_BUCKET = f"sagemaker-{LOCAL_REGION}-{LOCAL_ACCOUNT}"
@pytest.fixture
def user_env(local_aws_env, tmp_path, monkeypatch):
    """``local_aws_env``'s environment, with no ``~/.aws`` or ``~/.config/sagemaker`` file of the developer's read."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return local_aws_env


def run_user_script(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--role-arn", LOCAL_ROLE_ARN, "--pipeline-name", name,
                           "--max-attempts", "240"], env=dict(os.environ), cwd=SCRIPT.parent, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def check_outcome(result: subprocess.CompletedProcess[str], name: str) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    steps = {s["StepName"]: s for s in json.loads(result.stdout.strip().splitlines()[-1])}
    assert {n: s["StepStatus"] for n, s in steps.items()} == {"Preprocess": "Succeeded", "Train": "Succeeded"}

    sm, s3 = boto3.client("sagemaker"), boto3.client("s3")
    executions = sm.list_pipeline_executions(PipelineName=name)["PipelineExecutionSummaries"]
    assert [e["PipelineExecutionStatus"] for e in executions] == ["Succeeded"]
    assert s3.head_object(Bucket=DEFAULT_BUCKET, Key=f"{name}/input/data.csv")["ContentLength"] > 0  # S3Uploader

    processing = sm.describe_processing_job(
        ProcessingJobName=steps["Preprocess"]["Metadata"]["ProcessingJob"]["Arn"].rsplit("/", 1)[1])
    assert processing["ProcessingJobStatus"] == "Completed"
    outputs = {o["OutputName"]: o["S3Output"]["S3Uri"] for o in processing["ProcessingOutputConfig"]["Outputs"]}
    bucket, prefix = split_s3(outputs["train"])
    assert bucket == DEFAULT_BUCKET
    train_csv = s3.get_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/train.csv")["Body"].read().decode()
    rows = list(csv.reader(io.StringIO(train_csv)))
    # y' = y * Scale + offset, with y = 2x + 1, Scale = 3 (the parameter's default) and offset = 10, which only the
    # config object the job fetched itself with boto3 s3.get_object holds.
    assert rows[0] == ["x", "y"] and len(rows) == 21
    assert all(int(y) == (2 * int(x) + 1) * 3 + 10 for x, y in rows[1:])
    bucket, prefix = split_s3(outputs["report"])
    report = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/report.json")["Body"].read())
    assert (report["rows"], report["scale"], report["offset"]) == (20, 3, 10)

    training = sm.describe_training_job(
        TrainingJobName=steps["Train"]["Metadata"]["TrainingJob"]["Arn"].rsplit("/", 1)[1])
    assert training["TrainingJobStatus"] == "Completed"
    assert training["HyperParameters"]["scale"] == "3"  # the same ParameterInteger as the processing step's
    assert training["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] == outputs["train"]
    bucket, key = split_s3(training["ModelArtifacts"]["S3ModelArtifacts"])
    assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
    with tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())) as tar:
        member = tar.extractfile("model.json")
        assert member is not None
        model = json.loads(member.read())
    assert (round(model["a"], 6), round(model["b"], 6), model["rows"]) == (6.0, 13.0, 20)
    metrics = {m["MetricName"]: m["Value"] for m in training.get("FinalMetricDataList", [])}
    assert metrics.get("train:mse") == pytest.approx(0.0, abs=1e-6)


def test_user_pipeline_script_unchanged(user_env):
    name = f"user-pipeline-{uuid.uuid4().hex[:8]}"
    check_outcome(run_user_script(name), name)


def test_without_the_sdk_defaults_file_the_default_bucket_needs_the_real_sts(user_env, tmp_path, monkeypatch):
    """Why ``local up`` exports ``SAGEMAKER_USER_CONFIG_OVERRIDE``: without it the script fails at the SDK's STS
    call, which never reaches the local service."""
    empty = tmp_path / "empty-sagemaker-config.yaml"  # a missing override file is an error to the SDK
    empty.write_text("SchemaVersion: '1.0'\n")
    monkeypatch.setenv("SAGEMAKER_USER_CONFIG_OVERRIDE", str(empty))
    result = run_user_script(f"user-pipeline-{uuid.uuid4().hex[:8]}")
    output = result.stdout + result.stderr  # the SDK's rich traceback goes to stdout
    assert result.returncode != 0
    # offline: "Could not connect to the endpoint URL: https://sts.<region>.amazonaws.com/"; online: STS refuses the
    # local key in GetCallerIdentity
    assert f"sts.{LOCAL_REGION}.amazonaws.com" in output or "GetCallerIdentity" in output, output[-2000:]
