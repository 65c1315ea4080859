"""CLI commands for the local model registry and endpoints (``models ...``, ``endpoints ...``).

``add_subcommands(subparsers)`` adds the two command groups (each sets ``cli_group`` on the parsed namespace) and
``run(args)`` executes one. Every change goes through the local AWS service with boto3, as it would on AWS:
approving or rejecting a version is ``UpdateModelPackage``; the service emits the EventBridge "SageMaker Model
Package State Change" event, the approval rule (created like infra/template.yaml's, :mod:`pipelines.local.api.stack`)
sends it to the deploy function (``steps/deploy.py``, created with Lambda ``CreateFunction``), which deploys through
the SageMaker API; the command then reads that invocation's log (its ``Result:`` line) and waits for the endpoint.
``endpoints invoke`` is the runtime's ``InvokeEndpoint``; ``endpoints delete`` is ``DeleteEndpoint``. Listings read
the registry and the API.

Rejecting the only Approved version while it serves leaves the endpoint serving it (the deploy function's
``NothingApproved``, as on AWS: nothing approved to roll back to, and deleting a live endpoint is a separate, explicit
decision). ``models reject`` then exits 1 with the reason on stderr (the registry change stands), and ``endpoints
list`` / ``models describe`` flag the endpoint ("serving a Rejected version: nothing approved to roll back to").
``models approve`` exits 0 only when the endpoint is InService serving the deployed version from a live server.
"""

from __future__ import annotations

import argparse
import json
import logging
import mimetypes
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from rich.console import Console
from rich.table import Table

from pipelines import views
from pipelines.local.api import clients
from pipelines.local.serving import endpoints
from pipelines.local.storage import registry
from pipelines.local.storage.store import DEPLOY_FUNCTION_NAME, mlops_home

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT_NAME = "imgclf-endpoint"
DEPLOY_WAIT_S = 300.0  # models approve/reject: the deploy function's invocation and the endpoint
IMAGE_CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}



def _out() -> Console:
    """Created per command so that COLUMNS and redirections in effect now apply; unwrapped when not a terminal."""
    return views.console()


def _err() -> Console:
    return Console(stderr=True)


