"""steps/deploy.py against moto's SageMaker (request shapes validated by botocore's service model).

moto 5.2 implements model packages, models, endpoint configs, endpoints and tags but not ``UpdateEndpoint``; the
``UpdateEndpointFake`` below adds that one operation at the AWS boundary, on moto's own backend, with SageMaker's
documented behaviour (status ``Updating``, the old ``EndpointConfigName`` until the new fleet is in service, the new
config in ``PendingDeploymentSummary``, "in-progress" updates refused). Our code is never mocked.
"""

from __future__ import annotations

import copy
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ParamValidationError
from moto import mock_aws
from moto.sagemaker.models import sagemaker_backends

from steps import deploy

pytestmark = pytest.mark.fast

ACCOUNT = "123456789012"
REGION = "us-east-1"
GROUP = "ImageClassifierModels"
ENDPOINT = "imgclf-endpoint"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/imgclf-sagemaker-execution"
DATA = Path(__file__).parent / "data"
ENV = {"SAGEMAKER_EXECUTION_ROLE_ARN": ROLE, "ENDPOINT_NAME": ENDPOINT}


def _sample_event(status: str, version: int = 1) -> dict:
    event = json.loads((DATA / f"model_package_state_change_{status}.json").read_text())
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package/{GROUP}/{version}"
    event["detail"].update(ModelPackageVersion=version, ModelPackageArn=arn)
    event["resources"] = [arn]
    return event


class UpdateEndpointFake:
    """SageMaker's UpdateEndpoint on moto's backend (moto 5.2 lacks it); ``finish()`` ends the running updates."""

    def __init__(self, client) -> None:
        self.requests: list[dict] = []
        client.meta.events.register("before-call.sagemaker.UpdateEndpoint", self._update_endpoint)

    @staticmethod
    def backend():
        return sagemaker_backends[ACCOUNT][REGION]

    @staticmethod
    def _reply(status: int, body: dict):
        body["ResponseMetadata"] = {"HTTPStatusCode": status}
        return AWSResponse(f"https://api.sagemaker.{REGION}.amazonaws.com/", status, {}, None), body

    def _update_endpoint(self, params, **_):
        request = json.loads(params["body"])
        self.requests.append(request)
        backend = self.backend()
        endpoint = backend.endpoints.get(request["EndpointName"])
        if endpoint is None:
            return self._reply(400, {"Error": {"Code": "ValidationException",
                                               "Message": f"Could not find endpoint {request['EndpointName']}."}})
        if endpoint.endpoint_status != "InService":
            return self._reply(400, {"Error": {"Code": "ValidationException",
                                               "Message": "Cannot update in-progress endpoint"}})
        if request["EndpointConfigName"] not in backend.endpoint_configs:
            return self._reply(400, {"Error": {"Code": "ValidationException",
                                               "Message": "Could not find endpoint configuration"}})
        endpoint.endpoint_status = "Updating"
        endpoint.pending_deployment_summary = {"EndpointConfigName": request["EndpointConfigName"],
                                               "StartTime": datetime.now(UTC)}
        return self._reply(200, {"EndpointArn": endpoint.arn})

    def finish(self) -> None:
        backend = self.backend()
        for endpoint in backend.endpoints.values():
            pending = getattr(endpoint, "pending_deployment_summary", None)
            if pending:
                config = backend.endpoint_configs[pending["EndpointConfigName"]]
                endpoint.endpoint_config_name = config.endpoint_config_name
                endpoint.production_variants = endpoint._process_production_variants(config.production_variants)
                endpoint.pending_deployment_summary = None
            endpoint.endpoint_status = "InService"


@pytest.fixture
def aws(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "SAGEMAKER_EXECUTION_ROLE_ARN", "ENDPOINT_NAME", "ENDPOINT_INSTANCE_TYPE",
                 "ENDPOINT_INSTANCE_COUNT", "DATA_CAPTURE_S3_URI"):
        monkeypatch.delenv(name, raising=False)
    with mock_aws():
        client = boto3.client("sagemaker", region_name=REGION)
        client.create_model_package_group(ModelPackageGroupName=GROUP)
        yield client, UpdateEndpointFake(client)


def register(client, approval: str = "PendingManualApproval") -> str:
    return client.create_model_package(
        ModelPackageGroupName=GROUP,
        ModelApprovalStatus=approval,
        InferenceSpecification={
            "Containers": [{
                "Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.5-cpu-py311",
                "ModelDataUrl": "s3://imgclf-artifacts/ImageClassificationPipeline/model.tar.gz",
                "Environment": {"SAGEMAKER_PROGRAM": "inference.py"},
            }],
            "SupportedContentTypes": ["image/jpeg"],
            "SupportedResponseMIMETypes": ["application/json"],
        },
    )["ModelPackageArn"]


