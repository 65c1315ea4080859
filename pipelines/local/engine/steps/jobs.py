"""The job steps: Processing, Training, Tuning and Transform. Each resolves its arguments (the Create*Job request
without the job's name), names the job, runs it through :mod:`pipelines.local.jobs` under step signature caching,
and returns the Describe*Job answer as the step's properties."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.local.engine.steps.base import JobInfo, StepFailed, StepKind, StepRun, local_client, slug
from pipelines.local.jobs import runtime as jobs
from pipelines.local.storage.store import ArtifactStore

logger = logging.getLogger(__name__)


class Processing(StepKind):
    type_name = "Processing"
    cacheable = True
    job = JobInfo("ProcessingJobName", "ProcessingJobArn", "ProcessingJobStatus", "processing-job", "ProcessingJob",
                  "ProcessingEndTime")

    def run(self, run: StepRun) -> tuple[dict[str, Any], str | None]:
        def start(arguments: dict[str, Any]) -> dict[str, Any]:
            return jobs.run_processing_job(arguments, run.job_name(), run.job_dir, run.artifacts, run.log_path,
                                           on_line=run.on_line(), control=run.control)
        return run.cached(start)


class Training(StepKind):
    type_name = "Training"
    cacheable = True
    job = JobInfo("TrainingJobName", "TrainingJobArn", "TrainingJobStatus", "training-job", "TrainingJob",
                  "TrainingEndTime")

    def run(self, run: StepRun) -> tuple[dict[str, Any], str | None]:
        return run.cached(lambda arguments: self.train(run, arguments))

    @staticmethod
    def train(run: StepRun, arguments: dict[str, Any]) -> dict[str, Any]:
        debugging = any(arguments.get(k) for k in ("DebugHookConfig", "DebugRuleConfigurations",
                                                   "ProfilerConfig", "ProfilerRuleConfigurations"))
        debugger = _debugger_module() if debugging else None

        def prepare(path: Path) -> Mapping[str, str] | None:
            if debugger is None:
                return None
            debugger.preload_in_background()  # the rules' imports, while the job starts and trains
            return debugger.write_hook_config(arguments, path)

        result = jobs.run_training_job(arguments, run.job_name(), run.job_dir, run.artifacts, run.log_path,
                                       on_line=run.on_line(), control=run.control, prepare=prepare)
        if debugger is not None:
            job_dir = Path(result["LocalJobDir"])
            result.update(_evaluate_debugger(debugger, arguments, job_dir, run.log_path))
            result.update(_upload_debugger_outputs(debugger, arguments, result["TrainingJobName"], job_dir,
                                                   run.artifacts))
        return result

    def detail(self, properties: Mapping[str, Any]) -> str:
        metrics = properties.get("FinalMetricDataList") or []
        return ", ".join(f"{m.get('MetricName')}={m.get('Value')}" for m in metrics[:3])


def tuning_job_name(execution_id: str, step_name: str, attempt: int) -> str:
    """A tuning job's name: 32 characters at most, as SageMaker allows."""
    return f"{execution_id[:12]}-{slug(step_name, 14)}-{attempt}"[:32]


class Tuning(StepKind):
    type_name = "Tuning"
    cacheable = True
    job = JobInfo("HyperParameterTuningJobName", "HyperParameterTuningJobArn", "HyperParameterTuningJobStatus",
                  "hyper-parameter-tuning-job", "TuningJob", "HyperParameterTuningEndTime")

    def run(self, run: StepRun) -> tuple[dict[str, Any], str | None]:
        from pipelines.local.engine import tuner

        name = tuning_job_name(run.execution_id, run.step.name, run.attempt)

        def start(arguments: dict[str, Any]) -> dict[str, Any]:
            try:
                return tuner.run_tuning_job(arguments, name, run.job_dir, run.artifacts,
                                            execution_id=run.execution_id, step_name=run.step.name,
                                            records=run.engine.records, control=run.control,
                                            on_message=run.message(), log_path=run.log_path)
            except tuner.TuningError as exc:
                raise StepFailed(str(exc)) from exc
        return run.cached(start)

    def detail(self, properties: Mapping[str, Any]) -> str:
        best = properties.get("BestTrainingJob") or {}
        metric = best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
        return f"best {metric.get('MetricName')}={metric.get('Value')}"


class Transform(StepKind):
    """Batch transform on a model of the local SageMaker API (``ModelName``), through the serving path of local
    endpoints (:mod:`pipelines.local.jobs.transform`)."""

    type_name = "Transform"
    cacheable = True
    job = JobInfo("TransformJobName", "TransformJobArn", "TransformJobStatus", "transform-job", "TransformJob",
                  "TransformEndTime")

    def run(self, run: StepRun) -> tuple[dict[str, Any], str | None]:
        from pipelines.local.jobs import transform

        def start(arguments: dict[str, Any]) -> dict[str, Any]:
            model = _describe_model(str(arguments.get("ModelName") or ""))
            return transform.run_transform_job(arguments, run.job_name(), run.job_dir, run.artifacts, run.log_path,
                                               model=model, on_line=run.on_line(), control=run.control)
        return run.cached(start)

    def detail(self, properties: Mapping[str, Any]) -> str:
        return str((properties.get("TransformOutput") or {}).get("S3OutputPath") or "")


