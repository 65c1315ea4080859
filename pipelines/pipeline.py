"""The image-classification pipeline as a SageMaker Pipelines definition (the single source of truth).

``get_pipeline(...)`` returns a :class:`sagemaker.workflow.pipeline.Pipeline` whose ``definition()`` SageMaker runs
as is and the embedded local engine (``pipelines/local``) interprets:

1. ``PrepareData`` -- processing job running ``steps/preprocess.py`` on ``InputDataUrl``.
2. ``TuneHyperparameters`` -- tuning job over ``training/train.py`` (objective ``valid_accuracy``, maximize).
3. ``TrainBestModel`` -- retrains with the tuning job's best hyperparameters; Debugger rules and the Profiler go
   here because SageMaker attaches neither to tuning trials (in regions without them, see ``get_pipeline``).
4. ``EvaluateModel`` -- processing job running ``steps/evaluate.py``; ``evaluation.json`` is a PropertyFile.
5. ``CheckAccuracy`` -- accuracy >= ``AccuracyThreshold``: register and deploy, else ``AccuracyBelowThreshold``.
6. ``RegisterModel`` -- model package in ``ModelPackageGroupName`` with ``ModelApprovalStatus``.
7. ``DeployApprovedModel`` -- Lambda deploying the group's latest *approved* package (docs/CONTRACTS.md §8).

Building the definition makes no AWS call and is deterministic: code comes as ``s3://`` URIs that the CLI uploaded
under content-addressed keys (:mod:`pipelines.packaging`), processors are plain ``Processor`` objects with an
explicit image (the framework processors upload a generated ``runproc.sh``), the model's handler travels in
``model.tar.gz`` under ``code/`` and is named by ``SAGEMAKER_PROGRAM`` (``register()`` with an ``entry_point`` would
add a repack step),
image URIs come from the SDK's bundled tables, and the timestamped ``sagemaker_job_name`` the SDK writes into the
tuner's static hyperparameters is removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
# Without a level the SDK sets "sagemaker.config" to INFO and reports, on stdout, which config files it did not find.
if logging.getLogger("sagemaker.config").level == logging.NOTSET:
    logging.getLogger("sagemaker.config").setLevel(logging.WARNING)

import boto3  # noqa: E402
import sagemaker.utils  # noqa: E402
from sagemaker import fw_utils, image_uris  # noqa: E402
from sagemaker.debugger import (  # noqa: E402
    CollectionConfig,
    DebuggerHookConfig,
    ProfilerConfig,
    ProfilerRule,
    Rule,
    get_rule_container_image_uri,
    rule_configs,
)
from sagemaker.inputs import TrainingInput  # noqa: E402
from sagemaker.lambda_helper import Lambda  # noqa: E402
from sagemaker.model import Model  # noqa: E402
from sagemaker.model_metrics import MetricsSource, ModelMetrics  # noqa: E402
from sagemaker.processing import ProcessingInput, ProcessingOutput, Processor  # noqa: E402
from sagemaker.pytorch import PyTorch  # noqa: E402
from sagemaker.tuner import (  # noqa: E402
    CategoricalParameter,
    ContinuousParameter,
    HyperbandStrategyConfig,
    HyperparameterTuner,
    IntegerParameter,
    StrategyConfig,
)
from sagemaker.workflow.condition_step import ConditionStep  # noqa: E402
from sagemaker.workflow.conditions import ConditionGreaterThanOrEqualTo  # noqa: E402
from sagemaker.workflow.execution_variables import ExecutionVariables  # noqa: E402
from sagemaker.workflow.fail_step import FailStep  # noqa: E402
from sagemaker.workflow.functions import Join, JsonGet  # noqa: E402
from sagemaker.workflow.lambda_step import LambdaOutput, LambdaOutputTypeEnum, LambdaStep  # noqa: E402
from sagemaker.workflow.model_step import ModelStep  # noqa: E402
from sagemaker.workflow.parameters import ParameterFloat, ParameterInteger, ParameterString  # noqa: E402
from sagemaker.workflow.pipeline import Pipeline  # noqa: E402
from sagemaker.workflow.pipeline_context import PipelineSession  # noqa: E402
from sagemaker.workflow.properties import PropertyFile  # noqa: E402
from sagemaker.workflow.retry import (  # noqa: E402
    SageMakerJobExceptionTypeEnum,
    SageMakerJobStepRetryPolicy,
    StepExceptionTypeEnum,
    StepRetryPolicy,
)
from sagemaker.workflow.steps import CacheConfig, ProcessingStep, TrainingStep, TuningStep  # noqa: E402

from pipelines import arns  # noqa: E402
from pipelines.packaging import PRETRAINED_CHANNEL, CodeLocations, no_pretrained_weights_uri  # noqa: E402
from training.metrics import METRIC_DEFINITIONS, OBJECTIVE_METRIC, OBJECTIVE_TYPE  # noqa: E402
from training.serving_code import SERVING_PROGRAM  # noqa: E402

logger = logging.getLogger(__name__)

# --- names shared with the local engine and the tests -------------------------------------------------------------
STEP_PREPARE = "PrepareData"
STEP_TUNE = "TuneHyperparameters"
STEP_TRAIN = "TrainBestModel"
STEP_EVALUATE = "EvaluateModel"
STEP_CHECK = "CheckAccuracy"
STEP_FAIL = "AccuracyBelowThreshold"
STEP_REGISTER = "RegisterModel"
# ModelStep names the CreateModelPackage step "<name>-RegisterModel" in the definition (type "RegisterModel").
STEP_REGISTER_DEFINITION_NAME = f"{STEP_REGISTER}-RegisterModel"
STEP_DEPLOY = "DeployApprovedModel"
EVALUATION_PROPERTY_FILE = "EvaluationReport"
ACCURACY_JSON_PATH = "multiclass_classification_metrics.accuracy.value"

DEFAULT_PIPELINE_NAME = "ImageClassificationPipeline"
DEFAULT_MODEL_PACKAGE_GROUP = "ImageClassifierModels"
DEFAULT_BASE_JOB_PREFIX = "imgclf"
DEFAULT_DEPLOY_FUNCTION_NAME = "imgclf-deploy-approved-model"
TUNING_STRATEGIES = ("Bayesian", "Hyperband", "Random")

# Framework containers (image URIs resolved offline from the SDK's bundled tables, per region).
FRAMEWORK_VERSION = "2.6"
PY_VERSION = "py312"
GPU_REFERENCE_INSTANCE = "ml.g5.xlarge"
CPU_REFERENCE_INSTANCE = "ml.m5.xlarge"

# Container paths (CONTRACTS §2, §3, §7).
CODE_DIR = "/opt/ml/processing/input/code"
PROCESSING = "/opt/ml/processing"

CONTENT_TYPES = ["image/jpeg", "image/png", "application/x-image", "application/x-npy", "application/json"]
RESPONSE_TYPES = ["application/json"]
INFERENCE_INSTANCE_TYPES = ["ml.m5.large", "ml.m5.xlarge", "ml.m5.2xlarge", "ml.c5.xlarge", "ml.c5.2xlarge"]
TRANSFORM_INSTANCE_TYPES = ["ml.m5.xlarge", "ml.m5.2xlarge", "ml.c5.2xlarge"]

# Tuned hyperparameters: name -> range. The trainer receives every hyperparameter as ``--name value``.
TUNED_HYPERPARAMETERS = ("lr", "batch_size", "epochs", "dropout", "hidden_units", "optimizer")

TELEMETRY_OPT_OUT_CONFIG: dict[str, Any] = {
    "SchemaVersion": "1.0",
    "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}},
}


def pipeline_parameters(default_bucket: str, base_job_prefix: str = DEFAULT_BASE_JOB_PREFIX,
                        default_endpoint_name: str | None = None) -> dict[str, Any]:
    """The pipeline's Parameters by name (each a fresh SDK Parameter object, in definition order)."""
    params = [
        ParameterString("InputDataUrl", default_value=f"s3://{default_bucket}/{base_job_prefix}/data/raw/"),
        ParameterString("ProcessingInstanceType", default_value="ml.m5.xlarge"),
        ParameterString("TrainingInstanceType", default_value=GPU_REFERENCE_INSTANCE),
        ParameterInteger("MaxTrainingJobs", default_value=12),
        ParameterInteger("MaxParallelTrainingJobs", default_value=3),
        ParameterInteger("EpochsMin", default_value=5),
        ParameterInteger("EpochsMax", default_value=20),
        ParameterString("Arch", default_value="resnet50"),
        ParameterString("Pretrained", default_value="default"),
        # A state dict file (torch.save(model.state_dict())) for the trainer's ``pretrained`` channel; the default is
        # the placeholder object the CLI uploads (NO_PRETRAINED_WEIGHTS.txt): the channel always exists, holds no
        # weights, and the trainer falls back to ``Pretrained``.
        ParameterString("PretrainedWeights", default_value=no_pretrained_weights_uri(default_bucket, base_job_prefix)),
        ParameterInteger("ImageSize", default_value=224),
        ParameterInteger("ResizeSize", default_value=256),
        ParameterInteger("DataLoaderWorkers", default_value=4),
        ParameterFloat("AccuracyThreshold", default_value=0.7),
        ParameterString("ModelApprovalStatus", default_value="PendingManualApproval"),
        ParameterString("EndpointName", default_value=default_endpoint_name or f"{base_job_prefix}-endpoint"),
        ParameterString("EndpointInstanceType", default_value="ml.m5.large"),
        ParameterInteger("EndpointInstanceCount", default_value=1),
    ]
    return {p.name: p for p in params}


