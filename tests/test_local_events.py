"""The local EventBridge service (pipelines/local/api/events.py) driven by boto3's real ``events`` client pointed at
the service with ``AWS_ENDPOINT_URL``: rules, targets, TestEventPattern over the content-filtering rules, and
PutEvents delivered to a Lambda target (a function created with boto3's ``lambda`` client that writes the event it
gets to S3). The pattern matcher is also tested on its own, with the same table."""

from __future__ import annotations

import datetime
import io
import json
import time
import uuid
import zipfile
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from cfnlint.decode import decode

from pipelines import arns
from pipelines.local.api import events
from pipelines.local.storage.store import LOCAL_ACCOUNT, LOCAL_REGION, LOCAL_ROLE_ARN

pytestmark = pytest.mark.fast

TEMPLATE = Path(__file__).resolve().parents[1] / "infra" / "template.yaml"

EVENT = {
    "version": "0", "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
    "detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2", "account": LOCAL_ACCOUNT,
    "time": "2024-05-01T12:00:00Z", "region": LOCAL_REGION,
    "resources": [f"arn:aws:ec2:{LOCAL_REGION}:{LOCAL_ACCOUNT}:instance/i-0123456789"],
    "detail": {
        "instance-id": "i-0123456789", "state": "running", "c-count": 5, "d-count": 3.5, "source-ip": "10.0.0.123",
        "tags": ["blue", "green"], "nested": {"deep": {"value": "Hello"}}, "flag": True, "nothing": None,
        "items": [{"name": "x", "size": 1}, {"name": "y", "size": 2}], "filename": "image.png",
    },
}

#: (pattern, does EVENT match it)
PATTERNS = [
    ({"source": ["aws.ec2"]}, True),
    ({"source": ["aws.s3"]}, False),
    ({"source": ["aws.s3", "aws.ec2"]}, True),
    ({"source": ["aws.ec2"], "detail-type": ["Something else"]}, False),
    ({"detail": {"state": ["running"]}}, True),
    ({"detail": {"nested": {"deep": {"value": ["Hello"]}}}}, True),
    ({"detail": {"nested": {"deep": {"value": ["hello"]}}}}, False),
    ({"detail": {"c-count": [5]}}, True),
    ({"detail": {"c-count": [5.0]}}, True),
    ({"detail": {"c-count": ["5"]}}, False),
    ({"detail": {"flag": [True]}}, True),
    ({"detail": {"flag": [1]}}, False),
    ({"detail": {"nothing": [None]}}, True),
    ({"detail": {"tags": ["green"]}}, True),
    ({"detail": {"tags": ["red"]}}, False),
    ({"detail": {"items": {"name": ["y"]}}}, True),
    ({"detail": {"items": {"name": ["z"]}}}, False),
    ({"detail": {"instance-id": [{"prefix": "i-01"}]}}, True),
    ({"detail": {"instance-id": [{"prefix": "i-99"}]}}, False),
    ({"detail": {"instance-id": [{"prefix": {"equals-ignore-case": "I-01"}}]}}, True),
    ({"resources": [{"prefix": "arn:aws:ec2:"}]}, True),
    ({"detail": {"filename": [{"suffix": ".png"}]}}, True),
    ({"detail": {"filename": [{"suffix": ".jpg"}]}}, False),
    ({"detail": {"filename": [{"suffix": {"equals-ignore-case": ".PNG"}}]}}, True),
    ({"detail": {"state": [{"anything-but": "stopped"}]}}, True),
    ({"detail": {"state": [{"anything-but": "running"}]}}, False),
    ({"detail": {"state": [{"anything-but": ["pending", "running"]}]}}, False),
    ({"detail": {"c-count": [{"anything-but": [1, 2, 3]}]}}, True),
    ({"detail": {"instance-id": [{"anything-but": {"prefix": "i-"}}]}}, False),
    ({"detail": {"instance-id": [{"anything-but": {"prefix": "sg-"}}]}}, True),
    ({"detail": {"filename": [{"anything-but": {"suffix": ".png"}}]}}, False),
    ({"detail": {"state": [{"anything-but": {"equals-ignore-case": "RUNNING"}}]}}, False),
    ({"detail": {"missing": [{"anything-but": "x"}]}}, False),
    ({"detail": {"c-count": [{"numeric": [">", 0, "<=", 5]}]}}, True),
    ({"detail": {"c-count": [{"numeric": [">", 5]}]}}, False),
    ({"detail": {"d-count": [{"numeric": ["=", 3.5]}]}}, True),
    ({"detail": {"d-count": [{"numeric": [">=", 3.6]}]}}, False),
    ({"detail": {"state": [{"numeric": [">", 0]}]}}, False),
    ({"detail": {"state": [{"exists": True}]}}, True),
    ({"detail": {"missing": [{"exists": True}]}}, False),
    ({"detail": {"missing": [{"exists": False}]}}, True),
    ({"detail": {"state": [{"exists": False}]}}, False),
    ({"detail": {"nested": [{"exists": True}]}}, False),  # exists matches leaf fields only
    ({"detail": {"state": [{"equals-ignore-case": "RUNNING"}]}}, True),
    ({"detail": {"state": [{"equals-ignore-case": "stopped"}]}}, False),
    ({"detail": {"filename": [{"wildcard": "im*.png"}]}}, True),
    ({"detail": {"filename": [{"wildcard": "*.jpg"}]}}, False),
    ({"detail": {"source-ip": [{"cidr": "10.0.0.0/24"}]}}, True),
    ({"detail": {"source-ip": [{"cidr": "10.0.1.0/24"}]}}, False),
    ({"source": ["aws.ec2"], "$or": [{"detail-type": ["nope"]}, {"detail": {"c-count": [5]}}]}, True),
    ({"$or": [{"source": ["aws.s3"]}, {"detail": {"state": ["stopped"]}}]}, False),
    ({"detail": {"$or": [{"state": ["stopped"]}, {"flag": [True]}]}}, True),
    ({"detail": {"state": ["stopped", {"prefix": "run"}]}}, True),
]

