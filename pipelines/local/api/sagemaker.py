"""SageMaker for the local AWS service: the SageMaker API (JSON 1.1) and the SageMaker runtime's ``InvokeEndpoint``
(REST-JSON), both signed as service ``sagemaker``.

Runtime: ``POST /endpoints/{EndpointName}/invocations`` is forwarded (body and the runtime's request headers:
``Content-Type``, ``Accept``, ``X-Amzn-SageMaker-*``) to that endpoint's local server, whose answer -- status,
headers, body, its ``ModelError`` included -- comes back unchanged. An unknown endpoint, or one whose server is not
running, is the runtime's ``ValidationError`` (400, ``x-amzn-ErrorType``): ``Endpoint X of account Y not found.``

API: ``POST /`` with ``X-Amz-Target: SageMaker.<Operation>``. An operation SageMaker does not have, or that is not
served locally, is ``UnknownOperationException``. Every request is validated against the operation's input shape
with botocore's ``ParamValidator`` (``ValidationException`` carrying botocore's report), plus the enum and pattern
checks SageMaker makes server-side; every response is cut down to the operation's output shape (engine-internal
keys never leave) with timestamps as epoch seconds. Errors are ``{"__type": code, "message": ...}`` with HTTP 400
(500 ``InternalFailure`` for a bug here), the form botocore's JSON parser reads.

Served: pipelines, executions and the engine's jobs (:mod:`.sagemaker_pipelines`); models, endpoint configs,
endpoints, model package groups and packages, tags (:class:`~pipelines.local.api.sagemaker_backend.SageMakerBackend`,
every method of it that is a SageMaker operation). ``CreateEndpoint``/``UpdateEndpoint`` answer once the deploy is
under way (at most :data:`DEPLOY_ANSWER_S`), as SageMaker answers with the endpoint ``Creating``: the local deploy
goes on in the service and ``DescribeEndpoint`` (or the ``EndpointInService`` waiter) shows when it is done.
"""

from __future__ import annotations

import http.client
import logging
import re
import threading
import urllib.parse
import uuid
from collections.abc import Callable
from functools import cache
from typing import Any

from botocore import xform_name
from botocore.exceptions import ClientError, ParamValidationError

from pipelines.local.api import sagemaker_backend, sagemaker_pipelines, shapes
from pipelines.local.api.protocol import NO_CACHE_HEADER, Request, Response
from pipelines.local.api.shapes import ApiError
from pipelines.local.serving import endpoints
from pipelines.local.storage.store import LOCAL_ACCOUNT, LOCAL_REGION

logger = logging.getLogger(__name__)

SERVICE = "sagemaker"
TARGET_PREFIX = "SageMaker"
RUNTIME_PATH = re.compile(r"^/endpoints/([^/]+)/invocations$")
#: Request headers of InvokeEndpoint forwarded to the endpoint server (plus every ``X-Amzn-SageMaker-*``).
RUNTIME_HEADERS = ("Content-Type", "Accept")
#: Response headers not passed back from the endpoint server (this server writes its own).
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}
INVOKE_TIMEOUT_S = 65.0  # the runtime's 60 s model timeout, and a little
MAX_INVOKE_BODY_BYTES = 25 * 1024 * 1024
#: How long CreateEndpoint/UpdateEndpoint wait for the local deploy before answering (it goes on afterwards).
DEPLOY_ANSWER_S = 5.0
ASYNC_DEPLOYS = {"CreateEndpoint", "UpdateEndpoint"}


# ------------------------------------------------------------------------------------------------------- runtime


def _runtime_error(code: str, status: int, message: str) -> Response:
    return Response.json({"__type": code, "message": message, "Message": message}, status=status,
                         content_type="application/json",
                         headers={"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/com.amazon.sagemaker/",
                                  "x-amzn-RequestId": str(uuid.uuid4())})


def _endpoint_url(name: str) -> str | None:
    """The URL of a running local endpoint server, or ``None``."""
    try:
        endpoint = endpoints.get(name)
    except (endpoints.EndpointNotFound, ValueError):
        return None
    return endpoint.url if endpoint.alive and endpoint.url else None