def set_status(client, arn: str, status: str) -> None:
    client.update_model_package(ModelPackageArn=arn, ModelApprovalStatus=status)


def serving(client) -> str:
    """The package the endpoint serves, read the way an operator would: endpoint -> config -> model."""
    config_name = client.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]
    config = client.describe_endpoint_config(EndpointConfigName=config_name)
    model = client.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    return model["PrimaryContainer"]["ModelPackageName"]


def counts(client) -> tuple[int, int]:
    backend = sagemaker_backends[ACCOUNT][REGION]
    return len(backend._models), len(backend.endpoint_configs)


# ------------------------------------------------------------------------------------------------ the lifecycle


def test_first_approval_creates_the_endpoint(aws, monkeypatch):
    client, _ = aws
    arn = register(client)
    set_status(client, arn, "Approved")
    monkeypatch.setattr(deploy, "_CLIENT", None)  # lambda_handler builds its boto3 client lazily (moto here)
    event = {"model_package_group_name": GROUP, "endpoint_name": ENDPOINT, "instance_type": "ml.m5.xlarge",
             "instance_count": 2, "role_arn": ROLE}

    result = deploy.lambda_handler(event, None)

    assert result["status"] == "Created"
    assert result["model_package_arn"] == arn
    assert result["endpoint_name"] == ENDPOINT
    assert result["endpoint_status"] == client.describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"]
    assert serving(client) == arn
    endpoint = client.describe_endpoint(EndpointName=ENDPOINT)
    config = client.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    variant = config["ProductionVariants"][0]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.m5.xlarge", 2)
    model = client.describe_model(ModelName=variant["ModelName"])
    assert model["ExecutionRoleArn"] == ROLE
    for name in (variant["ModelName"], endpoint["EndpointConfigName"]):
        assert name.startswith(f"{ENDPOINT}-v1-") and len(name) <= 63
    tags = {t["Key"]: t["Value"] for t in client.list_tags(ResourceArn=endpoint["EndpointArn"])["Tags"]}
    assert tags[deploy.TAG_MODEL_PACKAGE_ARN] == arn


def test_an_update_another_invocation_started_first_is_joined(aws, monkeypatch):
    """A package registered as Approved is deployed twice at once: by the approval event and by the pipeline's
    LambdaStep. The one whose UpdateEndpoint loses ("Cannot update in-progress endpoint") sees the endpoint Updating
    towards the same package: NoChange, not a failed step."""
    client, updates = aws
    v1 = register(client)
    set_status(client, v1, "Approved")
    assert deploy.handle_event(_sample_event("approved", 1), client, env=ENV)["status"] == "Created"
    v2 = register(client)
    set_status(client, v2, "Approved")
    real_describe = client.describe_endpoint
    first: list[dict] = []

    def describe_then_race(**kwargs):
        described = real_describe(**kwargs)
        if not first:  # after this invocation looked, the other one updates the endpoint to the same package
            first.append(described)
            other_client = boto3.client("sagemaker", region_name=REGION)
            other_client.meta.events.register("before-call.sagemaker.UpdateEndpoint", updates._update_endpoint)
            other = deploy.handle_event(_sample_event("approved", 2), other_client, env=ENV)
            assert other["status"] == "Updated"
        return described

    monkeypatch.setattr(client, "describe_endpoint", describe_then_race)
    result = deploy.handle_event(_sample_event("approved", 2), client, env=ENV)

    assert (result["status"], result["endpoint_status"]) == ("NoChange", "Updating")
    assert result["model_package_arn"] == v2
    assert [r["EndpointConfigName"] for r in updates.requests].count(updates.requests[-1]["EndpointConfigName"]) == 2


