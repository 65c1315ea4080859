"""Small pipeline definitions for the UI's tests and benchmark (the JSON ``pipeline.definition()`` writes)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

ROLE = "arn:aws:iam::000000000000:role/MLOpsLocalExecutionRole"
BUCKET = "mlops-local"


def definition_of(*steps: dict[str, Any], parameters: list[dict[str, Any]] | None = None) -> str:
    return json.dumps({"Version": "2020-12-01", "Metadata": {}, "Parameters": parameters or [],
                       "PipelineExperimentConfig": None, "Steps": list(steps)})


def fail_step(name: str, message: Any) -> dict[str, Any]:
    return {"Name": name, "Type": "Fail", "Arguments": {"ErrorMessage": message}}


def retry_definition(flag_uri: str) -> str:
    """``Ready`` reads ``ready`` from ``flag_uri`` (``JsonGet(s3_uri=...)``): it fails while the object is missing;
    once it is there (``{"ready": 1}``) the If branch (``Done``) runs and the Else branch (``NotReady``) does not."""
    done = {"Name": "Done", "Type": "Condition", "Description": "<b>not bold</b>", "Arguments": {
        "Conditions": [{"Type": "GreaterThanOrEqualTo", "LeftValue": 1, "RightValue": 0}],
        "IfSteps": [], "ElseSteps": []}}
    ready = {"Name": "Ready", "Type": "Condition", "Description": "Is the flag object there?", "Arguments": {
        "Conditions": [{"Type": "GreaterThanOrEqualTo",
                        "LeftValue": {"Std:JsonGet": {"S3Uri": flag_uri, "Path": "ready"}}, "RightValue": 1}],
        "IfSteps": [done], "ElseSteps": [fail_step("NotReady", "the flag says not ready")]}}
    return definition_of(ready)


def sleep_definition(seconds: int = 300) -> str:
    """One processing step (the project's own environment) that sleeps: something to stop."""
    return definition_of({"Name": "Sleep", "Type": "Processing", "Arguments": {
        "ProcessingResources": {"ClusterConfig": {"InstanceCount": 1, "InstanceType": "ml.m5.large",
                                                  "VolumeSizeInGB": 1}},
        "AppSpecification": {"ImageUri": "local",
                             "ContainerEntrypoint": ["python3", "-c", f"import time; time.sleep({seconds})"]},
        "RoleArn": ROLE}})


def trivial_definition() -> str:
    """A Condition on a Parameter with a Fail step in its Else branch: executions that cost no job."""
    condition = {"Name": "Check", "Type": "Condition", "Arguments": {
        "Conditions": [{"Type": "GreaterThanOrEqualTo", "LeftValue": {"Get": "Parameters.Score"}, "RightValue": 0.5}],
        "IfSteps": [], "ElseSteps": [fail_step("TooLow", {"Std:Join": {"On": " ", "Values": [
            "score", {"Get": "Parameters.Score"}, "is below 0.5"]}})]}}
    return definition_of(condition, parameters=[{"Name": "Score", "Type": "Float", "DefaultValue": 0.9}])


def upsert(sm: Any, name: str, definition: str) -> None:
    try:
        sm.update_pipeline(PipelineName=name, PipelineDefinition=definition, RoleArn=ROLE)
    except sm.exceptions.ResourceNotFound:
        sm.create_pipeline(PipelineName=name, PipelineDefinition=definition, RoleArn=ROLE,
                           ClientRequestToken=str(uuid.uuid4()))


def start(sm: Any, name: str, description: str | None = None, **parameters: Any) -> str:
    request: dict[str, Any] = {"PipelineName": name, "ClientRequestToken": str(uuid.uuid4()),
                               "PipelineParameters": [{"Name": k, "Value": str(v)} for k, v in parameters.items()]}
    if description:
        request["PipelineExecutionDescription"] = description
    return sm.start_pipeline_execution(**request)["PipelineExecutionArn"]


def wait(sm: Any, arn: str, statuses: tuple[str, ...] = ("Succeeded", "Failed", "Stopped"),
         timeout: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        described = sm.describe_pipeline_execution(PipelineExecutionArn=arn)
        if described["PipelineExecutionStatus"] in statuses:
            return described
        if time.monotonic() > deadline:
            raise TimeoutError(f"{arn} still {described['PipelineExecutionStatus']} after {timeout:.0f} s")
        time.sleep(0.5)
