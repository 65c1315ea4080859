"""The model steps: Model (``CreateModel``; ModelStep ``model.create()`` and CreateModelStep) and RegisterModel
(``CreateModelPackage``; ModelStep ``model.register()`` and RegisterModel). Both go through the local SageMaker API,
as SageMaker Pipelines calls its own API, so the model or package they make is what ``DescribeModel``,
``CreateEndpointConfig``, a TransformStep and the registry see."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipelines.local.engine.steps.base import StepFailed, StepKind, StepRun, local_client


class Model(StepKind):
    """``Arguments`` is a CreateModel request without ``ModelName``: the step names the model (as SageMaker does,
    from the execution and the step) and its properties are DescribeModel's answer (``Steps.X.ModelName``)."""

    type_name = "Model"

    def run(self, run: StepRun) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        arguments = run.resolve()
        name = run.job_name()
        request = {**arguments, "ModelName": name}
        run.record_arguments(request)
        sagemaker = local_client("sagemaker")
        try:
            sagemaker.create_model(**request)
        except ClientError as exc:
            if "already exists" not in str(exc):  # an attempt that died after the call made it: the same model
                raise StepFailed(f"CreateModel failed: {exc}") from exc
        except Exception as exc:  # botocore ParamValidationError
            raise StepFailed(f"CreateModel failed: {exc}") from exc
        described = dict(sagemaker.describe_model(ModelName=name))
        described.pop("ResponseMetadata", None)
        run.log(f"created model {name} ({described.get('ModelArn')})")
        return described

    def detail(self, properties: Mapping[str, Any]) -> str:
        return str(properties.get("ModelName") or "")

    def metadata(self, properties: Mapping[str, Any], spec: Mapping[str, Any], status: str,
                 failure_reason: str | None, job_arn: str | None) -> dict[str, Any]:
        return {"Model": {"Arn": properties["ModelArn"]}} if properties.get("ModelArn") else {}


class RegisterModel(StepKind):
    type_name = "RegisterModel"

    def run(self, run: StepRun) -> dict[str, Any]:
        from pipelines.local.storage import registry

        # The request carries the step's identity (execution ARN + step name) as CreateModelPackage's idempotency
        # token, recorded with the arguments before the call: an attempt that dies after the registry's commit is
        # retried with the same token and gets the same package back instead of registering the artifact again.
        token = registry.client_token(run.execution["arn"], run.step.name)
        request = {**run.resolve(), "ClientToken": token}
        run.record_arguments(request)
        earlier = registry.package_for_token(token)
        try:  # through the SageMaker API, as on AWS: the service emits the package's state-change event
            sagemaker = local_client("sagemaker")
            _ensure_package_group(sagemaker, request.get("ModelPackageGroupName"))
            created = sagemaker.create_model_package(**request)
        except Exception as exc:  # botocore ParamValidationError, ClientError (IdempotentParameterMismatch too)
            raise StepFailed(f"CreateModelPackage failed: {exc}") from exc
        described = registry.get_package(created["ModelPackageArn"]).describe()
        how = "reused (an earlier attempt registered it)" if earlier else "registered"
        run.log(f"{how} {created['ModelPackageArn']} ({described.get('ModelApprovalStatus')}), ClientToken {token}")
        return {**described, "ModelPackageArn": created["ModelPackageArn"]}

    def detail(self, properties: Mapping[str, Any]) -> str:
        return f"{properties.get('ModelPackageArn')} ({properties.get('ModelApprovalStatus')})"

    def metadata(self, properties: Mapping[str, Any], spec: Mapping[str, Any], status: str,
                 failure_reason: str | None, job_arn: str | None) -> dict[str, Any]:
        arn = properties.get("ModelPackageArn")
        return {"RegisterModel": {"Arn": arn}} if arn else {}


def _ensure_package_group(sagemaker: Any, group: str | None) -> None:
    """SageMaker Pipelines' RegisterModel step creates its model package group when it does not exist yet."""
    from botocore.exceptions import ClientError

    if not group or group.startswith("arn:"):
        return
    try:
        sagemaker.describe_model_package_group(ModelPackageGroupName=group)
    except ClientError:
        try:
            sagemaker.create_model_package_group(ModelPackageGroupName=group)
        except ClientError as exc:  # created concurrently by another step: fine
            if "already exists" not in str(exc):
                raise