def _forwarded_headers(request: Request) -> dict[str, str]:
    headers = {k: v for k in RUNTIME_HEADERS if (v := request.header(k)) is not None}
    for key, value in request.headers.items():
        if key.lower().startswith("x-amzn-sagemaker-"):
            headers[key] = value
    return headers


def invoke_endpoint(request: Request, name: str) -> Response:
    """``InvokeEndpoint``: forwarded to the endpoint's own server; its answer comes back unchanged."""
    not_found = f"Endpoint {name} of account {LOCAL_ACCOUNT} not found."
    url = _endpoint_url(name)
    if url is None:
        return _runtime_error("ValidationError", 400, not_found)
    body = request.body(MAX_INVOKE_BODY_BYTES)
    target = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=INVOKE_TIMEOUT_S)
    try:
        connection.request("POST", f"/endpoints/{urllib.parse.quote(name, safe='')}/invocations", body=body,
                           headers=_forwarded_headers(request))
        answer = connection.getresponse()
        payload = answer.read()
        headers = {k: v for k, v in answer.getheaders() if k.lower() not in HOP_HEADERS}
        return Response(answer.status, headers, payload)
    except (OSError, http.client.HTTPException) as exc:
        logger.warning("endpoint %s at %s did not answer: %s", name, url, exc)
        return _runtime_error("ValidationError", 400, not_found)
    finally:
        connection.close()


# ----------------------------------------------------------------------------------------------------------- API


def _error(exc: ApiError, request_id: str) -> Response:
    return Response.json({"__type": exc.code, "message": exc.message}, status=exc.status,
                         headers={"x-amzn-RequestId": request_id})


@cache
def _client() -> sagemaker_backend.SageMakerBackend:
    return sagemaker_backend.SageMakerBackend()


@cache
def client_operations() -> frozenset[str]:
    """The SageMaker operations SageMakerBackend implements (its methods named as boto3 names them)."""
    names = shapes.service_model(SERVICE).operation_names
    return frozenset(op for op in names if callable(getattr(sagemaker_backend.SageMakerBackend, xform_name(op),
                                                            None)))


def served_operations() -> frozenset[str]:
    return frozenset(sagemaker_pipelines.OPERATIONS) | client_operations() | {"DeleteTags"}


def _call_client(operation: str, params: dict[str, Any]) -> dict[str, Any]:
    """Call SageMakerBackend; its ClientError becomes the same error on the wire."""
    method: Callable[..., dict[str, Any]] = getattr(_client(), xform_name(operation))
    try:
        if operation in ASYNC_DEPLOYS:
            return _answer_early(operation, method, params)
        result = method(**params)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 400
        raise ApiError(error.get("Code") or "ValidationException", error.get("Message") or str(exc), status) from exc
    except ParamValidationError as exc:
        raise shapes.validation_error(str(exc)) from exc
    result.pop("ResponseMetadata", None)
    return result


