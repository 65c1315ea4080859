"""``python -m pipelines.run --target sagemaker``: upsert/start/list/describe against moto, the calls moto lacks
(list_pipeline_execution_steps, stop_pipeline_execution) through botocore's Stubber, and the error paths."""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws

from pipelines import packaging, run
from pipelines import pipeline as pl

REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/SageMakerPipelineRole"
BUCKET = "codebuild-artifacts"
EXECUTION_ARN = f"arn:aws:sagemaker:{REGION}:123456789012:pipeline/imgclf-p-1/execution/abc123"


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
                       "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "MLOPS_HOME": str(tmp_path / "mlops"),
                       "SAGEMAKER_PIPELINE_ROLE_ARN": ROLE, "ARTIFACT_BUCKET": BUCKET,
                       "SAGEMAKER_PROJECT_NAME": "imgclf", "SAGEMAKER_PROJECT_ID": "p-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLOPS_TARGET", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.mark.fast
def test_upsert_start_list_describe_against_moto(aws_env, capsys):
    with mock_aws():
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        sm = boto3.client("sagemaker", region_name=REGION)

        assert run.main(["--target", "sagemaker", "upsert"]) == 0
        created = json.loads(capsys.readouterr().out)
        assert created["Action"] == "created"
        name = "imgclf-p-1"  # <project-name>-<project-id>, as in AWS's project template
        described = sm.describe_pipeline(PipelineName=name)
        definition = json.loads(described["PipelineDefinition"])
        assert pl.step_names(definition)[:4] == ["PrepareData", "TuneHyperparameters", "TrainBestModel",
                                                 "EvaluateModel"]
        assert described["RoleArn"] == ROLE
        tags = sm.list_tags(ResourceArn=described["PipelineArn"])["Tags"]
        assert {"Key": "sagemaker:project-id", "Value": "p-1"} in tags
        assert sm.describe_model_package_group(ModelPackageGroupName=name)["ModelPackageGroupName"] == name

        # the code the definition points at was uploaded under its content address
        bundles = packaging.build_code_bundles(packaging.project_root())
        code = packaging.code_locations(BUCKET, name, bundles)
        key = code.sourcedir.removeprefix(f"s3://{BUCKET}/")
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == bundles.sourcedir
        assert code.sourcedir in described["PipelineDefinition"]

        assert run.main(["--target", "sagemaker", "upsert"]) == 0
        assert json.loads(capsys.readouterr().out)["Action"] == "updated"

        assert run.main(["--target", "sagemaker", "start", "--param", "MaxTrainingJobs=2",
                         "--param", "AccuracyThreshold=0.5"]) == 0
        arn = capsys.readouterr().out.strip().splitlines()[-1]
        assert arn.startswith(f"arn:aws:sagemaker:{REGION}:") and f"pipeline/{name}/execution/" in arn
        params = sm.describe_pipeline_execution(PipelineExecutionArn=arn)
        assert params["PipelineExecutionArn"] == arn

        assert run.main(["--target", "sagemaker", "list-executions", "--output", "json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [e["PipelineExecutionArn"] for e in listed] == [arn]


def _stubbed_clients():
    sm = boto3.client("sagemaker", region_name=REGION)
    return sm, Stubber(sm)


@pytest.mark.fast
def test_status_and_stop_with_stubber(aws_env, capsys):
    sm, stub = _stubbed_clients()
    stub.add_response("describe_pipeline_execution",
                      {"PipelineExecutionArn": EXECUTION_ARN, "PipelineExecutionStatus": "Executing"},
                      {"PipelineExecutionArn": EXECUTION_ARN})
    stub.add_response("list_pipeline_execution_steps",
                      {"PipelineExecutionSteps": [{"StepName": "PrepareData", "StepStatus": "Succeeded"}],
                       "NextToken": "t1"},
                      {"PipelineExecutionArn": EXECUTION_ARN, "SortOrder": "Ascending"})
    stub.add_response("list_pipeline_execution_steps",
                      {"PipelineExecutionSteps": [{"StepName": "TuneHyperparameters", "StepStatus": "Executing"}]},
                      {"PipelineExecutionArn": EXECUTION_ARN, "SortOrder": "Ascending", "NextToken": "t1"})
    stub.add_response("stop_pipeline_execution", {"PipelineExecutionArn": EXECUTION_ARN},
                      {"PipelineExecutionArn": EXECUTION_ARN, "ClientRequestToken": ANY})
    clients = run.AwsClients(sagemaker=sm, s3=None, sts=None)
    with stub:
        assert run.main(["--target", "sagemaker", "status", EXECUTION_ARN, "--output", "json"], clients=clients) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["Steps"] == {"PrepareData": "Succeeded", "TuneHyperparameters": "Executing"}
        assert run.main(["--target", "sagemaker", "stop", EXECUTION_ARN], clients=clients) == 0
        stub.assert_no_pending_responses()


@pytest.mark.fast
def test_start_wait_reports_failure_and_retry(aws_env, capsys):
    sm, stub = _stubbed_clients()
    stub.add_response("start_pipeline_execution", {"PipelineExecutionArn": EXECUTION_ARN},
                      {"PipelineName": "imgclf-p-1", "ClientRequestToken": ANY,
                       "PipelineParameters": [{"Name": "Arch", "Value": "resnet18"}]})
    for status in ("Executing", "Failed"):
        stub.add_response("describe_pipeline_execution",
                          {"PipelineExecutionArn": EXECUTION_ARN, "PipelineExecutionStatus": status,
                           **({"FailureReason": "Step failure: AccuracyBelowThreshold"} if status == "Failed" else {})},
                          {"PipelineExecutionArn": EXECUTION_ARN})
        stub.add_response("list_pipeline_execution_steps",  # the steps' progress, while waiting and at the end
                          {"PipelineExecutionSteps": [{"StepName": "CheckAccuracy", "StepStatus": status}]},
                          {"PipelineExecutionArn": EXECUTION_ARN, "SortOrder": "Ascending"})
    stub.add_response("retry_pipeline_execution", {"PipelineExecutionArn": EXECUTION_ARN},
                      {"PipelineExecutionArn": EXECUTION_ARN, "ClientRequestToken": ANY})
    clients = run.AwsClients(sagemaker=sm, s3=None, sts=None)
    with stub:
        rc = run.main(["--target", "sagemaker", "start", "--param", "Arch=resnet18", "--wait", "--poll-seconds", "0"],
                      clients=clients)
        assert rc == 1
        out = capsys.readouterr().out
        assert '"PipelineExecutionStatus": "Failed"' in out and "AccuracyBelowThreshold" in out
        assert run.main(["--target", "sagemaker", "retry", EXECUTION_ARN], clients=clients) == 0
        stub.assert_no_pending_responses()


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.fast
@pytest.mark.parametrize(("argv", "expected"), [
    (["start", "--param", "Nope=1"], "unknown pipeline parameter 'Nope'"),
    (["start", "--param", "MaxTrainingJobs=many"], "MaxTrainingJobs expects Integer"),
    (["start", "--param", "AccuracyThreshold=high"], "AccuracyThreshold expects Float"),
    (["start", "--param", "ModelApprovalStatus=Maybe"], "ModelApprovalStatus must be one of"),
    (["start", "--param", "NoEquals"], "expects Name=Value"),
])
def test_bad_parameters_are_one_line_errors(aws_env, capsys, argv, expected):
    assert run.main(["--target", "sagemaker", *argv]) == 2
    assert expected in _one_line_error(capsys)


@pytest.mark.fast
def test_missing_role_is_a_one_line_error(aws_env, monkeypatch, capsys):
    monkeypatch.delenv("SAGEMAKER_PIPELINE_ROLE_ARN")
    assert run.main(["--target", "sagemaker", "definition"]) == 2
    assert "SAGEMAKER_PIPELINE_ROLE_ARN" in _one_line_error(capsys)


@pytest.mark.fast
def test_no_credentials_is_a_one_line_error(aws_env, monkeypatch, capsys):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key)
    assert run.main(["--target", "sagemaker", "list-executions"]) == 2
    assert "no AWS credentials" in _one_line_error(capsys)


@pytest.mark.fast
def test_flags_override_environment(aws_env):
    args = run.build_parser().parse_args(["--target", "sagemaker", "--pipeline-name", "Mine", "--bucket", "b2",
                                          "definition"])
    settings = run.resolve_settings(args)
    assert (settings.pipeline_name, settings.bucket, settings.role_arn) == ("Mine", "b2", ROLE)
    assert settings.model_package_group_name == "imgclf-p-1"
    assert settings.tags() == [{"Key": "sagemaker:project-name", "Value": "imgclf"},
                               {"Key": "sagemaker:project-id", "Value": "p-1"}]


@pytest.mark.fast
def test_parse_parameters_normalises_values():
    assert run.parse_parameters(["MaxTrainingJobs=04", "AccuracyThreshold=0.75", "Arch=resnet18"]) == [
        {"Name": "MaxTrainingJobs", "Value": "4"}, {"Name": "AccuracyThreshold", "Value": "0.75"},
        {"Name": "Arch", "Value": "resnet18"}]


# --- regions and partitions (definition only: no AWS call) ----------------------------------------------------------

def _definition_steps(out: str) -> dict[str, dict]:
    steps: dict[str, dict] = {}

    def walk(items: list[dict]) -> None:
        for step in items:
            steps[step["Name"]] = step
            if step["Type"] == "Condition":
                walk(step["Arguments"]["IfSteps"])
                walk(step["Arguments"]["ElseSteps"])

    walk(json.loads(out)["Steps"])
    return steps


def _warnings(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("WARNING")]


@pytest.mark.fast
def test_region_without_debugger_rule_image_builds_without_the_rules(aws_env, capsys):
    """il-central-1 has PyTorch images but no Debugger rule evaluator image: no rules, hook and profiler kept."""
    assert run.main(["--target", "sagemaker", "--region", "il-central-1", "definition"]) == 0
    captured = capsys.readouterr()
    train = _definition_steps(captured.out)[pl.STEP_TRAIN]["Arguments"]
    assert "il-central-1" in train["AlgorithmSpecification"]["TrainingImage"]
    assert not train.get("DebugRuleConfigurations") and not train.get("ProfilerRuleConfigurations")
    assert {c["CollectionName"] for c in train["DebugHookConfig"]["CollectionConfigurations"]} >= {"losses"}
    assert train["ProfilerConfig"]["DisableProfiler"] is False
    (warning,) = _warnings(captured.err)
    assert "il-central-1" in warning and "rule evaluator image" in warning
    assert "Debugger rules (LossNotDecreasing" in warning and "Profiler rules (LowGPUUtilization" in warning
    assert "hook" not in warning


@pytest.mark.fast
def test_region_without_framework_images_is_a_one_line_error(aws_env, capsys):
    argv = ["--target", "sagemaker", "--region", "us-iso-east-1",
            "--role-arn", "arn:aws-iso:iam::123456789012:role/SageMakerPipelineRole", "definition"]
    assert run.main(argv) == 2
    line = _one_line_error(capsys)
    assert "us-iso-east-1" in line and "PyTorch" in line


@pytest.mark.fast
@pytest.mark.parametrize(("region", "partition", "debugger"), [
    ("cn-north-1", "aws-cn", True), ("us-gov-west-1", "aws-us-gov", True), ("us-gov-east-1", "aws-us-gov", False)])
def test_china_and_govcloud_definitions_use_their_partition(aws_env, capsys, region, partition, debugger):
    role = f"arn:{partition}:iam::123456789012:role/SageMakerPipelineRole"
    assert run.main(["--target", "sagemaker", "--region", region, "--role-arn", role, "definition"]) == 0
    captured = capsys.readouterr()
    steps = _definition_steps(captured.out)
    # the default deploy function lives in the role's account, in the region's partition
    assert steps[pl.STEP_DEPLOY]["FunctionArn"] == (
        f"arn:{partition}:lambda:{region}:123456789012:function:{pl.DEFAULT_DEPLOY_FUNCTION_NAME}")
    assert "arn:aws:" not in captured.out
    train = steps[pl.STEP_TRAIN]["Arguments"]
    assert train["RoleArn"] == role
    suffix = ".amazonaws.com.cn/" if partition == "aws-cn" else ".amazonaws.com/"
    assert f".dkr.ecr.{region}{suffix}pytorch-training:" in train["AlgorithmSpecification"]["TrainingImage"]
    if debugger:
        assert len(train["DebugRuleConfigurations"]) == len(pl.DEBUGGER_RULES) and not _warnings(captured.err)
        assert all(f".dkr.ecr.{region}{suffix}" in r["RuleEvaluatorImage"] for r in train["DebugRuleConfigurations"])
    else:  # the SDK supports no Debugger/Profiler in us-gov-east-1: all of it is left out, with one warning
        assert not {"DebugHookConfig", "DebugRuleConfigurations", "ProfilerRuleConfigurations"} & set(train)
        assert train["ProfilerConfig"] == {"DisableProfiler": True}
        (warning,) = _warnings(captured.err)
        assert region in warning and "Debugger hook config" in warning and "Profiler config" in warning