# ------------------------------------------------------------------------------------------------------ parser


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``models`` (list, describe, approve, reject) and ``endpoints`` (list, invoke, delete, restart)."""
    models = subparsers.add_parser("models", help="local model registry: list, describe, approve, reject")
    models.set_defaults(cli_group="models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="{list,describe,approve,reject}")

    p = msub.add_parser("list", help="model versions with approval status and accuracy")
    p.add_argument("--group", help="model package group (default: all groups)")
    p.add_argument("--status", choices=registry.APPROVAL_STATUSES, help="only versions with this approval status")
    views.add_output_argument(p)

    p = msub.add_parser("describe", help="one model version in detail")
    p.add_argument("model", help="model package ARN, <group>/<version> or a version number")
    p.add_argument("--group", help=f"group of a bare version number (default {registry.DEFAULT_GROUP})")
    p.add_argument("--json", action="store_true", help="the same as --output json")
    views.add_output_argument(p)

    for verb, status in (("approve", "Approved"), ("reject", "Rejected")):
        p = msub.add_parser(verb, help=f"set a version to {status} and deploy the latest approved version")
        p.add_argument("model", help="model package ARN, <group>/<version> or a version number")
        p.add_argument("--group", help=f"group of a bare version number (default {registry.DEFAULT_GROUP})")
        p.add_argument("--endpoint-name", default=os.environ.get("ENDPOINT_NAME") or DEFAULT_ENDPOINT_NAME,
                       help="endpoint the deploy function manages (default: env ENDPOINT_NAME or %(default)s)")
        p.add_argument("--description", help="approval description to record")
        p.add_argument("--no-wait", action="store_true",
                       help="do not wait for the deploy function (the approval event triggers it either way)")
        p.add_argument("--timeout", type=float, default=DEPLOY_WAIT_S, help="seconds to wait for the deploy")
        p.set_defaults(approval_status=status)

    eps = subparsers.add_parser("endpoints", help="local endpoints: list, invoke, delete, restart")
    eps.set_defaults(cli_group="endpoints")
    esub = eps.add_subparsers(dest="endpoints_command", required=True, metavar="{list,invoke,delete,restart}")
    views.add_output_argument(esub.add_parser("list", help="local endpoints, their status, URL and the model they "
                                                         "serve"))
    p = esub.add_parser("invoke", help="send a file to an endpoint's /invocations")
    p.add_argument("name", help="endpoint name")
    p.add_argument("--file", required=True, type=Path, help="request body, e.g. an image")
    p.add_argument("--content-type", help="Content-Type (default: from the file extension, else application/x-image)")
    p.add_argument("--accept", default="application/json")
    p = esub.add_parser("delete", help="stop an endpoint's server and delete the endpoint")
    p.add_argument("name", help="endpoint name")
    p = esub.add_parser("restart", help="deploy an endpoint's current configuration again (e.g. its server died)")
    p.add_argument("name", help="endpoint name")


def run(args: argparse.Namespace) -> int:
    """Run the ``models``/``endpoints`` command in ``args``; returns the process exit code."""
    group = getattr(args, "cli_group", None)
    try:
        if group == "models":
            return _MODEL_COMMANDS[args.models_command](args)
        if group == "endpoints":
            return _ENDPOINT_COMMANDS[args.endpoints_command](args)
    except (registry.RegistryError, endpoints.EndpointError, ClientError, ValueError, OSError) as exc:
        _err().print(f"[red]error:[/red] {exc}", highlight=False)
        return 1
    raise ValueError(f"not a models/endpoints command: {group!r}")


# ------------------------------------------------------------------------------------------------------ models


def _fmt_time(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S") if epoch else "-"


def _fmt_metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


_STATUS_STYLE = {"Approved": "green", "Rejected": "red", "PendingManualApproval": "yellow",
                 "InService": "green", "Failed": "red"}


def _styled(status: str | None) -> str:
    style = _STATUS_STYLE.get(status or "", "white")
    return f"[{style}]{status or '-'}[/{style}]"


def package_record(package: registry.ModelPackage) -> dict[str, Any]:
    """``models list --output json``: one version (stable keys)."""
    return {"ModelPackageGroupName": package.group, "ModelPackageVersion": package.version,
            "ModelPackageArn": package.arn, "ModelApprovalStatus": package.approval_status,
            "Accuracy": package.accuracy, "CreationTime": _iso_time(package.creation_time),
            "ModelPackageDescription": package.description}


def _iso_time(epoch: float | None) -> str | None:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat() if epoch else None


def _models_list(args: argparse.Namespace) -> int:
    packages = registry.list_packages(args.group, args.status)
    if args.output == "json":
        views.print_json([package_record(p) for p in packages])
        return 0
    if not packages:
        _out().print("No model versions registered" + (f" in group {args.group!r}" if args.group else "") + ".")
        return 0
    table = Table(title="Model registry")
    for column in ("Group", "Version", "Approval", "Accuracy", "Created", "Description", "ARN"):
        table.add_column(column, overflow="fold")
    for p in packages:
        table.add_row(p.group, str(p.version), _styled(p.approval_status), _fmt_metric(p.accuracy),
                      _fmt_time(p.creation_time), p.description or "", p.arn)
    _out().print(table)
    return 0


def _models_describe(args: argparse.Namespace) -> int:
    package = registry.get_package(args.model, args.group)
    if args.json or args.output == "json":
        views.print_json(package.describe())
        return 0
    container = package.container or {}
    env = container.get("Environment") or {}
    spec = package.inference_specification or {}
    rows: list[tuple[str, str]] = [
        ("ARN", package.arn), ("Group", package.group), ("Version", str(package.version)),
        ("Approval", _styled(package.approval_status)), ("Approval description", package.approval_description or "-"),
        ("Description", package.description or "-"), ("Created", _fmt_time(package.creation_time)),
        ("Last modified", _fmt_time(package.last_modified_time)),
        ("Image", container.get("Image", "-")), ("Model data", container.get("ModelDataUrl", "-")),
        ("Serving code", f"code/{env.get('SAGEMAKER_PROGRAM', 'inference.py')} in the model data"),
        ("Content types", ", ".join(spec.get("SupportedContentTypes") or []) or "-"),
        ("Response types", ", ".join(spec.get("SupportedResponseMIMETypes") or []) or "-"),
    ]
    rows.append(("Endpoints", _serving_endpoints_text(_sagemaker(), package)))
    metrics = (package.evaluation or {}).get("multiclass_classification_metrics") or {}
    for name in ("accuracy", "top_5_accuracy", "macro_f1", "weighted_f1"):
        value = (metrics.get(name) or {}).get("value")
        if value is not None:
            rows.append((name, _fmt_metric(value)))
    source = ((package.model_metrics or {}).get("ModelQuality") or {}).get("Statistics", {}).get("S3Uri")
    if source:
        rows.append(("Metrics report", source + ("" if package.evaluation is not None else " (not readable)")))
    for key, value in sorted(package.customer_metadata.items()):
        rows.append((f"metadata: {key}", value))
    table = Table(title=f"{package.group} version {package.version}", show_header=False)
    table.add_column("Field", style="bold")
    table.add_column("Value", overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    _out().print(table)
    return 0


def _sagemaker() -> Any:
    """The local AWS service's SageMaker client (boto3)."""
    return clients.client("sagemaker")