def test_second_approval_updates_blue_green_and_repeat_is_a_no_op(aws):
    client, updates = aws
    v1 = register(client)
    set_status(client, v1, "Approved")
    assert deploy.handle_event(_sample_event("approved", 1), client, env=ENV)["status"] == "Created"
    v2 = register(client)
    set_status(client, v2, "Approved")
    old_config = client.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]

    result = deploy.handle_event(_sample_event("approved", 2), client, env=ENV)

    assert result["status"] == "Updated"
    assert result["model_package_arn"] == v2
    assert result["endpoint_status"] == "Updating"
    assert v1 in result["message"] and v2 in result["message"]
    [request] = updates.requests
    assert request["RetainAllVariantProperties"] is False
    assert request["DeploymentConfig"]["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]["Type"] == "ALL_AT_ONCE"
    assert request["EndpointConfigName"] != old_config
    # While the new fleet comes up, the same approval again is recognised as already under way.
    during = deploy.handle_event(_sample_event("approved", 2), client, env=ENV)
    assert (during["status"], during["endpoint_status"]) == ("NoChange", "Updating")

    updates.finish()
    assert serving(client) == v2
    before = counts(client)
    again = deploy.handle_event(_sample_event("approved", 2), client, env=ENV)
    assert again["status"] == "NoChange"
    assert again["model_package_arn"] == v2
    assert "already serves" in again["message"]
    assert counts(client) == before and len(updates.requests) == 1


def test_rejecting_the_live_version_rolls_back_to_the_previous_approved_one(aws):
    client, updates = aws
    v1, v2 = register(client), register(client)
    set_status(client, v1, "Approved")
    deploy.handle_event(_sample_event("approved", 1), client, env=ENV)
    set_status(client, v2, "Approved")
    deploy.handle_event(_sample_event("approved", 2), client, env=ENV)
    updates.finish()
    v1_config = sorted(sagemaker_backends[ACCOUNT][REGION].endpoint_configs)[0]
    before = counts(client)

    set_status(client, v2, "Rejected")
    result = deploy.handle_event(_sample_event("rejected", 2), client, env=ENV)

    assert (result["status"], result["model_package_arn"]) == ("Updated", v1)
    assert updates.requests[-1]["EndpointConfigName"] == v1_config  # v1's model and config are reused
    assert counts(client) == before
    updates.finish()
    assert serving(client) == v1


def test_nothing_approved_gives_a_clear_message_and_no_endpoint(aws):
    client, _ = aws
    register(client)  # PendingManualApproval only
    set_status(client, register(client), "Rejected")

    result = deploy.deploy_latest_approved(client, GROUP, ENDPOINT, execution_role_arn=ROLE)

    assert result["status"] == "NothingApproved"
    assert result["model_package_arn"] is None and result["endpoint_status"] is None
    assert "No Approved model package" in result["message"] and GROUP in result["message"]
    assert client.list_endpoints()["Endpoints"] == []
    assert counts(client) == (0, 0)


def test_rejecting_the_only_approved_version_leaves_the_endpoint_and_says_so(aws):
    client, updates = aws
    v1 = register(client)
    set_status(client, v1, "Approved")
    deploy.handle_event(_sample_event("approved", 1), client, env=ENV)
    set_status(client, v1, "Rejected")

    result = deploy.handle_event(_sample_event("rejected", 1), client, env=ENV)

    assert result["status"] == "NothingApproved"
    assert "left unchanged" in result["message"] and v1 in result["message"]
    assert "Rejected version: nothing approved to roll back to" in result["message"]
    assert (result["serving_model_package_arn"], result["serving_approval_status"]) == (v1, "Rejected")
    assert updates.requests == [] and serving(client) == v1


def test_latest_approved_walks_every_page(aws, monkeypatch):
    client, _ = aws
    arns = [register(client) for _ in range(5)]
    for arn in (arns[0], arns[3]):
        set_status(client, arn, "Approved")
    monkeypatch.setattr(deploy, "LIST_PAGE_SIZE", 1)
    calls: list[dict] = []
    client.meta.events.register("provide-client-params.sagemaker.ListModelPackages",
                                lambda params, **_: calls.append(dict(params)))

    latest = deploy.latest_approved_package(client, GROUP)

    assert latest["ModelPackageArn"] == arns[3]
    assert len(calls) >= 2 and all(c["ModelApprovalStatus"] == "Approved" and c["MaxResults"] == 1 for c in calls)
    assert "NextToken" in calls[-1]


def test_busy_endpoint_is_not_touched(aws):
    client, updates = aws
    v1, v2, v3 = register(client), register(client), register(client)
    set_status(client, v1, "Approved")
    deploy.handle_event(_sample_event("approved", 1), client, env=ENV)
    set_status(client, v2, "Approved")
    deploy.handle_event(_sample_event("approved", 2), client, env=ENV)  # -> Updating
    set_status(client, v3, "Approved")

    with pytest.raises(deploy.EndpointBusyError, match="Updating.*Retry later"):
        deploy.handle_event(_sample_event("approved", 3), client, env=ENV)
    assert len(updates.requests) == 1


def _fail_endpoint(reason: str = "The primary container did not pass the ping check") -> None:
    endpoint = sagemaker_backends[ACCOUNT][REGION].endpoints[ENDPOINT]
    endpoint.endpoint_status, endpoint.failure_reason = "Failed", reason


def test_failed_endpoint_is_deleted_and_created_again(aws):
    """DeleteEndpoint is the only operation SageMaker allows on a Failed endpoint, which serves nothing."""
    client, updates = aws
    v1, v2 = register(client), register(client)
    set_status(client, v1, "Approved")
    deploy.handle_event(_sample_event("approved", 1), client, env=ENV)
    _fail_endpoint()
    set_status(client, v2, "Approved")
    deletes: list[dict] = []
    client.meta.events.register("provide-client-params.sagemaker.DeleteEndpoint",
                                lambda params, **_: deletes.append(dict(params)))

    result = deploy.handle_event(_sample_event("approved", 2), client, env=ENV)

    assert (result["status"], result["model_package_arn"]) == ("Created", v2)
    assert "Failed endpoint" in result["message"] and "ping check" in result["message"]
    assert deletes == [{"EndpointName": ENDPOINT}] and updates.requests == []
    assert serving(client) == v2
    # The same version that failed is recreated too (a pipeline retry of DeployApprovedModel).
    _fail_endpoint("interrupted")
    assert deploy.handle_event(_sample_event("approved", 2), client, env=ENV)["status"] == "Created"
    assert serving(client) == v2 and len(deletes) == 2


def test_failed_endpoint_without_delete_permission_gets_a_clear_error(aws):
    client, updates = aws
    v1, v2 = register(client), register(client)
    set_status(client, v1, "Approved")
    deploy.handle_event(_sample_event("approved", 1), client, env=ENV)
    _fail_endpoint()
    set_status(client, v2, "Approved")
    denied = {"Error": {"Code": "AccessDeniedException", "Message": "not authorized to perform DeleteEndpoint"},
              "ResponseMetadata": {"HTTPStatusCode": 400}}
    client.meta.events.register(
        "before-call.sagemaker.DeleteEndpoint",
        lambda **_: (AWSResponse("https://api.sagemaker.us-east-1.amazonaws.com/", 400, {}, None), denied))

    with pytest.raises(deploy.DeploymentError, match="Failed.*ping check.*sagemaker:DeleteEndpoint.*delete-endpoint"):
        deploy.handle_event(_sample_event("approved", 2), client, env=ENV)
    assert updates.requests == []
    assert client.describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "Failed"


def test_a_deploy_that_fails_at_once_is_not_reported_as_success(aws):
    """A backend whose deploys are synchronous (the local one) reports the outcome right away: Failed after
    CreateEndpoint, or InService on the old config after a rolled-back UpdateEndpoint, is an error."""
    client, updates = aws
    v1, v2 = register(client), register(client)
    set_status(client, v1, "Approved")
    backend = sagemaker_backends[ACCOUNT][REGION]

    def failed(**_):
        _fail_endpoint("model_fn raised")

    client.meta.events.register("after-call.sagemaker.CreateEndpoint", failed)
    with pytest.raises(deploy.DeploymentError, match="failed to deploy .*model_fn raised"):
        deploy.handle_event(_sample_event("approved", 1), client, env=ENV)
    client.meta.events.unregister("after-call.sagemaker.CreateEndpoint", failed)
    backend.endpoints[ENDPOINT].endpoint_status = "InService"
    old_config = client.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]

    def rolled_back(**_):
        endpoint = backend.endpoints[ENDPOINT]
        endpoint.endpoint_status, endpoint.pending_deployment_summary = "InService", None
        endpoint.failure_reason = "the new fleet failed its health check"

    set_status(client, v2, "Approved")
    client.meta.events.register("after-call.sagemaker.UpdateEndpoint", rolled_back)
    with pytest.raises(deploy.DeploymentError, match=f"rolled back to config '{old_config}'.*health check"):
        deploy.handle_event(_sample_event("approved", 2), client, env=ENV)
    assert len(updates.requests) == 1 and serving(client) == v1


