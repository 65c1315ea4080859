"""Every read the UI makes: the SageMaker, S3 and Lambda APIs of the local AWS service through boto3 (as the CLI
reads them), plus the local files that stand in for CloudWatch Logs (step, trial, endpoint and Lambda logs).

Answers that cannot change any more are cached in memory (a finished execution's description and steps, keyed by
its ARN and status, so a retry refreshes them; evaluation reports by S3 URI); nothing is cached while it can move.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError, EndpointConnectionError

logger = logging.getLogger(__name__)

TERMINAL = ("Succeeded", "Failed", "Stopped")
CACHE_SIZE = 4096
TRIAL_NUMBER = re.compile(r"-(\d{3})-[0-9a-f]{8}$")


def execution_id(arn: str) -> str:
    return arn.rsplit("/", 1)[-1]


def arn_name(arn: str | None) -> str:
    return (arn or "").rsplit("/", 1)[-1]


def split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"S3 URI without a bucket: {uri!r}")
    return bucket, key


def decode_hyperparameter(value: Any) -> str:
    """A hyperparameter as the user wrote it: SageMaker passes categorical values JSON-quoted (``'"64"'``)."""
    text = str(value if value is not None else "")
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


class Reader:
    """boto3 clients of the local AWS service (created on first use, again after a connection error)."""

    def __init__(self, clients: Any = None) -> None:
        self._clients = clients
        self._lock = threading.Lock()
        self._cache: OrderedDict[Any, Any] = OrderedDict()
        self._records: Any = None
        self._runtime: Any = None

    # ------------------------------------------------------------------------------------------ plumbing
    @property
    def clients(self) -> Any:
        with self._lock:
            if self._clients is None:
                from pipelines.run import local_clients

                self._clients = local_clients()
            return self._clients

    @property
    def sm(self) -> Any:
        return self.clients.sagemaker

    @property
    def s3(self) -> Any:
        return self.clients.s3

    @property
    def runtime(self) -> Any:
        """The SageMaker runtime client (``InvokeEndpoint``)."""
        with self._lock:
            if self._runtime is None:
                from pipelines.run import local_client

                self._runtime = local_client("sagemaker-runtime")
            return self._runtime

    def reset(self) -> None:
        """Forget the clients (the service may have been restarted on another port)."""
        with self._lock:
            self._clients = self._runtime = None

    def call(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, once more with fresh clients if the service could not be reached."""
        try:
            return fn()
        except EndpointConnectionError:
            logger.warning("the local AWS service did not answer; reconnecting")
            self.reset()
            return fn()

    def cached(self, key: Any, load: Callable[[], Any], keep: Callable[[Any], bool] | None = None) -> Any:
        """``load()``, remembered under ``key`` (unless ``keep(value)`` says not to)."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        value = load()
        if keep is not None and not keep(value):
            return value
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return value

    @property
    def records(self) -> Any:
        """The engine's execution records: only for what the API has no field for (log paths, a condition's
        evaluated values, the resolved arguments of non-job steps)."""
        if self._records is None:
            from pipelines.local.storage.executions import ExecutionStore

            self._records = ExecutionStore()
        return self._records

    def pages(self, operation: str, key: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        for page in self.sm.get_paginator(operation).paginate(**kwargs):
            yield from page.get(key, [])

    # ---------------------------------------------------------------------------------------- executions
    def pipelines(self) -> list[str]:
        return sorted(p["PipelineName"] for p in self.pages("list_pipelines", "PipelineSummaries"))

    def executions(self, pipeline: str | None = None) -> list[dict[str, Any]]:
        """Summaries (with ``PipelineName``) of one or every pipeline, newest first."""
        names = [pipeline] if pipeline else self.pipelines()
        found = [{**s, "PipelineName": name} for name in names
                 for s in self.pages("list_pipeline_executions", "PipelineExecutionSummaries", PipelineName=name,
                                     SortBy="CreationTime", SortOrder="Descending")]
        return sorted(found, key=lambda s: s["StartTime"], reverse=True)

    def _stable(self, arn: str, status: str | None, what: str, load: Callable[[], Any]) -> Any:
        return self.cached((what, arn, status), load) if status in TERMINAL else load()

    def describe_execution(self, arn: str, status: str | None = None) -> dict[str, Any]:
        return self._stable(arn, status, "describe", lambda: self.sm.describe_pipeline_execution(
            PipelineExecutionArn=arn))

    def parameters(self, arn: str) -> dict[str, str]:
        return self.cached(("parameters", arn), lambda: {
            p["Name"]: p["Value"] for p in self.pages("list_pipeline_parameters_for_execution",
                                                      "PipelineParameters", PipelineExecutionArn=arn)})

    def steps(self, arn: str, status: str | None = None) -> list[dict[str, Any]]:
        """ListPipelineExecutionSteps, oldest first (SageMaker omits steps that did not run)."""
        return self._stable(arn, status, "steps", lambda: list(self.pages(
            "list_pipeline_execution_steps", "PipelineExecutionSteps", PipelineExecutionArn=arn,
            SortOrder="Ascending")))

    def definition(self, arn: str) -> dict[str, Any]:
        text = self.cached(("definition", arn), lambda: self.sm.describe_pipeline_definition_for_execution(
            PipelineExecutionArn=arn)["PipelineDefinition"])
        try:
            return json.loads(text)
        except ValueError:
            return {}

    def step(self, arn: str, name: str) -> dict[str, Any] | None:
        return next((s for s in self.steps(arn) if s.get("StepName") == name), None)

    def latest_step_of_kind(self, kind: str) -> tuple[str, str] | None:
        """``(execution ARN, step name)`` of the newest step whose metadata has ``kind`` (``TuningJob``...)."""
        for summary in self.executions()[:50]:
            arn = summary["PipelineExecutionArn"]
            for step in reversed(self.steps(arn, summary.get("PipelineExecutionStatus"))):
                if kind in (step.get("Metadata") or {}):
                    return arn, step["StepName"]
        return None

    # --------------------------------------------------------------------------------------------- jobs
    def training_job(self, name: str) -> dict[str, Any]:
        return self.sm.describe_training_job(TrainingJobName=name)

    def processing_job(self, name: str) -> dict[str, Any]:
        return self.sm.describe_processing_job(ProcessingJobName=name)

    def tuning_job(self, name: str) -> dict[str, Any]:
        return self.sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)

    def trials(self, tuning_job: str) -> list[dict[str, Any]]:
        return list(self.pages("list_training_jobs_for_hyper_parameter_tuning_job", "TrainingJobSummaries",
                               HyperParameterTuningJobName=tuning_job))

    def job_of(self, step: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """``(kind, Describe* answer)`` of the job a step ran (a cache hit names the original job)."""
        meta = step.get("Metadata") or {}
        loaders = {"TrainingJob": self.training_job, "ProcessingJob": self.processing_job,
                   "TuningJob": self.tuning_job}
        for kind, load in loaders.items():
            arn = (meta.get(kind) or {}).get("Arn")
            if arn:
                final = step.get("StepStatus") if step.get("StepStatus") in TERMINAL else None
                return kind, self._stable(arn, final, "job",
                                          lambda load=load, arn=arn: load(arn_name(arn)))
        return None

    # ------------------------------------------------------------------------------------------- S3
    def s3_bytes(self, uri: str, limit: int = 64 * 2**20) -> bytes:
        bucket, key = split_s3(uri)
        body = self.s3.get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return body.read(limit)
        finally:
            body.close()

    def s3_json(self, uri: str) -> Any:
        return self.cached(("s3json", uri), lambda: json.loads(self.s3_bytes(uri)))

    def s3_exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            self.s3.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError:
            return False

    def s3_list(self, uri: str, limit: int = 200) -> list[dict[str, Any]]:
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        page = self.s3.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=limit)
        return page.get("Contents", [])

    # ------------------------------------------------------------------------------------------ registry
    def groups(self) -> list[dict[str, Any]]:
        return sorted(self.pages("list_model_package_groups", "ModelPackageGroupSummaryList"),
                      key=lambda g: g["ModelPackageGroupName"])

    def packages(self, group: str) -> list[dict[str, Any]]:
        """Versions of a group, newest first."""
        return list(self.pages("list_model_packages", "ModelPackageSummaryList", ModelPackageGroupName=group,
                               SortBy="CreationTime", SortOrder="Descending"))

    def package(self, arn: str, status: str | None = None) -> dict[str, Any]:
        load = lambda: self.sm.describe_model_package(ModelPackageName=arn)  # noqa: E731
        return self.cached(("package", arn, status), load) if status else load()

    def evaluation(self, package: dict[str, Any]) -> dict[str, Any] | None:
        """The evaluation report ``ModelMetrics.ModelQuality.Statistics.S3Uri`` points at (S3 GetObject)."""
        uri = (((package.get("ModelMetrics") or {}).get("ModelQuality") or {}).get("Statistics") or {}).get("S3Uri")
        if not uri:
            return None
        try:
            return self.s3_json(uri)
        except (ClientError, ValueError) as exc:
            logger.info("evaluation report %s: %s", uri, exc)
            return None

    def registering_execution(self, package: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The execution whose RegisterModel step created ``package``, with its steps: the newest executions
        started before the package was created are asked first."""
        created = package.get("CreationTime")
        for summary in self.executions():
            start = summary.get("StartTime")
            if isinstance(created, datetime) and isinstance(start, datetime) and start > created:
                continue
            steps = self.steps(summary["PipelineExecutionArn"], summary.get("PipelineExecutionStatus"))
            if any((s.get("Metadata") or {}).get("RegisterModel", {}).get("Arn") == package["ModelPackageArn"]
                   for s in steps):
                return summary, steps
        return None

    # ----------------------------------------------------------------------------------------- endpoints
    def endpoints(self) -> list[dict[str, Any]]:
        return [self.sm.describe_endpoint(EndpointName=s["EndpointName"])
                for s in self.pages("list_endpoints", "Endpoints")]

    def serving_package(self, config_name: str | None) -> str | None:
        """The model package an endpoint config serves (config -> model -> ModelPackageName)."""
        from steps import deploy

        if not config_name:
            return None
        return self.cached(("config", config_name), lambda: deploy.package_of_config(self.sm, config_name))

    def managed_endpoint(self) -> str | None:
        """The endpoint the deploy function manages (its ``ENDPOINT_NAME``), ``None`` without the function."""
        from pipelines.local.storage.store import DEPLOY_FUNCTION_NAME

        try:
            config = self.clients.lambda_.get_function_configuration(FunctionName=DEPLOY_FUNCTION_NAME)
        except ClientError:
            return None
        return ((config.get("Environment") or {}).get("Variables") or {}).get("ENDPOINT_NAME")

    # --------------------------------------------------------------------------- logs (CloudWatch stand-ins)
    def step_log(self, arn: str, step_name: str) -> Path | None:
        """A step's log; a cache hit's is its source step's."""
        row = self.records.step(execution_id(arn), step_name)
        if row and row.get("cached_from"):  # its own log only says "cache hit"
            row = self.records.step(row["cached_from"], step_name) or row
        path = Path(row["log_path"]) if row and row.get("log_path") else None
        return path if path and path.is_file() else None

    def step_record(self, arn: str, step_name: str) -> dict[str, Any] | None:
        return self.records.step(execution_id(arn), step_name)

    def trial_logs(self, arn: str, step_name: str) -> dict[str, Path]:
        """``{trial job name (lowercase): log}`` of a tuning step (a cache hit's are its source's)."""
        row = self.records.step(execution_id(arn), step_name) or {}
        source = row.get("cached_from") or execution_id(arn)
        return {t["job_name"].lower(): Path(t["log_path"]) for t in self.records.trials(source, step_name)
                if t.get("log_path") and Path(t["log_path"]).is_file()}


def tail(path: Path | None, lines: int = 40, max_bytes: int = 256 * 1024) -> str:
    """The last ``lines`` lines of a log (reading at most its last ``max_bytes``)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - max_bytes))
            text = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(log not readable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def trial_number(job_name: str, fallback: int) -> int:
    match = TRIAL_NUMBER.search(job_name)
    return int(match.group(1)) if match else fallback
