"""CLI commands for the local model registry and endpoints (``models ...``, ``endpoints ...``).

``add_subcommands(subparsers)`` adds the two command groups (each sets ``cli_group`` on the parsed namespace) and
``run(args)`` executes one. Approving or rejecting a version updates the registry and then does what AWS does: the
registry emits an EventBridge "SageMaker Model Package State Change" event and the deploy function
(``steps.deploy.handle_event``, the very code the AWS Lambda runs) reacts to it -- here with the local SageMaker
client, so the endpoint is a local server.

Rejecting the only Approved version while it serves leaves the endpoint serving it (the deploy function's
``NothingApproved``, as on AWS: nothing approved to roll back to, and deleting a live endpoint is a separate, explicit
decision). ``models reject`` then exits 1 with the reason on stderr (the registry change stands), and ``endpoints
list`` / ``models describe`` flag the endpoint ("serving a Rejected version: nothing approved to roll back to").
``models approve`` exits 0 only when the endpoint is InService serving the approved version from a live server.
"""

from __future__ import annotations

import argparse
import json
import logging
import mimetypes
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from rich.console import Console
from rich.table import Table

from pipelines.local import endpoints, registry
from pipelines.local.sagemaker_client import LocalSageMakerClient
from pipelines.local.store import LOCAL_ACCOUNT, LOCAL_REGION, LOCAL_ROLE_ARN

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT_NAME = "imgclf-endpoint"
EVENT_DETAIL_TYPE = "SageMaker Model Package State Change"
IMAGE_CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}



def _out() -> Console:
    return Console()  # created per command so that COLUMNS and redirections in effect now apply


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

    p = msub.add_parser("describe", help="one model version in detail")
    p.add_argument("model", help="model package ARN, <group>/<version> or a version number")
    p.add_argument("--group", help=f"group of a bare version number (default {registry.DEFAULT_GROUP})")
    p.add_argument("--json", action="store_true", help="print the DescribeModelPackage response as JSON")

    for verb, status in (("approve", "Approved"), ("reject", "Rejected")):
        p = msub.add_parser(verb, help=f"set a version to {status} and deploy the latest approved version")
        p.add_argument("model", help="model package ARN, <group>/<version> or a version number")
        p.add_argument("--group", help=f"group of a bare version number (default {registry.DEFAULT_GROUP})")
        p.add_argument("--endpoint-name", default=os.environ.get("ENDPOINT_NAME") or DEFAULT_ENDPOINT_NAME,
                       help="endpoint the deploy function manages (default: env ENDPOINT_NAME or %(default)s)")
        p.add_argument("--description", help="approval description to record")
        p.add_argument("--no-deploy", action="store_true", help="only change the registry")
        p.set_defaults(approval_status=status)

    eps = subparsers.add_parser("endpoints", help="local endpoints: list, invoke, delete, restart")
    eps.set_defaults(cli_group="endpoints")
    esub = eps.add_subparsers(dest="endpoints_command", required=True, metavar="{list,invoke,delete,restart}")
    esub.add_parser("list", help="local endpoints, their status, URL and the model they serve")
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


def _models_list(args: argparse.Namespace) -> int:
    packages = registry.list_packages(args.group, args.status)
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
    if args.json:
        _out().print_json(json.dumps(package.describe(), default=str))
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
    rows.append(("Endpoints", _serving_endpoints_text(LocalSageMakerClient(), package)))
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


def state_change_event(package: registry.ModelPackage) -> dict[str, Any]:
    """The EventBridge event SageMaker emits when a model package's approval status changes."""
    detail = package.describe()
    for key in ("CreationTime", "LastModifiedTime"):  # EventBridge carries epoch milliseconds
        if isinstance(detail.get(key), datetime):
            detail[key] = int(detail[key].timestamp() * 1000)
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": EVENT_DETAIL_TYPE,
        "source": "aws.sagemaker",
        "account": LOCAL_ACCOUNT,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": LOCAL_REGION,
        "resources": [package.arn],
        "detail": detail,
    }


def deploy_on_state_change(event: dict[str, Any], endpoint_name: str = DEFAULT_ENDPOINT_NAME,
                           client: LocalSageMakerClient | None = None) -> dict[str, Any]:
    """Run the deploy function (``steps.deploy.handle_event``) on ``event`` against the local backend, with the
    environment the AWS Lambda would have (``ENDPOINT_NAME``, ``SAGEMAKER_EXECUTION_ROLE_ARN``)."""
    try:
        from steps import deploy
    except ImportError as exc:
        raise RuntimeError(f"the deploy function steps/deploy.py cannot be imported: {exc}") from exc
    env = dict(os.environ)
    env["ENDPOINT_NAME"] = endpoint_name
    env.setdefault("SAGEMAKER_EXECUTION_ROLE_ARN", LOCAL_ROLE_ARN)
    return deploy.handle_event(event, client or LocalSageMakerClient(), env=env)


