"""infra/template.yaml: cfn-lint clean, the approval rule matches real events, IAM stays least-privilege."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cfnlint.api import lint_file
from cfnlint.decode import decode
from moto.events.models import EventPattern

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "infra" / "template.yaml"
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def template() -> dict:
    parsed, matches = decode(str(TEMPLATE))
    assert not matches, [str(m) for m in matches]
    return parsed


def _resolve(node, parameters: dict):
    """Substitute ``Ref`` to parameters with their defaults (enough for the event pattern)."""
    if isinstance(node, dict):
        if set(node) == {"Ref"} and node["Ref"] in parameters:
            return parameters[node["Ref"]]["Default"]
        return {key: _resolve(value, parameters) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(item, parameters) for item in node]
    return node


def _statements(template: dict, role: str) -> list[dict]:
    return [statement
            for policy in template["Resources"][role]["Properties"]["Policies"]
            for statement in policy["PolicyDocument"]["Statement"]]


def test_cfn_lint_passes():
    matches = lint_file(TEMPLATE)
    assert not matches, "\n".join(str(m) for m in matches)


def _matches(pattern: dict, event: dict) -> bool:
    """EventBridge matching semantics as implemented by moto's events backend (its TestEventPattern API is a stub)."""
    return EventPattern.load(json.dumps(pattern)).matches_event(event)


def test_approval_rule_matches_approved_and_rejected_events_only(template):
    rule = template["Resources"]["ModelApprovalRule"]["Properties"]
    pattern = _resolve(rule["EventPattern"], template["Parameters"])
    sample = {status: json.loads((DATA / f"model_package_state_change_{status}.json").read_text())
              for status in ("approved", "rejected", "pending")}

    assert _matches(pattern, sample["approved"])
    assert _matches(pattern, sample["rejected"])
    assert not _matches(pattern, sample["pending"])
    other_group = json.loads(json.dumps(sample["approved"]))
    other_group["detail"]["ModelPackageGroupName"] = "SomeoneElsesModels"
    assert not _matches(pattern, other_group)
    assert rule["Targets"][0]["Arn"] == {"Fn::GetAtt": ["DeployFunction", "Arn"]}


def test_deploy_function_runs_this_repository_handler(template):
    function = template["Resources"]["DeployFunction"]["Properties"]
    assert function["Handler"] == "deploy.lambda_handler"
    assert (ROOT / "steps" / "deploy.py").read_text().count("def lambda_handler(") == 1
    variables = function["Environment"]["Variables"]
    assert variables["SAGEMAKER_EXECUTION_ROLE_ARN"] == {"Fn::GetAtt": ["SageMakerExecutionRole", "Arn"]}
    expected = {"ENDPOINT_NAME", "ENDPOINT_INSTANCE_TYPE", "ENDPOINT_INSTANCE_COUNT", "DATA_CAPTURE_S3_URI"}
    assert expected <= set(variables)
    permission = template["Resources"]["ModelApprovalRuleInvokePermission"]["Properties"]
    assert permission["Principal"] == "events.amazonaws.com"
    assert permission["SourceArn"] == {"Fn::GetAtt": ["ModelApprovalRule", "Arn"]}


def test_artifact_bucket_is_encrypted_versioned_private_and_tls_only(template):
    bucket = template["Resources"]["ArtifactBucket"]["Properties"]
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert bucket["VersioningConfiguration"]["Status"] == "Enabled"
    assert all(bucket["PublicAccessBlockConfiguration"][flag] is True for flag in
               ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"))
    [deny] = template["Resources"]["ArtifactBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert (deny["Effect"], deny["Action"]) == ("Deny", "s3:*")
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_deploy_lambda_role_is_scoped_to_the_project(template):
    statements = _statements(template, "DeployFunctionRole")
    actions = {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    # Exactly what steps/deploy.py calls (docs/CONTRACTS.md section 8), plus logs and PassRole.
    assert {a for a in actions if a.startswith("sagemaker:")} == {
        "sagemaker:ListModelPackages", "sagemaker:DescribeModelPackage", "sagemaker:CreateModel",
        "sagemaker:DescribeModel", "sagemaker:CreateEndpointConfig", "sagemaker:DescribeEndpointConfig",
        "sagemaker:CreateEndpoint", "sagemaker:UpdateEndpoint", "sagemaker:DescribeEndpoint",
        "sagemaker:DeleteEndpoint", "sagemaker:AddTags", "sagemaker:ListTags"}
    assert not any(a.endswith("*") for a in actions)
    for statement in statements:
        assert statement["Effect"] == "Allow"
        if statement["Resource"] == "*":
            assert statement["Action"] == "sagemaker:ListModelPackages"  # no resource-level permissions exist
    [pass_role] = [s for s in statements if s["Action"] == "iam:PassRole"]
    assert pass_role["Resource"] == {"Fn::GetAtt": ["SageMakerExecutionRole", "Arn"]}
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}
    scoped = json.dumps([s["Resource"] for s in statements if s["Resource"] != "*"])
    assert "${EndpointName}" in scoped and "${ModelPackageGroupName}" in scoped


def test_no_role_gets_admin_or_wildcard_actions(template):
    for name, resource in template["Resources"].items():
        if resource["Type"] != "AWS::IAM::Role":
            continue
        assert "ManagedPolicyArns" not in resource["Properties"], name
        for statement in _statements(template, name):
            actions = [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
            assert not any(a == "*" or a.endswith(":*") for a in actions), (name, actions)
            if "iam:PassRole" in actions:
                assert statement["Condition"]["StringEquals"]["iam:PassedToService"] == "sagemaker.amazonaws.com"


def test_cicd_runs_buildspec_on_push_to_the_branch(template):
    resources = template["Resources"]
    assert resources["BuildProject"]["Properties"]["Source"] == {"Type": "CODEPIPELINE", "BuildSpec": "buildspec.yml"}
    pipeline = resources["CiCdPipeline"]["Properties"]
    source = pipeline["Stages"][0]["Actions"][0]
    assert source["ActionTypeId"]["Provider"] == "CodeStarSourceConnection"
    assert source["Configuration"]["BranchName"] == {"Ref": "BranchName"}
    assert pipeline["Triggers"][0]["GitConfiguration"]["Push"][0]["Branches"]["Includes"] == [{"Ref": "BranchName"}]
    assert template["Parameters"]["BranchName"]["Default"] == "main"
    assert resources["ModelPackageGroup"]["Properties"]["ModelPackageGroupName"] == {"Ref": "ModelPackageGroupName"}