def test_data_capture_and_env_settings_reach_the_endpoint_config(aws):
    client, _ = aws
    set_status(client, register(client), "Approved")
    env = dict(ENV, ENDPOINT_INSTANCE_TYPE="ml.c5.large", ENDPOINT_INSTANCE_COUNT="3",
               DATA_CAPTURE_S3_URI="s3://imgclf-artifacts/data-capture/imgclf-endpoint")

    deploy.handle_event(_sample_event("approved", 1), client, env=env)

    config_name = client.describe_endpoint(EndpointName=ENDPOINT)["EndpointConfigName"]
    config = client.describe_endpoint_config(EndpointConfigName=config_name)
    assert config["DataCaptureConfig"]["DestinationS3Uri"] == env["DATA_CAPTURE_S3_URI"]
    assert config["DataCaptureConfig"]["EnableCapture"] is True
    assert (config["ProductionVariants"][0]["InstanceType"], config["ProductionVariants"][0]["InitialInstanceCount"]) \
        == ("ml.c5.large", 3)


def test_requests_are_validated_against_the_service_model(aws):
    client, _ = aws
    with pytest.raises(ParamValidationError):  # the fake UpdateEndpoint sees only shape-valid requests
        client.update_endpoint(EndpointName=ENDPOINT, EndpointConfigName="x", RetainAllVariantProperties="no")


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"endpoint_name": ENDPOINT, "role_arn": ROLE}, "model_package_group_name"),
        ({"model_package_group_name": GROUP, "role_arn": ROLE}, "endpoint_name"),
        ({"model_package_group_name": "  ", "endpoint_name": ENDPOINT, "role_arn": ROLE}, "model_package_group_name"),
        ({"detail-type": "SageMaker Model Package State Change", "detail": {"ModelApprovalStatus": "Approved"}},
         "detail.ModelPackageGroupName"),
        ({"detail-type": "SageMaker Model Package State Change"}, "'detail'"),
        ({"detail-type": "SageMaker Endpoint State Change", "detail": {}}, "detail-type"),
        ({"model_package_group_name": GROUP, "endpoint_name": ENDPOINT}, "SAGEMAKER_EXECUTION_ROLE_ARN"),
        ({"model_package_group_name": GROUP, "endpoint_name": ENDPOINT, "role_arn": ROLE, "instance_count": "two"},
         "instance_count"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_malformed_events_are_rejected_with_the_field_named(aws, monkeypatch, caplog, event, field):
    client, updates = aws
    set_status(client, register(client), "Approved")
    monkeypatch.setattr(deploy, "_CLIENT", client)
    with caplog.at_level(logging.ERROR, logger=deploy.__name__), pytest.raises(ValueError) as info:
        deploy.lambda_handler(copy.deepcopy(event), None)
    assert field in str(info.value)
    assert "Rejected event" in caplog.text
    assert client.list_endpoints()["Endpoints"] == [] and counts(client) == (0, 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"execution_role_arn": "not-a-role"}, "execution_role_arn"),
        ({"execution_role_arn": ROLE, "instance_type": "m5.large"}, "instance_type"),
        ({"execution_role_arn": ROLE, "initial_instance_count": 0}, "initial_instance_count"),
        ({"execution_role_arn": ROLE, "data_capture_s3_uri": "/tmp/capture"}, "data_capture_s3_uri"),
    ],
)
def test_bad_arguments_fail_before_any_call(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deploy.deploy_latest_approved(object(), GROUP, ENDPOINT, **kwargs)


def test_bad_endpoint_name_fails_before_any_call():
    with pytest.raises(ValueError, match="endpoint_name"):
        deploy.deploy_latest_approved(object(), GROUP, "my_endpoint", execution_role_arn=ROLE)


def test_derived_names_fit_sagemaker_rules():
    long_name = "e" * 63
    name = deploy.resource_name(long_name, "v123-0123abcd")
    assert len(name) == 63 and name.endswith("-v123-0123abcd")
    assert deploy.resource_name("a" * 40, "v9999999999-0123abcd").startswith("a" * 40 + "-")
    assert deploy.resource_name("ab-" + "c" * 60, "v1-0123abcd").count("--") == 0


def test_module_imports_without_project_packages(tmp_path):
    """The Lambda bundle is deploy.py alone: it must import with only the standard library and botocore."""
    import subprocess
    import sys
    import zipfile

    bundle = tmp_path / "deploy.zip"
    with zipfile.ZipFile(bundle, "w") as zf:
        zf.write(Path(deploy.__file__), "deploy.py")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import deploy; "
            "assert deploy.lambda_handler and 'steps' not in sys.modules and 'training' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(bundle)], check=True, cwd=tmp_path, timeout=60)
