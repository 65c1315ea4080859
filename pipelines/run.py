"""The pipeline's command line: ``python -m pipelines.run [--target local|sagemaker] COMMAND``.

Commands (both targets): ``definition``, ``upsert``, ``start [--param Name=Value ...] [--wait]``,
``status``/``describe EXECUTION``, ``list-executions``, ``retry EXECUTION``, ``stop EXECUTION``; the local engine
adds its own (``models``, ``endpoints``, ``report``...). The target defaults to ``local`` (env ``MLOPS_TARGET``).

Configuration: flags override the environment CodeBuild provides (``SAGEMAKER_PIPELINE_ROLE_ARN``,
``ARTIFACT_BUCKET``, ``SAGEMAKER_PROJECT_NAME``, ``SAGEMAKER_PROJECT_ID``, ``SAGEMAKER_PROJECT_ARN``,
``AWS_REGION``); ``--param`` overrides a pipeline Parameter's default for one execution.

Both targets are one code path: the CLI uploads the content-addressed code bundles itself
(``pipelines.packaging``), builds the definition with no AWS call, and talks to the service through boto3 only --
SageMaker's endpoints, or (``--target local``) the local AWS service on 127.0.0.1 (:mod:`pipelines.local.api`),
started on demand. On the local target ``upsert`` and ``start`` first create what ``infra/template.yaml`` creates on
AWS (the bucket, the deploy Lambda, the approval rule; :mod:`pipelines.local.api.stack`), and ``start`` upserts the
checked-out definition before starting it.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
# The SDK gives "sagemaker.config" a stdout handler unless it has one: keep stdout for our JSON output.
logging.getLogger("sagemaker.config").addHandler(logging.NullHandler())

logger = logging.getLogger("pipelines.run")

from pipelines.validation import APPROVAL_STATUSES  # noqa: E402 -- after the SDK logging setup above

TARGETS = ("local", "sagemaker")
TERMINAL_STATUSES = ("Succeeded", "Failed", "Stopped")
COMMANDS = ("definition", "upsert", "start", "status", "describe", "list-executions", "retry", "stop")


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2, no traceback."""


# --- parameters --------------------------------------------------------------------------------------------------

def parameter_types(bucket: str = "bucket") -> dict[str, tuple[str, Any]]:
    """``{name: (type, default)}`` of the pipeline's Parameters (built offline, no code bundles needed); defaults
    that name S3 objects name them in ``bucket``."""
    from pipelines.pipeline import pipeline_parameters

    return {name: (param.parameter_type.python_type.__name__, param.default_value)
            for name, param in pipeline_parameters(bucket).items()}


_TYPE_NAMES = {"str": "String", "int": "Integer", "float": "Float", "bool": "Boolean"}
_PYTHON_TYPES = {"String": "str", "Integer": "int", "Float": "float", "Boolean": "bool"}


def read_definition(path: str) -> str:
    """A pipeline definition file's text (JSON, as ``pipeline.definition()`` writes it): :class:`UserError` when
    it is not one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        parsed = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"--definition {path}: not a readable pipeline definition JSON ({exc})") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("Steps"), list):
        raise UserError(f"--definition {path}: a pipeline definition has a 'Steps' list")
    return text


def definition_parameter_types(path: str) -> dict[str, tuple[str, Any]]:
    """``{name: (type, default)}`` of a definition file's Parameters."""
    parameters = json.loads(read_definition(path)).get("Parameters") or []
    return {p["Name"]: (_PYTHON_TYPES.get(p.get("Type", "String"), "str"), p.get("DefaultValue"))
            for p in parameters if isinstance(p, dict) and p.get("Name")}


def parse_parameters(pairs: Sequence[str], types: dict[str, tuple[str, Any]] | None = None) -> list[dict[str, str]]:
    """Validate ``Name=Value`` pairs against the pipeline's Parameters; StartPipelineExecution's shape.

    Raises :class:`UserError` for a malformed pair, an unknown name, or a value of the wrong type.
    """
    types = types if types is not None else parameter_types()
    result: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"--param expects Name=Value, got {pair!r}")
        if name not in types:
            raise UserError(f"unknown pipeline parameter {name!r} (known: {', '.join(sorted(types))})")
        kind = types[name][0]
        try:
            if kind == "int":
                value = str(int(value))
            elif kind == "float":
                value = repr(float(value))
            elif kind == "bool":
                if value.lower() not in ("true", "false"):
                    raise ValueError(value)
                value = value.lower()
        except ValueError:
            raise UserError(f"parameter {name} expects {_TYPE_NAMES.get(kind, kind)}, got {value!r}") from None
        if name == "ModelApprovalStatus" and value not in APPROVAL_STATUSES:
            raise UserError(f"parameter ModelApprovalStatus must be one of {', '.join(APPROVAL_STATUSES)}, "
                            f"got {value!r}")
        result[name] = value
    return [{"Name": name, "Value": value} for name, value in result.items()]


