"""The UI's state changes, each the same API operation the CLI (and AWS's own console) uses:

- Stop: ``StopPipelineExecution``; Retry: ``RetryPipelineExecution``;
- Approve / Reject: ``UpdateModelPackage`` (status + ``ApprovalDescription``). The local SageMaker service emits the
  "SageMaker Model Package State Change" event, the approval rule sends it to the deploy function
  (``steps/deploy.py``), which updates the endpoint through the SageMaker API -- asynchronously, as on AWS;
  :func:`deploy_status` follows that path (the function's invocation log, then ``DescribeEndpoint``);
- Try it: ``InvokeEndpoint`` (SageMaker runtime).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from pipelines.local.cli.models import deploy_result
from pipelines.local.ui.reader import Reader, tail
from pipelines.local.ui.web import HttpError, bad_request

logger = logging.getLogger(__name__)

APPROVAL_STATUSES = ("Approved", "Rejected", "PendingManualApproval")
DEPLOY_WAIT_S = 300.0
DEFAULT_ENDPOINT_NAME = "imgclf-endpoint"
MAX_COMMENT = 1024


def stop(reader: Reader, arn: str) -> dict[str, Any]:
    logger.info("StopPipelineExecution %s", arn)
    return reader.sm.stop_pipeline_execution(PipelineExecutionArn=arn, ClientRequestToken=str(uuid.uuid4()))


def retry(reader: Reader, arn: str) -> dict[str, Any]:
    logger.info("RetryPipelineExecution %s", arn)
    return reader.sm.retry_pipeline_execution(PipelineExecutionArn=arn, ClientRequestToken=str(uuid.uuid4()))


def set_approval(reader: Reader, arn: str, status: str, comment: str | None) -> tuple[float, str]:
    """``UpdateModelPackage`` with ``status`` and the comment as ``ApprovalDescription``; returns ``(when,
    endpoint)`` to follow the deploy with. The deploy function and approval rule are made sure of first, as
    ``models approve`` does (keeping the endpoint the function already manages)."""
    from pipelines.local.api import stack

    if status not in APPROVAL_STATUSES:
        raise bad_request(f"unknown approval status {status!r} (one of {', '.join(APPROVAL_STATUSES)})")
    if comment and len(comment) > MAX_COMMENT:
        raise bad_request(f"the comment is longer than {MAX_COMMENT} characters")
    described = reader.sm.describe_model_package(ModelPackageName=arn)
    if described.get("ModelApprovalStatus") == status:
        raise HttpError(409, f"{arn} is already {status}")
    endpoint = reader.managed_endpoint() or os.environ.get("ENDPOINT_NAME") or DEFAULT_ENDPOINT_NAME
    stack.ensure_all(reader.clients, None, described["ModelPackageGroupName"], endpoint_name=endpoint)
    since = time.time()
    request = {"ModelPackageArn": arn, "ModelApprovalStatus": status}
    if comment:
        request["ApprovalDescription"] = comment
    reader.sm.update_model_package(**request)
    logger.info("UpdateModelPackage %s -> %s (%s)", arn, status, comment or "no comment")
    return since, endpoint


def _deploy_logs(since: float) -> list[Path]:
    from pipelines.local.storage.store import DEPLOY_FUNCTION_NAME, mlops_home

    folder = mlops_home() / "lambda" / DEPLOY_FUNCTION_NAME / "logs"
    if not folder.is_dir():
        return []
    logs = [(p.stat().st_mtime, p) for p in folder.glob("*.log")]
    return [p for mtime, p in sorted(logs) if mtime >= since - 0.05]


def recent_deploys(limit: int = 10) -> list[tuple[Path, dict[str, Any] | None]]:
    """The deploy function's latest finished invocations (newest first) with their results."""
    done = [p for p in _deploy_logs(0.0) if "END RequestId:" in p.read_text(errors="replace")]
    return [(p, deploy_result(p)) for p in reversed(done[-limit:])]


def package_name(reader: Reader, arn: str | None) -> str:
    """``group/version`` of a package ARN (the ARN itself when unknown)."""
    if not arn:
        return "nothing"
    try:
        described = reader.package(arn, status="name")  # group and version never change
    except ClientError:
        return arn
    return f"{described['ModelPackageGroupName']}/{described['ModelPackageVersion']}"


def deploy_status(reader: Reader, since: float, endpoint: str) -> dict[str, Any]:
    """Where the deploy started at ``since`` stands: ``{"state", "text", "done"}``."""
    finished = [p for p in _deploy_logs(since) if "END RequestId:" in p.read_text(errors="replace")]
    if not finished:
        if time.time() - since > DEPLOY_WAIT_S:
            return {"state": "timeout", "done": True, "text": f"the deploy function did not finish within "
                                                             f"{DEPLOY_WAIT_S:.0f} s"}
        return {"state": "deploying", "done": False,
                "text": "approval event sent: waiting for the deploy function (EventBridge rule → Lambda)…"}
    log = finished[0]
    result = deploy_result(log)
    if result is None:
        return {"state": "failed", "done": True, "text": f"the deploy function failed ({log.name}):\n{tail(log, 12)}"}
    return _endpoint_after(reader, result, endpoint, since)


def _endpoint_after(reader: Reader, result: dict[str, Any], endpoint: str, since: float) -> dict[str, Any]:
    name = result.get("endpoint_name") or endpoint
    head = f"deploy: {result.get('status')} — {result.get('message')}"
    try:
        described = reader.sm.describe_endpoint(EndpointName=name)
    except ClientError:
        return {"state": "done", "done": True, "text": f"{head}\nendpoint {name} does not exist",
                "result": result}
    status = described["EndpointStatus"]
    serving = reader.serving_package(described.get("EndpointConfigName"))
    text = f"{head}\nendpoint {name} is {status}, serving {package_name(reader, serving)}"
    if status in ("Creating", "Updating") and time.time() - since < DEPLOY_WAIT_S:
        return {"state": "updating", "done": False, "text": text, "result": result}
    wanted = result.get("model_package_arn")
    ok = status == "InService" and (serving == wanted or result.get("status") == "NothingApproved")
    return {"state": "ok" if ok else "failed", "done": True, "text": text, "result": result,
            "endpoint_status": status, "serving": serving}


def invoke(reader: Reader, endpoint: str, body: bytes, content_type: str) -> dict[str, Any]:
    """``InvokeEndpoint``: ``{"status": 200, "body", "content_type"}``, or the error as the runtime sends it."""
    if not body:
        raise bad_request("the request has no body: send an image")
    try:
        answer = reader.runtime.invoke_endpoint(EndpointName=endpoint, Body=body, ContentType=content_type,
                                                Accept="application/json")
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("OriginalStatusCode") or exc.response.get("ResponseMetadata", {}).get(
            "HTTPStatusCode")
        return {"status": status, "error": f"{error.get('Code')}: {error.get('Message')}"}
    return {"status": 200, "body": answer["Body"].read().decode("utf-8", "replace"),
            "content_type": answer.get("ContentType")}