def _models_set_approval(args: argparse.Namespace) -> int:
    """``UpdateModelPackage`` on the local AWS service, as on AWS: the approval change is an EventBridge event that
    the approval rule sends to the deploy function (created like infra/template.yaml does, see
    :mod:`pipelines.local.api.stack`). Then wait for that invocation (its log, as CloudWatch Logs would show it) and
    for the endpoint to serve what it deployed."""
    from pipelines.local.api import stack

    package = registry.get_package(args.model, args.group)
    sm = _sagemaker()
    from pipelines.run import local_clients

    stack.ensure_all(local_clients(), None, package.group, endpoint_name=args.endpoint_name)
    logs_before = set(_deploy_logs())
    request = {"ModelPackageArn": package.arn, "ModelApprovalStatus": args.approval_status}
    if args.description:
        request["ApprovalDescription"] = args.description
    sm.update_model_package(**request)
    if package.approval_status == args.approval_status:
        _resend_state_change(sm, package.arn)
    else:
        _out().print(f"{package.group} version {package.version} is now {_styled(args.approval_status)} "
                     f"({package.arn})")
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout
    log = _finished_invocation(logs_before, deadline)
    if log is None:
        _err().print(f"[red]the deploy function did not finish within {args.timeout:.0f} s[/red]; its logs: "
                     f"{_deploy_log_dir()}", highlight=False)
        return 1
    result = deploy_result(log)
    if result is None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        _err().print(f"[red]deploy failed[/red] ({log}):\n{tail}", highlight=False)
        return 1
    _out().print(f"deploy: {result.get('status')} -- {result.get('message')}", highlight=False)
    if result.get("status") == "NothingApproved":
        return _nothing_approved_exit(args.endpoint_name, result)
    return _wait_until_serving(sm, args.endpoint_name, result.get("model_package_arn"), deadline)


def _resend_state_change(sm: Any, package_arn: str) -> None:
    """The status did not change, so SageMaker sends no event: send the package's state-change event to the deploy
    function directly (asynchronously, as EventBridge -- and its retries after a failed deploy -- would)."""
    from pipelines.local.api import events
    from pipelines.local.storage.store import LOCAL_ACCOUNT, LOCAL_REGION

    described = sm.describe_model_package(ModelPackageName=package_arn)
    described.pop("ResponseMetadata", None)
    event = events.model_package_state_change_event(described, account=LOCAL_ACCOUNT, region=LOCAL_REGION)
    clients.client("lambda").invoke(FunctionName=DEPLOY_FUNCTION_NAME, InvocationType="Event",
                                    Payload=json.dumps(event, default=str).encode())
    _out().print(f"{package_arn} is already {_styled(described['ModelApprovalStatus'])}: sent its state-change "
                 "event to the deploy function again")


def _deploy_log_dir() -> Path:
    return mlops_home() / "lambda" / DEPLOY_FUNCTION_NAME / "logs"


def _deploy_logs() -> list[Path]:
    folder = _deploy_log_dir()
    return sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []


def _finished_invocation(before: set[Path], deadline: float) -> Path | None:
    """The log of the first deploy invocation started after ``before`` was taken, once it has ended."""
    while time.monotonic() < deadline:
        for log in _deploy_logs():
            if log not in before and "END RequestId:" in log.read_text(errors="replace"):
                return log
        time.sleep(0.2)
    return None


def deploy_result(log: Path) -> dict[str, Any] | None:
    """The deploy function's result (its ``Result: {json}`` log line), ``None`` when it failed."""
    from steps.deploy import RESULT_LOG_PREFIX

    for line in reversed(log.read_text(errors="replace").splitlines()):
        _, found, payload = line.partition(RESULT_LOG_PREFIX + " ")
        if found:
            try:
                return json.loads(payload)
            except ValueError:
                return None
    return None