def check_start_parameters(parameters: list[dict[str, str]],
                           types: dict[str, tuple[str, Any]] | None = None, *, local: bool = False) -> None:
    """Refuse a start whose parameter values (defaults + overrides) the jobs cannot use: :class:`UserError` with
    every problem, before anything runs or is uploaded."""
    from pipelines.validation import check_parameters

    types = types if types is not None else parameter_types()
    values: dict[str, Any] = {name: default for name, (_kind, default) in types.items()}
    casts = {"int": int, "float": float, "str": str, "bool": lambda v: str(v).lower() == "true"}
    for item in parameters:
        values[item["Name"]] = casts.get(types[item["Name"]][0], str)(item["Value"])
    problems = check_parameters(values, local=local)
    if problems:
        raise UserError("invalid pipeline parameters: " + "; ".join(problems))


def apply_local_profile(parameters: list[dict[str, str]]) -> Any:
    """The local profile's values for the Parameters the user did not set
    (:mod:`pipelines.local.cli.profile`): a ``Resolved`` whose ``overrides()`` the start sends. Definition defaults
    are those of the local bucket, as the execution will see them."""
    from pipelines.local.cli import profile
    from pipelines.local.storage.store import LOCAL_BUCKET

    defaults = {name: default for name, (_kind, default) in parameter_types(LOCAL_BUCKET).items()}
    return profile.resolve(defaults, {p["Name"]: p["Value"] for p in parameters})


def show_profile(resolved: Any) -> None:
    """The resolved parameters with each value's origin, and the profile's warnings (stderr: stdout stays the
    execution ARN)."""
    from rich.table import Table

    from pipelines import views

    out = views.console(stderr=True)
    machine = resolved.machine
    table = Table(title=f"Parameters (local profile {machine.kind}: {machine.cores} cores, "
                        f"{machine.memory_gib:g} GiB, {machine.gpus} GPU)")
    for col in ("Parameter", "Value", "Origin"):
        table.add_column(col, overflow="fold")
    for name, value, origin in resolved.rows():
        table.add_row(name, value, origin)
    out.print(table)
    for warning in resolved.warnings:
        out.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def check_mlops_home() -> None:
    """``MLOPS_HOME`` must be a writable directory (created if missing): one clear line otherwise, not a traceback."""
    home = Path(os.environ.get("MLOPS_HOME") or Path.cwd() / ".mlops").expanduser()
    probe = home / f".write-test-{os.getpid()}"
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"MLOPS_HOME={home} is not a usable directory ({exc.strerror or exc}); set MLOPS_HOME to a "
                        "writable directory") from None


# --- configuration -----------------------------------------------------------------------------------------------

@dataclass
class Settings:
    """Everything ``get_pipeline`` needs, resolved from flags and environment."""

    region: str | None
    role_arn: str | None
    bucket: str | None
    pipeline_name: str
    model_package_group_name: str
    base_job_prefix: str
    project_name: str | None
    project_id: str | None
    project_arn: str | None
    deploy_function_arn: str | None
    tuning_strategy: str
    use_spot_instances: bool
    cache: bool
    stop_training_on_rule_issue: bool

    def tags(self) -> list[dict[str, str]]:
        tags = [{"Key": "sagemaker:project-name", "Value": self.project_name}] if self.project_name else []
        if self.project_id:
            tags.append({"Key": "sagemaker:project-id", "Value": self.project_id})
        return tags

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {
            "model_package_group_name": self.model_package_group_name, "pipeline_name": self.pipeline_name,
            "base_job_prefix": self.base_job_prefix, "sagemaker_project_arn": self.project_arn,
            "deploy_function_arn": self.deploy_function_arn, "tuning_strategy": self.tuning_strategy,
            "use_spot_instances": self.use_spot_instances, "cache": self.cache,
            "stop_training_on_rule_issue": self.stop_training_on_rule_issue,
        }