INVALID_PATTERNS = [
    "not json",
    '["aws.ec2"]',
    "{}",
    '{"source": "aws.ec2"}',
    '{"source": [{"no-such-operator": "x"}]}',
    '{"detail": {"c": [{"numeric": [">", "zero"]}]}}',
    '{"detail": {"c": [{"numeric": ["~", 1]}]}}',
    '{"detail": {"c": [{"exists": "yes"}]}}',
    '{"detail": {"c": [{"prefix": 1}]}}',
    '{"detail": {"c": [{"cidr": "not-a-network"}]}}',
    '{"detail": {"c": [{"wildcard": "a**b"}]}}',
    '{"$or": []}',
]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return excinfo.value.response["Error"]["Code"]


@pytest.fixture
def eb(local_aws_env):
    return boto3.client("events")


# ------------------------------------------------------------------------------------------------- pure matcher


@pytest.mark.parametrize(("pattern", "expected"), PATTERNS, ids=[json.dumps(p)[:60] for p, _ in PATTERNS])
def test_matches_table(pattern, expected):
    events.check_pattern(pattern)
    assert events.matches(pattern, EVENT) is expected


@pytest.mark.parametrize("text", INVALID_PATTERNS)
def test_invalid_patterns_are_refused(text):
    with pytest.raises(events.InvalidPattern):
        events.parse_pattern(text)


def test_target_input_forms():
    rule = "r"
    assert events.target_input({"Id": "t", "Arn": "a"}, EVENT, rule) == json.dumps(EVENT).encode()
    assert events.target_input({"Id": "t", "Arn": "a", "Input": '{"k": 1}'}, EVENT, rule) == b'{"k": 1}'
    assert json.loads(events.target_input({"Id": "t", "Arn": "a", "InputPath": "$.detail.nested"}, EVENT, rule)) \
        == EVENT["detail"]["nested"]
    assert json.loads(events.target_input({"Id": "t", "Arn": "a", "InputPath": "$.detail.tags[1]"}, EVENT, rule)) \
        == "green"
    transformer = {"InputPathsMap": {"state": "$.detail.state", "count": "$.detail.c-count"},
                   "InputTemplate": '{"state": <state>, "count": <count>, "text": "is <state>", "rule": '
                                    '"<aws.events.rule-name>"}'}
    rendered = events.target_input({"Id": "t", "Arn": "a", "InputTransformer": transformer}, EVENT, rule)
    assert json.loads(rendered) == {"state": "running", "count": 5, "text": "is running", "rule": "r"}