def _wait_until_serving(sm: Any, endpoint_name: str, package_arn: str | None, deadline: float) -> int:
    """0 once ``endpoint_name`` is InService serving ``package_arn`` from a live server; 1 (reason on stderr) when
    the deploy failed or the deadline passed."""
    from steps import deploy

    while True:
        endpoint = sm.describe_endpoint(EndpointName=endpoint_name)
        status = endpoint["EndpointStatus"]
        serving = deploy.package_of_config(sm, endpoint.get("EndpointConfigName"))
        if status == "InService" and serving == package_arn and endpoints.get(endpoint_name).alive:
            _out().print(f"endpoint {endpoint_name} is {_styled('InService')} at "
                         f"{endpoints.get(endpoint_name).url}/invocations")
            return 0
        if status not in ("Creating", "Updating") or time.monotonic() >= deadline:
            _err().print(f"[red]endpoint {endpoint_name} is not serving {package_arn}:[/red] it is {status}, "
                         f"serving {serving or 'nothing'}: {endpoint.get('FailureReason') or 'no reason given'}",
                         highlight=False)
            return 1
        time.sleep(0.5)


def _nothing_approved_exit(endpoint_name: str, result: dict[str, Any]) -> int:
    """Exit code after ``NothingApproved``: 1 when the endpoint still serves a version that is not Approved."""
    serving, approval = result.get("serving_model_package_arn"), result.get("serving_approval_status")
    if result.get("endpoint_status") is None or not approval or approval == "Approved":
        return 0
    _err().print(f"[red]endpoint {endpoint_name} still serves {serving}, which is {approval}: nothing approved to "
                 f"roll back to.[/red] Approve a version to replace it, or `endpoints delete {endpoint_name}` to "
                 "stop serving it.", highlight=False)
    return 1


def serving_note(client: Any, config_name: str | None) -> str | None:
    """A note when an endpoint config serves a version that is no longer Approved (``None`` otherwise)."""
    from steps import deploy

    arn = deploy.package_of_config(client, config_name)
    try:
        package = registry.get_package(arn) if arn else None
    except registry.ResourceNotFound:
        return None
    if package is None or package.approval_status == "Approved":
        return None
    approved = registry.list_packages(package.group, "Approved")
    if not approved:
        return f"serving a {package.approval_status} version: nothing approved to roll back to"
    newest = approved[-1].version
    return (f"serving a {package.approval_status} version; newest Approved is {package.group}/{newest} "
            f"(models approve {newest} to deploy it)")


def _serving_endpoints_text(client: Any, package: registry.ModelPackage) -> str:
    """``name (status)`` of each local endpoint whose config serves ``package``, with its note."""
    from steps import deploy

    found = []
    for described in _described_endpoints(client).values():
        if deploy.package_of_config(client, described.get("EndpointConfigName")) == package.arn:
            note = serving_note(client, described.get("EndpointConfigName"))
            found.append(f"{described['EndpointName']} ({described['EndpointStatus']})" + (f": {note}" if note else ""))
    return "; ".join(found) or "-"


# --------------------------------------------------------------------------------------------------- endpoints


def served_package(client: Any, config_name: str | None) -> str | None:
    """``group/version`` (or ARN, or image) that an endpoint config serves, for display."""
    if not config_name:
        return None
    try:
        config = client.describe_endpoint_config(EndpointConfigName=config_name)
        model = client.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    except (ClientError, KeyError, IndexError):
        return None
    container = model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0]
    ref = container.get("ModelPackageName")
    if ref:
        try:
            package = registry.get_package(ref)
            return f"{package.group}/{package.version}"
        except registry.ResourceNotFound:
            return ref
    return container.get("ModelDataUrl") or container.get("Image")


def _described_endpoints(client: Any) -> dict[str, dict[str, Any]]:
    """``DescribeEndpoint`` of every endpoint, by name (every page of ``ListEndpoints``)."""
    return {summary["EndpointName"]: client.describe_endpoint(EndpointName=summary["EndpointName"])
            for page in client.get_paginator("list_endpoints").paginate() for summary in page["Endpoints"]}