def resolve_settings(args: argparse.Namespace, env: dict[str, str] | os._Environ[str] = os.environ) -> Settings:
    from pipelines.pipeline import DEFAULT_BASE_JOB_PREFIX, DEFAULT_MODEL_PACKAGE_GROUP, DEFAULT_PIPELINE_NAME

    project_name = args.project_name or env.get("SAGEMAKER_PROJECT_NAME") or None
    project_id = args.project_id or env.get("SAGEMAKER_PROJECT_ID") or None
    # Like AWS's project template: names derive from "<project-name>-<project-id>" inside a SageMaker project.
    project_name_id = f"{project_name}-{project_id}" if project_name and project_id else None
    return Settings(
        region=args.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        role_arn=args.role_arn or env.get("SAGEMAKER_PIPELINE_ROLE_ARN") or None,
        bucket=args.bucket or env.get("ARTIFACT_BUCKET") or None,
        pipeline_name=args.pipeline_name or project_name_id or DEFAULT_PIPELINE_NAME,
        model_package_group_name=args.model_package_group or project_name_id or DEFAULT_MODEL_PACKAGE_GROUP,
        base_job_prefix=args.base_job_prefix or project_name_id or DEFAULT_BASE_JOB_PREFIX,
        project_name=project_name,
        project_id=project_id,
        project_arn=args.project_arn or env.get("SAGEMAKER_PROJECT_ARN") or None,
        deploy_function_arn=args.deploy_function_arn or env.get("DEPLOY_FUNCTION_ARN") or None,
        tuning_strategy=args.tuning_strategy,
        use_spot_instances=args.spot,
        cache=not args.no_cache,
        stop_training_on_rule_issue=args.stop_training_on_rule_issue,
    )


# --- definitions ---------------------------------------------------------------------------------------------------

def build_definition_json(settings: Settings, upload: Callable[[str, bytes], None] | None,
                          bundles: Any = None) -> str:
    """Build the code bundles (unless given), upload them through ``upload(s3_uri, data)`` (if given) and return
    the definition."""
    from pipelines.arns import UnknownRegionError
    from pipelines.packaging import build_code_bundles, code_locations, project_root, upload_code_bundles
    from pipelines.pipeline import UnsupportedRegionError, framework_images, get_pipeline, pipeline_definition

    if not settings.region:
        raise UserError("no AWS region: set AWS_REGION or pass --region")
    if not settings.role_arn:
        raise UserError("no pipeline role: set SAGEMAKER_PIPELINE_ROLE_ARN or pass --role-arn")
    if not settings.role_arn.startswith("arn:aws") or ":role/" not in settings.role_arn:
        raise UserError(f"--role-arn must be an IAM role ARN (arn:aws:iam::<account>:role/<name>), "
                        f"got {settings.role_arn!r}")
    if not settings.bucket:
        raise UserError("no artifact bucket: set ARTIFACT_BUCKET or pass --bucket")
    try:
        framework_images(settings.region)  # a region without the PyTorch images: one line, before any work
        bundles = bundles or build_code_bundles(project_root())
        locations = code_locations(settings.bucket, settings.base_job_prefix, bundles)
        if upload is not None:
            upload_code_bundles(bundles, locations, upload)
        pipeline = get_pipeline(settings.region, settings.role_arn, settings.bucket, locations,
                                **settings.pipeline_kwargs())
    except (UnsupportedRegionError, UnknownRegionError) as exc:
        raise UserError(str(exc)) from None
    return pipeline_definition(pipeline)


def local_settings(args: argparse.Namespace) -> Settings:
    """Settings of a local definition (CONTRACTS §9): fixed bucket, region, role and deploy function."""
    from pipelines.local.storage.store import DEPLOY_FUNCTION_ARN, LOCAL_BUCKET, LOCAL_REGION, LOCAL_ROLE_ARN

    settings = resolve_settings(args, env={})
    settings.region, settings.role_arn, settings.bucket = LOCAL_REGION, LOCAL_ROLE_ARN, LOCAL_BUCKET
    settings.deploy_function_arn = DEPLOY_FUNCTION_ARN
    settings.project_arn = None
    return settings


# --- SageMaker target ------------------------------------------------------------------------------------------------

@dataclass
class AwsClients:
    """The boto3 clients the SageMaker target uses (tests pass moto-backed or Stubber-wrapped clients)."""

    sagemaker: Any
    s3: Any
    sts: Any
    lambda_: Any = None
    events: Any = None

    #: field -> boto3 service name
    SERVICES: ClassVar[dict[str, str]] = {"sagemaker": "sagemaker", "s3": "s3", "sts": "sts", "lambda_": "lambda",
                                          "events": "events"}

    @classmethod
    def create(cls, region: str | None) -> AwsClients:
        import boto3

        session = boto3.Session(region_name=region)
        if not session.region_name:
            raise UserError("no AWS region: set AWS_REGION or pass --region")
        return cls(sagemaker=session.client("sagemaker"), s3=session.client("s3"), sts=session.client("sts"))