def test_model_package_state_change_event_shape():
    arn = arns.sagemaker_arn(LOCAL_REGION, LOCAL_ACCOUNT, "model-package", "Group/3")
    created = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)
    described = {"ModelPackageName": "Group", "ModelPackageGroupName": "Group", "ModelPackageVersion": 3,
                 "ModelPackageArn": arn, "CreationTime": created, "ModelPackageStatus": "Completed",
                 "ModelApprovalStatus": "Approved", "ResponseMetadata": {"HTTPStatusCode": 200}}
    event = events.model_package_state_change_event(described, account=LOCAL_ACCOUNT, region=LOCAL_REGION)
    assert (event["source"], event["detail-type"], event["resources"]) == (
        "aws.sagemaker", "SageMaker Model Package State Change", [arn])
    assert (event["account"], event["region"], event["version"]) == (LOCAL_ACCOUNT, LOCAL_REGION, "0")
    assert event["detail"]["CreationTime"] == int(created.timestamp() * 1000)
    assert "ResponseMetadata" not in event["detail"]
    assert event["detail"]["ModelApprovalStatus"] == "Approved"
    json.dumps(event)


# ------------------------------------------------------------------------------------------------ via the client


def test_test_event_pattern_via_client(eb):
    results = [eb.test_event_pattern(EventPattern=json.dumps(p), Event=json.dumps(EVENT))["Result"]
               for p, _ in PATTERNS]
    assert results == [expected for _, expected in PATTERNS]


def test_invalid_pattern_errors(eb):
    for text in ("not json", '{"source": "aws.ec2"}', '{"source": [{"no-such-operator": 1}]}'):
        with pytest.raises(ClientError) as excinfo:
            eb.test_event_pattern(EventPattern=text, Event=json.dumps(EVENT))
        assert error_code(excinfo) == "InvalidEventPatternException"
        with pytest.raises(ClientError) as excinfo:
            eb.put_rule(Name=unique("bad"), EventPattern=text)
        assert error_code(excinfo) == "InvalidEventPatternException"
    with pytest.raises(ClientError) as excinfo:
        eb.test_event_pattern(EventPattern='{"source": ["x"]}', Event='{"source": "x"}')
    assert error_code(excinfo) == "ValidationException"


def test_rule_crud_and_paginator(eb):
    prefix = unique("crud")
    names = [f"{prefix}-{i}" for i in range(5)]
    pattern = json.dumps({"source": ["aws.sagemaker"]})
    for name in names:
        arn = eb.put_rule(Name=name, EventPattern=pattern, Description="d")["RuleArn"]
        assert arn == arns.arn("events", LOCAL_REGION, LOCAL_ACCOUNT, f"rule/{name}")
    described = eb.describe_rule(Name=names[0])
    assert (described["Name"], described["EventPattern"], described["State"], described["EventBusName"],
            described["Description"]) == (names[0], pattern, "ENABLED", "default", "d")

    pages = list(eb.get_paginator("list_rules").paginate(NamePrefix=prefix, PaginationConfig={"PageSize": 2}))
    assert len(pages) == 3
    assert [rule["Name"] for page in pages for rule in page["Rules"]] == names
    assert eb.list_rules(NamePrefix=unique("none"))["Rules"] == []

    eb.disable_rule(Name=names[1])
    assert eb.describe_rule(Name=names[1])["State"] == "DISABLED"
    eb.enable_rule(Name=names[1])
    assert eb.describe_rule(Name=names[1])["State"] == "ENABLED"

    eb.put_rule(Name=names[2], ScheduleExpression="rate(5 minutes)", State="DISABLED")  # replaces the rule
    replaced = eb.describe_rule(Name=names[2])
    assert (replaced["ScheduleExpression"], replaced["State"]) == ("rate(5 minutes)", "DISABLED")
    assert "EventPattern" not in replaced and "Description" not in replaced

    for name in names:
        eb.delete_rule(Name=name)
    eb.delete_rule(Name=names[0])  # gone already: no error, as on AWS
    with pytest.raises(ClientError) as excinfo:
        eb.describe_rule(Name=names[0])
    assert error_code(excinfo) == "ResourceNotFoundException"
    with pytest.raises(ClientError) as excinfo:
        eb.enable_rule(Name=names[0])
    assert error_code(excinfo) == "ResourceNotFoundException"


