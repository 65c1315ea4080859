"""Local model registry and the local SageMaker client's API surface (no servers started here)."""

from __future__ import annotations

import json
import re

import pytest
from botocore.exceptions import ClientError, ParamValidationError
from botocore.validate import ParamValidator

from pipelines.local.api.sagemaker_backend import SageMakerBackend
from pipelines.local.storage import registry
from pipelines.local.storage.store import ArtifactStore

pytestmark = pytest.mark.fast

GROUP = "ImageClassifierModels"
ARN_RE = re.compile(r"^arn:aws:sagemaker:us-east-1:000000000000:model-package/imageclassifiermodels/(\d+)$")


@pytest.fixture(autouse=True)
def mlops_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "mlops"))
    return tmp_path / "mlops"


def register_request(accuracy: float | None = 0.875, description: str = "candidate", **overrides) -> dict:
    """A CreateModelPackage request as the RegisterModel step's Arguments carry it."""
    metrics_uri = f"s3://mlops-local/evaluation/{accuracy}/evaluation.json"
    if accuracy is not None:
        ArtifactStore().put_bytes(metrics_uri, json.dumps({"multiclass_classification_metrics": {
            "accuracy": {"value": accuracy, "standard_deviation": 0.01},
            "macro_f1": {"value": accuracy - 0.05, "standard_deviation": 0.02}}}).encode())
    request = {
        "ModelPackageGroupName": GROUP,
        "ModelPackageDescription": description,
        "ModelApprovalStatus": "PendingManualApproval",
        "InferenceSpecification": {
            "Containers": [{
                "Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.1-cpu-py310",
                "Environment": {"SAGEMAKER_PROGRAM": "inference.py",
                                "SAGEMAKER_SUBMIT_DIRECTORY": "s3://mlops-local/code/abc/serving.tar.gz"},
                "ModelDataUrl": "s3://mlops-local/train/output/model.tar.gz",
            }],
            "SupportedContentTypes": ["image/jpeg", "application/x-image"],
            "SupportedResponseMIMETypes": ["application/json"],
            "SupportedRealtimeInferenceInstanceTypes": ["ml.m5.large"],
            "SupportedTransformInstanceTypes": ["ml.m5.large"],
        },
        "ModelMetrics": {"ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": metrics_uri}}},
        "CustomerMetadataProperties": {"git_sha": "0123abc"},
        "CertifyForMarketplace": False,
    }
    request.update(overrides)
    return request


def assert_valid_output(operation: str, response: dict) -> None:
    """The response matches botocore's output shape for the operation (no unknown keys, required ones present)."""
    body = {k: v for k, v in response.items() if k != "ResponseMetadata"}
    shape = registry.operation_model(operation).output_shape
    report = ParamValidator().validate(body, shape)
    assert not report.has_errors(), report.generate_report()
    assert set(shape.required_members) <= set(body)


def test_versions_arns_metrics_and_describe_shape():
    first = registry.create_model_package(register_request(0.875, "first"))
    second = registry.create_model_package(register_request(0.9, "second"))
    assert [int(ARN_RE.match(r["ModelPackageArn"]).group(1)) for r in (first, second)] == [1, 2]

    package = registry.get_package(2)
    assert package.arn == second["ModelPackageArn"]
    assert package.accuracy == pytest.approx(0.9)
    assert package.approval_status == "PendingManualApproval"
    assert package.customer_metadata == {"git_sha": "0123abc"}
    assert package.container["ModelDataUrl"] == "s3://mlops-local/train/output/model.tar.gz"
    assert registry.get_package(f"{GROUP}/1").description == "first"
    assert registry.get_package(first["ModelPackageArn"]).version == 1
    assert registry.get_group(GROUP).arn.endswith(":model-package-group/imageclassifiermodels")

    described = package.describe()
    assert described["ModelPackageVersion"] == 2 and described["ModelPackageGroupName"] == GROUP
    assert described["CreationTime"].tzinfo is not None
    assert_valid_output("DescribeModelPackage", described)
    assert [p.version for p in registry.list_packages(GROUP)] == [1, 2]