def make_session(region: str, default_bucket: str, boto_session: boto3.Session | None = None) -> PipelineSession:
    """A PipelineSession that makes no AWS call while a definition is built (no config files, telemetry off)."""
    boto_session = boto_session or boto3.Session(region_name=region)
    session = PipelineSession(boto_session=boto_session, default_bucket=default_bucket,
                              sagemaker_config=TELEMETRY_OPT_OUT_CONFIG)
    # ``default_bucket()`` would call s3:ListBuckets/CreateBucket the first time; the bucket is the caller's.
    session._default_bucket = default_bucket  # noqa: SLF001 -- no public way to skip the existence check
    return session


_VALIDATED_SDK_CONFIGS: set[str] = set()


@contextlib.contextmanager
def sdk_build_context() -> Iterator[None]:
    """Scope for building a definition with the SDK: quiet, and the SDK config validated once, not per lookup.

    With a ``sagemaker_config`` (needed for ``TelemetryOptOut``) the SDK re-validates the whole config against its
    JSON schema on every default lookup (~70 lookups x ~0.5 s here). The config never changes while we build, so
    each distinct config is validated once; the original validator is restored on exit.
    """
    original = sagemaker.utils.validate_sagemaker_config

    def validate_once(config: Any = None) -> None:
        key = json.dumps(config, sort_keys=True, default=str)
        if key not in _VALIDATED_SDK_CONFIGS:
            original(config)
            _VALIDATED_SDK_CONFIGS.add(key)

    sagemaker.utils.validate_sagemaker_config = validate_once
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Running within a PipelineSession")
            warnings.filterwarnings("ignore", message="Lambda function won't be updated")
            yield
    finally:
        sagemaker.utils.validate_sagemaker_config = original


