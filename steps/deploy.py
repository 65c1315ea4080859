"""Deploy the newest *Approved* model package of a group to a SageMaker endpoint.

One code path for three callers:

* the pipeline's ``DeployApprovedModel`` LambdaStep (event ``{"model_package_group_name", "endpoint_name",
  "instance_type", "instance_count"[, "role_arn", "data_capture_s3_uri"]}``),
* the EventBridge rule on ``SageMaker Model Package State Change`` events (approval *and* rejection: rejecting the live
  version makes the previous approved one the newest, so the same reconciliation rolls the endpoint back),
* the local engine, which passes its own client (same methods, same request/response shapes) to :func:`handle_event`.

The function is a reconciler: it computes the desired state (the newest Approved package of the group) and moves the
endpoint towards it with at most one ``CreateEndpoint``/``UpdateEndpoint`` call, never waiting for ``InService``
(an update takes minutes; the Lambda returns the endpoint status, a later call or ``pipelines.run endpoints`` reports
it). A ``Failed`` endpoint serves nothing and SageMaker allows only ``DeleteEndpoint`` on it, so it is deleted
(waiting at most :data:`DELETE_WAIT_S` for it to go) and created again. The status read right after the call is
checked: ``Failed``, or ``InService`` on another configuration (an update that was rolled back at once, as the local
backend's synchronous deploys report it), raises :class:`DeploymentError` instead of claiming success.

Rejecting the only Approved version leaves the endpoint serving it (nothing approved to roll back to; deleting a live
endpoint is not this function's call): the result is ``NothingApproved`` with ``serving_model_package_arn`` and
``serving_approval_status`` (``Rejected``), and the message says so.

Updates are blue/green (``UpdateEndpoint`` with a ``DeploymentConfig``; SageMaker keeps the old fleet serving until the
new one is healthy and rolls back on its own if the new fleet fails to come up).

Only these SageMaker client methods are used (docs/CONTRACTS.md §8): ``list_model_packages``,
``describe_model_package``, ``create_model``, ``describe_model``, ``create_endpoint_config``,
``describe_endpoint_config``, ``create_endpoint``, ``update_endpoint``, ``describe_endpoint``, ``delete_endpoint``
(only for a ``Failed`` endpoint), ``add_tags``, ``list_tags``. The module needs only the standard library and
botocore/boto3 (both in the Lambda runtime), so the Lambda bundle is this one file (``deploy.py`` at the zip root,
handler ``deploy.lambda_handler``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from botocore.exceptions import ClientError

logger = logging.getLogger(__name__)

# Shared defaults (docs/CONTRACTS.md §11).
DEFAULT_MODEL_PACKAGE_GROUP_NAME = "ImageClassifierModels"
DEFAULT_ENDPOINT_NAME = "imgclf-endpoint"
DEFAULT_INSTANCE_TYPE = "ml.m5.large"
DEFAULT_INSTANCE_COUNT = 1

# Tags written on the model, endpoint config and endpoint this module creates.
TAG_MODEL_PACKAGE_ARN = "imgclf:model-package-arn"
TAG_MODEL_PACKAGE_GROUP = "imgclf:model-package-group"

EVENTBRIDGE_DETAIL_TYPE = "SageMaker Model Package State Change"
#: The handler's last log line is ``Result: {json}`` (CloudWatch Logs on AWS; read by the local ``models approve``).
RESULT_LOG_PREFIX = "Result:"
VARIANT_NAME = "AllTraffic"
LIST_PAGE_SIZE = 100  # MaxResults for list_model_packages (the API maximum)
DELETE_WAIT_S = 60.0  # how long to wait for a Failed endpoint to be deleted before giving up (Lambda timeout: 120 s)
DELETE_POLL_S = 5.0
MAX_NAME_LENGTH = 63
_NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_ROLE_ARN_RE = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/\S+$")
_INSTANCE_TYPE_RE = re.compile(r"^ml\.[a-z0-9]+\.[a-z0-9]+$")

STATUS_CREATED = "Created"
STATUS_UPDATED = "Updated"
STATUS_NO_CHANGE = "NoChange"
STATUS_NOTHING_APPROVED = "NothingApproved"

# Endpoint states in which SageMaker refuses UpdateEndpoint until the running operation ends.
_IN_PROGRESS = {"Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"}

# Blue/green, all traffic at once once the new fleet is healthy; SageMaker keeps the old fleet until then.
BLUE_GREEN_DEPLOYMENT_CONFIG: dict[str, Any] = {
    "BlueGreenUpdatePolicy": {
        "TrafficRoutingConfiguration": {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 0},
        "TerminationWaitInSeconds": 120,
        "MaximumExecutionTimeoutInSeconds": 3600,
    },
}


class DeploymentError(RuntimeError):
    """The endpoint cannot be moved to the desired model right now (busy, failed); nothing was changed."""


class EndpointBusyError(DeploymentError):
    """The endpoint is in the middle of another operation; retry later (Lambda's async retries do this)."""


# --------------------------------------------------------------------------------------------------- public API


def deploy_latest_approved(
    sm_client: Any,
    model_package_group_name: str,
    endpoint_name: str,
    *,
    execution_role_arn: str,
    instance_type: str = DEFAULT_INSTANCE_TYPE,
    initial_instance_count: int = DEFAULT_INSTANCE_COUNT,
    data_capture_s3_uri: str | None = None,
) -> dict[str, Any]:
    """Make ``endpoint_name`` serve the newest Approved package of ``model_package_group_name``.

    Returns ``{"status": "Created"|"Updated"|"NoChange"|"NothingApproved", "endpoint_name", "model_package_arn",
    "endpoint_status", "message"}``: the package the endpoint serves or moves to (``None`` with ``NothingApproved``,
    which adds ``serving_model_package_arn``/``serving_approval_status``) and its status after the call. Instance
    settings only take effect with a model change. A ``Failed`` endpoint is deleted and created again. Raises
    ``ValueError`` for bad arguments, :class:`EndpointBusyError` when the endpoint is busy with another model (or still
    being deleted), :class:`DeploymentError` when it cannot be moved (the deploy failed or was rolled back, or a
    ``Failed`` endpoint may not be deleted), and lets SageMaker's ``ClientError`` through for anything else.
    """
    _validate_arguments(model_package_group_name, endpoint_name, execution_role_arn, instance_type,
                        initial_instance_count, data_capture_s3_uri)
    latest = latest_approved_package(sm_client, model_package_group_name)
    endpoint = _describe_endpoint(sm_client, endpoint_name)
    if latest is None:
        return _nothing_approved(sm_client, model_package_group_name, endpoint_name, endpoint)

    package_arn = latest["ModelPackageArn"]
    package = sm_client.describe_model_package(ModelPackageName=package_arn)
    _check_deployable(package)
    version = package.get("ModelPackageVersion", latest.get("ModelPackageVersion"))
    logger.info("Newest Approved package of %s: %s (version %s)", model_package_group_name, package_arn, version)

    endpoint, recreated = _replace_failed(sm_client, endpoint)
    if endpoint is not None:
        no_change = _no_change_or_raise(sm_client, endpoint, package_arn)
        if no_change is not None:
            return no_change

    tags = [{"Key": TAG_MODEL_PACKAGE_ARN, "Value": package_arn},
            {"Key": TAG_MODEL_PACKAGE_GROUP, "Value": model_package_group_name}]
    model_name = _ensure_model(sm_client, endpoint_name, package_arn, version, execution_role_arn, tags)
    config_name = _ensure_endpoint_config(sm_client, endpoint_name, model_name, version, instance_type,
                                          initial_instance_count, data_capture_s3_uri, tags)

    if endpoint is None:
        raced = _create_endpoint(sm_client, endpoint_name, config_name, tags)
        if raced is not None:
            return _joined(sm_client, raced, package_arn)
        status = STATUS_CREATED
        message = (f"Creating endpoint {endpoint_name!r} with {package_arn} (version {version}) on "
                   f"{initial_instance_count} x {instance_type}, config {config_name!r}{recreated}.")
    else:
        previous, raced = _update_endpoint(sm_client, endpoint, config_name, tags)
        if raced is not None:
            return _joined(sm_client, raced, package_arn)
        status = STATUS_UPDATED
        message = (f"Updating endpoint {endpoint_name!r} (blue/green) from {previous or 'an unknown model'} to "
                   f"{package_arn} (version {version}), config {config_name!r}.")
    logger.info(message)
    described = sm_client.describe_endpoint(EndpointName=endpoint_name)
    _check_outcome(described, config_name, package_arn)
    return _result(status, endpoint_name, package_arn, described["EndpointStatus"], message)


def latest_approved_package(sm_client: Any, model_package_group_name: str) -> dict[str, Any] | None:
    """The ``ModelPackageSummary`` of the group's newest Approved package (highest version), or ``None``.

    Walks every page (boto3's paginator) and re-checks status and ordering client-side, so a backend that pages
    differently or ignores ``SortBy`` still gives the right answer.
    """
    best: dict[str, Any] | None = None
    pages = sm_client.get_paginator("list_model_packages").paginate(
        ModelPackageGroupName=model_package_group_name, ModelApprovalStatus="Approved", SortBy="CreationTime",
        SortOrder="Descending", PaginationConfig={"PageSize": LIST_PAGE_SIZE})
    for page in pages:  # botocore's paginator stops on a repeated NextToken (PaginationError) too
        for summary in page.get("ModelPackageSummaryList", []):
            if summary.get("ModelApprovalStatus") != "Approved":
                continue
            if summary.get("ModelPackageStatus") not in (None, "Completed"):
                logger.warning("Skipping approved package %s: status %s", summary.get("ModelPackageArn"),
                               summary.get("ModelPackageStatus"))
                continue
            if best is None or _recency(summary) > _recency(best):
                best = summary
    return best


def handle_event(event: Any, sm_client: Any, *, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parse a LambdaStep or EventBridge event (see :func:`parse_event`) and run :func:`deploy_latest_approved`."""
    request = parse_event(event, env=env)
    logger.info("Deploy request: %s", json.dumps(request, sort_keys=True))
    group = request.pop("model_package_group_name")
    endpoint_name = request.pop("endpoint_name")
    return deploy_latest_approved(sm_client, group, endpoint_name, **request)


def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    """AWS Lambda entry point: :func:`handle_event` with a boto3 SageMaker client (created on first use)."""
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    request_id = getattr(context, "aws_request_id", None)
    logger.info("Invocation %s, event: %s", request_id, json.dumps(event, default=str)[:4000])
    try:
        result = handle_event(event, _sagemaker_client())
    except ValueError:
        logger.exception("Rejected event")
        raise
    logger.info("%s %s", RESULT_LOG_PREFIX, json.dumps(result, sort_keys=True, default=str))
    return result


def parse_event(event: Any, *, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Turn an event into :func:`deploy_latest_approved` keyword arguments (plus group and endpoint name).

    * LambdaStep event: ``model_package_group_name`` and ``endpoint_name`` required; ``instance_type``,
      ``instance_count``, ``role_arn``, ``data_capture_s3_uri`` optional (env, then defaults).
    * EventBridge ``SageMaker Model Package State Change``: group from ``detail.ModelPackageGroupName``; endpoint from
      env ``ENDPOINT_NAME`` (default ``imgclf-endpoint``).

    Env (``env`` or ``os.environ``): ``SAGEMAKER_EXECUTION_ROLE_ARN``, ``ENDPOINT_NAME``, ``ENDPOINT_INSTANCE_TYPE``,
    ``ENDPOINT_INSTANCE_COUNT``, ``DATA_CAPTURE_S3_URI``. Raises ``ValueError`` naming the missing or bad field.
    """
    env = os.environ if env is None else env
    if not isinstance(event, Mapping):
        raise ValueError(f"deploy event must be a JSON object, got {type(event).__name__}")

    if "detail-type" in event or "detail" in event:
        detail_type = event.get("detail-type")
        if detail_type != EVENTBRIDGE_DETAIL_TYPE:
            raise ValueError(f"unsupported EventBridge event: 'detail-type' is {detail_type!r}, "
                             f"expected {EVENTBRIDGE_DETAIL_TYPE!r}")
        detail = event.get("detail")
        if not isinstance(detail, Mapping):
            raise ValueError("EventBridge event is missing the 'detail' object")
        group = _required_str(detail, "ModelPackageGroupName", "detail.ModelPackageGroupName")
        logger.info("Model package state change: %s version %s is now %s", group,
                    detail.get("ModelPackageVersion"), detail.get("ModelApprovalStatus"))
        endpoint_name = env.get("ENDPOINT_NAME") or DEFAULT_ENDPOINT_NAME
        instance_type = env.get("ENDPOINT_INSTANCE_TYPE") or DEFAULT_INSTANCE_TYPE
        instance_count: Any = env.get("ENDPOINT_INSTANCE_COUNT") or DEFAULT_INSTANCE_COUNT
        role_arn = env.get("SAGEMAKER_EXECUTION_ROLE_ARN")
        data_capture = env.get("DATA_CAPTURE_S3_URI")
        role_source = "env SAGEMAKER_EXECUTION_ROLE_ARN"
    else:
        group = _required_str(event, "model_package_group_name", "model_package_group_name")
        endpoint_name = _required_str(event, "endpoint_name", "endpoint_name")
        instance_type = event.get("instance_type") or env.get("ENDPOINT_INSTANCE_TYPE") or DEFAULT_INSTANCE_TYPE
        instance_count = (event.get("instance_count") or env.get("ENDPOINT_INSTANCE_COUNT")
                          or DEFAULT_INSTANCE_COUNT)
        role_arn = event.get("role_arn") or env.get("SAGEMAKER_EXECUTION_ROLE_ARN")
        data_capture = event.get("data_capture_s3_uri") or env.get("DATA_CAPTURE_S3_URI")
        role_source = "event 'role_arn' or env SAGEMAKER_EXECUTION_ROLE_ARN"

    if not role_arn:
        raise ValueError(f"no SageMaker execution role for CreateModel: set {role_source}")
    try:
        count = int(instance_count)
    except (TypeError, ValueError):
        raise ValueError(f"instance_count must be a positive integer, got {instance_count!r}") from None
    return {
        "model_package_group_name": group,
        "endpoint_name": endpoint_name,
        "execution_role_arn": str(role_arn),
        "instance_type": str(instance_type),
        "initial_instance_count": count,
        "data_capture_s3_uri": str(data_capture) if data_capture else None,
    }


def resource_name(endpoint_name: str, suffix: str) -> str:
    """``<endpoint_name>-<suffix>`` within SageMaker's 63-character name rule (the endpoint part is cut if needed).

    With endpoint names of at most 40 characters nothing is cut, so IAM policies can scope to ``<endpoint>-*``.
    """
    room = MAX_NAME_LENGTH - len(suffix) - 1
    if room < 1:
        raise ValueError(f"name suffix {suffix!r} leaves no room for the endpoint name")
    base = endpoint_name[:room].rstrip("-")
    name = f"{base}-{suffix}"
    if not _NAME_RE.match(name):
        raise ValueError(f"derived resource name {name!r} is not a valid SageMaker name")
    return name


# --------------------------------------------------------------------------------------------------- internals


def _result(status: str, endpoint_name: str, package_arn: str | None, endpoint_status: str | None,
            message: str, **extra: Any) -> dict[str, Any]:
    return {"status": status, "endpoint_name": endpoint_name, "model_package_arn": package_arn,
            "endpoint_status": endpoint_status, "message": message, **extra}


def _nothing_approved(sm_client: Any, group: str, endpoint_name: str,
                      endpoint: Mapping[str, Any] | None) -> dict[str, Any]:
    """``NothingApproved``: the endpoint (if any) is left as it is; say what it still serves and whether that is a
    version that is no longer Approved (nothing approved to roll back to)."""
    if endpoint is None:
        message = (f"No Approved model package in group {group!r}; endpoint {endpoint_name!r} was not created. "
                   "Approve a version to deploy it.")
        logger.warning(message)
        return _result(STATUS_NOTHING_APPROVED, endpoint_name, None, None, message)
    serving = package_of_config(sm_client, endpoint.get("EndpointConfigName"))
    approval = _approval_status(sm_client, serving)
    message = (f"No Approved model package in group {group!r}; endpoint {endpoint_name!r} left unchanged (still "
               f"serving {serving or 'an unknown model'}{f', which is {approval}' if approval else ''}). ")
    if approval and approval != "Approved":
        message += (f"It serves a {approval} version: nothing approved to roll back to. Approve a version to replace "
                    f"it, or delete the endpoint to stop serving it.")
    else:
        message += "Approve a version to replace it."
    logger.warning(message)
    return _result(STATUS_NOTHING_APPROVED, endpoint_name, None, endpoint.get("EndpointStatus"), message,
                   serving_model_package_arn=serving, serving_approval_status=approval)


def _approval_status(sm_client: Any, package_arn: str | None) -> str | None:
    if not package_arn:
        return None
    try:
        return sm_client.describe_model_package(ModelPackageName=package_arn).get("ModelApprovalStatus")
    except ClientError as error:
        if _is_not_found(error):
            return None
        raise


def _validate_arguments(group: str, endpoint_name: str, role_arn: str, instance_type: str, count: int,
                        data_capture_s3_uri: str | None) -> None:
    if not isinstance(group, str) or not group.strip():
        raise ValueError("model_package_group_name must be a non-empty string")
    if not isinstance(endpoint_name, str) or not _NAME_RE.match(endpoint_name):
        raise ValueError(f"endpoint_name {endpoint_name!r} is not a valid SageMaker endpoint name "
                         "(letters, digits and hyphens, at most 63 characters, starting with a letter or digit)")
    if not isinstance(role_arn, str) or not _ROLE_ARN_RE.match(role_arn):
        raise ValueError(f"execution_role_arn {role_arn!r} is not an IAM role ARN (arn:aws:iam::<account>:role/...)")
    if not isinstance(instance_type, str) or not _INSTANCE_TYPE_RE.match(instance_type):
        raise ValueError(f"instance_type {instance_type!r} is not a SageMaker instance type like 'ml.m5.large'")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"initial_instance_count must be a positive integer, got {count!r}")
    if data_capture_s3_uri is not None and not (isinstance(data_capture_s3_uri, str)
                                                and data_capture_s3_uri.startswith("s3://")
                                                and len(data_capture_s3_uri) > len("s3://")):
        raise ValueError(f"data_capture_s3_uri must be an s3:// URI, got {data_capture_s3_uri!r}")


def _required_str(mapping: Mapping[str, Any], key: str, label: str) -> str:
    value = mapping.get(key)
    if not isinstance(value, str) or not value.strip():
        present = ", ".join(sorted(map(str, mapping))) or "none"
        raise ValueError(f"deploy event is missing required field {label!r} (fields present: {present})")
    return value.strip()


def _recency(summary: Mapping[str, Any]) -> tuple[int, Any]:
    version = summary.get("ModelPackageVersion")
    return (int(version) if version is not None else -1, summary.get("CreationTime") or "")


def _check_deployable(package: Mapping[str, Any]) -> None:
    arn = package.get("ModelPackageArn")
    if package.get("ModelApprovalStatus") != "Approved":
        raise DeploymentError(f"{arn} is {package.get('ModelApprovalStatus')} now (changed while deploying); "
                              "nothing was changed")
    containers = (package.get("InferenceSpecification") or {}).get("Containers") or []
    if not containers:
        raise DeploymentError(f"{arn} has no InferenceSpecification containers, so it cannot be deployed")


def _is_not_found(error: ClientError) -> bool:
    # SageMaker reports missing models/configs/endpoints as ValidationException "Could not find ...".
    code = error.response.get("Error", {}).get("Code", "")
    return code in ("ValidationException", "ResourceNotFound", "ResourceNotFoundException")


def _describe_endpoint(sm_client: Any, endpoint_name: str) -> dict[str, Any] | None:
    try:
        return sm_client.describe_endpoint(EndpointName=endpoint_name)
    except ClientError as error:
        if _is_not_found(error):
            return None
        raise


def _package_of_model(sm_client: Any, model_name: str) -> str | None:
    try:
        model = sm_client.describe_model(ModelName=model_name)
    except ClientError as error:
        if _is_not_found(error):
            return None
        raise
    containers = [model.get("PrimaryContainer") or {}] + list(model.get("Containers") or [])
    for container in containers:
        if container.get("ModelPackageName"):
            return str(container["ModelPackageName"])
    if model.get("ModelArn"):  # a model built from images: fall back to our tag
        tags = _list_all_tags(sm_client, model["ModelArn"])
        return tags.get(TAG_MODEL_PACKAGE_ARN)
    return None


def package_of_config(sm_client: Any, config_name: str | None) -> str | None:
    """The model package an endpoint config serves (walks config -> model), ``None`` if unknown."""
    if not config_name:
        return None
    try:
        config = sm_client.describe_endpoint_config(EndpointConfigName=config_name)
    except ClientError as error:
        if _is_not_found(error):
            logger.warning("Endpoint config %s no longer exists", config_name)
            return None
        raise
    variants = config.get("ProductionVariants") or []
    if len(variants) != 1:
        return None  # several variants (A/B) are not something this module deployed
    return _package_of_model(sm_client, variants[0]["ModelName"])


def _list_all_tags(sm_client: Any, arn: str) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for page in sm_client.get_paginator("list_tags").paginate(ResourceArn=arn)
            for tag in page.get("Tags", [])}


