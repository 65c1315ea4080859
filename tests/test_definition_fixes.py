"""Definition fixes: Debugger rule parameters as AWS documents them, ARNs per partition, spot checkpoints per
execution, step and tuning trial."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import smdebug_rulesconfig.profiler_rules.rules as profiler_rule_configs
from smdebug_rulesconfig.debugger_rules._utils import _get_rule_config

from pipelines import arns, packaging
from pipelines import pipeline as pl
from pipelines.local.debugger import rules
from pipelines.local.engine import tuner
from pipelines.local.jobs import runtime as jobs
from training.metrics import METRIC_DEFINITIONS, format_epoch_metrics

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
ROLE = "arn:aws:iam::123456789012:role/SageMakerPipelineRole"
BUCKET = "my-artifacts"

# RuleParameters keys the SDK itself writes (smdebug_rulesconfig's ``rule_to_invoke``; ``action_json`` from
# ``actions=``), not parameters of the rule.
SDK_KEYS = {"rule_to_invoke", "action_json"}

# Parameters of the built-in Debugger rules, as AWS documents them ("List of Debugger built-in rules", tables
# "Parameter Descriptions for the <Rule> Rule", docs.aws.amazon.com/sagemaker/latest/dg/debugger-built-in-rules.html;
# source: awsdocs/amazon-sagemaker-developer-guide doc_source/debugger-built-in-rules.md), ``base_trial`` aside.
# smdebug_rulesconfig, which sagemaker.debugger.rule_configs wraps, ships each rule's name, ``rule_to_invoke`` and
# collections but no parameter list (its ruleConfigs.json holds only ``rule_to_invoke``), so the names cannot be
# derived from it; the tests below check against the package everything it does carry.
DOCUMENTED_DEBUGGER_RULE_PARAMETERS = {
    "LossNotDecreasing": {"collection_names", "tensor_regex", "use_losses_collection", "num_steps", "diff_percent",
                          "mode"},
    "Overfit": {"tensor_regex", "start_step", "patience", "ratio_threshold"},
    "Overtraining": {"patience_train", "patience_validation", "delta"},
    "VanishingGradient": {"threshold"},
    "PoorWeightInitialization": {"activation_inputs_regex", "threshold", "distribution_range", "patience", "steps"},
}


@pytest.fixture(scope="module")
def train_step() -> dict[str, Any]:
    bundles = packaging.build_code_bundles(ROOT)
    code = packaging.code_locations(BUCKET, "imgclf", bundles)
    definition = json.loads(pl.pipeline_definition(pl.get_pipeline(
        "eu-west-1", ROLE, BUCKET, code, stop_training_on_rule_issue=True)))
    (step,) = [s for s in definition["Steps"] if s["Name"] == pl.STEP_TRAIN]
    return step["Arguments"]


def test_every_debugger_rule_parameter_is_documented_for_its_rule(train_step):
    configured = {r["RuleConfigurationName"]: r["RuleParameters"] for r in train_step["DebugRuleConfigurations"]}
    assert set(configured) == set(DOCUMENTED_DEBUGGER_RULE_PARAMETERS)
    for name, params in configured.items():
        package = _get_rule_config(name)  # the built-in rule exactly as smdebug_rulesconfig ships it
        assert package is not None, f"{name} is not a built-in rule of smdebug_rulesconfig"
        assert params["rule_to_invoke"] == package["DebugRuleConfiguration"]["RuleParameters"]["rule_to_invoke"]
        assert set(package["DebugRuleConfiguration"]["RuleParameters"]) <= SDK_KEYS
        undocumented = set(params) - SDK_KEYS - DOCUMENTED_DEBUGGER_RULE_PARAMETERS[name]
        assert not undocumented, f"{name} gets parameters AWS does not document for it: {sorted(undocumented)}"
    assert {"start_step", "patience", "ratio_threshold"} <= set(configured["Overfit"])


def test_debugger_rules_save_the_collections_the_package_names(train_step):
    """Where smdebug_rulesconfig gives a rule its collections, the hook saves them (same include_regex)."""
    saved = {c["CollectionName"]: c.get("CollectionParameters", {})
             for c in train_step["DebugHookConfig"]["CollectionConfigurations"]}
    for name in DOCUMENTED_DEBUGGER_RULE_PARAMETERS:
        for collection in _get_rule_config(name).get("CollectionConfigurations", []):
            assert collection["CollectionName"] in saved, (name, collection)
            regex = collection.get("CollectionParameters", {}).get("include_regex")
            if regex:
                assert saved[collection["CollectionName"]]["include_regex"] == regex


def test_profiler_rule_parameters_are_the_package_rules_arguments(train_step):
    for rule in train_step["ProfilerRuleConfigurations"]:
        name = rule["RuleConfigurationName"]
        init = getattr(profiler_rule_configs, name).__init__
        accepted = {p.name for p in inspect.signature(init).parameters.values()
                    if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
        has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(init).parameters.values())
        extra = set(rule["RuleParameters"]) - SDK_KEYS - accepted
        assert not extra or has_kwargs, (name, extra)


def test_local_rules_read_exactly_the_documented_parameters():
    assert set(rules.TENSOR_RULES) == set(DOCUMENTED_DEBUGGER_RULE_PARAMETERS)
    for name, cls in rules.TENSOR_RULES.items():
        assert set(cls.PARAMETERS) == DOCUMENTED_DEBUGGER_RULE_PARAMETERS[name], name


def test_local_overfit_refuses_overtrainings_parameters():
    class Trial:  # enough of an smdebug trial without tensors
        logger = logging.getLogger("trial")

        def tensor_names(self, **_: Any) -> list[str]:
            return []

        def collections(self) -> dict[str, Any]:
            return {}

    with pytest.raises(rules.RuleParameterError, match="Overfit has no parameter patience_train, patience_validation"):
        rules.Overfit(Trial(), {"patience_train": "5", "patience_validation": "10", "ratio_threshold": "0.1"})
    with pytest.raises(rules.RuleParameterError, match="Overtraining has no parameter tensor_regex"):
        rules.Overtraining(Trial(), {"tensor_regex": ".*loss"})
    overfit = rules.Overfit(Trial(), {"start_step": "3", "patience": "2", "ratio_threshold": "0.25"})
    assert (overfit.start_step, overfit.patience, overfit.ratio_threshold) == (3, 2, 0.25)
    defaults = rules.Overtraining(Trial(), {})
    assert (defaults.patience_train, defaults.patience_validation, defaults.delta) == (5, 10, 0.1)


# --- ARNs ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("region", "partition"), [
    ("us-east-1", "aws"), ("cn-north-1", "aws-cn"), ("cn-northwest-1", "aws-cn"),
    ("us-gov-west-1", "aws-us-gov"), ("us-gov-east-1", "aws-us-gov"), ("us-iso-east-1", "aws-iso")])
def test_partition_comes_from_botocore(region, partition):
    assert arns.partition(region) == partition
    assert arns.lambda_function_arn(region, "123456789012", "fn") == (
        f"arn:{partition}:lambda:{region}:123456789012:function:fn")
    assert arns.sagemaker_arn(region, "123456789012", "training-job", "job-1") == (
        f"arn:{partition}:sagemaker:{region}:123456789012:training-job/job-1")
    assert arns.iam_role_arn(region, "123456789012", "R") == f"arn:{partition}:iam::123456789012:role/R"
    assert arns.parse(arns.iam_role_arn(region, "1", "R")) == (partition, "iam", "", "1", "role/R")


def test_unknown_region_and_bad_arn():
    with pytest.raises(arns.UnknownRegionError, match="xx-nowhere-1"):
        arns.partition("xx-nowhere-1")
    with pytest.raises(ValueError, match="not an ARN"):
        arns.parse("role/R")


def test_local_engine_arns_are_built_by_arns():
    from pipelines.local.storage import store

    assert store.LOCAL_ROLE_ARN == arns.iam_role_arn(store.LOCAL_REGION, store.LOCAL_ACCOUNT,
                                                     "MLOpsLocalExecutionRole")
    assert store.DEPLOY_FUNCTION_ARN == "arn:aws:lambda:us-east-1:000000000000:function:imgclf-deploy-approved-model"
    assert jobs._arn("training-job", "Job-1") == "arn:aws:sagemaker:us-east-1:000000000000:training-job/job-1"


def test_no_hand_built_arns_in_the_definition_code():
    for path in (ROOT / "pipelines" / "pipeline.py", ROOT / "pipelines" / "local" / "storage" / "store.py"):
        assert 'f"arn:aws:' not in path.read_text(), path


# --- spot checkpoints ------------------------------------------------------------------------------------------------

class _Records:
    def record_trial(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_each_tuning_trial_checkpoints_under_its_own_job_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "home"))
    seen: list[tuple[str, dict[str, Any]]] = []

    def fake_training_job(request, job_name, job_dir, artifacts, log_path, *, on_line=None, control=None, **_):
        seen.append((job_name, request["CheckpointConfig"]))
        on_line(format_epoch_metrics(1, train_loss=1.0, train_accuracy=0.5, valid_loss=1.0,
                                     valid_accuracy=0.1 * len(seen)))
        return {"ModelArtifacts": {"S3ModelArtifacts": f"s3://b/{job_name}/output/model.tar.gz"}}

    monkeypatch.setattr(jobs, "run_training_job", fake_training_job)
    base = "s3://b/imgclf/executions/exec-1/TuneHyperparameters/checkpoints"
    request = {
        "HyperParameterTuningJobConfig": {
            "Strategy": "Random", "RandomSeed": 1,
            "HyperParameterTuningJobObjective": {"MetricName": "valid_accuracy", "Type": "Maximize"},
            "ResourceLimits": {"MaxNumberOfTrainingJobs": 3, "MaxParallelTrainingJobs": 1},
            "ParameterRanges": {"ContinuousParameterRanges": [{"Name": "lr", "MinValue": "0.001",
                                                               "MaxValue": "0.1"}]}},
        "TrainingJobDefinition": {
            "AlgorithmSpecification": {"MetricDefinitions": METRIC_DEFINITIONS},
            "StaticHyperParameters": {"epochs": "1"}, "EnableManagedSpotTraining": True,
            "CheckpointConfig": {"S3Uri": base}},
    }
    result = tuner.run_tuning_job(request, "imgclf-tune-1", tmp_path / "step", None, execution_id="exec-1",
                                  step_name="TuneHyperparameters", records=_Records(), control=jobs.JobControl())
    assert len(seen) == 3 and result["HyperParameterTuningJobStatus"] == "Completed"
    assert [checkpoint["S3Uri"] for _, checkpoint in seen] == [f"{base}/{name}" for name, _ in seen]
    assert len({name for name, _ in seen}) == 3
    assert request["TrainingJobDefinition"]["CheckpointConfig"] == {"S3Uri": base}  # the definition is untouched