def _s3_join(*parts: Any) -> Join:
    return Join(on="/", values=["s3:/", *parts])


# Debugger collections saved by the best-model job. Each rule is given exactly the collections it reads (the SDK
# otherwise adds its own copies with different save intervals, so the same collection would appear twice).
_SAVE_EVERY = {"train.save_interval": "50", "eval.save_interval": "10"}
DEBUGGER_COLLECTIONS = {
    "losses": CollectionConfig("losses", parameters={"train.save_interval": "10", "eval.save_interval": "1"}),
    "gradients": CollectionConfig("gradients", parameters=_SAVE_EVERY),
    "weights": CollectionConfig("weights", parameters=_SAVE_EVERY),
    "relu_input": CollectionConfig("relu_input", parameters={"include_regex": ".*relu_input", **_SAVE_EVERY}),
}
# Rule parameters: only the names AWS documents for each built-in rule ("List of Debugger built-in rules",
# docs.aws.amazon.com/sagemaker/latest/dg/debugger-built-in-rules.html); the local engine reads the same names
# from the definition (pipelines/local/debugger/rules.py). smdebug_rulesconfig carries the rules' names, collections and
# ``rule_to_invoke`` but not their parameter lists. Overfit takes ``patience``; ``patience_train`` and
# ``patience_validation`` are Overtraining's.
DEBUGGER_RULES: dict[str, tuple[Any, dict[str, str], tuple[str, ...]]] = {
    "LossNotDecreasing": (rule_configs.loss_not_decreasing,
                          {"num_steps": "10", "diff_percent": "0.1", "mode": "TRAIN"}, ("losses",)),
    "Overfit": (rule_configs.overfit,
                {"start_step": "0", "patience": "5", "ratio_threshold": "0.1"}, ("losses",)),
    "Overtraining": (rule_configs.overtraining,
                     {"patience_train": "5", "patience_validation": "10", "delta": "0.01"}, ("losses",)),
    "VanishingGradient": (rule_configs.vanishing_gradient, {"threshold": "0.0000001"}, ("gradients",)),
    "PoorWeightInitialization": (rule_configs.poor_weight_initialization,
                                 {"activation_inputs_regex": ".*relu_input", "threshold": "10.0",
                                  "distribution_range": "0.001", "patience": "5", "steps": "10"},
                                 ("relu_input",)),
}
PROFILER_RULES = ("LowGPUUtilization", "ProfilerReport")
SYSTEM_MONITOR_INTERVAL_MS = 500


class UnsupportedRegionError(ValueError):
    """The SageMaker PyTorch framework images this pipeline runs on do not exist in the region."""