def _no_change_or_raise(sm_client: Any, endpoint: Mapping[str, Any], package_arn: str) -> dict[str, Any] | None:
    """``NoChange`` result if the endpoint already serves (or is moving to) ``package_arn``; raise if it can't move."""
    name = endpoint["EndpointName"]
    status = endpoint.get("EndpointStatus")
    pending_config = (endpoint.get("PendingDeploymentSummary") or {}).get("EndpointConfigName")
    if status in _IN_PROGRESS:
        target = package_of_config(sm_client, pending_config or endpoint.get("EndpointConfigName"))
        if target == package_arn:
            message = f"Endpoint {name!r} is already {status} towards {package_arn}; nothing to do."
            logger.info(message)
            return _result(STATUS_NO_CHANGE, name, package_arn, status, message)
        raise EndpointBusyError(f"Endpoint {name!r} is {status} (towards {target or 'an unknown model'}); cannot "
                                f"deploy {package_arn} until it finishes. Retry later.")
    if status == "InService":
        serving = package_of_config(sm_client, endpoint.get("EndpointConfigName"))
        if serving == package_arn:
            message = f"Endpoint {name!r} already serves {package_arn}; nothing to do."
            logger.info(message)
            return _result(STATUS_NO_CHANGE, name, package_arn, status, message)
        return None
    reason = endpoint.get("FailureReason") or "no reason given"
    raise DeploymentError(f"Endpoint {name!r} is {status} ({reason}); SageMaker cannot update it. Delete it "
                          f"(aws sagemaker delete-endpoint --endpoint-name {name}) and deploy again.")


