"""The local SageMaker service (pipelines/local/api/sagemaker.py) driven by real clients: boto3's ``sagemaker`` and
``sagemaker-runtime`` clients and the SageMaker SDK's ``Pipeline`` with a ``PipelineSession``, all pointed at the
service with ``AWS_ENDPOINT_URL``. One service process per module under a temporary MLOPS_HOME.

The pipelines are written by hand (a ConditionStep and a FailStep, no jobs), so an execution runs in the runner in
about the time Python takes to start."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid

import boto3
import botocore.waiter
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, ParamValidationError, WaiterError
from botocore.validate import ParamValidator

from pipelines.local.api import server
from pipelines.local.storage.executions import ExecutionStore
from pipelines.local.storage.store import LOCAL_ROLE_ARN

pytestmark = pytest.mark.fast

TERMINAL = ("Succeeded", "Failed", "Stopped")


@pytest.fixture
def sm(local_aws_env):
    return boto3.client("sagemaker")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def error_of(excinfo: pytest.ExceptionInfo[ClientError]) -> tuple[str, str, int]:
    response = excinfo.value.response
    return response["Error"]["Code"], response["Error"]["Message"], response["ResponseMetadata"]["HTTPStatusCode"]


def tiny_definition(message: str = "score below") -> str:
    """Condition ``Score >= Threshold``; the else branch is a FailStep whose message names the threshold."""
    fail = {"Name": "TooLow", "Type": "Fail", "Description": "the score is too low",
            "Arguments": {"ErrorMessage": {"Std:Join": {"On": " ",
                                                        "Values": [message, {"Get": "Parameters.Threshold"}]}}}}
    condition = {"Name": "CheckScore", "Type": "Condition", "DisplayName": "Check the score",
                 "Arguments": {"Conditions": [{"Type": "GreaterThanOrEqualTo", "LeftValue": {"Get": "Parameters.Score"},
                                               "RightValue": {"Get": "Parameters.Threshold"}}],
                               "IfSteps": [], "ElseSteps": [fail]}}
    return json.dumps({
        "Version": "2020-12-01", "Metadata": {},
        "Parameters": [{"Name": "Threshold", "Type": "Float", "DefaultValue": 0.5},
                       {"Name": "Score", "Type": "Float", "DefaultValue": 0.9}],
        "PipelineExperimentConfig": {"ExperimentName": {"Get": "Execution.PipelineName"},
                                     "TrialName": {"Get": "Execution.PipelineExecutionId"}},
        "Steps": [condition],
    })


def create(sm, name: str, definition: str | None = None, **extra) -> str:
    return sm.create_pipeline(PipelineName=name, PipelineDefinition=definition or tiny_definition(),
                              RoleArn=LOCAL_ROLE_ARN, **extra)["PipelineArn"]


def waiter(sm, delay: float = 0.25, max_attempts: int = 240) -> botocore.waiter.Waiter:
    """The waiter the SDK's ``_PipelineExecution.wait`` builds (botocore has none for pipelines)."""
    model = botocore.waiter.WaiterModel({"version": 2, "waiters": {"PipelineExecutionComplete": {
        "delay": delay, "maxAttempts": max_attempts, "operation": "DescribePipelineExecution",
        "acceptors": [{"expected": "Succeeded", "matcher": "path", "state": "success",
                       "argument": "PipelineExecutionStatus"},
                      {"expected": "Failed", "matcher": "path", "state": "failure",
                       "argument": "PipelineExecutionStatus"}]}}})
    return botocore.waiter.create_waiter_with_client("PipelineExecutionComplete", model, sm)