@dataclass(frozen=True)
class DebuggerSupport:
    """What of SageMaker Debugger a region offers the best-model job (from the SDK's own tables, offline).

    ``hook``/``profiler``: the SDK accepts a Debugger hook config / a ProfilerConfig there (neither needs an
    image); ``rules``: the Debugger rule evaluator image exists there (every Debugger and Profiler rule runs in it).
    """

    region: str
    hook: bool
    profiler: bool
    rules: bool

    @property
    def debugger_rules(self) -> bool:
        return self.rules and self.hook

    @property
    def profiler_rules(self) -> bool:
        return self.rules and self.profiler

    def reason(self) -> str:
        if not (self.hook and self.profiler):
            return "the SageMaker SDK supports no Debugger/Profiler there"
        return "SageMaker Debugger has no rule evaluator image there" if not self.rules else "fully supported"

    def omitted(self) -> list[str]:
        """What the pipeline leaves out in this region, in words (empty: nothing)."""
        omitted = []
        if not self.debugger_rules:
            omitted.append(f"the Debugger rules ({', '.join(DEBUGGER_RULES)})")
        if not self.profiler_rules:
            omitted.append(f"the Profiler rules ({', '.join(PROFILER_RULES)})")
        if not self.hook:
            omitted.append("the Debugger hook config")
        if not self.profiler:
            omitted.append("the Profiler config")
        return omitted


def debugger_support(region: str) -> DebuggerSupport:
    """Which Debugger features ``region`` supports, per the SageMaker SDK's bundled tables (no AWS call)."""
    try:
        get_rule_container_image_uri(None, region)
        rules = True
    except ValueError:  # "Unsupported region: ..." -- no rule evaluator image in this region
        rules = False
    return DebuggerSupport(region=region, hook=region.lower() not in fw_utils.DEBUGGER_UNSUPPORTED_REGIONS,
                           profiler=region.lower() not in fw_utils.PROFILER_UNSUPPORTED_REGIONS, rules=rules)


def framework_images(region: str) -> tuple[str, str, str]:
    """(CPU training, GPU training, CPU inference) PyTorch image URIs; :class:`UnsupportedRegionError` if the
    SDK's tables have none for the region."""
    def retrieve(instance_type: str, scope: str) -> str:
        return image_uris.retrieve("pytorch", region, version=FRAMEWORK_VERSION, py_version=PY_VERSION,
                                   instance_type=instance_type, image_scope=scope)

    try:
        return (retrieve(CPU_REFERENCE_INSTANCE, "training"), retrieve(GPU_REFERENCE_INSTANCE, "training"),
                retrieve(INFERENCE_INSTANCE_TYPES[0], "inference"))
    except ValueError as exc:
        if "Unsupported region" not in str(exc):
            raise
        raise UnsupportedRegionError(
            f"region {region}: the SageMaker PyTorch {FRAMEWORK_VERSION} ({PY_VERSION}) framework images this "
            "pipeline runs on are not available there; choose another region") from None


def _debugger_rules(stop_training: bool, support: DebuggerSupport) -> list[Any]:
    """Debugger rules (with an optional StopTraining action) and the profiler rules for the best-model job, as
    far as the region has the rule image (``support``).

    Pipeline training jobs are named ``pipelines-<execution>-TrainBestModel-...`` at run time, so the StopTraining
    action gets the fixed prefix ``pipelines-`` (the SDK would otherwise write the timestamped name it generates).
    """
    extra: dict[str, Any] = {}
    if stop_training:
        extra["actions"] = rule_configs.ActionList(rule_configs.StopTraining(training_job_prefix="pipelines-"))
    rules: list[Any] = []
    if support.debugger_rules:
        rules += [
            Rule.sagemaker(factory(), name=name, rule_parameters=dict(params),
                           collections_to_save=[DEBUGGER_COLLECTIONS[c] for c in collections], **extra)
            for name, (factory, params, collections) in DEBUGGER_RULES.items()
        ]
    if support.profiler_rules:
        rules += [ProfilerRule.sagemaker(getattr(rule_configs, name)(), name=name) for name in PROFILER_RULES]
    return rules


def _debugger_hook_config(s3_output_path: Any) -> DebuggerHookConfig:
    return DebuggerHookConfig(s3_output_path=s3_output_path, hook_parameters=dict(_SAVE_EVERY),
                              collection_configs=list(DEBUGGER_COLLECTIONS.values()))


#: Processing jobs' ``StoppingCondition.MaxRuntimeInSeconds``: preprocessing and evaluating the datasets this
#: pipeline is sized for take minutes; an hour stops a hung job (a stuck input mount, a deadlock) at a bounded cost.
DEFAULT_MAX_PROCESSING_SECONDS = 3600