def _replace_failed(sm_client: Any, endpoint: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str]:
    """``(endpoint, note)``: a ``Failed`` endpoint is deleted, so ``(None, note for the message)``."""
    if endpoint is None or endpoint.get("EndpointStatus") != "Failed":
        return endpoint, ""
    _delete_failed_endpoint(sm_client, endpoint)
    return None, f" (the Failed endpoint, {endpoint.get('FailureReason') or 'no reason given'}, was deleted)"


def _delete_failed_endpoint(sm_client: Any, endpoint: Mapping[str, Any]) -> None:
    """Delete a ``Failed`` endpoint (the only operation SageMaker allows on it) and wait until it is gone."""
    name = endpoint["EndpointName"]
    reason = endpoint.get("FailureReason") or "no reason given"
    logger.warning("Endpoint %s is Failed (%s); deleting it to create it again", name, reason)
    try:
        sm_client.delete_endpoint(EndpointName=name)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("AccessDeniedException", "AccessDenied"):
            raise DeploymentError(
                f"Endpoint {name!r} is Failed ({reason}) and this function may not delete it "
                f"(sagemaker:DeleteEndpoint). Delete it (aws sagemaker delete-endpoint --endpoint-name {name}) and "
                "deploy again.") from error
        if not _is_not_found(error):  # not found: deleted concurrently by another invocation
            raise
    deadline = time.monotonic() + DELETE_WAIT_S
    while _describe_endpoint(sm_client, name) is not None:
        if time.monotonic() >= deadline:
            raise EndpointBusyError(f"Endpoint {name!r} (Failed: {reason}) is still being deleted after "
                                    f"{DELETE_WAIT_S:.0f}s; retry later to create it again.")
        time.sleep(DELETE_POLL_S)
    logger.info("Deleted Failed endpoint %s", name)