def wait_terminal(sm, arn: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        described = sm.describe_pipeline_execution(PipelineExecutionArn=arn)
        if described["PipelineExecutionStatus"] in TERMINAL:
            return described
        time.sleep(0.2)
    raise AssertionError(f"{arn} did not end within {timeout}s")


def steps_by_name(sm, arn: str) -> dict[str, dict]:
    return {s["StepName"]: s for s in sm.list_pipeline_execution_steps(PipelineExecutionArn=arn)
            ["PipelineExecutionSteps"]}


# ----------------------------------------------------------------------------------------------- protocol


def signed_post(url: str, target: str, body: bytes = b"{}") -> tuple[int, dict]:
    import urllib.request

    request = AWSRequest(method="POST", url=url + "/", data=body,
                         headers={"X-Amz-Target": target, "Content-Type": "application/x-amz-json-1.1"})
    SigV4Auth(Credentials(server.access_key(), "local"), "sagemaker", "us-east-1").add_auth(request)
    prepared = urllib.request.Request(url + "/", data=body, headers=dict(request.headers.items()), method="POST")
    try:
        with urllib.request.urlopen(prepared, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_unknown_operation(local_aws_env, sm):
    url, _ = local_aws_env
    status, body = signed_post(url, "SageMaker.FrobnicateWidgets")
    assert (status, body["__type"]) == (400, "UnknownOperationException")
    with pytest.raises(ClientError) as excinfo:  # a SageMaker operation the local service does not serve
        sm.list_domains()
    code, message, status = error_of(excinfo)
    assert (code, status) == ("UnknownOperationException", 400)
    assert "does not implement ListDomains" in message
    status, body = signed_post(url, "SageMaker.ListPipelines", b"[not json")
    assert (status, body["__type"]) == (400, "SerializationException")


def botocore_report(client, operation: str, params: dict) -> str:
    shape = client.meta.service_model.operation_model(operation).input_shape
    return str(ParamValidationError(report=ParamValidator().validate(params, shape).generate_report()))


def test_validation_error_carries_botocore_message(local_aws_env):
    url, _ = local_aws_env
    raw = boto3.client("sagemaker", config=Config(parameter_validation=False))
    for params in ({}, {"PipelineName": ""}):
        with pytest.raises(ClientError) as excinfo:
            raw.describe_pipeline(**params)
        assert error_of(excinfo) == ("ValidationException", botocore_report(raw, "DescribePipeline", params), 400)
    assert 'Missing required parameter in input: "PipelineName"' in botocore_report(raw, "DescribePipeline", {})
    unknown = {"PipelineName": "x", "Bogus": 1}
    status, body = signed_post(url, "SageMaker.DescribePipeline", json.dumps(unknown).encode())
    assert (status, body["__type"]) == (400, "ValidationException")
    assert body["message"] == botocore_report(raw, "DescribePipeline", unknown)
    assert 'Unknown parameter in input: "Bogus"' in body["message"]
    with pytest.raises(ClientError) as excinfo:  # what SageMaker checks server-side and botocore does not
        raw.list_pipelines(SortBy="Colour")
    code, message, _ = error_of(excinfo)
    assert code == "ValidationException"
    assert message.startswith("1 validation error detected: Value 'Colour' at 'sortBy' failed to satisfy")
    with pytest.raises(ClientError) as excinfo:
        raw.create_pipeline(PipelineName="bad_name", PipelineDefinition=tiny_definition(), RoleArn=LOCAL_ROLE_ARN,
                            ClientRequestToken=uuid.uuid4().hex)
    assert "Member must satisfy regular expression pattern" in error_of(excinfo)[1]


# ---------------------------------------------------------------------------------------------- pipelines


def test_pipeline_create_describe_list_update_delete(sm):
    name = unique("crud")
    arn = create(sm, name, PipelineDescription="first", Tags=[{"Key": "team", "Value": "ml"}])
    assert arn == f"arn:aws:sagemaker:us-east-1:000000000000:pipeline/{name}"
    described = sm.describe_pipeline(PipelineName=name)
    assert json.loads(described["PipelineDefinition"]) == json.loads(tiny_definition())
    assert (described["PipelineStatus"], described["RoleArn"], described["PipelineDescription"]) == \
        ("Active", LOCAL_ROLE_ARN, "first")
    assert sm.describe_pipeline(PipelineName=arn)["PipelineName"] == name  # name or ARN
    with pytest.raises(ClientError) as excinfo:
        create(sm, name)
    code, message, _ = error_of(excinfo)
    assert code == "ValidationException" and "already exists" in message  # what Pipeline.upsert looks for
    assert sm.list_tags(ResourceArn=arn)["Tags"] == [{"Key": "team", "Value": "ml"}]

    updated = sm.update_pipeline(PipelineName=name, PipelineDefinition=tiny_definition("way below"),
                                 PipelineDescription="second")
    assert updated == {"PipelineArn": arn, "PipelineVersionId": 2, "ResponseMetadata": updated["ResponseMetadata"]}
    assert "way below" in sm.describe_pipeline(PipelineName=name)["PipelineDefinition"]
    assert "way below" not in sm.describe_pipeline(PipelineName=name, PipelineVersionId=1)["PipelineDefinition"]
    versions = sm.list_pipeline_versions(PipelineName=name)["PipelineVersionSummaries"]
    assert [v["PipelineVersionId"] for v in versions] == [2, 1]
    listed = sm.list_pipelines(PipelineNamePrefix=name)["PipelineSummaries"]
    assert [(p["PipelineName"], p["PipelineDescription"]) for p in listed] == [(name, "second")]

    assert sm.delete_pipeline(PipelineName=name)["PipelineArn"] == arn
    with pytest.raises(ClientError) as excinfo:
        sm.describe_pipeline(PipelineName=name)
    assert error_of(excinfo)[:2] == ("ResourceNotFound", f"Pipeline '{arn}' does not exist.")


def test_a_step_the_engine_cannot_run_fails_at_run_time_and_a_malformed_definition_is_refused(sm):
    """As on SageMaker: a definition is refused only when malformed; a step kind the local engine cannot run
    (EMR) fails that step when the execution reaches it, with the reason."""
    cycle = json.dumps({"Version": "2020-12-01", "Steps": [
        {"Name": "A", "Type": "Fail", "Arguments": {}, "DependsOn": ["B"]},
        {"Name": "B", "Type": "Fail", "Arguments": {}, "DependsOn": ["A"]}]})
    with pytest.raises(ClientError) as excinfo:
        create(sm, unique("cycle"), cycle)
    code, message, _ = error_of(excinfo)
    assert code == "ValidationException" and "cycle" in message.lower()

    name = unique("emr")
    create(sm, name, json.dumps({"Version": "2020-12-01", "Steps": [{"Name": "Emr", "Type": "EMR", "Arguments": {
        "ClusterId": "j-1", "StepConfig": {"HadoopJarStep": {"Jar": "command-runner.jar"}}}}]}))
    arn = sm.start_pipeline_execution(PipelineName=name)["PipelineExecutionArn"]
    with contextlib.suppress(WaiterError):
        waiter(sm).wait(PipelineExecutionArn=arn)
    assert sm.describe_pipeline_execution(PipelineExecutionArn=arn)["PipelineExecutionStatus"] == "Failed"
    step = steps_by_name(sm, arn)["Emr"]
    assert step["StepStatus"] == "Failed" and "EMR" in step["FailureReason"], step


# --------------------------------------------------------------------------------------------- executions


def test_execution_succeeds_and_reports_like_sagemaker(sm):
    name = unique("ok")
    create(sm, name)
    request = {"PipelineName": name, "ClientRequestToken": uuid.uuid4().hex, "PipelineExecutionDisplayName": "run1",
               "PipelineParameters": [{"Name": "Score", "Value": "0.75"}]}
    arn = sm.start_pipeline_execution(**request)["PipelineExecutionArn"]
    assert sm.start_pipeline_execution(**request)["PipelineExecutionArn"] == arn  # the same token starts nothing new
    waiter(sm).wait(PipelineExecutionArn=arn)

    described = sm.describe_pipeline_execution(PipelineExecutionArn=arn)
    assert (described["PipelineExecutionStatus"], described["PipelineExecutionDisplayName"]) == ("Succeeded", "run1")
    assert described["PipelineExperimentConfig"] == {"ExperimentName": name, "TrialName": arn.rsplit("/", 1)[1]}
    assert described["PipelineVersionId"] == 1
    steps = steps_by_name(sm, arn)
    assert list(steps) == ["CheckScore"]  # the untaken branch is not listed
    check = steps["CheckScore"]
    assert (check["StepStatus"], check["StepDisplayName"], check["AttemptCount"]) == ("Succeeded", "Check the score", 1)
    assert check["Metadata"] == {"Condition": {"Outcome": "True"}}
    assert check["EndTime"] >= check["StartTime"]
    parameters = sm.list_pipeline_parameters_for_execution(PipelineExecutionArn=arn)["PipelineParameters"]
    assert {p["Name"]: p["Value"] for p in parameters} == {"Threshold": "0.5", "Score": "0.75"}
    definition = sm.describe_pipeline_definition_for_execution(PipelineExecutionArn=arn)["PipelineDefinition"]
    assert json.loads(definition) == json.loads(tiny_definition())
    summaries = sm.list_pipeline_executions(PipelineName=name)["PipelineExecutionSummaries"]
    assert [(s["PipelineExecutionArn"], s["PipelineExecutionStatus"]) for s in summaries] == [(arn, "Succeeded")]

    with pytest.raises(ClientError) as excinfo:
        sm.stop_pipeline_execution(PipelineExecutionArn=arn)
    code, message, _ = error_of(excinfo)
    assert code == "ValidationException" and "status is Succeeded" in message


def test_failed_execution_fail_step_metadata_and_retry(sm):
    name = unique("fail")
    create(sm, name)
    arn = sm.start_pipeline_execution(PipelineName=name, PipelineParameters=[{"Name": "Score", "Value": "0.1"}])[
        "PipelineExecutionArn"]
    with pytest.raises(WaiterError, match="terminal failure state"):
        waiter(sm).wait(PipelineExecutionArn=arn)
    described = sm.describe_pipeline_execution(PipelineExecutionArn=arn)
    assert (described["PipelineExecutionStatus"], described["FailureReason"]) == ("Failed", "score below 0.5")
    steps = steps_by_name(sm, arn)
    assert steps["CheckScore"]["Metadata"] == {"Condition": {"Outcome": "False"}}
    too_low = steps["TooLow"]
    assert (too_low["StepStatus"], too_low["FailureReason"]) == ("Failed", "score below 0.5")
    assert too_low["Metadata"] == {"Fail": {"ErrorMessage": "score below 0.5"}}
    assert too_low["StepDescription"] == "the score is too low"

    assert sm.retry_pipeline_execution(PipelineExecutionArn=arn)["PipelineExecutionArn"] == arn
    assert sm.describe_pipeline_execution(PipelineExecutionArn=arn)["PipelineExecutionStatus"] != "Failed"
    retried = wait_terminal(sm, arn)
    assert retried["PipelineExecutionStatus"] == "Failed"  # the FailStep fails again, on its second attempt
    steps = steps_by_name(sm, arn)
    assert (steps["TooLow"]["AttemptCount"], steps["CheckScore"]["AttemptCount"]) == (2, 1)


def test_stop_before_the_engine_began(sm):
    name = unique("stop")
    create(sm, name)
    arn = sm.start_pipeline_execution(PipelineName=name)["PipelineExecutionArn"]
    sm.stop_pipeline_execution(PipelineExecutionArn=arn)  # the runner is still starting Python
    assert sm.describe_pipeline_execution(PipelineExecutionArn=arn)["PipelineExecutionStatus"] in ("Stopping",
                                                                                                  "Stopped")
    assert wait_terminal(sm, arn)["PipelineExecutionStatus"] == "Stopped"
    assert sm.retry_pipeline_execution(PipelineExecutionArn=arn)["PipelineExecutionArn"] == arn
    assert wait_terminal(sm, arn)["PipelineExecutionStatus"] == "Succeeded"


def test_unknown_execution_and_pipeline(sm):
    missing = "arn:aws:sagemaker:us-east-1:000000000000:pipeline/nope/execution/abcdefabcdef"
    with pytest.raises(ClientError) as excinfo:
        sm.describe_pipeline_execution(PipelineExecutionArn=missing)
    assert error_of(excinfo)[0] == "ResourceNotFound"
    with pytest.raises(ClientError) as excinfo:
        sm.start_pipeline_execution(PipelineName=unique("nope"))
    assert error_of(excinfo)[0] == "ResourceNotFound"
    with pytest.raises(ClientError) as excinfo:
        sm.describe_training_job(TrainingJobName="never-ran")
    assert error_of(excinfo)[:2] == ("ValidationException", "Requested resource not found.")


def test_bad_parameter_value_is_a_validation_error(sm):
    name = unique("param")
    create(sm, name)
    with pytest.raises(ClientError) as excinfo:
        sm.start_pipeline_execution(PipelineName=name, PipelineParameters=[{"Name": "Score", "Value": "high"}])
    code, message, _ = error_of(excinfo)
    assert code == "ValidationException" and "Score" in message


def test_engine_gone_is_settled_failed_and_runner_records_its_crash(local_aws_env, sm):
    _, home = local_aws_env
    records = ExecutionStore()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = records.create_execution("settle", tiny_definition(), {"Threshold": 0.5, "Score": 0.9})
    records.conn.execute("UPDATE executions SET pid = ? WHERE execution_id = ?", (dead.pid, gone["execution_id"]))
    described = sm.describe_pipeline_execution(PipelineExecutionArn=gone["arn"])
    assert described["PipelineExecutionStatus"] == "Failed"
    assert "ended without recording the end" in described["FailureReason"]

    broken = records.create_execution("crash", json.dumps({"Version": "2020-12-01", "Steps": [  # a cycle
        {"Name": "X", "Type": "Fail", "Arguments": {}, "DependsOn": ["Y"]},
        {"Name": "Y", "Type": "Fail", "Arguments": {}, "DependsOn": ["X"]}]}), {})
    result = subprocess.run([sys.executable, "-m", "pipelines.local.api.runner", "start", broken["execution_id"]],
                            env={**os.environ, "MLOPS_HOME": str(home)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    described = sm.describe_pipeline_execution(PipelineExecutionArn=broken["arn"])
    assert described["PipelineExecutionStatus"] == "Failed"
    assert "DefinitionError" in described["FailureReason"] and "cycle" in described["FailureReason"].lower()
    assert (home / "runs" / broken["execution_id"] / "engine.log").is_file()


# -------------------------------------------------------------------------------------- registry, runtime


def test_model_package_group_and_package_through_the_api(sm):
    group = unique("Group")
    sm.create_model_package_group(ModelPackageGroupName=group, ModelPackageGroupDescription="api test")
    assert sm.describe_model_package_group(ModelPackageGroupName=group)["ModelPackageGroupName"] == group
    created = sm.create_model_package(
        ModelPackageGroupName=group, ModelApprovalStatus="PendingManualApproval",
        InferenceSpecification={"Containers": [{"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/x:1",
                                                "ModelDataUrl": "s3://mlops-local/models/model.tar.gz"}],
                                "SupportedContentTypes": ["application/x-image"],
                                "SupportedResponseMIMETypes": ["application/json"]})
    arn = created["ModelPackageArn"]
    assert arn.endswith(f"model-package/{group.lower()}/1")
    described = sm.describe_model_package(ModelPackageName=arn)
    assert (described["ModelApprovalStatus"], described["ModelPackageVersion"]) == ("PendingManualApproval", 1)
    assert isinstance(described["CreationTime"].timestamp(), float)  # a timestamp on the wire, parsed by botocore
    sm.update_model_package(ModelPackageArn=arn, ModelApprovalStatus="Rejected", ApprovalDescription="no")
    listed = sm.list_model_packages(ModelPackageGroupName=group)["ModelPackageSummaryList"]
    assert [(p["ModelPackageArn"], p["ModelApprovalStatus"]) for p in listed] == [(arn, "Rejected")]
    with pytest.raises(ClientError) as excinfo:
        sm.describe_model_package(ModelPackageName=f"{group}/9")
    assert error_of(excinfo)[0] == "ValidationException"


def test_runtime_unknown_endpoint_is_validation_error(local_aws_env):
    runtime = boto3.client("sagemaker-runtime")
    with pytest.raises(ClientError) as excinfo:
        runtime.invoke_endpoint(EndpointName="no-such-endpoint", Body=b"{}", ContentType="application/json")
    assert error_of(excinfo) == ("ValidationError", "Endpoint no-such-endpoint of account 000000000000 not found.",
                                 400)


# ------------------------------------------------------------------------------------------------------ SDK


def test_sagemaker_sdk_pipeline_upsert_start_wait_list_steps(local_aws_env):
    from sagemaker.workflow.condition_step import ConditionStep
    from sagemaker.workflow.conditions import ConditionGreaterThanOrEqualTo
    from sagemaker.workflow.fail_step import FailStep
    from sagemaker.workflow.functions import Join
    from sagemaker.workflow.parameters import ParameterFloat
    from sagemaker.workflow.pipeline import Pipeline

    from pipelines.pipeline import make_session, sdk_build_context

    score, threshold = ParameterFloat("Score", default_value=0.9), ParameterFloat("Threshold", default_value=0.5)
    fail = FailStep(name="TooLow", error_message=Join(on=" ", values=["score below", threshold]))
    check = ConditionStep(name="CheckScore", conditions=[ConditionGreaterThanOrEqualTo(left=score, right=threshold)],
                          if_steps=[], else_steps=[fail])
    session = make_session("us-east-1", "mlops-local", boto3.Session())
    name = unique("sdk")
    with sdk_build_context():
        pipeline = Pipeline(name=name, steps=[check], parameters=[score, threshold], sagemaker_session=session)
        created = pipeline.upsert(role_arn=LOCAL_ROLE_ARN)
        updated = pipeline.upsert(role_arn=LOCAL_ROLE_ARN, description="again",  # the update path, then tags
                                  tags=[{"Key": "owner", "Value": "sdk"}])
        assert created["PipelineArn"] == updated["PipelineArn"]
        assert updated["PipelineVersionId"] == 2
        assert session.sagemaker_client.list_tags(ResourceArn=created["PipelineArn"])["Tags"] == \
            [{"Key": "owner", "Value": "sdk"}]
        execution = pipeline.start(parameters={"Score": 0.2})
        with pytest.raises(WaiterError, match="terminal failure state"):
            execution.wait(delay=1, max_attempts=60)
        steps = {s["StepName"]: s for s in execution.list_steps()}
        assert steps["TooLow"]["Metadata"]["Fail"]["ErrorMessage"] == "score below 0.5"
        assert steps["CheckScore"]["Metadata"]["Condition"]["Outcome"] == "False"
        ok = pipeline.start()
        ok.wait(delay=1, max_attempts=60)
        assert ok.describe()["PipelineExecutionStatus"] == "Succeeded"
        assert [s["StepName"] for s in ok.list_steps()] == ["CheckScore"]
        assert {p["Name"]: p["Value"] for p in ok.list_parameters()["PipelineParameters"]} == \
            {"Score": "0.9", "Threshold": "0.5"}
        assert pipeline.describe()["PipelineDescription"] == "again"
        assert len(pipeline.list_executions()["PipelineExecutionSummaries"]) == 2


# ----------------------------------------------------------------------------------------------------- jobs


def record_jobs(records: ExecutionStore) -> dict:
    """An execution with the step records the engine leaves: a processing job that succeeded (its properties keyed
    by input/output name, with engine-internal keys), a training job that failed, a tuning job and its trials."""
    execution = records.create_execution(unique("jobs"), tiny_definition(), {})
    eid, now = execution["execution_id"], time.time()
    prep = unique("pipelines-prep")
    records.start_step(eid, "Prep", "Processing", None)
    app = {"ImageUri": "img:1"}
    records.set_step_arguments(eid, "Prep", {"AppSpecification": app, "RoleArn": LOCAL_ROLE_ARN}, None)
    records.finish_step(eid, "Prep", "Succeeded", properties={
        "ProcessingJobName": prep,
        "ProcessingJobArn": f"arn:aws:sagemaker:us-east-1:000000000000:processing-job/{prep}",
        "ProcessingJobStatus": "Completed", "AppSpecification": app, "RoleArn": LOCAL_ROLE_ARN,
        "ProcessingInputs": {"code": {"InputName": "code", "S3Input": {
            "S3Uri": "s3://mlops-local/code", "LocalPath": "/opt/ml/processing/input/code", "S3DataType": "S3Prefix",
            "S3InputMode": "File"}}},
        "ProcessingOutputConfig": {"Outputs": {"train": {"OutputName": "train", "S3Output": {
            "S3Uri": "s3://mlops-local/train", "LocalPath": "/opt/ml/processing/train", "S3UploadMode": "EndOfJob"}}}},
        "ProcessingStartTime": now, "ProcessingEndTime": now, "LocalJobDir": "/tmp/engine-internal"})
    records.start_step(eid, "Train", "Training", None)
    records.set_step_arguments(eid, "Train", {
        "AlgorithmSpecification": {"TrainingImage": "img:2", "TrainingInputMode": "File"}, "RoleArn": LOCAL_ROLE_ARN,
        "HyperParameters": {"epochs": "2"}, "OutputDataConfig": {"S3OutputPath": "s3://mlops-local/out"},
        "ResourceConfig": {"InstanceType": "ml.m5.large", "InstanceCount": 1, "VolumeSizeInGB": 5},
        "StoppingCondition": {"MaxRuntimeInSeconds": 60}}, None)
    records.finish_step(eid, "Train", "Failed", failure_reason="AlgorithmError: boom")
    tuning = unique("tune")
    objective = {"Type": "Maximize", "MetricName": "valid_accuracy"}
    records.start_step(eid, "Tune", "Tuning", None)
    records.set_step_arguments(eid, "Tune", {}, None)
    trials = [(f"{tuning}-001-aaaa", "Completed", {"lr": "0.01"}, 0.8), (f"{tuning}-002-bbbb", "Failed", {"lr": "1"},
                                                                         None)]
    for index, (job, status, tuned, value) in enumerate(trials, 1):
        records.record_trial(eid, "Tune", index, job, status, tuned, objective=value, started_at=now, ended_at=now,
                             failure_reason=None if value else "diverged")
    records.finish_step(eid, "Tune", "Succeeded", properties={
        "HyperParameterTuningJobName": tuning, "HyperParameterTuningJobStatus": "Completed",
        "HyperParameterTuningJobArn": f"arn:aws:sagemaker:us-east-1:000000000000:hyper-parameter-tuning-job/{tuning}",
        "HyperParameterTuningJobConfig": {"Strategy": "Bayesian", "HyperParameterTuningJobObjective": objective,
                                          "ResourceLimits": {"MaxNumberOfTrainingJobs": 2}},
        "TrainingJobDefinition": {"AlgorithmSpecification": {"TrainingImage": "img:2", "TrainingInputMode": "File"},
                                  "RoleArn": LOCAL_ROLE_ARN, "StaticHyperParameters": {"epochs": "3"}},
        "BestTrainingJob": {"TrainingJobName": trials[0][0], "TrainingJobStatus": "Completed",
                            "TunedHyperParameters": {"lr": "0.01"}, "CreationTime": now},
        "TrainingJobSummaries": [{"TrainingJobName": trials[0][0], "ObjectiveStatus": "Succeeded",
                                  "ModelArtifacts": {"S3ModelArtifacts": "s3://mlops-local/m.tar.gz"}}],
        "OptunaStudyName": "engine-internal"})
    records.mark_execution(eid, "Failed", "Step Train failed: AlgorithmError: boom")
    return {"execution": execution, "prep": prep, "tuning": tuning, "trials": [t[0] for t in trials]}


def test_jobs_the_engine_ran_through_the_api(local_aws_env, sm):
    recorded = record_jobs(ExecutionStore())
    processing = sm.describe_processing_job(ProcessingJobName=recorded["prep"])
    assert processing["ProcessingJobStatus"] == "Completed"
    assert [i["InputName"] for i in processing["ProcessingInputs"]] == ["code"]  # a list on the wire
    assert processing["ProcessingOutputConfig"]["Outputs"][0]["S3Output"]["S3Uri"] == "s3://mlops-local/train"
    assert "LocalJobDir" not in processing
    assert recorded["prep"] in [j["ProcessingJobName"] for j in sm.list_processing_jobs()["ProcessingJobSummaries"]]

    steps = steps_by_name(sm, recorded["execution"]["arn"])
    train_arn = steps["Train"]["Metadata"]["TrainingJob"]["Arn"]
    assert steps["Prep"]["Metadata"] == {"ProcessingJob": {"Arn": processing["ProcessingJobArn"]}}
    failed = sm.describe_training_job(TrainingJobName=train_arn.rsplit("/", 1)[1])
    assert (failed["TrainingJobStatus"], failed["FailureReason"]) == ("Failed", "AlgorithmError: boom")
    assert failed["HyperParameters"] == {"epochs": "2"}
    assert failed["TrainingJobArn"] == train_arn

    tuning = sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=recorded["tuning"])
    assert steps["Tune"]["Metadata"] == {"TuningJob": {"Arn": tuning["HyperParameterTuningJobArn"]}}
    assert tuning["BestTrainingJob"]["TrainingJobName"] == recorded["trials"][0]
    assert "OptunaStudyName" not in tuning
    trials = sm.list_training_jobs_for_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=recorded["tuning"], SortBy="FinalObjectiveMetricValue")["TrainingJobSummaries"]
    assert [(t["TrainingJobName"], t["TrainingJobStatus"]) for t in trials] == \
        [(recorded["trials"][0], "Completed"), (recorded["trials"][1], "Failed")]
    assert trials[0]["FinalHyperParameterTuningJobObjectiveMetric"] == {"MetricName": "valid_accuracy", "Value": 0.8}
    best = sm.describe_training_job(TrainingJobName=recorded["trials"][0])
    assert best["HyperParameters"] == {"epochs": "3", "lr": "0.01"}
    assert best["TuningJobArn"] == tuning["HyperParameterTuningJobArn"]
    assert best["ModelArtifacts"] == {"S3ModelArtifacts": "s3://mlops-local/m.tar.gz"}
    listed = sm.list_training_jobs(NameContains=recorded["tuning"], StatusEquals="Failed")["TrainingJobSummaries"]
    assert [j["TrainingJobName"] for j in listed] == [recorded["trials"][1]]


def test_tags_and_endpoint_errors_through_the_api(sm):
    group = unique("Tagged")
    arn = sm.create_model_package_group(ModelPackageGroupName=group)["ModelPackageGroupArn"]
    sm.add_tags(ResourceArn=arn, Tags=[{"Key": "a", "Value": "1"}, {"Key": "b", "Value": "2"}])
    sm.delete_tags(ResourceArn=arn, TagKeys=["a"])
    assert sm.list_tags(ResourceArn=arn)["Tags"] == [{"Key": "b", "Value": "2"}]
    with pytest.raises(ClientError) as excinfo:
        sm.delete_tags(ResourceArn=arn + "-gone", TagKeys=["a"])
    assert error_of(excinfo)[0] == "ValidationException"
    with pytest.raises(ClientError) as excinfo:
        sm.create_endpoint(EndpointName=unique("ep"), EndpointConfigName="no-such-config")
    assert error_of(excinfo)[0] == "ValidationException"


FAKE_ENDPOINT_SERVER = r'''
import http.server, json, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if body == b"fail":
            status, headers = 424, {"x-amzn-ErrorType": "ModelError:http://internal.amazon.com/coral/com.amazon.sagemaker/"}
            payload = json.dumps({"message": "model said no", "OriginalStatusCode": 500}).encode()
        else:
            status = 200
            headers = {"X-Amzn-Invoked-Production-Variant": "AllTraffic",
                       "X-Amzn-SageMaker-Custom-Attributes": self.headers.get("X-Amzn-SageMaker-Custom-Attributes", "")}
            payload = json.dumps({"path": self.path, "body": body.decode(), "accept": self.headers.get("Accept"),
                                  "content_type": self.headers.get("Content-Type")}).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
'''


@pytest.fixture
def fake_endpoint(local_aws_env, tmp_path):
    """A server that answers the runtime path as an endpoint server would, registered as a running local endpoint
    (its command line names the endpoint server module, which is how a live server is recognized)."""
    import psutil

    from pipelines.local.serving import endpoints
    from pipelines.local.storage.store import connect

    proc = subprocess.Popen([sys.executable, "-c", FAKE_ENDPOINT_SERVER, "pipelines.local.serving.endpoint_server"],
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        name = unique("fake")
        conn = connect(endpoints.SCHEMA)
        conn.execute("INSERT INTO endpoints (name, pid, pid_create_time, port, url, state_dir, created_at, "
                     "deployed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (name, proc.pid, psutil.Process(proc.pid).create_time(), port, f"http://127.0.0.1:{port}",
                      str(tmp_path), time.time(), time.time()))
        conn.close()
        yield name
    finally:
        proc.kill()
        proc.wait()


def test_runtime_forwards_to_the_endpoint_server(fake_endpoint):
    runtime = boto3.client("sagemaker-runtime")
    answer = runtime.invoke_endpoint(EndpointName=fake_endpoint, Body=b'{"x": 1}', ContentType="application/json",
                                     Accept="application/json", CustomAttributes="trace=1")
    echoed = json.loads(answer["Body"].read())
    assert echoed == {"path": f"/endpoints/{fake_endpoint}/invocations", "body": '{"x": 1}',
                      "accept": "application/json", "content_type": "application/json"}
    assert (answer["InvokedProductionVariant"], answer["CustomAttributes"]) == ("AllTraffic", "trace=1")
    with pytest.raises(ClientError) as excinfo:
        runtime.invoke_endpoint(EndpointName=fake_endpoint, Body=b"fail", ContentType="application/json")
    assert error_of(excinfo) == ("ModelError", "model said no", 424)
    assert excinfo.value.response["OriginalStatusCode"] == 500


def test_definition_from_s3_location(sm):
    from pipelines.local.storage.store import ArtifactStore

    name = unique("s3def")
    ArtifactStore().put_bytes(f"s3://mlops-local/definitions/{name}.json", tiny_definition("from s3").encode())
    create_kwargs = {"PipelineDefinitionS3Location": {"Bucket": "mlops-local", "ObjectKey": f"definitions/{name}.json"}}
    sm.create_pipeline(PipelineName=name, RoleArn=LOCAL_ROLE_ARN, **create_kwargs)
    assert "from s3" in sm.describe_pipeline(PipelineName=name)["PipelineDefinition"]
    with pytest.raises(ClientError) as excinfo:
        sm.update_pipeline(PipelineName=name, PipelineDefinitionS3Location={"Bucket": "mlops-local",
                                                                            "ObjectKey": "definitions/missing.json"})
    code, message, _ = error_of(excinfo)
    assert code == "ValidationException" and "s3://mlops-local/definitions/missing.json" in message


def test_sdk_uploads_a_large_definition_through_local_s3(local_aws_env):
    """Above 100 KB the SDK uploads the definition to its default bucket and sends PipelineDefinitionS3Location."""
    import importlib.util

    if importlib.util.find_spec("pipelines.local.api.s3") is None:
        pytest.skip("pipelines.local.api.s3 (the local S3 service) is not there yet: the SDK's upload needs it")
    from sagemaker.workflow.fail_step import FailStep
    from sagemaker.workflow.pipeline import Pipeline

    from pipelines.pipeline import make_session, sdk_build_context

    s3 = boto3.client("s3")
    with contextlib.suppress(ClientError):
        s3.create_bucket(Bucket="mlops-local")
    session = make_session("us-east-1", "mlops-local", boto3.Session())
    name = unique("big")
    steps = [FailStep(name=f"Fail{i}", error_message="x" * 3000) for i in range(40)]
    with sdk_build_context():
        pipeline = Pipeline(name=name, steps=steps, sagemaker_session=session)
        assert len(pipeline.definition().encode()) > 100 * 1024
        pipeline.upsert(role_arn=LOCAL_ROLE_ARN)
        described = pipeline.describe()
    assert json.loads(described["PipelineDefinition"]) == json.loads(pipeline.definition())
    assert s3.list_objects_v2(Bucket="mlops-local", Prefix=name)["KeyCount"] == 1
