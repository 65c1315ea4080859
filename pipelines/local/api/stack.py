"""What ``infra/template.yaml`` creates on AWS, created on the local AWS service through the same APIs.

``python -m pipelines.run --target local upsert|start`` calls :func:`ensure_all` before the pipeline is upserted:

- the artifact bucket (S3 ``CreateBucket``);
- the deploy function ``imgclf-deploy-approved-model``: ``steps/deploy.py`` at the zip root, handler
  ``deploy.lambda_handler``, runtime/timeout/memory and environment as the template sets them (Lambda
  ``CreateFunction``; ``UpdateFunctionCode``/``UpdateFunctionConfiguration`` when the code or the settings changed);
- the EventBridge rule that sends the model package group's approval changes (``Approved``/``Rejected``) to it.

Nothing here is special-cased in the engine: the pipeline's LambdaStep invokes the function by its ARN, and an
``UpdateModelPackage`` approval change reaches it through the rule, as on AWS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from pipelines.local.storage.store import DEPLOY_FUNCTION_NAME, LOCAL_ROLE_ARN
from pipelines.packaging import deterministic_zip, project_root

logger = logging.getLogger(__name__)

#: As ``DeployFunction`` in infra/template.yaml.
DEPLOY_RUNTIME = "python3.12"
DEPLOY_HANDLER = "deploy.lambda_handler"
DEPLOY_TIMEOUT_S = 120
DEPLOY_MEMORY_MB = 256
APPROVAL_RULE_SUFFIX = "model-approval"
APPROVAL_TARGET_ID = "deploy-approved-model"
EVENT_DETAIL_TYPE = "SageMaker Model Package State Change"
DEFAULT_ENDPOINT_NAME = "imgclf-endpoint"


def deploy_function_zip(root: Path | None = None) -> bytes:
    """The deploy function's bundle: ``steps/deploy.py`` alone, as ``deploy.py`` (CONTRACTS §8)."""
    return deterministic_zip({"deploy.py": ((root or project_root()) / "steps" / "deploy.py").read_bytes()})


def code_sha256(data: bytes) -> str:
    """Lambda's ``CodeSha256``: base64 of the zip's SHA-256."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def deploy_function_environment(model_package_group_name: str, endpoint_name: str | None = None) -> dict[str, str]:
    """The deploy function's environment, as the template sets it (endpoint settings from env where given)."""
    return {
        "SAGEMAKER_EXECUTION_ROLE_ARN": LOCAL_ROLE_ARN,
        "MODEL_PACKAGE_GROUP_NAME": model_package_group_name,
        "ENDPOINT_NAME": endpoint_name or os.environ.get("ENDPOINT_NAME") or DEFAULT_ENDPOINT_NAME,
        "ENDPOINT_INSTANCE_TYPE": os.environ.get("ENDPOINT_INSTANCE_TYPE") or "ml.m5.large",
        "ENDPOINT_INSTANCE_COUNT": os.environ.get("ENDPOINT_INSTANCE_COUNT") or "1",
        "DATA_CAPTURE_S3_URI": "",
    }


def ensure_bucket(s3: Any, bucket: str) -> None:
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        s3.create_bucket(Bucket=bucket)
        logger.info("created bucket %s", bucket)


def _function_settings(model_package_group_name: str, endpoint_name: str | None) -> dict[str, Any]:
    return {"Runtime": DEPLOY_RUNTIME, "Handler": DEPLOY_HANDLER, "Role": LOCAL_ROLE_ARN,
            "Timeout": DEPLOY_TIMEOUT_S, "MemorySize": DEPLOY_MEMORY_MB,
            "Environment": {"Variables": deploy_function_environment(model_package_group_name, endpoint_name)}}


def _settings_differ(current: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return any(current.get(key) != value for key, value in wanted.items())


def ensure_deploy_function(lambda_client: Any, model_package_group_name: str, endpoint_name: str | None = None) -> str:
    """Create the deploy function, or bring its code and settings up to date; returns its ARN. ``endpoint_name``
    (default env ``ENDPOINT_NAME``, else ``imgclf-endpoint``) is the endpoint it manages, as the template's
    ``EndpointName`` parameter sets it."""
    code = deploy_function_zip()
    wanted = _function_settings(model_package_group_name, endpoint_name)
    try:
        current = lambda_client.get_function_configuration(FunctionName=DEPLOY_FUNCTION_NAME)
    except lambda_client.exceptions.ResourceNotFoundException:
        created = lambda_client.create_function(FunctionName=DEPLOY_FUNCTION_NAME, Code={"ZipFile": code},
                                                Description="Deploys the latest approved model package",
                                                **wanted)
        logger.info("created Lambda function %s", created["FunctionArn"])
        return created["FunctionArn"]
    if current.get("CodeSha256") != code_sha256(code):
        lambda_client.update_function_code(FunctionName=DEPLOY_FUNCTION_NAME, ZipFile=code)
        logger.info("updated the code of %s", DEPLOY_FUNCTION_NAME)
    if _settings_differ(current, wanted):
        lambda_client.update_function_configuration(FunctionName=DEPLOY_FUNCTION_NAME, **wanted)
        logger.info("updated the configuration of %s", DEPLOY_FUNCTION_NAME)
    return current["FunctionArn"]


def approval_rule_name(model_package_group_name: str) -> str:
    return f"{model_package_group_name}-{APPROVAL_RULE_SUFFIX}"[:64]


def approval_event_pattern(model_package_group_name: str) -> dict[str, Any]:
    """``ModelApprovalRule``'s pattern in infra/template.yaml."""
    return {"source": ["aws.sagemaker"], "detail-type": [EVENT_DETAIL_TYPE],
            "detail": {"ModelPackageGroupName": [model_package_group_name],
                       "ModelApprovalStatus": ["Approved", "Rejected"]}}


def ensure_approval_rule(events_client: Any, model_package_group_name: str, function_arn: str) -> str:
    """The rule sending the group's approval changes to the deploy function (PutRule/PutTargets are upserts)."""
    name = approval_rule_name(model_package_group_name)
    rule = events_client.put_rule(Name=name, EventPattern=json.dumps(approval_event_pattern(model_package_group_name)),
                                  State="ENABLED",
                                  Description="Deploy the latest approved model when an approval status changes")
    events_client.put_targets(Rule=name, Targets=[{"Id": APPROVAL_TARGET_ID, "Arn": function_arn}])
    return rule["RuleArn"]


def ensure_all(clients: Any, bucket: str | None, model_package_group_name: str, *,
               endpoint_name: str | None = None) -> str:
    """Bucket (when given), deploy function and approval rule; returns the function's ARN."""
    if bucket:
        ensure_bucket(clients.s3, bucket)
    function_arn = ensure_deploy_function(clients.lambda_, model_package_group_name, endpoint_name)
    ensure_approval_rule(clients.events, model_package_group_name, function_arn)
    return function_arn