def s3_uploader(s3: Any) -> Callable[[str, bytes], None]:
    """``put(s3_uri, data)`` with boto3 ``put_object``."""

    def put(uri: str, data: bytes) -> None:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        s3.put_object(Bucket=bucket, Key=key, Body=data)

    return put


def upload_bundles_if_missing(s3: Any, settings: Settings, bundles: Any = None) -> None:
    """Upload the code bundles (built here unless given) unless this content address is complete already
    (sourcedir.tar.gz goes last), and the placeholder the ``PretrainedWeights`` Parameter points at by default."""
    from botocore.exceptions import ClientError

    from pipelines.packaging import (
        build_code_bundles,
        code_locations,
        project_root,
        upload_code_bundles,
        upload_placeholder,
    )

    upload_placeholder(settings.bucket, settings.base_job_prefix, s3_uploader(s3))
    bundles = bundles or build_code_bundles(project_root())
    locations = code_locations(settings.bucket, settings.base_job_prefix, bundles)
    bucket, _, key = locations.sourcedir.removeprefix("s3://").partition("/")
    try:
        s3.head_object(Bucket=bucket, Key=key)
        logger.info("code %s already uploaded", locations.root)
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise
    upload_code_bundles(bundles, locations, s3_uploader(s3))
    logger.info("uploaded code to %s", locations.root)


def _execution_arn(clients: AwsClients, settings: Settings, execution: str) -> str:
    """An execution ARN from an ARN, an execution id, or ``latest`` (the most recent execution)."""
    if execution.startswith("arn:"):
        return execution
    if execution == "latest":
        page = clients.sagemaker.list_pipeline_executions(
            PipelineName=settings.pipeline_name, SortBy="CreationTime", SortOrder="Descending", MaxResults=1)
        summaries = page.get("PipelineExecutionSummaries", [])
        if not summaries:
            raise UserError(f"pipeline {settings.pipeline_name} has no executions")
        return summaries[0]["PipelineExecutionArn"]
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"PipelineName": settings.pipeline_name, "MaxResults": 100}
        if token:
            kwargs["NextToken"] = token
        page = clients.sagemaker.list_pipeline_executions(**kwargs)
        for summary in page.get("PipelineExecutionSummaries", []):
            if summary["PipelineExecutionArn"].rsplit("/", 1)[-1] == execution:
                return summary["PipelineExecutionArn"]
        token = page.get("NextToken")
        if not token:
            raise UserError(f"no execution {execution!r} of pipeline {settings.pipeline_name}")


def _list_steps(clients: AwsClients, arn: str) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"PipelineExecutionArn": arn, "SortOrder": "Ascending"}
        if token:
            kwargs["NextToken"] = token
        page = clients.sagemaker.list_pipeline_execution_steps(**kwargs)
        steps.extend(page.get("PipelineExecutionSteps", []))
        token = page.get("NextToken")
        if not token:
            return steps


