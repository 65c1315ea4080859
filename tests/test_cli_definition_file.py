"""``python -m pipelines.run start --definition FILE``: any pipeline's definition JSON, upserted and run through the
local AWS service, with its own Parameters; ``describe --output json`` lists every step's type, status and reason."""

from __future__ import annotations

import json

import pytest

from pipelines import run

pytestmark = pytest.mark.fast

DEFINITION = {
    "Version": "2020-12-01", "Metadata": {},
    "Parameters": [{"Name": "Threshold", "Type": "Float", "DefaultValue": 0.5},
                   {"Name": "Message", "Type": "String", "DefaultValue": "below"}],
    "PipelineExperimentConfig": None,
    "Steps": [{
        "Name": "Check", "Type": "Condition",
        "Arguments": {
            "Conditions": [{"Type": "GreaterThanOrEqualTo", "LeftValue": 0.7,
                            "RightValue": {"Get": "Parameters.Threshold"}}],
            "IfSteps": [],
            "ElseSteps": [{"Name": "Stop", "Type": "Fail",
                           "Arguments": {"ErrorMessage": {"Std:Join": {"On": " ", "Values": [
                               {"Get": "Parameters.Message"}, {"Get": "Parameters.Threshold"}]}}}}],
        },
    }],
}


@pytest.fixture
def definition_file(tmp_path):
    path = tmp_path / "someone-elses-pipeline.json"
    path.write_text(json.dumps(DEFINITION))
    return path


def _describe(name: str, capsys) -> dict:
    capsys.readouterr()
    assert run.main(["--pipeline-name", name, "describe", "latest", "--output", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_definition_file_runs_with_its_own_parameters(local_aws_env, definition_file, capsys):
    assert run.main(["start", "--definition", str(definition_file), "--wait", "--poll-seconds", "0.2"]) == 0
    described = _describe("someone-elses-pipeline", capsys)  # named after the file
    assert described["PipelineExecutionStatus"] == "Succeeded"
    steps = {s["StepName"]: s for s in described["Steps"]}
    assert steps["Check"]["StepStatus"] == "Succeeded" and steps["Check"]["Metadata"]["Condition"]["Outcome"] == "True"

    assert run.main(["--pipeline-name", "other", "start", "--definition", str(definition_file), "--param",
                     "Threshold=0.9", "--param", "Message=too low:", "--wait", "--poll-seconds", "0.2"]) == 1
    described = _describe("other", capsys)
    steps = {s["StepName"]: s for s in described["Steps"]}
    assert described["PipelineExecutionStatus"] == "Failed"
    assert (steps["Stop"]["StepStatus"], steps["Stop"]["FailureReason"]) == ("Failed", "too low: 0.9")
    assert {s["StepName"]: s.get("StepType") for s in described["Steps"]} == {"Check": "Condition", "Stop": "Fail"}


def test_parameters_are_checked_against_the_definition(local_aws_env, definition_file, capsys):
    assert run.main(["start", "--definition", str(definition_file), "--param", "Arch=resnet18"]) == 2
    assert "unknown pipeline parameter 'Arch'" in capsys.readouterr().err
    assert run.main(["start", "--definition", str(definition_file), "--param", "Threshold=high"]) == 2
    assert "expects Float" in capsys.readouterr().err
    bad = definition_file.with_name("bad.json")
    bad.write_text("{not json")
    assert run.main(["start", "--definition", str(bad)]) == 2
    assert "not a readable pipeline definition JSON" in capsys.readouterr().err