def test_invalid_requests_are_rejected_with_botocore_messages_and_store_nothing():
    bad_type = register_request(ModelPackageDescription=123)
    with pytest.raises(ParamValidationError, match=r"Invalid type for parameter ModelPackageDescription"):
        registry.create_model_package(bad_type)
    with pytest.raises(ParamValidationError, match=r'Unknown parameter in input: "ModelDataUrl"'):
        registry.create_model_package(register_request(ModelDataUrl="s3://x/model.tar.gz"))
    spec = register_request()["InferenceSpecification"]
    del spec["Containers"]
    with pytest.raises(ParamValidationError, match=r'Missing required parameter in InferenceSpecification: '
                                                   r'"Containers"'):
        registry.create_model_package(register_request(InferenceSpecification=spec))
    with pytest.raises(registry.RegistryValidationError, match=r"Member must satisfy enum value set"):
        registry.create_model_package(register_request(ModelApprovalStatus="Maybe"))
    with pytest.raises(registry.RegistryValidationError, match="only keeps versioned"):
        registry.create_model_package({"ModelPackageName": "loose"})
    assert registry.list_packages() == []


def test_approval_transitions_and_lookups():
    arn = registry.create_model_package(register_request())["ModelPackageArn"]
    created = registry.get_package(arn)
    approved = registry.set_approval(1, "Approved", "looks good")
    assert (approved.approval_status, approved.approval_description) == ("Approved", "looks good")
    assert approved.last_modified_time >= created.last_modified_time
    rejected = registry.set_approval(arn, "Rejected", "regression on cross")
    assert (rejected.approval_status, rejected.approval_description) == ("Rejected", "regression on cross")
    assert registry.set_approval(f"{GROUP}/1", "Approved").approval_description == "regression on cross"
    assert [p.version for p in registry.list_packages(approval_status="Approved")] == [1]
    assert registry.list_packages(approval_status="Rejected") == []

    with pytest.raises(registry.RegistryValidationError, match="unknown approval status"):
        registry.set_approval(1, "Maybe")
    with pytest.raises(registry.ResourceNotFound, match="version 7 does not exist"):
        registry.get_package(7)
    with pytest.raises(registry.ResourceNotFound):
        registry.get_package(arn.replace("/1", "/9"))


def test_unreadable_metrics_report_is_kept_as_reference(caplog):
    request = register_request(None)
    arn = registry.create_model_package(request)["ModelPackageArn"]
    package = registry.get_package(arn)
    assert package.evaluation is None and package.accuracy is None
    assert package.model_metrics == request["ModelMetrics"]
    assert "could not read model metrics" in caplog.text


def test_client_registry_calls_match_the_service_model():
    client = SageMakerBackend()
    with pytest.raises(ClientError, match="Model Package Group ImageClassifierModels does not exist") as info:
        client.create_model_package(**register_request())
    assert info.value.response["Error"]["Code"] == "ValidationException"

    assert_valid_output("CreateModelPackageGroup", client.create_model_package_group(ModelPackageGroupName=GROUP))
    arns = [client.create_model_package(**register_request(description=f"v{i}"))["ModelPackageArn"]
            for i in (1, 2, 3)]
    client.update_model_package(ModelPackageArn=arns[0], ModelApprovalStatus="Approved")
    client.update_model_package(ModelPackageArn=arns[2], ModelApprovalStatus="Approved",
                                ApprovalDescription="ship it")

    # Pages of one, newest first, only approved: what steps/deploy.py asks for.
    request = {"ModelPackageGroupName": GROUP, "ModelApprovalStatus": "Approved", "SortBy": "CreationTime",
               "SortOrder": "Descending", "MaxResults": 1}
    seen = []
    while True:
        page = client.list_model_packages(**request)
        assert_valid_output("ListModelPackages", page)
        seen += [(s["ModelPackageVersion"], s["ModelApprovalStatus"]) for s in page["ModelPackageSummaryList"]]
        if "NextToken" not in page:
            break
        request["NextToken"] = page["NextToken"]
    assert seen == [(3, "Approved"), (1, "Approved")]
    everything = client.list_model_packages(ModelPackageGroupName=GROUP)["ModelPackageSummaryList"]
    assert [s["ModelPackageVersion"] for s in everything] == [1, 2, 3]

    described = client.describe_model_package(ModelPackageName=arns[2])
    assert_valid_output("DescribeModelPackage", described)
    assert described["ApprovalDescription"] == "ship it"
    assert_valid_output("DescribeModelPackageGroup", client.describe_model_package_group(ModelPackageGroupName=GROUP))
    groups = client.list_model_package_groups()
    assert_valid_output("ListModelPackageGroups", groups)
    assert [g["ModelPackageGroupName"] for g in groups["ModelPackageGroupSummaryList"]] == [GROUP]

    with pytest.raises(ClientError, match="Invalid pagination token"):
        client.list_model_packages(ModelPackageGroupName=GROUP, NextToken="bm9wZQ==")
    with pytest.raises(ClientError, match="does not exist"):
        client.describe_model_package(ModelPackageName=arns[0].replace("/1", "/42"))
    with pytest.raises(ParamValidationError, match='Missing required parameter in input: "ModelPackageArn"'):
        client.update_model_package(ModelApprovalStatus="Approved")
    with pytest.raises(ClientError, match="Member must satisfy enum value set"):
        client.update_model_package(ModelPackageArn=arns[1], ModelApprovalStatus="Shipped")