def get_pipeline(
    region: str,
    role: str,
    default_bucket: str,
    code: CodeLocations,
    deploy_function_arn: str | None = None,
    model_package_group_name: str = DEFAULT_MODEL_PACKAGE_GROUP,
    pipeline_name: str = DEFAULT_PIPELINE_NAME,
    base_job_prefix: str = DEFAULT_BASE_JOB_PREFIX,
    sagemaker_project_arn: str | None = None,
    sagemaker_session: PipelineSession | None = None,
    *,
    cache: bool = True,
    cache_expire_after: str = "P30D",
    tuning_strategy: str = "Bayesian",
    use_spot_instances: bool = False,
    max_run_seconds: int = 3 * 3600,
    stop_training_on_rule_issue: bool = False,
    endpoint_name: str | None = None,
    max_processing_seconds: int = DEFAULT_MAX_PROCESSING_SECONDS,
) -> Pipeline:
    """Build the pipeline. Makes no AWS call; same arguments (and code sha) give byte-identical definitions.

    ``code`` holds the ``s3://`` URIs of the already uploaded code bundles (:func:`pipelines.packaging.code_locations`).
    ``deploy_function_arn`` defaults to the function ``imgclf-deploy-approved-model`` in the role's account.
    ``tuning_strategy`` is ``Bayesian`` (default, with early stopping ``Auto``), ``Hyperband`` (its own early
    stopping; epochs become the Hyperband resource, from ``EpochsMin`` to ``EpochsMax``) or ``Random``.
    ``max_run_seconds`` is every training job's ``StoppingCondition.MaxRuntimeInSeconds`` (tuning trials too),
    ``max_processing_seconds`` every processing job's (``PrepareData``, ``EvaluateModel``; default 1 hour): a job
    still running then is stopped (SageMaker: ``Stopped``, ``MaxRuntimeExceeded``) and fails the execution.
    ``use_spot_instances``: managed spot training, checkpointing per execution and step under
    ``s3://<bucket>/<prefix>/executions/<PipelineExecutionId>/<StepName>/checkpoints`` (``TuneHyperparameters``,
    ``TrainBestModel``); the local tuner gives each trial ``<that prefix>/<trial's training job name>``, and the
    trainer does not resume a checkpoint of other data or another epoch target.

    Regions: ARNs get the region's partition (:mod:`pipelines.arns`). Where the SageMaker PyTorch framework images
    do not exist (per the SDK's tables) this raises :class:`UnsupportedRegionError` (the CLI prints it as one line
    and exits 2). Where the Debugger rule evaluator image does not exist (``il-central-1``, ``ca-west-1``...),
    ``TrainBestModel`` is built without the Debugger and Profiler rules, keeping the Debugger hook config and the
    ProfilerConfig (neither needs an image); where the SDK supports no Debugger/Profiler at all
    (``fw_utils.DEBUGGER_UNSUPPORTED_REGIONS``, e.g. ``us-gov-east-1``) those are left out too. Either way one
    WARNING names the region and what was left out.
    """
    with sdk_build_context():
        return _build_pipeline(
            region, role, default_bucket, code, deploy_function_arn, model_package_group_name, pipeline_name,
            base_job_prefix, sagemaker_project_arn, sagemaker_session, cache=cache,
            cache_expire_after=cache_expire_after, tuning_strategy=tuning_strategy,
            use_spot_instances=use_spot_instances, max_run_seconds=max_run_seconds,
            stop_training_on_rule_issue=stop_training_on_rule_issue, endpoint_name=endpoint_name,
            max_processing_seconds=max_processing_seconds)


