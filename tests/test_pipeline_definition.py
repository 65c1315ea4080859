"""The SageMaker pipeline definition, built offline: deterministic, no AWS call, and every step's request valid
against botocore's own service models (not a hand-written schema)."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import botocore.endpoint
import botocore.session
import pytest
from botocore.validate import ParamValidator

from pipelines import packaging
from pipelines import pipeline as pl
from training.serving_code import SERVING_FILES

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
REGION = "eu-west-1"
ROLE = "arn:aws:iam::123456789012:role/SageMakerPipelineRole"
BUCKET = "my-artifacts"
FAKE_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE":
            "/nonexistent"}


@pytest.fixture(scope="module")
def offline():
    """Fake credentials; any socket connection or botocore request is recorded and fails."""
    attempts: list[str] = []
    mp = pytest.MonkeyPatch()
    for key, value in FAKE_ENV.items():
        mp.setenv(key, value)

    def no_connect(self, address, *args, **kwargs):
        attempts.append(f"socket {address}")
        raise OSError(f"network blocked in tests: {address}")

    def no_request(self, operation_model, request_dict):
        attempts.append(f"aws {operation_model.service_model.service_name}.{operation_model.name}")
        raise RuntimeError(f"AWS call in an offline test: {operation_model.name}")

    mp.setattr(socket.socket, "connect", no_connect)
    mp.setattr(socket.socket, "connect_ex", no_connect)
    mp.setattr(botocore.endpoint.Endpoint, "make_request", no_request)
    yield attempts
    mp.undo()


@pytest.fixture(scope="module")
def bundles() -> packaging.CodeBundles:
    return packaging.build_code_bundles(ROOT)


def build(bundles: packaging.CodeBundles, **kwargs: Any) -> str:
    code = packaging.code_locations(BUCKET, "imgclf", bundles)
    return pl.pipeline_definition(pl.get_pipeline(REGION, ROLE, BUCKET, code, **kwargs))


@pytest.fixture(scope="module")
def definition_json(offline, bundles) -> str:
    first = build(bundles)
    second = build(bundles)
    assert first == second, "two builds of the same pipeline differ"
    assert offline == [], f"building the definition touched the network/AWS: {offline}"
    return first


@pytest.fixture(scope="module")
def definition(definition_json) -> dict[str, Any]:
    return json.loads(definition_json)


@pytest.fixture(scope="module")
def variant(offline, bundles) -> dict[str, Any]:
    """Hyperband, spot training with checkpoints, rule actions on, caching off."""
    built = build(bundles, tuning_strategy="Hyperband", use_spot_instances=True, stop_training_on_rule_issue=True,
                  cache=False, sagemaker_project_arn="arn:aws:sagemaker:eu-west-1:123456789012:project/p-abc")
    assert offline == []
    return json.loads(built)


def all_steps(definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
    steps: dict[str, dict[str, Any]] = {}

    def walk(items):
        for step in items:
            steps[step["Name"]] = step
            if step["Type"] == "Condition":
                walk(step["Arguments"]["IfSteps"])
                walk(step["Arguments"]["ElseSteps"])

    walk(definition["Steps"])
    return steps


# --- botocore validation -------------------------------------------------------------------------------------------

_SESSION = botocore.session.get_session()
_PLACEHOLDER_KEYS = ("Get", "Std:Join", "Std:JsonGet")


def _placeholder(shape) -> Any:
    return {"string": "placeholder", "integer": 1, "long": 1, "float": 0.5, "double": 0.5, "boolean": True,
            "timestamp": "2024-01-01T00:00:00Z", "blob": b"x"}[shape.type_name]


def substitute(value: Any, shape) -> Any:
    """Replace pipeline expressions (Get, Std:Join, Std:JsonGet) with a value of the type the API expects."""
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _PLACEHOLDER_KEYS:
        assert shape.type_name not in ("structure", "list", "map"), f"expression where a {shape.type_name} goes"
        return _placeholder(shape)
    if shape.type_name == "structure" and isinstance(value, dict):
        return {k: substitute(v, shape.members[k]) if k in shape.members else v for k, v in value.items()}
    if shape.type_name == "list" and isinstance(value, list):
        return [substitute(v, shape.member) for v in value]
    if shape.type_name == "map" and isinstance(value, dict):
        return {k: substitute(v, shape.value) for k, v in value.items()}
    return value


def validate(service: str, operation: str, params: dict[str, Any]) -> dict[str, Any]:
    shape = _SESSION.get_service_model(service).operation_model(operation).input_shape
    resolved = substitute(params, shape)
    report = ParamValidator().validate(resolved, shape)
    assert not report.has_errors(), f"{operation}: {report.generate_report()}"
    return resolved


def test_definition_is_deterministic_and_offline(definition_json, offline):
    assert "sagemaker_job_name" not in definition_json
    assert not re.search(r"20\d\d-\d\d-\d\d-\d\d-\d\d-\d\d", definition_json), "a timestamp in the definition"
    assert offline == []


def test_definition_identical_in_a_fresh_process_with_another_hash_seed(definition_json, tmp_path):
    """The CLI's ``definition`` command, in a new interpreter (different set ordering), gives the same JSON."""
    env = {**os.environ, **FAKE_ENV, "PYTHONHASHSEED": "12345", "MLOPS_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.run", "--target", "sagemaker", "--region", REGION, "--role-arn", ROLE,
         "--bucket", BUCKET, "definition"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == definition_json.strip()


def test_every_step_request_is_valid_for_the_sagemaker_api(definition):
    steps = all_steps(definition)
    operations = {"Processing": ("CreateProcessingJob", "ProcessingJobName"),
                  "Training": ("CreateTrainingJob", "TrainingJobName"),
                  "Tuning": ("CreateHyperParameterTuningJob", "HyperParameterTuningJobName"),
                  "RegisterModel": ("CreateModelPackage", None)}
    validated = 0
    for name, step in steps.items():
        if step["Type"] not in operations:
            continue
        operation, job_name_key = operations[step["Type"]]
        params = dict(step["Arguments"])
        if job_name_key:  # the SDK pops job names; SageMaker generates them at run time
            assert job_name_key not in params
            params[job_name_key] = f"pipelines-x-{name}"
        validate("sagemaker", operation, params)
        validated += 1
    assert validated == 5


def test_lambda_step_is_a_valid_invoke(definition):
    step = all_steps(definition)[pl.STEP_DEPLOY]
    shape = _SESSION.get_service_model("lambda").operation_model("Invoke").input_shape
    pattern = shape.members["FunctionName"].metadata["pattern"]
    assert re.fullmatch(pattern, step["FunctionArn"]), step["FunctionArn"]
    payload = {k: ("x" if isinstance(v, dict) else v) for k, v in step["Arguments"].items()}
    validate("lambda", "Invoke", {"FunctionName": step["FunctionArn"], "Payload": json.dumps(payload).encode()})
    # The event of CONTRACTS §8.
    assert {"model_package_group_name", "endpoint_name", "instance_type", "instance_count"} <= set(step["Arguments"])
    assert step["Arguments"]["endpoint_name"] == {"Get": "Parameters.EndpointName"}
    assert [o["OutputName"] for o in step["OutputParameters"]] == ["status", "message", "model_package_arn"]
    assert step["DependsOn"] == [pl.STEP_REGISTER_DEFINITION_NAME]


def test_variant_requests_are_valid(variant):
    steps = all_steps(variant)
    tune = steps[pl.STEP_TUNE]["Arguments"]
    validate("sagemaker", "CreateHyperParameterTuningJob", {**tune, "HyperParameterTuningJobName": "t"})
    config = tune["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Hyperband"
    assert config["TrainingJobEarlyStoppingType"] == "Off"  # SageMaker rejects Auto with Hyperband
    assert config["StrategyConfig"]["HyperbandStrategyConfig"]["MaxResource"] == {"Get": "Parameters.EpochsMax"}
    assert "IntegerParameterRanges" not in config["ParameterRanges"] or not any(
        r["Name"] == "epochs" for r in config["ParameterRanges"]["IntegerParameterRanges"])
    assert tune["TrainingJobDefinition"]["EnableManagedSpotTraining"] is True
    train = steps[pl.STEP_TRAIN]["Arguments"]
    # checkpoints per execution and step (the local tuner adds each trial's job name; see test_definition_fixes)
    for name, args in ((pl.STEP_TUNE, tune["TrainingJobDefinition"]), (pl.STEP_TRAIN, train)):
        assert args["CheckpointConfig"]["S3Uri"] == {"Std:Join": {"On": "/", "Values": [
            "s3:/", BUCKET, "imgclf", "executions", {"Get": "Execution.PipelineExecutionId"}, name, "checkpoints"]}}
    validate("sagemaker", "CreateTrainingJob", {**train, "TrainingJobName": "t"})
    assert train["HyperParameters"]["epochs"] == {"Std:Join": {"On": "", "Values": [{"Get": "Parameters.EpochsMax"}]}}
    # smdebug_rulesconfig serialises actions as JSON with escaped quotes
    actions = [json.loads(rule["RuleParameters"]["action_json"].replace('\\"', '"'))
               for rule in train["DebugRuleConfigurations"]]
    assert actions and all(a == [{"name": "stoptraining", "training_job_prefix": "pipelines-"}] for a in actions)
    assert all(s.get("CacheConfig", {"Enabled": False})["Enabled"] is False for s in steps.values())
    register = steps[pl.STEP_REGISTER_DEFINITION_NAME]["Arguments"]
    assert register["CustomerMetadataProperties"]["sagemaker_project_arn"].endswith("project/p-abc")


# --- the DAG ----------------------------------------------------------------------------------------------------

def test_steps_and_types(definition):
    types = {name: step["Type"] for name, step in all_steps(definition).items()}
    assert types == {
        "PrepareData": "Processing", "TuneHyperparameters": "Tuning", "TrainBestModel": "Training",
        "EvaluateModel": "Processing", "CheckAccuracy": "Condition", "RegisterModel-RegisterModel": "RegisterModel",
        "DeployApprovedModel": "Lambda", "AccuracyBelowThreshold": "Fail"}
    assert pl.step_names(definition) == list(types)


def _references(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Get" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_references(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_references(item))
    return found


def test_every_reference_resolves_to_a_parameter_or_an_earlier_step(definition):
    params = set(pl.definition_parameters(definition))
    names = pl.step_names(definition)
    for ref in _references(definition["Steps"]):
        kind, _, rest = ref.partition(".")
        if kind == "Parameters":
            assert rest in params, ref
        elif kind == "Steps":
            assert rest.split(".")[0] in names, ref
        else:
            assert ref in ("Execution.PipelineExecutionId",), ref


def test_parameters(definition):
    params = pl.definition_parameters(definition)
    expected = {"InputDataUrl": "String", "ProcessingInstanceType": "String", "TrainingInstanceType": "String",
                "MaxTrainingJobs": "Integer", "MaxParallelTrainingJobs": "Integer", "AccuracyThreshold": "Float",
                "ModelApprovalStatus": "String", "EndpointName": "String", "EndpointInstanceType": "String",
                "Arch": "String", "ImageSize": "Integer", "EpochsMin": "Integer", "EpochsMax": "Integer"}
    assert {name: params[name]["Type"] for name in expected} == expected
    assert params["TrainingInstanceType"]["DefaultValue"] == "ml.g5.xlarge"
    assert params["ModelApprovalStatus"]["DefaultValue"] == "PendingManualApproval"


def test_processing_runs_the_scripts_from_the_code_bundle(definition, bundles):
    steps = all_steps(definition)
    code = packaging.code_locations(BUCKET, "imgclf", bundles)
    for name, script in ((pl.STEP_PREPARE, "preprocess.py"), (pl.STEP_EVALUATE, "evaluate.py")):
        args = steps[name]["Arguments"]
        assert args["AppSpecification"]["ContainerEntrypoint"] == [
            "python3", f"/opt/ml/processing/input/code/steps/{script}"]
        assert f"steps/{script}" in bundles.files
        inputs = {i["InputName"]: i["S3Input"] for i in args["ProcessingInputs"]}
        assert inputs["code"]["S3Uri"] == code.src_prefix
        assert inputs["code"]["LocalPath"] == "/opt/ml/processing/input/code"
    outputs = steps[pl.STEP_PREPARE]["Arguments"]["ProcessingOutputConfig"]["Outputs"]
    prepare_outputs = {o["OutputName"] for o in outputs}
    assert prepare_outputs == {"train", "validation", "test", "manifest"}


def test_training_uses_the_uploaded_sourcedir(definition, bundles):
    code = packaging.code_locations(BUCKET, "imgclf", bundles)
    steps = all_steps(definition)
    static = steps[pl.STEP_TUNE]["Arguments"]["TrainingJobDefinition"]["StaticHyperParameters"]
    train = steps[pl.STEP_TRAIN]["Arguments"]["HyperParameters"]
    for hps in (static, train):
        assert json.loads(hps["sagemaker_submit_directory"]) == code.sourcedir
        assert json.loads(hps["sagemaker_program"]) == "training/train.py"
    for config in (steps[pl.STEP_TRAIN]["Arguments"]["InputDataConfig"],
                   steps[pl.STEP_TUNE]["Arguments"]["TrainingJobDefinition"]["InputDataConfig"]):
        assert [c["ChannelName"] for c in config] == ["train", "validation", "pretrained"]
        pretrained = config[-1]["DataSource"]["S3DataSource"]
        assert pretrained["S3Uri"] == {"Get": "Parameters.PretrainedWeights"}
    default = next(p for p in definition["Parameters"] if p["Name"] == "PretrainedWeights")["DefaultValue"]
    assert default == packaging.no_pretrained_weights_uri(BUCKET, "imgclf")


def test_tuning_objective_ranges_and_metrics(definition):
    from training.metrics import METRIC_DEFINITIONS

    tune = all_steps(definition)[pl.STEP_TUNE]["Arguments"]
    config = tune["HyperParameterTuningJobConfig"]
    assert config["HyperParameterTuningJobObjective"] == {"MetricName": "valid_accuracy", "Type": "Maximize"}
    assert config["Strategy"] == "Bayesian" and config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": {"Get": "Parameters.MaxTrainingJobs"},
                                        "MaxParallelTrainingJobs": {"Get": "Parameters.MaxParallelTrainingJobs"}}
    ranges = config["ParameterRanges"]
    names = {r["Name"] for kind in ranges.values() for r in kind}
    assert names == set(pl.TUNED_HYPERPARAMETERS)
    lr = next(r for r in ranges["ContinuousParameterRanges"] if r["Name"] == "lr")
    assert lr["ScalingType"] == "Logarithmic"
    assert tune["TrainingJobDefinition"]["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS


def test_best_model_training_uses_the_tuning_jobs_best_hyperparameters(definition):
    train = all_steps(definition)[pl.STEP_TRAIN]
    hps = train["Arguments"]["HyperParameters"]
    for name in pl.TUNED_HYPERPARAMETERS:
        assert _references(hps[name]) == [f"Steps.TuneHyperparameters.BestTrainingJob.TunedHyperParameters['{name}']"]
    assert hps["arch"] == {"Get": "Parameters.Arch"}
    assert train["DependsOn"] == [pl.STEP_TUNE]


def test_debugger_and_profiler_on_the_best_model_job(definition):
    args = all_steps(definition)[pl.STEP_TRAIN]["Arguments"]
    rules = {r["RuleConfigurationName"]: r for r in args["DebugRuleConfigurations"]}
    assert set(rules) == {"LossNotDecreasing", "Overfit", "Overtraining", "VanishingGradient",
                          "PoorWeightInitialization"}
    assert rules["LossNotDecreasing"]["RuleParameters"]["num_steps"] == "10"
    assert all(r["RuleParameters"]["rule_to_invoke"] == name for name, r in rules.items())
    assert all(".dkr.ecr.eu-west-1.amazonaws.com/sagemaker-debugger-rules" in r["RuleEvaluatorImage"]
               for r in rules.values())
    assert {r["RuleConfigurationName"] for r in args["ProfilerRuleConfigurations"]} == {
        "LowGPUUtilization", "ProfilerReport"}
    assert args["ProfilerConfig"]["ProfilingIntervalInMilliseconds"] == 500
    assert args["ProfilerConfig"].get("DisableProfiler") is False
    hook = args["DebugHookConfig"]
    collections = [c["CollectionName"] for c in hook["CollectionConfigurations"]]
    assert sorted(collections) == collections and len(set(collections)) == len(collections)
    assert {"losses", "gradients", "weights"} <= set(collections)
    assert hook["HookParameters"] == {"train.save_interval": "50", "eval.save_interval": "10"}
    # tuning trials carry no Debugger configuration at all
    trial = all_steps(definition)[pl.STEP_TUNE]["Arguments"]["TrainingJobDefinition"]
    assert not {"DebugHookConfig", "DebugRuleConfigurations", "ProfilerConfig"} & set(trial)


def test_condition_reads_the_evaluation_property_file(definition):
    steps = all_steps(definition)
    assert steps[pl.STEP_EVALUATE]["PropertyFiles"] == [
        {"PropertyFileName": "EvaluationReport", "OutputName": "evaluation", "FilePath": "evaluation.json"}]
    outputs = steps[pl.STEP_EVALUATE]["Arguments"]["ProcessingOutputConfig"]["Outputs"]
    assert [o["OutputName"] for o in outputs] == ["evaluation"]
    check = steps[pl.STEP_CHECK]["Arguments"]
    (condition,) = check["Conditions"]
    assert condition["Type"] == "GreaterThanOrEqualTo"
    assert condition["LeftValue"] == {"Std:JsonGet": {
        "PropertyFile": {"Get": "Steps.EvaluateModel.PropertyFiles.EvaluationReport"},
        "Path": "multiclass_classification_metrics.accuracy.value"}}
    assert condition["RightValue"] == {"Get": "Parameters.AccuracyThreshold"}
    assert [s["Name"] for s in check["IfSteps"]] == [pl.STEP_REGISTER_DEFINITION_NAME, pl.STEP_DEPLOY]
    assert [s["Name"] for s in check["ElseSteps"]] == [pl.STEP_FAIL]
    message = steps[pl.STEP_FAIL]["Arguments"]["ErrorMessage"]["Std:Join"]["Values"]
    assert condition["LeftValue"] in message and {"Get": "Parameters.AccuracyThreshold"} in message


def test_registration_without_repack(definition):
    steps = all_steps(definition)
    assert not any("Repack" in name for name in steps)
    args = steps[pl.STEP_REGISTER_DEFINITION_NAME]["Arguments"]
    (container,) = args["InferenceSpecification"]["Containers"]
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    # the handler travels in model.tar.gz under code/ (training/serving_code.py): no serving bundle
    assert "SAGEMAKER_SUBMIT_DIRECTORY" not in container["Environment"]
    assert container["ModelDataUrl"] == {"Get": "Steps.TrainBestModel.ModelArtifacts.S3ModelArtifacts"}
    assert "pytorch-inference" in container["Image"] and REGION in container["Image"]
    spec = args["InferenceSpecification"]
    assert {"image/jpeg", "image/png", "application/x-image"} <= set(spec["SupportedContentTypes"])
    assert spec["SupportedResponseMIMETypes"] == ["application/json"]
    assert args["ModelApprovalStatus"] == {"Get": "Parameters.ModelApprovalStatus"}
    assert args["ModelPackageGroupName"] == pl.DEFAULT_MODEL_PACKAGE_GROUP
    metrics_uri = args["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]["Std:Join"]["Values"]
    assert metrics_uri == [{"Get": "Steps.EvaluateModel.ProcessingOutputConfig.Outputs['evaluation'].S3Output.S3Uri"},
                           "evaluation.json"]


def test_cache_and_retry_policies(definition):
    steps = all_steps(definition)
    for name in (pl.STEP_PREPARE, pl.STEP_TUNE, pl.STEP_TRAIN, pl.STEP_EVALUATE):
        assert steps[name]["CacheConfig"] == {"Enabled": True, "ExpireAfter": "P30D"}
        kinds = {kind for policy in steps[name]["RetryPolicies"] for kind in policy["ExceptionType"]}
        assert {"Step.THROTTLING", "Step.SERVICE_FAULT", "SageMaker.CAPACITY_ERROR",
                "SageMaker.RESOURCE_LIMIT"} <= kinds


def test_get_pipeline_rejects_bad_arguments(bundles):
    code = packaging.code_locations(BUCKET, "imgclf", bundles)
    with pytest.raises(ValueError, match="tuning_strategy"):
        pl.get_pipeline(REGION, ROLE, BUCKET, code, tuning_strategy="Grid")
    with pytest.raises(ValueError, match="role"):
        pl.get_pipeline(REGION, "MyRole", BUCKET, code)


# --- code bundles -----------------------------------------------------------------------------------------------

def _members(blob: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        return tar.getmembers()


def test_bundles_are_reproducible_and_follow_the_contract(bundles):
    again = packaging.build_code_bundles(ROOT)
    assert (again.sha, again.sourcedir) == (bundles.sha, bundles.sourcedir)
    source = _members(bundles.sourcedir)
    names = [m.name for m in source]
    assert names == sorted(names)
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in source)
    assert "training/train.py" in names and "steps/preprocess.py" in names and "inference/inference.py" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    if "training/requirements.txt" in names:
        assert "requirements.txt" in names


def test_sha_changes_with_content_and_ignores_caches(tmp_path):
    for package in packaging.SOURCE_PACKAGES:
        (tmp_path / package).mkdir()
    for rel in (*SERVING_FILES, "steps/preprocess.py"):
        (tmp_path / rel).write_text(f"# {rel}\n")
    first = packaging.build_code_bundles(tmp_path)
    (tmp_path / "steps" / "__pycache__").mkdir()
    (tmp_path / "steps" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "training" / ".hidden").write_text("x")
    assert packaging.build_code_bundles(tmp_path).sha == first.sha
    (tmp_path / "steps" / "preprocess.py").write_text("# changed\n")
    changed = packaging.build_code_bundles(tmp_path)
    assert changed.sha != first.sha and changed.sourcedir != first.sourcedir


def test_upload_writes_every_bundle_under_the_content_address(bundles):
    stored: dict[str, bytes] = {}
    code = packaging.code_locations("b", "pre/fix", bundles)
    packaging.upload_code_bundles(bundles, code, stored.__setitem__)
    assert list(stored)[-1] == code.sourcedir  # last: its presence means the upload is complete
    assert stored[code.sourcedir] == bundles.sourcedir
    assert stored[f"s3://b/pre/fix/code/{bundles.sha}/src/steps/evaluate.py"] == bundles.files["steps/evaluate.py"]
    with pytest.raises(ValueError):
        packaging.code_locations("s3://b", "p", bundles)


def test_missing_package_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="training"):
        packaging.build_code_bundles(tmp_path)