def _models_set_approval(args: argparse.Namespace) -> int:
    package = registry.set_approval(args.model, args.approval_status, args.description, args.group)
    _out().print(f"{package.group} version {package.version} is now {_styled(package.approval_status)} "
                  f"({package.arn})")
    if args.no_deploy:
        return 0
    client = LocalSageMakerClient()
    try:
        result = deploy_on_state_change(state_change_event(package), args.endpoint_name, client)
    except Exception as exc:  # the registry change stands; say why the deploy did not happen
        _err().print(f"[red]deploy failed:[/red] {type(exc).__name__}: {exc}", highlight=False)
        return 1
    _out().print(f"deploy: {result.get('status')} -- {result.get('message')}", highlight=False)
    if result.get("status") == "NothingApproved":
        return _nothing_approved_exit(args.endpoint_name, result)
    problem = client.serving_problem(args.endpoint_name, result.get("model_package_arn"))
    if problem:
        _err().print(f"[red]endpoint {args.endpoint_name} is not serving {result.get('model_package_arn')}:[/red] "
                     f"{problem}", highlight=False)
        return 1
    _out().print(f"endpoint {args.endpoint_name} is {_styled('InService')} at "
                 f"{endpoints.get(args.endpoint_name).url}/invocations")
    return 0


def _nothing_approved_exit(endpoint_name: str, result: dict[str, Any]) -> int:
    """Exit code after ``NothingApproved``: 1 when the endpoint still serves a version that is not Approved."""
    serving, approval = result.get("serving_model_package_arn"), result.get("serving_approval_status")
    if result.get("endpoint_status") is None or not approval or approval == "Approved":
        return 0
    _err().print(f"[red]endpoint {endpoint_name} still serves {serving}, which is {approval}: nothing approved to "
                 f"roll back to.[/red] Approve a version to replace it, or `endpoints delete {endpoint_name}` to "
                 "stop serving it.", highlight=False)
    return 1


def serving_note(client: LocalSageMakerClient, config_name: str | None) -> str | None:
    """A note when an endpoint config serves a version that is no longer Approved (``None`` otherwise)."""
    arn = client.package_of_config(config_name)
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


def _serving_endpoints_text(client: LocalSageMakerClient, package: registry.ModelPackage) -> str:
    """``name (status)`` of each local endpoint whose config serves ``package``, with its note."""
    found = []
    for described in _described_endpoints(client).values():
        if client.package_of_config(described.get("EndpointConfigName")) == package.arn:
            note = serving_note(client, described.get("EndpointConfigName"))
            found.append(f"{described['EndpointName']} ({described['EndpointStatus']})" + (f": {note}" if note else ""))
    return "; ".join(found) or "-"


# --------------------------------------------------------------------------------------------------- endpoints


def served_package(client: LocalSageMakerClient, config_name: str | None) -> str | None:
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


def _described_endpoints(client: LocalSageMakerClient) -> dict[str, dict[str, Any]]:
    """``DescribeEndpoint`` of every endpoint, by name (all pages of ``ListEndpoints``)."""
    described: dict[str, dict[str, Any]] = {}
    request: dict[str, Any] = {"MaxResults": 100}
    while True:
        page = client.list_endpoints(**request)
        for summary in page["Endpoints"]:
            described[summary["EndpointName"]] = client.describe_endpoint(EndpointName=summary["EndpointName"])
        if not page.get("NextToken"):
            return described
        request["NextToken"] = page["NextToken"]


def _endpoints_list(args: argparse.Namespace) -> int:
    client = LocalSageMakerClient()
    described = _described_endpoints(client)
    servers = {e.name: e for e in endpoints.list_endpoints()}
    names = sorted(set(described) | set(servers))
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


def _endpoints_invoke(args: argparse.Namespace) -> int:
    body = args.file.read_bytes()
    content_type = (args.content_type or IMAGE_CONTENT_TYPES.get(args.file.suffix.lower())
                    or mimetypes.guess_type(args.file.name)[0] or "application/x-image")
    status, payload = endpoints.invoke(args.name, body, content_type, args.accept)
    text = payload.decode("utf-8", "replace")
    if status != 200:
        _err().print(f"[red]HTTP {status}[/red] {text}", highlight=False)
        return 1
    try:
        _out().print_json(text)
    except (ValueError, TypeError):
        _out().print(text, highlight=False)
    return 0


def _endpoints_delete(args: argparse.Namespace) -> int:
    client = LocalSageMakerClient()
    try:
        client.delete_endpoint(EndpointName=args.name)
    except ClientError as exc:
        if not endpoints.delete(args.name):  # a bare local server without an API record is deleted too
            raise exc
    _out().print(f"deleted endpoint {args.name}")
    return 0


def _endpoints_restart(args: argparse.Namespace) -> int:
    described = LocalSageMakerClient().redeploy_endpoint(args.name)
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