def _build_pipeline(
    region: str, role: str, default_bucket: str, code: CodeLocations, deploy_function_arn: str | None,
    model_package_group_name: str, pipeline_name: str, base_job_prefix: str, sagemaker_project_arn: str | None,
    sagemaker_session: PipelineSession | None, *, cache: bool, cache_expire_after: str, tuning_strategy: str,
    use_spot_instances: bool, max_run_seconds: int, stop_training_on_rule_issue: bool, endpoint_name: str | None,
    max_processing_seconds: int = DEFAULT_MAX_PROCESSING_SECONDS,
) -> Pipeline:
    if tuning_strategy not in TUNING_STRATEGIES:
        raise ValueError(f"tuning_strategy must be one of {', '.join(TUNING_STRATEGIES)}, not {tuning_strategy!r}")
    if not role.startswith("arn:"):
        raise ValueError(f"role must be an IAM role ARN, got {role!r}")
    cpu_image, gpu_image, inference_image = framework_images(region)
    support = debugger_support(region)
    if support.omitted():
        logger.warning("region %s: %s; %s is built without %s", region, support.reason(), STEP_TRAIN,
                       ", ".join(support.omitted()))
    if deploy_function_arn is None:
        account = role.split(":")[4] or "000000000000"
        deploy_function_arn = arns.lambda_function_arn(region, account, DEFAULT_DEPLOY_FUNCTION_NAME)
    session = sagemaker_session or make_session(region, default_bucket)
    p = pipeline_parameters(default_bucket, base_job_prefix, endpoint_name)
    execution_root = [default_bucket, base_job_prefix, "executions", ExecutionVariables.PIPELINE_EXECUTION_ID]
    cache_config = CacheConfig(enable_caching=cache, expire_after=cache_expire_after)
    retry_policies = [
        StepRetryPolicy(exception_types=[StepExceptionTypeEnum.THROTTLING, StepExceptionTypeEnum.SERVICE_FAULT],
                        interval_seconds=10, backoff_rate=2.0, max_attempts=5),
        SageMakerJobStepRetryPolicy(
            exception_types=[SageMakerJobExceptionTypeEnum.CAPACITY_ERROR,
                             SageMakerJobExceptionTypeEnum.RESOURCE_LIMIT,
                             SageMakerJobExceptionTypeEnum.INTERNAL_ERROR],
            interval_seconds=60, backoff_rate=2.0, max_attempts=5),
    ]
    code_input = ProcessingInput(source=code.src_prefix, destination=CODE_DIR, input_name="code")

    # 1. PrepareData -------------------------------------------------------------------------------------------
    prepare_processor = Processor(
        role=role, image_uri=cpu_image, instance_count=1, instance_type=p["ProcessingInstanceType"],
        entrypoint=["python3", f"{CODE_DIR}/steps/preprocess.py"], volume_size_in_gb=100,
        max_runtime_in_seconds=max_processing_seconds,
        base_job_name=f"{base_job_prefix}-prepare", sagemaker_session=session,
    )
    data_outputs = {
        name: ProcessingOutput(output_name=name, source=f"{PROCESSING}/{name}",
                               destination=_s3_join(*execution_root, STEP_PREPARE, name))
        for name in ("train", "validation", "test", "manifest")
    }
    step_prepare = ProcessingStep(
        name=STEP_PREPARE,
        description="Validate, split and resize the raw images (quarantining bad files) into ImageFolder sets.",
        step_args=prepare_processor.run(
            inputs=[code_input,
                    ProcessingInput(source=p["InputDataUrl"], destination=f"{PROCESSING}/input/data",
                                    input_name="data")],
            outputs=list(data_outputs.values()),
            arguments=["--input-dir", f"{PROCESSING}/input/data", "--output-dir", PROCESSING,
                       "--resize-shorter-side", p["ResizeSize"].to_string()],
        ),
        cache_config=cache_config, retry_policies=retry_policies,
    )

    def channel(name: str) -> TrainingInput:
        return TrainingInput(
            s3_data=step_prepare.properties.ProcessingOutputConfig.Outputs[name].S3Output.S3Uri,
            content_type="application/x-image")

    channels = {"train": channel("train"), "validation": channel("validation"),
                PRETRAINED_CHANNEL: TrainingInput(s3_data=p["PretrainedWeights"])}
    static_hyperparameters = {
        "arch": p["Arch"], "pretrained": p["Pretrained"], "image_size": p["ImageSize"],
        "workers": p["DataLoaderWorkers"],
    }
    def estimator(kind: str, hyperparameters: dict[str, Any], **extra: Any) -> PyTorch:
        spot: dict[str, Any] = {}
        if use_spot_instances:
            # One checkpoint location per execution and step: no job resumes another execution's checkpoint.
            spot = {"use_spot_instances": True, "max_wait": max_run_seconds * 2,
                    "checkpoint_s3_uri": _s3_join(*execution_root, kind, "checkpoints")}
        return PyTorch(
            entry_point="training/train.py", source_dir=code.sourcedir, image_uri=gpu_image,
            role=role, instance_count=1, instance_type=p["TrainingInstanceType"], volume_size=100,
            max_run=max_run_seconds, hyperparameters=hyperparameters, metric_definitions=METRIC_DEFINITIONS,
            output_path=_s3_join(*execution_root, kind), base_job_name=f"{base_job_prefix}-{kind.lower()}",
            sagemaker_session=session, **spot, **extra,
        )

    # 2. TuneHyperparameters ----------------------------------------------------------------------------------
    hyperband = tuning_strategy == "Hyperband"
    ranges: dict[str, Any] = {
        "lr": ContinuousParameter(1e-5, 1e-1, scaling_type="Logarithmic"),
        "batch_size": CategoricalParameter([16, 32, 64, 128]),
        "epochs": IntegerParameter(p["EpochsMin"], p["EpochsMax"]),
        "dropout": ContinuousParameter(0.0, 0.6),
        "hidden_units": CategoricalParameter([0, 128, 256, 512]),
        "optimizer": CategoricalParameter(["sgd", "adam", "adamw"]),
    }
    tuning_static = dict(static_hyperparameters)
    if hyperband:
        # Hyperband allocates epochs itself: the trainer runs up to EpochsMax; trials report every epoch.
        del ranges["epochs"]
        tuning_static["epochs"] = p["EpochsMax"]
    tuning_estimator = estimator(STEP_TUNE, tuning_static, debugger_hook_config=False, disable_profiler=True)
    tuner = HyperparameterTuner(
        estimator=tuning_estimator,
        objective_metric_name=OBJECTIVE_METRIC,
        objective_type=OBJECTIVE_TYPE,
        hyperparameter_ranges=ranges,
        metric_definitions=METRIC_DEFINITIONS,
        strategy=tuning_strategy,
        strategy_config=StrategyConfig(HyperbandStrategyConfig(min_resource=1, max_resource=p["EpochsMax"]))
        if hyperband else None,
        early_stopping_type="Off" if hyperband else "Auto",
        max_jobs=p["MaxTrainingJobs"],
        max_parallel_jobs=p["MaxParallelTrainingJobs"],
        base_tuning_job_name=f"{base_job_prefix}-tune",
    )
    step_tune = TuningStep(
        name=STEP_TUNE,
        description=f"{tuning_strategy} search over lr, batch size, epochs, dropout, hidden units and optimizer.",
        step_args=tuner.fit(inputs=channels),
        cache_config=cache_config, retry_policies=retry_policies,
    )

    # 3. TrainBestModel ---------------------------------------------------------------------------------------
    best = step_tune.properties.BestTrainingJob.TunedHyperParameters
    best_hyperparameters: dict[str, Any] = dict(static_hyperparameters)
    for name in ranges:
        best_hyperparameters[name] = best[name]
    if hyperband:
        best_hyperparameters["epochs"] = p["EpochsMax"]
    train_root = [*execution_root, STEP_TRAIN]
    train_estimator = estimator(
        STEP_TRAIN, best_hyperparameters,
        debugger_hook_config=_debugger_hook_config(_s3_join(*train_root, "debug-output")) if support.hook else False,
        rules=_debugger_rules(stop_training_on_rule_issue, support) or None,
        profiler_config=ProfilerConfig(system_monitor_interval_millis=SYSTEM_MONITOR_INTERVAL_MS,
                                       s3_output_path=_s3_join(*train_root, "profiler-output"))
        if support.profiler else None,
        **({} if support.profiler else {"disable_profiler": True}),
    )
    step_train = TrainingStep(
        name=STEP_TRAIN,
        description="Retrain with the tuning job's best hyperparameters, with Debugger rules and the Profiler.",
        step_args=train_estimator.fit(inputs=channels),
        depends_on=[step_tune],
        cache_config=cache_config, retry_policies=retry_policies,
    )

    # 4. EvaluateModel ----------------------------------------------------------------------------------------
    evaluate_processor = Processor(
        role=role, image_uri=cpu_image, instance_count=1, instance_type=p["ProcessingInstanceType"],
        entrypoint=["python3", f"{CODE_DIR}/steps/evaluate.py"], max_runtime_in_seconds=max_processing_seconds,
        base_job_name=f"{base_job_prefix}-evaluate", sagemaker_session=session,
    )
    evaluation_report = PropertyFile(name=EVALUATION_PROPERTY_FILE, output_name="evaluation",
                                     path="evaluation.json")
    evaluation_destination = _s3_join(*execution_root, STEP_EVALUATE, "evaluation")
    step_evaluate = ProcessingStep(
        name=STEP_EVALUATE,
        description="Accuracy, top-5, F1, per-class precision/recall and the confusion matrix on the test set.",
        step_args=evaluate_processor.run(
            inputs=[code_input,
                    ProcessingInput(source=step_train.properties.ModelArtifacts.S3ModelArtifacts,
                                    destination=f"{PROCESSING}/model", input_name="model"),
                    ProcessingInput(
                        source=step_prepare.properties.ProcessingOutputConfig.Outputs["test"].S3Output.S3Uri,
                        destination=f"{PROCESSING}/test", input_name="test")],
            outputs=[ProcessingOutput(output_name="evaluation", source=f"{PROCESSING}/evaluation",
                                      destination=evaluation_destination)],
            arguments=["--model-dir", f"{PROCESSING}/model", "--test-dir", f"{PROCESSING}/test",
                       "--output-dir", f"{PROCESSING}/evaluation"],
        ),
        property_files=[evaluation_report],
        cache_config=cache_config, retry_policies=retry_policies,
    )

    # 6. RegisterModel ----------------------------------------------------------------------------------------
    model = Model(
        image_uri=inference_image,
        model_data=step_train.properties.ModelArtifacts.S3ModelArtifacts,
        role=role,
        # The PyTorch inference containers import SAGEMAKER_PROGRAM from code/ inside model.tar.gz (the trainer
        # puts it there: training/serving_code.py); they never read SAGEMAKER_SUBMIT_DIRECTORY.
        env={"SAGEMAKER_PROGRAM": SERVING_PROGRAM, "SAGEMAKER_CONTAINER_LOG_LEVEL": "20", "SAGEMAKER_REGION": region},
        sagemaker_session=session,
    )
    model_metrics = ModelMetrics(model_statistics=MetricsSource(
        content_type="application/json",
        s3_uri=Join(on="/", values=[
            step_evaluate.properties.ProcessingOutputConfig.Outputs["evaluation"].S3Output.S3Uri,
            "evaluation.json"])))
    step_register = ModelStep(
        name=STEP_REGISTER,
        description="Register the model package with its evaluation metrics.",
        step_args=model.register(
            content_types=CONTENT_TYPES,
            response_types=RESPONSE_TYPES,
            inference_instances=INFERENCE_INSTANCE_TYPES,
            transform_instances=TRANSFORM_INSTANCE_TYPES,
            model_package_group_name=model_package_group_name,
            approval_status=p["ModelApprovalStatus"],
            model_metrics=model_metrics,
            description="Image classifier (PyTorch) trained by the ImageClassification pipeline.",
            domain="COMPUTER_VISION",
            task="IMAGE_CLASSIFICATION",
            framework="PYTORCH",
            framework_version=FRAMEWORK_VERSION,
            customer_metadata_properties={"sagemaker_project_arn": sagemaker_project_arn}
            if sagemaker_project_arn else None,
        ),
        retry_policies=retry_policies[:1],
    )

    # 7. DeployApprovedModel ----------------------------------------------------------------------------------
    step_deploy = LambdaStep(
        name=STEP_DEPLOY,
        description="Deploy the group's latest Approved package (a fresh package is PendingManualApproval).",
        lambda_func=Lambda(function_arn=deploy_function_arn, session=session),
        inputs={
            "model_package_group_name": model_package_group_name,
            "endpoint_name": p["EndpointName"],
            "instance_type": p["EndpointInstanceType"],
            "instance_count": p["EndpointInstanceCount"],
            "role_arn": role,
        },
        outputs=[LambdaOutput(output_name=name, output_type=LambdaOutputTypeEnum.String)
                 for name in ("status", "message", "model_package_arn")],
        depends_on=[step_register],
    )

    # 5. CheckAccuracy ----------------------------------------------------------------------------------------
    accuracy = JsonGet(step_name=step_evaluate.name, property_file=evaluation_report, json_path=ACCURACY_JSON_PATH)
    step_fail = FailStep(
        name=STEP_FAIL,
        error_message=Join(on=" ", values=["Model accuracy", accuracy, "is below the threshold",
                                           p["AccuracyThreshold"], "- not registered."]),
    )
    step_check = ConditionStep(
        name=STEP_CHECK,
        description="Register and deploy only if the test accuracy reaches AccuracyThreshold.",
        conditions=[ConditionGreaterThanOrEqualTo(left=accuracy, right=p["AccuracyThreshold"])],
        if_steps=[step_register, step_deploy],
        else_steps=[step_fail],
    )

    return Pipeline(
        name=pipeline_name,
        parameters=list(p.values()),
        steps=[step_prepare, step_tune, step_train, step_evaluate, step_check],
        sagemaker_session=session,
    )