def _create_endpoint(sm_client: Any, endpoint_name: str, config_name: str,
                     tags: list[dict[str, str]]) -> dict[str, Any] | None:
    """``CreateEndpoint``; returns the endpoint another invocation created meanwhile (``None`` when we did)."""
    try:
        sm_client.create_endpoint(EndpointName=endpoint_name, EndpointConfigName=config_name, Tags=tags)
    except ClientError:
        existing = _describe_endpoint(sm_client, endpoint_name)
        if existing is None:
            raise
        logger.info("Endpoint %s was created concurrently (%s)", endpoint_name, existing.get("EndpointStatus"))
        return existing
    return None


def _joined(sm_client: Any, endpoint: Mapping[str, Any], package_arn: str) -> dict[str, Any]:
    """The result when another invocation created or updated the endpoint first: ``NoChange`` if it deploys
    ``package_arn``."""
    no_change = _no_change_or_raise(sm_client, endpoint, package_arn)
    if no_change is None:
        raise EndpointBusyError(f"Endpoint {endpoint['EndpointName']!r} was created or updated concurrently with "
                                f"another model; retry to deploy {package_arn}.")
    return no_change


def _update_endpoint(sm_client: Any, endpoint: Mapping[str, Any], config_name: str,
                     tags: list[dict[str, str]]) -> tuple[str | None, dict[str, Any] | None]:
    """Blue/green ``UpdateEndpoint`` to ``config_name``; returns ``(package served before, None)``, or ``(None, the
    endpoint)`` when another invocation started an update first (the approval event and the pipeline's LambdaStep
    both deploy a package registered as Approved)."""
    previous = package_of_config(sm_client, endpoint.get("EndpointConfigName"))
    try:
        sm_client.update_endpoint(
            EndpointName=endpoint["EndpointName"],
            EndpointConfigName=config_name,
            # Use the instance type/count of the new config rather than the live fleet's.
            RetainAllVariantProperties=False,
            DeploymentConfig=BLUE_GREEN_DEPLOYMENT_CONFIG,
        )
    except ClientError:
        current = _describe_endpoint(sm_client, endpoint["EndpointName"])
        if current is None or current.get("EndpointStatus") not in _IN_PROGRESS:
            raise
        logger.info("Endpoint %s is being updated concurrently (%s)", endpoint["EndpointName"],
                    current.get("EndpointStatus"))
        return None, current
    sm_client.add_tags(ResourceArn=endpoint["EndpointArn"], Tags=tags)
    return previous, None