def _describe_model(name: str) -> dict[str, Any]:
    from botocore.exceptions import ClientError

    if not name:
        raise StepFailed("CreateTransformJob: ModelName is required")
    try:
        model = local_client("sagemaker").describe_model(ModelName=name)
    except ClientError as exc:
        raise StepFailed(f"TransformStep: model {name!r}: {exc}") from exc
    model.pop("ResponseMetadata", None)
    return dict(model)


# --- Debugger and Profiler around a training job ----------------------------------------------------------------


def _debugger_module() -> Any | None:
    try:
        from pipelines.local.debugger import hooks as debugger
    except ImportError as exc:
        logger.warning("Debugger/Profiler configuration ignored: pipelines.local.debugger.hooks unavailable (%s)", exc)
        return None
    return debugger


def _evaluate_debugger(debugger: Any, request: Mapping[str, Any], job_dir: Path, log_path: Path) -> dict[str, Any]:
    """Evaluate the Debugger/Profiler rules after training; never fails the step (as on SageMaker)."""
    try:
        result: dict[str, Any] = debugger.evaluate_rules_by_kind(dict(request), job_dir)
    except Exception as exc:  # noqa: BLE001
        logger.exception("Debugger rule evaluation failed")
        result = {"DebugRuleEvaluationStatuses": [{"RuleConfigurationName": "DebuggerRules",
                                                   "RuleEvaluationStatus": "Error",
                                                   "StatusDetails": f"{type(exc).__name__}: {exc}"}],
                  "ProfilerRuleEvaluationStatuses": []}
    statuses = result["DebugRuleEvaluationStatuses"] + result["ProfilerRuleEvaluationStatuses"]
    report = Path(debugger.report_path(job_dir))
    if report.is_file():  # the ProfilerReport rule already wrote it
        result["ProfilerReport"] = str(report)
    else:
        try:
            result["ProfilerReport"] = str(debugger.write_profiler_report(job_dir, statuses))
        except Exception:  # noqa: BLE001
            logger.exception("profiler report failed")
    with open(log_path, "a", encoding="utf-8") as fh:
        for status in statuses:
            fh.write(f"[debugger] {status.get('RuleConfigurationName')}: {status.get('RuleEvaluationStatus')} "
                     f"{status.get('StatusDetails', '')}\n")
        if result.get("ProfilerReport"):
            fh.write(f"[profiler] report: {result['ProfilerReport']}\n")
    return result


def _upload_debugger_outputs(debugger: Any, request: Mapping[str, Any], job_name: str, job_dir: Path,
                             artifacts: ArtifactStore) -> dict[str, Any]:
    """Copy what Debugger and the Profiler left in the job to where SageMaker puts it: tensors to
    ``<DebugHookConfig.S3OutputPath>/<job>/debug-output/``, each Debugger rule's output to
    ``<DebugHookConfig.S3OutputPath>/<job>/rule-output/<rule>/``, each profiler rule's (the ProfilerReport) and the
    trainer's profiler data to ``<ProfilerConfig.S3OutputPath>/<job>/{rule-output/<rule>,profiler-output}/``."""
    uploaded: dict[str, str] = {}
    debug_root = str((request.get("DebugHookConfig") or {}).get("S3OutputPath") or "").rstrip("/")
    profiler_root = str((request.get("ProfilerConfig") or {}).get("S3OutputPath") or "").rstrip("/")
    tensors = Path(debugger.tensors_dir(job_dir))
    if debug_root and tensors.is_dir():
        uploaded["DebugOutputS3Uri"] = f"{debug_root}/{job_name}/debug-output"
        artifacts.copy_in(tensors, uploaded["DebugOutputS3Uri"])
    profiler_data = job_dir / "output" / "data" / "profiler"
    if profiler_root and profiler_data.is_dir():
        uploaded["ProfilerOutputS3Uri"] = f"{profiler_root}/{job_name}/profiler-output"
        artifacts.copy_in(profiler_data, uploaded["ProfilerOutputS3Uri"])
    rule_roots = {str(c.get("RuleConfigurationName")): debug_root
                  for c in request.get("DebugRuleConfigurations") or []}
    rule_roots.update({str(c.get("RuleConfigurationName")): profiler_root
                       for c in request.get("ProfilerRuleConfigurations") or []})
    for rule, root in rule_roots.items():
        local = job_dir / "rule-output" / rule
        if root and local.is_dir():
            artifacts.copy_in(local, f"{root}/{job_name}/rule-output/{rule}")
    return uploaded