def _strip_nondeterminism(node: Any) -> Any:
    """Remove the timestamped ``sagemaker_job_name`` static hyperparameter the SDK writes for tuners, and order
    Debugger collections (the SDK collects them in a ``set``, whose order changes with the hash seed)."""
    if isinstance(node, dict):
        cleaned = {key: _strip_nondeterminism(value) for key, value in node.items()
                   if not (key == "sagemaker_job_name" and isinstance(value, str))}
        if isinstance(cleaned.get("CollectionConfigurations"), list):
            cleaned["CollectionConfigurations"] = sorted(cleaned["CollectionConfigurations"],
                                                         key=lambda c: json.dumps(c, sort_keys=True))
        return cleaned
    if isinstance(node, list):
        return [_strip_nondeterminism(item) for item in node]
    return node


def pipeline_definition(pipeline: Pipeline) -> str:
    """The pipeline's definition JSON, made deterministic (sorted keys, no timestamped job names)."""
    with sdk_build_context():
        definition = json.loads(pipeline.definition())
    return json.dumps(_strip_nondeterminism(definition), indent=2, sort_keys=True)


def definition_parameters(definition: str | dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {"Name", "Type", "DefaultValue"}}`` of a definition's Parameters."""
    parsed = json.loads(definition) if isinstance(definition, str) else definition
    return {param["Name"]: param for param in parsed.get("Parameters", [])}


def step_names(definition: str | dict[str, Any]) -> Sequence[str]:
    """Every step name of a definition, condition branches included, in definition order."""
    parsed = json.loads(definition) if isinstance(definition, str) else definition
    names: list[str] = []

    def walk(steps: list[dict[str, Any]]) -> None:
        for step in steps:
            names.append(step["Name"])
            args = step.get("Arguments", {})
            if step.get("Type") == "Condition":
                walk(args.get("IfSteps", []))
                walk(args.get("ElseSteps", []))

    walk(parsed.get("Steps", []))
    return names