def test_put_rule_validation(eb):
    with pytest.raises(ClientError) as excinfo:
        eb.put_rule(Name=unique("empty"))
    assert error_code(excinfo) == "ValidationException"
    with pytest.raises(ClientError) as excinfo:
        eb.put_rule(Name=unique("sched"), ScheduleExpression="every tuesday")
    assert error_code(excinfo) == "ValidationException"
    with pytest.raises(ClientError) as excinfo:
        eb.put_rule(Name="bad name!", EventPattern='{"source": ["x"]}')
    assert error_code(excinfo) == "ValidationException"


def test_targets_crud_and_delete_rule_refused(eb):
    rule = unique("targets")
    eb.put_rule(Name=rule, EventPattern=json.dumps({"source": ["aws.sagemaker"]}))
    fn = arns.lambda_function_arn(LOCAL_REGION, LOCAL_ACCOUNT, "some-function")
    answer = eb.put_targets(Rule=rule, Targets=[{"Id": "a", "Arn": fn},
                                                {"Id": "b", "Arn": fn, "InputPath": "$.detail"}])
    assert answer["FailedEntryCount"] == 0
    eb.put_targets(Rule=rule, Targets=[{"Id": "a", "Arn": fn, "Input": '{"constant": true}'}])  # replaced by Id
    pages = list(eb.get_paginator("list_targets_by_rule").paginate(Rule=rule, PaginationConfig={"PageSize": 1}))
    targets = [target for page in pages for target in page["Targets"]]
    assert [(t["Id"], t.get("Input"), t.get("InputPath")) for t in targets] == [
        ("a", '{"constant": true}', None), ("b", None, "$.detail")]

    with pytest.raises(ClientError) as excinfo:
        eb.delete_rule(Name=rule)
    assert error_code(excinfo) == "ValidationException"
    assert "targets" in excinfo.value.response["Error"]["Message"]

    with pytest.raises(ClientError) as excinfo:
        eb.put_targets(Rule=rule, Targets=[{"Id": "c", "Arn": fn, "Input": "{}", "InputPath": "$"}])
    assert error_code(excinfo) == "ValidationException"
    with pytest.raises(ClientError) as excinfo:
        eb.put_targets(Rule=rule, Targets=[{"Id": f"t{i}", "Arn": fn} for i in range(4)])
    assert error_code(excinfo) == "LimitExceededException"
    with pytest.raises(ClientError) as excinfo:
        eb.put_targets(Rule=unique("missing"), Targets=[{"Id": "a", "Arn": fn}])
    assert error_code(excinfo) == "ResourceNotFoundException"

    assert eb.remove_targets(Rule=rule, Ids=["a", "b", "never-there"])["FailedEntryCount"] == 0
    assert eb.list_targets_by_rule(Rule=rule)["Targets"] == []
    eb.delete_rule(Name=rule)


def test_unknown_bus_and_operation(eb):
    with pytest.raises(ClientError) as excinfo:
        eb.list_rules(EventBusName="custom-bus")
    assert error_code(excinfo) == "ResourceNotFoundException"
    with pytest.raises(ClientError) as excinfo:
        eb.put_rule(Name=unique("bus"), EventPattern='{"source": ["x"]}', EventBusName="custom-bus")
    assert error_code(excinfo) == "ResourceNotFoundException"
    default_arn = arns.arn("events", LOCAL_REGION, LOCAL_ACCOUNT, "event-bus/default")
    assert "Rules" in eb.list_rules(EventBusName=default_arn)
    with pytest.raises(ClientError) as excinfo:
        eb.create_event_bus(Name="custom-bus")
    assert error_code(excinfo) == "UnknownOperationException"