def sagemaker_upsert(clients: AwsClients, settings: Settings) -> dict[str, Any]:
    from botocore.exceptions import ClientError

    if not settings.bucket:
        raise UserError("no artifact bucket: set ARTIFACT_BUCKET or pass --bucket")
    from pipelines.packaging import build_code_bundles, project_root

    bundles = build_code_bundles(project_root())  # once, for the definition and the upload
    definition = build_definition_json(settings, None, bundles)  # first: a region problem fails before any AWS call
    upload_bundles_if_missing(clients.s3, settings, bundles)
    description = "Image classification: prepare, tune, train, evaluate, register, deploy."
    try:
        clients.sagemaker.describe_model_package_group(ModelPackageGroupName=settings.model_package_group_name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("ValidationException", "ResourceNotFound"):
            raise
        clients.sagemaker.create_model_package_group(
            ModelPackageGroupName=settings.model_package_group_name,
            ModelPackageGroupDescription="Image classifiers registered by the pipeline.",
            **({"Tags": settings.tags()} if settings.tags() else {}))
    try:
        clients.sagemaker.describe_pipeline(PipelineName=settings.pipeline_name)
        exists = True
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("ResourceNotFound", "ValidationException"):
            raise
        exists = False
    common = {"PipelineName": settings.pipeline_name, "PipelineDefinition": definition,
              "RoleArn": settings.role_arn, "PipelineDescription": description}
    if exists:
        response = clients.sagemaker.update_pipeline(**common)
    else:
        response = clients.sagemaker.create_pipeline(
            **common, ClientRequestToken=str(uuid.uuid4()), **({"Tags": settings.tags()} if settings.tags() else {}))
    return {"PipelineArn": response["PipelineArn"], "Action": "updated" if exists else "created"}


def sagemaker_wait(clients: AwsClients, arn: str, poll_seconds: float, timeout_seconds: float) -> dict[str, Any]:
    """Poll until the execution ends; each step's status change is logged (``<step>: <status>``) on the way."""
    deadline = time.monotonic() + timeout_seconds
    seen: dict[Any, Any] = {}
    while True:
        described = clients.sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
        status = described["PipelineExecutionStatus"]
        if status in TERMINAL_STATUSES:
            _report_steps(clients, arn, seen)
            return described
        if time.monotonic() >= deadline:
            raise UserError(f"execution {arn} still {status} after {timeout_seconds:.0f} s")
        _report_steps(clients, arn, seen)
        time.sleep(poll_seconds)


#: Least seconds between two progress lines of one executing step while waiting.
PROGRESS_EVERY_S = 10.0


def _report_steps(clients: AwsClients, arn: str, seen: dict[str, Any]) -> None:
    """Each step's status change, and every ``PROGRESS_EVERY_S`` the progress of executing steps (trials, epochs,
    ETA: :func:`pipelines.views.step_progress`), on stderr."""
    from pipelines import views

    for step in _list_steps(clients, arn):
        name, status = step["StepName"], step.get("StepStatus", "")
        if seen.get(name) != status:
            seen[name] = status
            reason = f": {step['FailureReason']}" if step.get("FailureReason") else ""
            cached = " (cache hit)" if step.get("CacheHitResult") else ""
            print(f"{time.strftime('%H:%M:%S')} {name}: {status}{cached}{reason}", file=sys.stderr, flush=True)
        if status != "Executing" or time.monotonic() - seen.get(("progress-at", name), 0.0) < PROGRESS_EVERY_S:
            continue
        progress = views.step_progress(clients.sagemaker, step)
        if progress != seen.get(("progress", name)):
            seen[("progress", name)], seen[("progress-at", name)] = progress, time.monotonic()
            print(f"{time.strftime('%H:%M:%S')} {name}: {progress}", file=sys.stderr, flush=True)


def _start(clients: AwsClients, settings: Settings, args: argparse.Namespace) -> int:
    if getattr(args, "start_no_cache", False):
        raise UserError("start --no-cache is for the local engine; on SageMaker, upsert a definition built "
                        "without caching (the global flag: --no-cache upsert)")
    request: dict[str, Any] = {"PipelineName": settings.pipeline_name, "ClientRequestToken": str(uuid.uuid4()),
                               "PipelineParameters": args.parameters}
    if args.display_name:
        request["PipelineExecutionDisplayName"] = args.display_name
    resolved = getattr(args, "profile", None)
    if resolved is not None:
        show_profile(resolved)
        request["PipelineExecutionDescription"] = resolved.description()
    arn = clients.sagemaker.start_pipeline_execution(**request)["PipelineExecutionArn"]
    print(arn, flush=True)
    return _wait_and_report(clients, arn, args) if args.wait else 0


def _wait_and_report(clients: AwsClients, arn: str, args: argparse.Namespace) -> int:
    poll = args.poll_seconds if args.poll_seconds is not None else (1.0 if args.target == "local" else 30.0)
    described = sagemaker_wait(clients, arn, poll, args.timeout_seconds)
    _print({"PipelineExecutionArn": arn, "PipelineExecutionStatus": described["PipelineExecutionStatus"],
            "FailureReason": described.get("FailureReason")})
    return 0 if described["PipelineExecutionStatus"] == "Succeeded" else 1


def status_record(clients: AwsClients, arn: str) -> dict[str, Any]:
    """What ``status`` shows (:func:`pipelines.views.status_record`), with the progress of executing steps."""
    from pipelines import views

    described = clients.sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
    steps = _list_steps(clients, arn)
    progress = {s["StepName"]: views.step_progress(clients.sagemaker, s) for s in steps
                if s.get("StepStatus") == "Executing"}
    return views.status_record({**described, "PipelineExecutionArn": arn}, steps, progress)


def _status(clients: AwsClients, settings: Settings, args: argparse.Namespace) -> int:
    from pipelines import views

    arn = _execution_arn(clients, settings, args.execution)
    if args.watch:
        return _watch(clients, arn, args)
    record = status_record(clients, arn)
    if args.output == "json":
        views.print_json(record)
    else:
        views.console().print(views.status_table(record))
    return 0


def _watch(clients: AwsClients, arn: str, args: argparse.Namespace) -> int:
    """``status --watch``: redraw the status table every ``--interval`` seconds until the execution ends (a live
    table on a terminal; otherwise, or with ``--output json``, one record per change, one line each)."""
    from rich.live import Live

    from pipelines import views

    out = views.console()
    record = status_record(clients, arn)
    if out.is_terminal and args.output == "table":
        with Live(views.status_table(record), console=out, refresh_per_second=2) as live:
            while record["PipelineExecutionStatus"] not in TERMINAL_STATUSES:
                time.sleep(args.interval)
                record = status_record(clients, arn)
                live.update(views.status_table(record))
    else:
        last: dict[str, Any] | None = None
        while True:
            if record != last:
                if args.output == "json":
                    sys.stdout.write(json.dumps(views.jsonable(record)) + "\n")
                else:
                    out.print(views.status_table(record))
                sys.stdout.flush()
                last = record
            if record["PipelineExecutionStatus"] in TERMINAL_STATUSES:
                break
            time.sleep(args.interval)
            record = status_record(clients, arn)
    return 0 if record["PipelineExecutionStatus"] == "Succeeded" else 1


def _describe(clients: AwsClients, settings: Settings, args: argparse.Namespace) -> int:
    from pipelines import views

    arn = _execution_arn(clients, settings, args.execution)
    described = clients.sagemaker.describe_pipeline_execution(PipelineExecutionArn=arn)
    described.pop("ResponseMetadata", None)
    steps = views.with_step_types(clients.sagemaker, arn, _list_steps(clients, arn))
    if args.output == "json":
        _print({**described, "Steps": steps})
    else:
        views.render_execution(clients.sagemaker, described, steps)
    return 0


def _list_executions(clients: AwsClients, settings: Settings, args: argparse.Namespace) -> int:
    page = clients.sagemaker.list_pipeline_executions(PipelineName=settings.pipeline_name, SortBy="CreationTime",
                                                      SortOrder="Descending", MaxResults=args.max_results)
    from pipelines import views

    summaries = page.get("PipelineExecutionSummaries", [])
    if args.output == "json":
        views.print_json(summaries)
    else:
        views.console().print(views.executions_table(summaries))
    return 0


def _retry(clients: AwsClients, settings: Settings, args: argparse.Namespace) -> int:
    arn = _execution_arn(clients, settings, args.execution)
    _print(clients.sagemaker.retry_pipeline_execution(PipelineExecutionArn=arn, ClientRequestToken=str(uuid.uuid4())))
    return _wait_and_report(clients, arn, args) if args.wait else 0


def _stop(clients: AwsClients, settings: Settings, args: argparse.Namespace) -> int:
    arn = _execution_arn(clients, settings, args.execution)
    _print(clients.sagemaker.stop_pipeline_execution(PipelineExecutionArn=arn, ClientRequestToken=str(uuid.uuid4())))
    return 0


def run_sagemaker(args: argparse.Namespace, clients: AwsClients | None = None,
                  settings: Settings | None = None) -> int:
    """The pipeline commands through boto3: against SageMaker, or (``run_local``) the local AWS service."""
    settings = settings or resolve_settings(args)
    if args.command == "definition":
        print(build_definition_json(settings, upload=None))
        return 0
    if args.command in LOCAL_COMMANDS:
        raise UserError(f"command {args.command!r} is only available with --target local")
    clients = clients or AwsClients.create(settings.region)
    settings.region = settings.region or clients.sagemaker.meta.region_name
    if args.command == "upsert":
        _print(sagemaker_upsert(clients, settings))
        return 0
    if args.command == "start":
        if getattr(args, "definition", None) and args.target != "local":
            _upsert_definition_file(clients, settings, args)
        return _start(clients, settings, args)
    return _COMMANDS[args.command](clients, settings, args)


_COMMANDS: dict[str, Callable[[AwsClients, Settings, argparse.Namespace], int]] = {
    "status": _status, "describe": _describe, "list-executions": _list_executions, "retry": _retry, "stop": _stop,
}


def _print(value: Any) -> None:
    from pipelines import views

    views.print_json(value)


# --- local target ----------------------------------------------------------------------------------------------------

LOCAL_COMMANDS = ("report", "gc", "models", "endpoints", "local", "ui")


def local_service_url() -> str:
    """The local AWS service's URL (started on demand)."""
    from pipelines.local.api import server

    try:
        return server.up()
    except RuntimeError as exc:  # the service did not start
        raise UserError(str(exc)) from None


def local_client(service: str) -> Any:
    """A boto3 client of the local AWS service: ``sagemaker-runtime``, ``lambda``, ..."""
    from pipelines.local.api import clients

    return clients.client(service, local_service_url())


def local_clients() -> AwsClients:
    """The boto3 clients of the local AWS service."""
    from pipelines.local.api import clients

    url = local_service_url()
    return AwsClients(**{name: clients.client(service, url) for name, service in AwsClients.SERVICES.items()})


def _no_cache_header(request: Any, **_kwargs: Any) -> None:
    """``start --no-cache`` on the local target: the local service's one extension header (SageMaker has no such
    switch; the SageMaker target refuses the flag)."""
    from pipelines.local.api.protocol import NO_CACHE_HEADER

    request.headers[NO_CACHE_HEADER] = "true"


def ensure_local_stack(clients: AwsClients, settings: Settings, args: argparse.Namespace) -> None:
    """What ``infra/template.yaml`` creates on AWS, created the same way here (through the APIs): the artifact
    bucket, the deploy function (steps/deploy.py, created with Lambda's CreateFunction) and the EventBridge rule that
    sends the group's approval changes to it (:mod:`pipelines.local.api.stack`). The function manages the endpoint
    ``start --param EndpointName=...`` names (as the template's ``EndpointName`` parameter would)."""
    from pipelines.local.api import stack

    endpoint = next((p["Value"] for p in getattr(args, "parameters", None) or [] if p["Name"] == "EndpointName"), None)
    stack.ensure_all(clients, settings.bucket, settings.model_package_group_name, endpoint_name=endpoint)


def _upsert_definition_file(clients: AwsClients, settings: Settings, args: argparse.Namespace) -> None:
    """``start --definition FILE``: create or update the pipeline (``--pipeline-name``, default the file's stem)
    with that definition, as ``pipeline.upsert()`` would."""
    from botocore.exceptions import ClientError

    definition = read_definition(args.definition)
    settings.pipeline_name = args.pipeline_name or Path(args.definition).stem
    common = {"PipelineName": settings.pipeline_name, "PipelineDefinition": definition, "RoleArn": settings.role_arn}
    try:
        clients.sagemaker.update_pipeline(**common)
        action = "updated"
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("ResourceNotFound", "ValidationException"):
            raise
        clients.sagemaker.create_pipeline(**common, ClientRequestToken=str(uuid.uuid4()))
        action = "created"
    logger.info("%s: %s from %s", settings.pipeline_name, action, args.definition)


def run_local(args: argparse.Namespace, clients: AwsClients | None = None) -> int:
    """The local target: the SageMaker target's code against the local AWS service, plus its own commands."""
    if args.command in LOCAL_COMMANDS:
        from pipelines.local.cli import commands as local_cli

        return int(local_cli.dispatch(args) or 0)
    settings = local_settings(args)
    if args.command == "definition":
        print(build_definition_json(settings, upload=None))
        return 0
    clients = clients or local_clients()
    if args.command in ("upsert", "start"):
        ensure_local_stack(clients, settings, args)
    if args.command == "start" and getattr(args, "definition", None):
        _upsert_definition_file(clients, settings, args)
    elif args.command == "start":  # the local target runs what is checked out: upsert it first
        logger.info("%s: %s", settings.pipeline_name, sagemaker_upsert(clients, settings)["Action"])
        if getattr(args, "start_no_cache", False):
            clients.sagemaker.meta.events.register("before-sign.sagemaker.StartPipelineExecution", _no_cache_header)
            args.start_no_cache = False
    return run_sagemaker(args, clients, settings)


# --- parser ----------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from pipelines import views
    from pipelines.pipeline import TUNING_STRATEGIES

    parser = argparse.ArgumentParser(
        prog="python -m pipelines.run", description="Build, upsert, start and inspect the image-classification "
        "pipeline on SageMaker or on the embedded local engine.", allow_abbrev=False)
    parser.add_argument("--target", choices=TARGETS, default=os.environ.get("MLOPS_TARGET") or "local",
                        help="where the pipeline runs (env MLOPS_TARGET; default local)")
    parser.add_argument("--region", help="AWS region (env AWS_REGION)")
    parser.add_argument("--role-arn", help="pipeline execution role (env SAGEMAKER_PIPELINE_ROLE_ARN)")
    parser.add_argument("--bucket", help="artifact bucket for code and outputs (env ARTIFACT_BUCKET)")
    parser.add_argument("--pipeline-name", help="default ImageClassificationPipeline or <project-name>-<project-id>")
    parser.add_argument("--model-package-group", help="default ImageClassifierModels or <project-name>-<project-id>")
    parser.add_argument("--base-job-prefix", help="job name and S3 prefix (default imgclf)")
    parser.add_argument("--project-name", help="SageMaker project name (env SAGEMAKER_PROJECT_NAME)")
    parser.add_argument("--project-id", help="SageMaker project id (env SAGEMAKER_PROJECT_ID)")
    parser.add_argument("--project-arn", help="SageMaker project ARN (env SAGEMAKER_PROJECT_ARN)")
    parser.add_argument("--deploy-function-arn", help="deploy Lambda ARN (env DEPLOY_FUNCTION_ARN)")
    parser.add_argument("--tuning-strategy", choices=TUNING_STRATEGIES, default="Bayesian")
    parser.add_argument("--spot", action="store_true", help="managed spot training with checkpoints")
    parser.add_argument("--no-cache", action="store_true", help="disable step caching")
    parser.add_argument("--stop-training-on-rule-issue", action="store_true",
                        help="Debugger rules stop the best-model training job when they find an issue")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the SDK's messages too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("definition", help="print the pipeline definition JSON")
    sub.add_parser("upsert", help="create or update the pipeline")
    start = sub.add_parser("start", help="start an execution")
    start.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="override a pipeline Parameter (repeatable)")
    start.add_argument("--wait", action="store_true", help="wait until the execution ends; exit 1 unless it succeeded")
    start.add_argument("--display-name", help="execution display name")
    start.add_argument("--definition", metavar="FILE",
                       help="upsert and run this pipeline definition JSON (any pipeline's, e.g. from "
                            "pipeline.definition()) instead of the project's; --pipeline-name names it (default: "
                            "the file's stem), --param takes its Parameters")
    start.add_argument("--no-local-profile", action="store_true",
                       help="local target: take the definition's defaults (SageMaker's GPU sizes) for the Parameters "
                            "not set with --param, not the local profile sized to this machine")
    _add_wait_arguments(start)
    # not ``no_cache`` (the global flag, which builds the definition with caching off): the local engine's per-start
    # switch, sent to the local service as the x-mlops-no-cache header
    start.add_argument("--no-cache", dest="start_no_cache", action="store_true",
                       help="local target: this execution looks nothing up in the step cache")
    for name, text in (("status", "execution status and step statuses"), ("describe", "full execution record"),
                       ("retry", "retry a failed execution from its failed steps"), ("stop", "stop an execution")):
        command = sub.add_parser(name, help=text)
        command.add_argument("execution", nargs="?", default="latest",
                             help="execution ARN or id (default: the latest)")
        if name in ("describe", "status"):
            views.add_output_argument(command)
        if name == "status":
            command.add_argument("--watch", action="store_true",
                                 help="redraw until the execution ends (exit 1 unless it succeeded)")
            command.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (--watch)")
        if name == "retry":
            command.add_argument("--wait", action="store_true", help="wait until the execution ends")
            _add_wait_arguments(command)
    listing = sub.add_parser("list-executions", help="most recent executions first")
    listing.add_argument("--max-results", type=int, default=20)
    views.add_output_argument(listing)
    try:
        from pipelines.local.cli import commands as local_cli
    except ImportError as exc:
        logger.debug("local engine commands unavailable: %s", exc)
    else:
        local_cli.add_local_subcommands(sub)
    return parser