def _check_outcome(described: Mapping[str, Any], config_name: str, package_arn: str) -> None:
    """Raise :class:`DeploymentError` when the status right after Create/UpdateEndpoint already says it failed:
    ``Failed``, or ``InService`` on another config (rolled back). On AWS it is ``Creating``/``Updating`` here."""
    name, status = described.get("EndpointName"), described.get("EndpointStatus")
    reason = described.get("FailureReason") or "no reason given"
    if status == "Failed":
        raise DeploymentError(f"Endpoint {name!r} failed to deploy {package_arn} (config {config_name!r}): {reason}")
    if status == "InService" and described.get("EndpointConfigName") != config_name:
        raise DeploymentError(f"Endpoint {name!r} could not move to {package_arn} (config {config_name!r}) and was "
                              f"rolled back to config {described.get('EndpointConfigName')!r}: {reason}")


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _ensure_model(sm_client: Any, endpoint_name: str, package_arn: str, version: Any, role_arn: str,
                  tags: list[dict[str, str]]) -> str:
    name = resource_name(endpoint_name, f"v{version}-{_digest(package_arn, role_arn)}")
    if _package_of_model(sm_client, name) == package_arn:
        logger.info("Reusing model %s", name)
        return name
    try:
        sm_client.create_model(ModelName=name, PrimaryContainer={"ModelPackageName": package_arn},
                               ExecutionRoleArn=role_arn, Tags=tags)
    except ClientError:
        if _package_of_model(sm_client, name) == package_arn:  # created concurrently by another invocation
            return name
        raise
    logger.info("Created model %s from %s", name, package_arn)
    return name