def test_put_events_entries(eb):
    answer = eb.put_events(Entries=[
        {"Source": "my.app", "DetailType": "Thing Happened", "Detail": json.dumps({"n": 1})},
        {"Source": "my.app", "DetailType": "Thing Happened", "Detail": "not json"},
        {"Source": "my.app", "DetailType": "Thing Happened", "Detail": "{}", "EventBusName": "custom-bus"},
    ])
    assert answer["FailedEntryCount"] == 2
    first, malformed, other_bus = answer["Entries"]
    assert uuid.UUID(first["EventId"]) and "ErrorCode" not in first
    assert malformed["ErrorCode"] == "MalformedDetail" and "EventId" not in malformed
    assert other_bus["ErrorCode"] == "ResourceNotFoundException"


# ------------------------------------------------------------------------------------------------------ delivery


HANDLER = '''
import json

import boto3


def main(event, context):
    boto3.client("s3").put_object(Bucket={bucket!r}, Key="events/" + event["id"] + ".json", Body=json.dumps(event))
    return {{"ok": True}}
'''


def approval_pattern(group: str) -> dict:
    """infra/template.yaml's ModelApprovalRule pattern, with its ``!Ref ModelPackageGroupName`` set to ``group``."""
    parsed, problems = decode(str(TEMPLATE))
    assert not problems, [str(p) for p in problems]
    pattern = json.loads(json.dumps(parsed["Resources"]["ModelApprovalRule"]["Properties"]["EventPattern"]))
    assert pattern["detail"]["ModelPackageGroupName"] == [{"Ref": "ModelPackageGroupName"}]
    pattern["detail"]["ModelPackageGroupName"] = [group]
    return pattern


def _zip(source: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("handler.py", source)
    return buffer.getvalue()


def _state_change(group: str, status: str) -> dict:
    arn = arns.sagemaker_arn(LOCAL_REGION, LOCAL_ACCOUNT, "model-package", f"{group}/1")
    described = {"ModelPackageName": group, "ModelPackageGroupName": group, "ModelPackageVersion": 1,
                 "ModelPackageArn": arn, "CreationTime": datetime.datetime.now(datetime.UTC),
                 "ModelPackageStatus": "Completed", "ModelApprovalStatus": status}
    return events.model_package_state_change_event(described, account=LOCAL_ACCOUNT, region=LOCAL_REGION)


def _put(eb, event: dict) -> str:
    answer = eb.put_events(Entries=[{"Source": event["source"], "DetailType": event["detail-type"],
                                     "Resources": event["resources"], "Detail": json.dumps(event["detail"])}])
    assert answer["FailedEntryCount"] == 0, answer
    return answer["Entries"][0]["EventId"]


def _object(s3, bucket: str, key: str, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("NoSuchKey", "404"):
                raise
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)


def test_approval_event_is_delivered_to_the_lambda_target(eb, local_aws_env):
    url, _ = local_aws_env
    s3, lam = boto3.client("s3"), boto3.client("lambda")
    bucket, group, function = unique("events-sink"), unique("Models"), unique("sink")
    s3.create_bucket(Bucket=bucket)
    function_arn = lam.create_function(FunctionName=function, Runtime="python3.11", Role=LOCAL_ROLE_ARN,
                                       Handler="handler.main",
                                       Code={"ZipFile": _zip(HANDLER.format(bucket=bucket))})["FunctionArn"]
    rule = unique("model-approval")
    eb.put_rule(Name=rule, EventPattern=json.dumps(approval_pattern(group)), State="ENABLED")
    eb.put_targets(Rule=rule, Targets=[{"Id": "deploy-approved-model", "Arn": function_arn}])

    event_id = _put(eb, _state_change(group, "Approved"))
    delivered = _object(s3, bucket, f"events/{event_id}.json", timeout=30)
    assert delivered is not None, "the approval event did not reach the Lambda target within 30 s"
    assert (delivered["source"], delivered["detail-type"]) == ("aws.sagemaker", "SageMaker Model Package State Change")
    assert delivered["detail"]["ModelApprovalStatus"] == "Approved"
    assert delivered["detail"]["ModelPackageGroupName"] == group

    pending = _state_change(group, "PendingManualApproval")
    assert events.emit(pending, service_url=url) == []  # matches no rule: nothing is invoked
    pending_id = _put(eb, pending)
    assert _object(s3, bucket, f"events/{pending_id}.json", timeout=5) is None

    eb.remove_targets(Rule=rule, Ids=["deploy-approved-model"])
    eb.delete_rule(Name=rule)
