"""The real AWS CLI (``awscli`` v1, run as ``python -m awscli``) against the local AWS service, pointed at it only by
the environment ``local_aws_env`` sets (``AWS_ENDPOINT_URL``, the local key, the region): S3's high-level commands
(``mb``, ``cp`` up and down -- multipart above the CLI's 8 MiB threshold --, ``ls --recursive``, ``sync``,
``rm --recursive``), SageMaker Pipelines from the command line (create, list, describe, start, list executions,
describe an execution until it ends, list its steps), a SageMaker error's exit code and message, and STS.

The pipeline is written by hand (a ConditionStep whose else branch is a FailStep, no jobs): an execution takes about
the time the runner's Python takes to start."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest

from pipelines.local.storage.store import LOCAL_ACCOUNT, LOCAL_ROLE_ARN

pytest.importorskip("awscli")

pytestmark = pytest.mark.fast

MB = 1024 * 1024
TERMINAL = ("Succeeded", "Failed", "Stopped")


@pytest.fixture
def cli_env(local_aws_env, tmp_path, monkeypatch):
    """``os.environ`` as ``local_aws_env`` left it, with no ``~/.aws`` files read (a developer's profile must not
    change what the CLI does here)."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return local_aws_env


def aws(*args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``aws ARGS...`` as a subprocess with this process's environment."""
    result = subprocess.run([sys.executable, "-m", "awscli", *args], env=dict(os.environ), cwd=cwd,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, f"aws {' '.join(args)} -> {result.returncode}\n{result.stderr}"
    return result


def aws_json(*args: str) -> dict:
    return json.loads(aws(*args, "--output", "json").stdout)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def age(root: Path, seconds: float = 120.0) -> None:
    """Date every file under ``root`` back: ``sync`` uploads a file whose mtime is later than the object's
    LastModified, which S3 keeps to the second, so a file written in the second of its upload looks newer."""
    stamp = time.time() - seconds
    for path in root.rglob("*"):
        os.utime(path, (stamp, stamp))


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def bucket(cli_env):
    name = unique("cli")
    result = aws("s3", "mb", f"s3://{name}")
    assert f"make_bucket: {name}" in result.stdout
    return name


# ------------------------------------------------------------------------------------------------------- STS


def test_sts_get_caller_identity(cli_env):
    identity = aws_json("sts", "get-caller-identity")
    assert identity["Account"] == LOCAL_ACCOUNT
    assert identity["Arn"].startswith(f"arn:aws:iam::{LOCAL_ACCOUNT}:")
    assert aws("sts", "get-caller-identity", "--query", "Account", "--output", "text").stdout.strip() == LOCAL_ACCOUNT


# -------------------------------------------------------------------------------------------------------- S3


def test_s3_mb_lists_the_bucket(cli_env, bucket):
    assert bucket in aws("s3", "ls").stdout.split()
    assert bucket in [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
    aws("s3", "mb", f"s3://{bucket}")  # us-east-1 answers 200 to the bucket's owner (S3's legacy behaviour)
    elsewhere = aws("s3", "mb", f"s3://{bucket}", "--region", "eu-west-1", check=False)  # and 409 elsewhere
    assert elsewhere.returncode != 0 and "(BucketAlreadyOwnedByYou)" in elsewhere.stderr


def test_s3_cp_up_and_down_small_and_multipart(cli_env, bucket, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("hello from the aws cli\n")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * MB + 12345))  # above multipart_threshold (8 MiB): 2 parts of 8 MiB chunks
    assert "upload:" in aws("s3", "cp", str(small), f"s3://{bucket}/dir/small.txt").stdout
    aws("s3", "cp", str(big), f"s3://{bucket}/dir/big.bin")

    s3 = boto3.client("s3")
    head = s3.head_object(Bucket=bucket, Key="dir/big.bin")
    assert head["ContentLength"] == big.stat().st_size
    assert head["ETag"].strip('"').endswith("-2")  # a multipart upload's ETag: <md5 of part md5s>-<parts>
    assert s3.get_object(Bucket=bucket, Key="dir/small.txt")["Body"].read() == small.read_bytes()

    down = tmp_path / "down"
    aws("s3", "cp", f"s3://{bucket}/dir/small.txt", str(down / "small.txt"))
    aws("s3", "cp", f"s3://{bucket}/dir/big.bin", str(down / "big.bin"))  # ranged GETs above the threshold
    assert (down / "small.txt").read_bytes() == small.read_bytes()
    assert sha256(down / "big.bin") == sha256(big)

    missing = aws("s3", "cp", f"s3://{bucket}/dir/missing.txt", str(down / "missing.txt"), check=False)
    assert missing.returncode != 0
    assert "404" in missing.stderr or "Not Found" in missing.stderr


def test_s3_ls_recursive(cli_env, bucket, tmp_path):
    s3 = boto3.client("s3")
    keys = {"a.txt": b"a", "deep/b.txt": b"bb", "deep/er/c.txt": b"ccc", "other/d.txt": b"dddd"}
    for key, body in keys.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    listed = aws("s3", "ls", f"s3://{bucket}", "--recursive").stdout.splitlines()
    # "<date> <time> <size> <key>"
    assert {line.split(maxsplit=3)[3]: int(line.split(maxsplit=3)[2]) for line in listed} == \
        {key: len(body) for key, body in keys.items()}
    top = aws("s3", "ls", f"s3://{bucket}/").stdout  # one level: the prefixes and the top object
    assert "PRE deep/" in top and "PRE other/" in top and "a.txt" in top and "b.txt" not in top
    under = aws("s3", "ls", f"s3://{bucket}/deep/", "--recursive", "--summarize").stdout
    assert "deep/er/c.txt" in under and "other/d.txt" not in under
    assert "Total Objects: 2" in under and "Total Size: 5" in under


def test_s3_sync_up_incremental_and_down(cli_env, bucket, tmp_path):
    src = tmp_path / "src"
    for rel, text in {"one.txt": "1", "sub/two.txt": "22", "sub/deeper/three.csv": "a,b\n1,2\n"}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    age(src)
    first = aws("s3", "sync", str(src), f"s3://{bucket}/synced")
    assert first.stdout.count("upload:") == 3

    (src / "sub" / "four.txt").write_text("4444")
    age(src)
    second = aws("s3", "sync", str(src), f"s3://{bucket}/synced")  # only what is new (size/mtime compare)
    uploads = [line for line in second.stdout.splitlines() if "upload:" in line]
    assert len(uploads) == 1 and "four.txt" in uploads[0]
    assert aws("s3", "sync", str(src), f"s3://{bucket}/synced").stdout.count("upload:") == 0

    dest = tmp_path / "dest"
    aws("s3", "sync", f"s3://{bucket}/synced", str(dest))
    assert tree(dest) == tree(src)

    (src / "one.txt").unlink()
    deleted = aws("s3", "sync", str(src), f"s3://{bucket}/synced", "--delete")
    assert f"delete: s3://{bucket}/synced/one.txt" in deleted.stdout
    listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="synced/")
    assert sorted(o["Key"] for o in listed["Contents"]) == \
        ["synced/sub/deeper/three.csv", "synced/sub/four.txt", "synced/sub/two.txt"]


def test_s3_rm_recursive_and_rb(cli_env, bucket):
    s3 = boto3.client("s3")
    for key in ("gone/1", "gone/2/x", "gone/3/y/z", "kept/1"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    removed = aws("s3", "rm", f"s3://{bucket}/gone/", "--recursive")
    assert removed.stdout.count("delete:") == 3
    remaining = s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in remaining["Contents"]] == ["kept/1"]
    aws("s3", "rb", f"s3://{bucket}", "--force")  # empties the bucket, then deletes it
    assert bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


# ------------------------------------------------------------------------------------------------- SageMaker


def definition() -> dict:
    """``Score >= Threshold``, else a FailStep naming the threshold."""
    fail = {"Name": "TooLow", "Type": "Fail",
            "Arguments": {"ErrorMessage": {"Std:Join": {"On": " ",
                                                        "Values": ["score below", {"Get": "Parameters.Threshold"}]}}}}
    condition = {"Name": "CheckScore", "Type": "Condition",
                 "Arguments": {"Conditions": [{"Type": "GreaterThanOrEqualTo", "LeftValue": {"Get": "Parameters.Score"},
                                               "RightValue": {"Get": "Parameters.Threshold"}}],
                               "IfSteps": [], "ElseSteps": [fail]}}
    return {"Version": "2020-12-01", "Metadata": {},
            "Parameters": [{"Name": "Threshold", "Type": "Float", "DefaultValue": 0.5},
                           {"Name": "Score", "Type": "Float", "DefaultValue": 0.9}],
            "Steps": [condition]}


def wait_terminal(arn: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = aws_json("sagemaker", "describe-pipeline-execution", "--pipeline-execution-arn", arn)
        if described["PipelineExecutionStatus"] in TERMINAL:
            return described
        time.sleep(0.5)
    raise AssertionError(f"{arn} did not end within {timeout:.0f}s")


def test_sagemaker_pipeline_from_the_cli(cli_env, tmp_path):
    name = unique("cli-pipeline")
    path = tmp_path / "definition.json"
    path.write_text(json.dumps(definition()))
    created = aws_json("sagemaker", "create-pipeline", "--pipeline-name", name, "--pipeline-definition",
                       f"file://{path}", "--role-arn", LOCAL_ROLE_ARN, "--pipeline-description", "from the cli")
    arn = created["PipelineArn"]
    assert arn == f"arn:aws:sagemaker:us-east-1:{LOCAL_ACCOUNT}:pipeline/{name}"

    listed = aws_json("sagemaker", "list-pipelines", "--pipeline-name-prefix", name)["PipelineSummaries"]
    assert [(p["PipelineName"], p["PipelineArn"]) for p in listed] == [(name, arn)]
    described = aws_json("sagemaker", "describe-pipeline", "--pipeline-name", name)
    assert json.loads(described["PipelineDefinition"]) == definition()
    assert (described["PipelineStatus"], described["RoleArn"], described["PipelineDescription"]) == \
        ("Active", LOCAL_ROLE_ARN, "from the cli")

    ok = aws_json("sagemaker", "start-pipeline-execution", "--pipeline-name", name,
                  "--pipeline-parameters", "Name=Score,Value=0.75")["PipelineExecutionArn"]
    low = aws_json("sagemaker", "start-pipeline-execution", "--pipeline-name", name,
                   "--pipeline-parameters", json.dumps([{"Name": "Score", "Value": "0.1"}]))["PipelineExecutionArn"]
    assert ok.startswith(arn + "/execution/") and low.startswith(arn + "/execution/") and ok != low

    executions = aws_json("sagemaker", "list-pipeline-executions", "--pipeline-name", name)
    assert sorted(e["PipelineExecutionArn"] for e in executions["PipelineExecutionSummaries"]) == sorted([ok, low])

    succeeded = wait_terminal(ok)
    assert succeeded["PipelineExecutionStatus"] == "Succeeded"
    failed = wait_terminal(low)
    assert (failed["PipelineExecutionStatus"], failed["FailureReason"]) == ("Failed", "score below 0.5")

    steps = aws_json("sagemaker", "list-pipeline-execution-steps", "--pipeline-execution-arn", ok)
    assert [(s["StepName"], s["StepStatus"]) for s in steps["PipelineExecutionSteps"]] == [("CheckScore", "Succeeded")]
    assert steps["PipelineExecutionSteps"][0]["Metadata"] == {"Condition": {"Outcome": "True"}}
    failed_steps = {s["StepName"]: s for s in aws_json("sagemaker", "list-pipeline-execution-steps",
                                                        "--pipeline-execution-arn", low)["PipelineExecutionSteps"]}
    assert failed_steps["TooLow"]["StepStatus"] == "Failed"
    assert failed_steps["TooLow"]["Metadata"] == {"Fail": {"ErrorMessage": "score below 0.5"}}

    statuses = aws("sagemaker", "list-pipeline-executions", "--pipeline-name", name, "--query",
                   "PipelineExecutionSummaries[].PipelineExecutionStatus", "--output", "text").stdout.split()
    assert sorted(statuses) == ["Failed", "Succeeded"]


def test_sagemaker_errors_exit_non_zero_with_the_error_code(cli_env):
    name = unique("no-such-pipeline")
    missing = aws("sagemaker", "describe-pipeline", "--pipeline-name", name, check=False)
    assert missing.returncode == 254 or missing.returncode == 255, missing.returncode
    assert "(ResourceNotFound)" in missing.stderr and "DescribePipeline" in missing.stderr
    assert name in missing.stderr
    start = aws("sagemaker", "start-pipeline-execution", "--pipeline-name", name, check=False)
    assert start.returncode != 0 and "(ResourceNotFound)" in start.stderr
    cycle = [{"Name": "A", "Type": "Fail", "Arguments": {}, "DependsOn": ["B"]},
             {"Name": "B", "Type": "Fail", "Arguments": {}, "DependsOn": ["A"]}]
    bad = aws("sagemaker", "create-pipeline", "--pipeline-name", unique("cycle"), "--role-arn", LOCAL_ROLE_ARN,
              "--pipeline-definition", json.dumps({"Version": "2020-12-01", "Steps": cycle}), check=False)
    assert bad.returncode != 0 and "(ValidationException)" in bad.stderr and "cycle" in bad.stderr.lower()
    unserved = aws("sagemaker", "list-domains", check=False)
    assert unserved.returncode != 0 and "(UnknownOperationException)" in unserved.stderr