def _ensure_endpoint_config(sm_client: Any, endpoint_name: str, model_name: str, version: Any, instance_type: str,
                            count: int, data_capture_s3_uri: str | None, tags: list[dict[str, str]]) -> str:
    variant = {"VariantName": VARIANT_NAME, "ModelName": model_name, "InstanceType": instance_type,
               "InitialInstanceCount": count, "InitialVariantWeight": 1.0}
    request: dict[str, Any] = {"ProductionVariants": [variant], "Tags": tags}
    if data_capture_s3_uri:
        request["DataCaptureConfig"] = {
            "EnableCapture": True,
            "InitialSamplingPercentage": 100,
            "DestinationS3Uri": data_capture_s3_uri,
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
        }
    name = resource_name(endpoint_name, f"v{version}-{_digest(model_name, instance_type, count, data_capture_s3_uri)}")
    try:
        sm_client.describe_endpoint_config(EndpointConfigName=name)
        logger.info("Reusing endpoint config %s", name)
        return name
    except ClientError as error:
        if not _is_not_found(error):
            raise
    try:
        sm_client.create_endpoint_config(EndpointConfigName=name, **request)
    except ClientError:
        try:  # created concurrently by another invocation
            sm_client.describe_endpoint_config(EndpointConfigName=name)
            return name
        except ClientError:
            pass
        raise
    logger.info("Created endpoint config %s (%d x %s, data capture %s)", name, count, instance_type,
                data_capture_s3_uri or "off")
    return name


_CLIENT: Any = None


def _sagemaker_client() -> Any:
    global _CLIENT
    if _CLIENT is None:
        import boto3  # imported here so the module imports (and the local engine runs) without AWS configuration

        _CLIENT = boto3.client("sagemaker")
    return _CLIENT