def _add_wait_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--poll-seconds", type=float, default=None,
                        help="status poll interval while waiting (default 30, 1 on the local target)")
    parser.add_argument("--timeout-seconds", type=float, default=24 * 3600.0)


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("pipelines").setLevel(logging.INFO)
    for noisy in ("sagemaker", "sagemaker.config", "botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)


def main(argv: Sequence[str] | None = None, clients: AwsClients | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 execution failed, 2 user error)."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        definition_file = getattr(args, "definition", None)
        types = definition_parameter_types(definition_file) if definition_file else None
        args.parameters = parse_parameters(getattr(args, "param", None) or [], types)
        if args.command == "start" and not definition_file:
            if args.target == "local" and not args.no_local_profile:
                args.profile = apply_local_profile(args.parameters)
                args.parameters = args.profile.overrides()
            check_start_parameters(args.parameters, local=args.target == "local")
        if args.target == "local":
            check_mlops_home()
            return run_local(args) if clients is None else run_local(args, clients)
        return run_sagemaker(args, clients)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NoCredentialsError:
        print("error: no AWS credentials found: configure a profile, environment variables or an instance role "
              "(or use --target local)", file=sys.stderr)
        return 2
    except NoRegionError:
        print("error: no AWS region: set AWS_REGION or pass --region", file=sys.stderr)
        return 2
    except ClientError as exc:
        error = exc.response.get("Error", {})
        print(f"error: {exc.operation_name}: {error.get('Code')}: {error.get('Message')}", file=sys.stderr)
        return 2
    except BotoCoreError as exc:
        print(f"error: AWS: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {exc.filename}" if exc.filename else ""
            print(f"error: no space left on the device{where}; free some space (e.g. `python -m pipelines.run gc`) "
                  "or point MLOPS_HOME at a larger disk", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
