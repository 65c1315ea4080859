"""Unit tests of the local engine's expression resolver and graph parsing, on definition fragments in the exact shape
``Pipeline.definition()`` produces (fast, no jobs run)."""

from __future__ import annotations

import json

import pytest

from pipelines.local.engine import core as engine
from pipelines.local.engine import resolver
from pipelines.local.storage.executions import parse_iso_duration

pytestmark = pytest.mark.fast

DEFINITION = {
    "Version": "2020-12-01",
    "Parameters": [
        {"Name": "InputDataUrl", "Type": "String", "DefaultValue": "s3://mlops-local/data"},
        {"Name": "AccuracyThreshold", "Type": "Float", "DefaultValue": 0.7},
        {"Name": "MaxTrainingJobs", "Type": "Integer", "DefaultValue": 12},
        {"Name": "UseSpot", "Type": "Boolean", "DefaultValue": False},
    ],
}

PROPS = {
    "PrepareData": {"ProcessingOutputConfig": {"Outputs": {
        "train": {"OutputName": "train", "S3Output": {"S3Uri": "s3://mlops-local/x/train"}}}}},
    "Tune": {"BestTrainingJob": {"TunedHyperParameters": {"lr": "0.01", "optimizer": "\"adam\""},
                                 "TrainingJobName": "t-001"},
             "TrainingJobSummaries": [{"TrainingJobName": "t-001"}, {"TrainingJobName": "t-002"}]},
    "Train": {"ModelArtifacts": {"S3ModelArtifacts": "s3://mlops-local/m/model.tar.gz"}},
    "Deploy": {"OutputParameters": {"status": "Created"}},
}


def ctx(**kw) -> resolver.ResolverContext:
    def props(name: str):
        return PROPS[name]

    def read(step: str, name: str):
        assert (step, name) == ("EvaluateModel", "EvaluationReport")
        return {"multiclass_classification_metrics": {"accuracy": {"value": 0.82}}}

    params = resolver.resolve_parameters(DEFINITION, kw.pop("overrides", None))
    return resolver.ResolverContext(parameters=params, step_properties=props, read_property_file=read,
                                    execution={"PipelineExecutionId": "abc123", "PipelineName": "P",
                                               "PipelineExecutionArn": "arn:x", "StartDateTime": "t"}, **kw)