def test_client_models_configs_endpoints_and_tags_errors():
    client = SageMakerBackend()
    client.create_model_package_group(ModelPackageGroupName=GROUP)
    package_arn = client.create_model_package(**register_request())["ModelPackageArn"]
    role = "arn:aws:iam::000000000000:role/MLOpsLocalExecutionRole"
    tags = [{"Key": "team", "Value": "vision"}]

    created = client.create_model(ModelName="m1", PrimaryContainer={"ModelPackageName": package_arn},
                                  ExecutionRoleArn=role, Tags=tags)
    assert_valid_output("CreateModel", created)
    with pytest.raises(ClientError) as info:
        client.create_model(ModelName="m1", PrimaryContainer={"ModelPackageName": package_arn}, ExecutionRoleArn=role)
    assert info.value.response["Error"] == {
        "Code": "ValidationException",
        "Message": 'Cannot create already existing model "arn:aws:sagemaker:us-east-1:000000000000:model/m1".'}
    with pytest.raises(ClientError, match="does not exist"):
        client.create_model(ModelName="m2", PrimaryContainer={"ModelPackageName": package_arn + "0"})
    with pytest.raises(ParamValidationError, match='Missing required parameter in input: "ModelName"'):
        client.create_model(PrimaryContainer={"ModelPackageName": package_arn})

    model = client.describe_model(ModelName="m1")
    assert_valid_output("DescribeModel", model)
    assert model["PrimaryContainer"] == {"ModelPackageName": package_arn} and model["ExecutionRoleArn"] == role
    with pytest.raises(ClientError, match=r'Could not find model "arn:aws:sagemaker:.*:model/nope"\.'):
        client.describe_model(ModelName="nope")

    variant = {"VariantName": "AllTraffic", "ModelName": "m1", "InstanceType": "ml.m5.large",
               "InitialInstanceCount": 1, "InitialVariantWeight": 1.0}
    capture = {"EnableCapture": True, "InitialSamplingPercentage": 100, "DestinationS3Uri": "s3://mlops-local/dc",
               "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}]}
    assert_valid_output("CreateEndpointConfig", client.create_endpoint_config(
        EndpointConfigName="c1", ProductionVariants=[variant], DataCaptureConfig=capture, Tags=tags))
    with pytest.raises(ClientError, match="Cannot create already existing endpoint configuration"):
        client.create_endpoint_config(EndpointConfigName="c1", ProductionVariants=[variant])
    with pytest.raises(ClientError, match='Could not find model ".*model/ghost"'):
        client.create_endpoint_config(EndpointConfigName="c2", ProductionVariants=[{**variant, "ModelName": "ghost"}])
    config = client.describe_endpoint_config(EndpointConfigName="c1")
    assert_valid_output("DescribeEndpointConfig", config)
    assert config["ProductionVariants"] == [variant] and config["DataCaptureConfig"] == capture

    with pytest.raises(ClientError) as info:
        client.describe_endpoint(EndpointName="imgclf-endpoint")
    assert info.value.response["Error"]["Message"] == (
        'Could not find endpoint "arn:aws:sagemaker:us-east-1:000000000000:endpoint/imgclf-endpoint".')
    with pytest.raises(ClientError, match="Could not find endpoint configuration"):
        client.create_endpoint(EndpointName="e1", EndpointConfigName="missing")
    with pytest.raises(ClientError, match="Could not find endpoint"):
        client.update_endpoint(EndpointName="e1", EndpointConfigName="c1")
    with pytest.raises(ClientError, match="Could not find endpoint"):
        client.delete_endpoint(EndpointName="e1")
    listed = client.list_endpoints()
    assert_valid_output("ListEndpoints", listed)
    assert listed["Endpoints"] == []

    assert client.list_tags(ResourceArn=created["ModelArn"])["Tags"] == tags
    more = [{"Key": f"k{i:02d}", "Value": str(i)} for i in range(50)]
    client.add_tags(ResourceArn=created["ModelArn"], Tags=more)
    page = client.list_tags(ResourceArn=created["ModelArn"], MaxResults=50)  # the API's minimum page size
    assert_valid_output("ListTags", page)
    rest = client.list_tags(ResourceArn=created["ModelArn"], NextToken=page["NextToken"])
    assert len(page["Tags"]) == 50 and "NextToken" not in rest
    assert page["Tags"] + rest["Tags"] == sorted(more + tags, key=lambda t: t["Key"])
    with pytest.raises(ClientError, match="does not exist"):
        client.add_tags(ResourceArn="arn:aws:sagemaker:us-east-1:000000000000:model/ghost", Tags=tags)

    client.delete_endpoint_config(EndpointConfigName="c1")
    client.delete_model(ModelName="m1")
    with pytest.raises(ClientError, match="Could not find model"):
        client.delete_model(ModelName="m1")


def test_client_token_makes_create_model_package_idempotent():
    shape = registry.operation_model("CreateModelPackage")
    assert shape.input_shape.members["ClientToken"].metadata["idempotencyToken"] is True
    assert "ConflictException" in {error.name for error in shape.error_shapes}
    token = "5f0d9a36-0c1e-5b7a-9f51-1d2c3b4a5e6f"
    request = register_request(ClientToken=token)
    first = registry.create_model_package(request)
    assert registry.create_model_package(json.loads(json.dumps(request))) == first  # a retry: same package
    assert [p.version for p in registry.list_packages()] == [1]
    assert registry.package_for_token(token) == first["ModelPackageArn"]
    with pytest.raises(registry.IdempotentParameterMismatch, match=r"ClientToken .* different CreateModelPackage"):
        registry.create_model_package(register_request(description="another model", ClientToken=token))
    assert [p.version for p in registry.list_packages()] == [1]

    execution = "arn:aws:sagemaker:us-east-1:000000000000:pipeline/p/execution/abc123"
    derived = registry.client_token(execution, "RegisterModel")
    assert derived == registry.client_token(execution, "RegisterModel") != registry.client_token(execution, "Other")
    assert re.fullmatch(r"[a-zA-Z0-9-]{1,36}", derived)  # the shape's pattern and length
    assert registry.create_model_package(register_request(ClientToken=derived)) != first
    assert registry.create_model_package(register_request()) != first  # no token: no idempotency
    assert [p.version for p in registry.list_packages()] == [1, 2, 3]

    client = SageMakerBackend()
    assert client.create_model_package(**request)["ModelPackageArn"] == first["ModelPackageArn"]
    with pytest.raises(ClientError, match="IdempotentParameterMismatch") as info:
        client.create_model_package(**register_request(description="another model", ClientToken=token))
    assert info.value.response["Error"]["Code"] == "ConflictException"
    assert len(registry.list_packages()) == 3


def test_failed_endpoint_allows_only_delete():
    client = SageMakerBackend()
    client.create_model_package_group(ModelPackageGroupName=GROUP)
    package_arn = client.create_model_package(**register_request())["ModelPackageArn"]  # its model data is missing
    client.create_model(ModelName="m1", PrimaryContainer={"ModelPackageName": package_arn},
                        ExecutionRoleArn="arn:aws:iam::000000000000:role/MLOpsLocalExecutionRole")
    client.create_endpoint_config(EndpointConfigName="c1", ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": "m1", "InstanceType": "ml.m5.large", "InitialInstanceCount": 1}])
    client.create_endpoint(EndpointName="e1", EndpointConfigName="c1")

    described = client.describe_endpoint(EndpointName="e1")
    assert described["EndpointStatus"] == "Failed" and "not found in the local artifact store" in \
        described["FailureReason"]
    assert_valid_output("DescribeEndpoint", described)
    with pytest.raises(ClientError, match='Cannot update failed endpoint ".*endpoint/e1"'):
        client.update_endpoint(EndpointName="e1", EndpointConfigName="c1")
    client.delete_endpoint(EndpointName="e1")
    assert client.list_endpoints()["Endpoints"] == []