def _answer_early(operation: str, method: Callable[..., dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """Run a deploy in a service thread; its result if it ends within DEPLOY_ANSWER_S, else the endpoint's ARN
    (the endpoint is ``Creating``/``Updating`` meanwhile, as on SageMaker)."""
    outcome: dict[str, Any] = {}

    def deploy() -> None:
        try:
            outcome["result"] = method(**params)
        except Exception as exc:  # noqa: BLE001 -- reported to the caller, or logged once it has its answer
            outcome["error"] = exc
            if done.is_set():
                logger.warning("%s %s failed after it was answered: %s", operation, params.get("EndpointName"), exc)

    done = threading.Event()
    worker = threading.Thread(target=deploy, name=f"{operation}-{params.get('EndpointName')}", daemon=True)
    worker.start()
    worker.join(DEPLOY_ANSWER_S)
    done.set()
    if "error" in outcome:
        raise outcome["error"]
    if "result" in outcome:
        return dict(outcome["result"])
    logger.info("%s %s: deploy goes on in the background", operation, params.get("EndpointName"))
    return {"EndpointArn": sagemaker_backend.endpoint_arn(params["EndpointName"])}


def _tags(operation: str, params: dict[str, Any], ctx: sagemaker_pipelines.Context) -> dict[str, Any]:
    """Tag operations: pipelines' tags here, other resources' through the client (DeleteTags after the client
    confirmed the resource exists)."""
    if sagemaker_pipelines.is_pipeline_arn(params["ResourceArn"]):
        return sagemaker_pipelines.PIPELINE_TAG_OPERATIONS[operation](params, ctx)
    if operation == "DeleteTags":
        _call_client("ListTags", {"ResourceArn": params["ResourceArn"]})
        return sagemaker_pipelines.delete_tags(params, ctx)
    return _call_client(operation, params)


def _package_state(arn: str) -> dict[str, Any]:
    return _call_client("DescribeModelPackage", {"ModelPackageName": arn})


def _emit_state_change(described: dict[str, Any], ctx: sagemaker_pipelines.Context) -> None:
    """SageMaker's "Model Package State Change" event to EventBridge (rules, e.g. the approval -> deploy rule)."""
    from pipelines.local.api import events

    event = events.model_package_state_change_event(described, account=LOCAL_ACCOUNT, region=LOCAL_REGION)
    delivered = events.emit(event, service_url=ctx.service_url)
    logger.info("%s %s: state change event delivered to %s", described.get("ModelPackageArn"),
                described.get("ModelApprovalStatus"), delivered or "no target")


def _model_package_operation(operation: str, params: dict[str, Any],
                             ctx: sagemaker_pipelines.Context) -> dict[str, Any]:
    """Create/UpdateModelPackage, then the state change event as SageMaker sends it: on creation, and on an
    update that changes the approval status."""
    before = _package_state(params["ModelPackageArn"]) if operation == "UpdateModelPackage" else None
    result = _call_client(operation, params)
    after = _package_state(result["ModelPackageArn"])
    if before is None or before.get("ModelApprovalStatus") != after.get("ModelApprovalStatus"):
        _emit_state_change(after, ctx)
    return result


def _dispatch(operation: str, params: dict[str, Any], ctx: sagemaker_pipelines.Context) -> dict[str, Any]:
    if operation in sagemaker_pipelines.PIPELINE_TAG_OPERATIONS:
        return _tags(operation, params, ctx)
    if operation in sagemaker_pipelines.OPERATIONS:
        return sagemaker_pipelines.OPERATIONS[operation](params, ctx)
    if operation in ("CreateModelPackage", "UpdateModelPackage"):
        return _model_package_operation(operation, params, ctx)
    return _call_client(operation, params)


def _api(request: Request, request_id: str) -> Response:
    operation = shapes.json_target_operation(
        request, service=SERVICE, prefix=TARGET_PREFIX, served=served_operations(), title="SageMaker",
        serves="pipelines, executions, the engine's jobs, models, endpoint configs, endpoints, the model registry "
               "and tags")
    model = shapes.operation_model(SERVICE, operation)
    assert model is not None
    params = shapes.parse_input(model.input_shape, shapes.json_params(request))
    shapes.validate(model.input_shape, params)
    no_cache = (request.header(NO_CACHE_HEADER) or "").lower() == "true"
    ctx = sagemaker_pipelines.Context(service_url=request.service_url(), no_cache=no_cache)
    result = _dispatch(operation, params, ctx)
    body = shapes.shape_output(model.output_shape, result) if model.output_shape is not None else {}
    logger.debug("%s answered", operation)
    return Response.json(body or {}, headers={"x-amzn-RequestId": request_id})


def handle(request: Request) -> Response:
    """Answer one SageMaker (API or runtime) request; every failure is the protocol's error shape."""
    match = RUNTIME_PATH.match(request.path)
    if match and request.method == "POST":
        return invoke_endpoint(request, match.group(1))
    return shapes.answer(request, lambda request_id: _api(request, request_id), _error,
                         internal_code="InternalFailure", title="SageMaker")