def _endpoints_list(args: argparse.Namespace) -> int:
    client = _sagemaker()
    described = _described_endpoints(client)
    servers = {e.name: e for e in endpoints.list_endpoints()}
    names = sorted(set(described) | set(servers))
    if args.output == "json":
        views.print_json([endpoint_record(client, name, described.get(name, {}), servers.get(name)) for name in names])
        return 0
    if not names:
        _out().print("No local endpoints.")
        return 0
    table = Table(title="Local endpoints")
    for column in ("Name", "Status", "Server", "endpoint_url", "Serving", "Deployed", "Note"):
        table.add_column(column, overflow="fold")
    for name in names:
        desc, server = described.get(name, {}), servers.get(name)
        health = "-" if server is None else ("[green]up[/green]" if server.alive else "[red]down[/red]")
        serving = served_package(client, desc.get("EndpointConfigName")) or (server.model_dir if server else "-")
        notes = [desc.get("FailureReason"), serving_note(client, desc.get("EndpointConfigName"))]
        if server is not None and not server.alive:
            notes.append(f"server pid {server.pid} is gone: endpoints restart {name}")
        note = " ".join(n for n in notes if n)
        table.add_row(name, _styled(desc.get("EndpointStatus")) if desc else "-", health,
                      server.url if server and server.url else "-", serving or "-",
                      _fmt_time(server.deployed_at) if server else "-", note)
    _out().print(table)
    return 0


def endpoint_record(client: Any, name: str, desc: dict[str, Any], server: Any) -> dict[str, Any]:
    """``endpoints list --output json``: one endpoint (stable keys)."""
    notes = [desc.get("FailureReason"), serving_note(client, desc.get("EndpointConfigName"))]
    return {"EndpointName": name, "EndpointStatus": desc.get("EndpointStatus"),
            "EndpointConfigName": desc.get("EndpointConfigName"),
            "ServerAlive": None if server is None else bool(server.alive),
            "Url": server.url if server is not None else None,
            "ModelPackageArn": served_package(client, desc.get("EndpointConfigName")),
            "ModelDir": str(server.model_dir) if server is not None else None,
            "DeployedAt": _iso_time(server.deployed_at) if server is not None else None,
            "Note": " ".join(n for n in notes if n) or None}


def _endpoints_invoke(args: argparse.Namespace) -> int:
    """The SageMaker runtime's ``InvokeEndpoint`` (boto3, the local AWS service)."""
    body = args.file.read_bytes()
    content_type = (args.content_type or IMAGE_CONTENT_TYPES.get(args.file.suffix.lower())
                    or mimetypes.guess_type(args.file.name)[0] or "application/x-image")
    try:
        answer = clients.client("sagemaker-runtime").invoke_endpoint(
            EndpointName=args.name, Body=body, ContentType=content_type, Accept=args.accept)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("OriginalStatusCode") or exc.response.get("ResponseMetadata", {}).get(
            "HTTPStatusCode")
        _err().print(f"[red]HTTP {status}[/red] {error.get('Code')}: {error.get('Message')}", highlight=False)
        return 1
    text = answer["Body"].read().decode("utf-8", "replace")
    try:
        _out().print_json(text)
    except (ValueError, TypeError):
        _out().print(text, highlight=False)
    return 0


def _endpoints_delete(args: argparse.Namespace) -> int:
    client = _sagemaker()
    try:
        client.delete_endpoint(EndpointName=args.name)
    except ClientError as exc:
        if not endpoints.delete(args.name):  # a bare local server without an API record is deleted too
            raise exc
    _out().print(f"deleted endpoint {args.name}")
    return 0


def _endpoints_restart(args: argparse.Namespace) -> int:
    from pipelines.local.api.sagemaker_backend import SageMakerBackend

    described = SageMakerBackend().redeploy_endpoint(args.name)  # local-only: SageMaker has no such operation
    if described.get("FailureReason"):
        _err().print(f"endpoint {args.name} is {_styled(described['EndpointStatus'])}: "
                          f"{described['FailureReason']}", highlight=False)
        return 1
    _out().print(f"endpoint {args.name} is {_styled(described['EndpointStatus'])} at "
                  f"{endpoints.get(args.name).url}/invocations")
    return 0


_MODEL_COMMANDS = {"list": _models_list, "describe": _models_describe, "approve": _models_set_approval,
                   "reject": _models_set_approval}
_ENDPOINT_COMMANDS = {"list": _endpoints_list, "invoke": _endpoints_invoke, "delete": _endpoints_delete,
                      "restart": _endpoints_restart}