def test_parameters_defaults_overrides_and_type_checks():
    values = resolver.resolve_parameters(DEFINITION, {"MaxTrainingJobs": "3", "AccuracyThreshold": "1",
                                                      "UseSpot": "true"})
    assert values == {"InputDataUrl": "s3://mlops-local/data", "AccuracyThreshold": 1.0, "MaxTrainingJobs": 3,
                      "UseSpot": True}
    assert isinstance(values["AccuracyThreshold"], float)
    with pytest.raises(resolver.ParameterError, match="MaxTrainingJobs is an Integer"):
        resolver.resolve_parameters(DEFINITION, {"MaxTrainingJobs": "2.5"})
    with pytest.raises(resolver.ParameterError, match="AccuracyThreshold is a Float"):
        resolver.resolve_parameters(DEFINITION, {"AccuracyThreshold": "high"})
    with pytest.raises(resolver.ParameterError, match="unknown parameter.*Nope"):
        resolver.resolve_parameters(DEFINITION, {"Nope": "1"})
    assert resolver.parse_param_overrides(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(resolver.ParameterError, match="NAME=VALUE"):
        resolver.parse_param_overrides(["novalue"])


def test_get_join_and_execution_variables():
    c = ctx(overrides={"InputDataUrl": "/data/dogs"})
    join = {"Std:Join": {"On": "/", "Values": ["s3:/", "mlops-local", {"Get": "Execution.PipelineExecutionId"},
                                              "PrepareData", {"Get": "Parameters.MaxTrainingJobs"}]}}
    assert resolver.resolve(join, c) == "s3://mlops-local/abc123/PrepareData/12"
    assert resolver.resolve({"Get": "Parameters.InputDataUrl"}, c) == "/data/dogs"
    tree = {"a": [{"Get": "Steps.PrepareData.ProcessingOutputConfig.Outputs['train'].S3Output.S3Uri"}],
            "b": {"Std:Join": {"On": "", "Values": [{"Get": "Steps.Tune.BestTrainingJob.TunedHyperParameters['lr']"}]}},
            "c": {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"},
            "d": {"Get": "Steps.Deploy.OutputParameters['status']"},
            "e": {"Get": "Steps.Tune.TrainingJobSummaries[1].TrainingJobName"},
            "f": {"Std:Join": {"On": ",", "Values": [True, 0.5, {"Get": "Parameters.UseSpot"}]}}}
    assert resolver.resolve(tree, c) == {"a": ["s3://mlops-local/x/train"], "b": "0.01",
                                         "c": "s3://mlops-local/m/model.tar.gz", "d": "Created", "e": "t-002",
                                         "f": "true,0.5,false"}
    # symbolic execution variables (cache keys) do not depend on the execution
    sym = ctx(symbolic_execution=True)
    assert resolver.resolve(join, sym) == "s3://mlops-local/{Execution.PipelineExecutionId}/PrepareData/12"


def test_resolution_errors_name_the_problem():
    c = ctx()
    with pytest.raises(resolver.ResolutionError, match="no such parameter"):
        resolver.resolve({"Get": "Parameters.Missing"}, c)
    with pytest.raises(resolver.ResolutionError, match="does not exist"):
        resolver.resolve({"Get": "Steps.Train.ModelArtifacts.Nope"}, c)
    with pytest.raises(resolver.ResolutionError, match="unknown execution variable"):
        resolver.resolve({"Get": "Execution.Bogus"}, c)
    with pytest.raises(resolver.ResolutionError, match="has not produced properties"):
        resolver.resolve({"Get": "Steps.NotRun.X"}, resolver.ResolverContext(step_properties=lambda n: {}[n]))


def test_json_get_and_conditions():
    c = ctx()
    accuracy = {"Std:JsonGet": {"Path": "multiclass_classification_metrics.accuracy.value",
                                "PropertyFile": {"Get": "Steps.EvaluateModel.PropertyFiles.EvaluationReport"}}}
    assert resolver.resolve(accuracy, c) == 0.82
    gte = {"Type": "GreaterThanOrEqualTo", "LeftValue": accuracy, "RightValue": {"Get": "Parameters.AccuracyThreshold"}}
    assert resolver.evaluate_condition(gte, c) is True
    assert resolver.evaluate_condition(gte, ctx(overrides={"AccuracyThreshold": "0.9"})) is False
    assert resolver.evaluate_condition({"Type": "Not", "Condition": gte}, c) is False
    assert resolver.evaluate_condition({"Type": "Or", "Conditions": [
        {"Type": "LessThan", "LeftValue": 1, "RightValue": 0},
        {"Type": "Equals", "LeftValue": {"Get": "Parameters.MaxTrainingJobs"}, "RightValue": 12}]}, c) is True
    assert resolver.evaluate_condition({"Type": "In", "QueryValue": {"Get": "Parameters.InputDataUrl"},
                                        "Values": ["a", "s3://mlops-local/data"]}, c) is True
    assert resolver.evaluate_condition({"Type": "LessThanOrEqualTo", "LeftValue": "0.5", "RightValue": 0.7}, c)
    assert resolver.evaluate_condition({"Type": "GreaterThan", "LeftValue": 0.71, "RightValue": 0.7}, c)
    with pytest.raises(resolver.ResolutionError, match="cannot compare"):
        resolver.evaluate_condition({"Type": "Equals", "LeftValue": "abc", "RightValue": 1}, c)
    with pytest.raises(resolver.ResolutionError, match="unsupported condition type"):
        resolver.evaluate_condition({"Type": "Xor", "Conditions": []}, c)


def test_hyperparameters_are_decoded_like_the_training_toolkit():
    assert resolver.hyperparameter_arg("\"resnet18\"") == "resnet18"
    assert resolver.hyperparameter_arg("resnet18") == "resnet18"
    assert resolver.hyperparameter_arg("2") == "2"
    assert resolver.hyperparameter_arg("\"16\"") == "16"
    assert resolver.hyperparameter_arg("[1, 2]") == "[1, 2]"


def _step(name, stype, args=None, **extra):
    return {"Name": name, "Type": stype, "Arguments": args or {}, **extra}


def test_graph_dependencies_branches_and_errors():
    definition = {"Steps": [
        _step("A", "Processing"),
        _step("B", "Training", {"X": {"Get": "Steps.A.ProcessingOutputConfig.Outputs['t'].S3Output.S3Uri"}}),
        _step("C", "Condition", {"Conditions": [{"Type": "Equals", "LeftValue": {"Std:JsonGet": {
            "Path": "a", "PropertyFile": {"Get": "Steps.B.PropertyFiles.F"}}}, "RightValue": 1}],
            "IfSteps": [_step("R", "RegisterModel"),
                        _step("L", "Lambda", FunctionArn="arn:aws:lambda:us-east-1:000000000000:function:"
                              "imgclf-deploy-approved-model", DependsOn=["R"])],
            "ElseSteps": [_step("F", "Fail", {"ErrorMessage": "no"})]}),
    ]}
    steps = engine.parse_definition(definition)
    assert steps["B"].deps == {"A"}
    assert steps["C"].deps == {"B"}
    assert steps["L"].deps == {"C", "R"} and steps["L"].branch == ("C", True)
    assert steps["F"].branch == ("C", False)
    order = engine.topological_order(steps)
    assert order.index("A") < order.index("B") < order.index("C") < order.index("R") < order.index("L")

    # A step type the engine cannot run is accepted here: that step fails when it is reached (test_step_kinds.py).
    assert engine.parse_definition({"Steps": [_step("E", "EMR")]})["E"].kind.type_name == "EMR"
    # Any Lambda function: invoked at run time through the local Lambda service (a missing one fails that step).
    assert engine.parse_definition({"Steps": [_step("L", "Lambda", FunctionArn="arn:aws:lambda:us-east-1:1:function:"
                                                    "other-fn")]})["L"].type == "Lambda"
    with pytest.raises(engine.DefinitionError, match="unknown step"):
        engine.parse_definition({"Steps": [_step("A", "Processing", DependsOn=["Ghost"])]})
    with pytest.raises(engine.DefinitionError, match="cycle"):
        engine.parse_definition({"Steps": [_step("A", "Processing", DependsOn=["B"]),
                                           _step("B", "Processing", DependsOn=["A"])]})
    json.dumps(definition)  # fragments stay plain JSON


def test_iso_durations():
    assert parse_iso_duration("P30D") == 30 * 86400
    assert parse_iso_duration("PT1H30M") == 5400
    assert parse_iso_duration("P1W") == 7 * 86400
    with pytest.raises(ValueError):
        parse_iso_duration("30 days")
