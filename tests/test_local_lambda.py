"""The local Lambda service (pipelines/local/api/lambda_.py) driven by real clients: boto3's Lambda client (and its
paginator), the SageMaker SDK's ``sagemaker.lambda_helper.Lambda``, and handlers that themselves call the local S3
service with boto3. One service process per module under a temporary MLOPS_HOME; each test uses functions (and
buckets) of its own."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import uuid
import zipfile
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ParamValidationError

from pipelines import arns
from pipelines.local.storage.store import LOCAL_ACCOUNT, LOCAL_REGION, LOCAL_ROLE_ARN

pytestmark = pytest.mark.fast

ECHO = """
def handler(event, context):
    return {"echo": event, "name": context.function_name, "arn": context.invoked_function_arn,
            "request_id": context.aws_request_id, "memory": context.memory_limit_in_mb,
            "remaining": context.get_remaining_time_in_millis()}
"""


def make_zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buffer.getvalue()


def function_name() -> str:
    return f"fn-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def aws(local_aws_env):
    return boto3.client("lambda")


@pytest.fixture
def s3(local_aws_env):
    return boto3.client("s3")


@pytest.fixture
def bucket(s3):
    name = f"lambda-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def create(aws, code: str | bytes, name: str | None = None, handler: str = "app.handler", **extra):
    zipped = code if isinstance(code, bytes) else make_zip({"app.py": code})
    return aws.create_function(FunctionName=name or function_name(), Runtime="python3.12", Role=LOCAL_ROLE_ARN,
                               Handler=handler, Code={"ZipFile": zipped}, **extra)


def call(aws, name: str, event=None, **extra):
    response = aws.invoke(FunctionName=name, Payload=json.dumps(event if event is not None else {}), **extra)
    return response, json.loads(response["Payload"].read())


def error_of(excinfo: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    response = excinfo.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


# ----------------------------------------------------------------------------------------------------- functions


def test_create_get_list_update_delete(local_aws_env, aws):
    _, home = local_aws_env
    code = make_zip({"app.py": ECHO})
    name = function_name()
    created = create(aws, code, name, Environment={"Variables": {"GREETING": "hi"}}, Timeout=7, MemorySize=256)
    assert created["ResponseMetadata"]["HTTPStatusCode"] == 201
    assert created["FunctionArn"] == arns.lambda_function_arn(LOCAL_REGION, LOCAL_ACCOUNT, name)
    assert created["CodeSha256"] == base64.b64encode(hashlib.sha256(code).digest()).decode()
    assert created["CodeSize"] == len(code)
    assert (created["Version"], created["State"], created["LastUpdateStatus"], created["PackageType"]) == (
        "$LATEST", "Active", "Successful", "Zip")
    assert (created["Timeout"], created["MemorySize"], created["Runtime"], created["Handler"]) == (
        7, 256, "python3.12", "app.handler")
    assert created["Environment"]["Variables"] == {"GREETING": "hi"}
    assert created["Architectures"] == ["x86_64"]
    time.strptime(created["LastModified"], "%Y-%m-%dT%H:%M:%S.%f+0000")
    sha_hex = hashlib.sha256(code).hexdigest()
    assert (home / "lambda" / name / sha_hex / "app.py").read_text() == ECHO
    assert json.loads((home / "lambda" / name / "function.json").read_text())["Configuration"]["FunctionName"] == name

    got = aws.get_function(FunctionName=name)
    assert got["Configuration"]["CodeSha256"] == created["CodeSha256"]
    assert got["Code"]["RepositoryType"] == "S3"
    assert aws.get_function_configuration(FunctionName=created["FunctionArn"])["FunctionName"] == name
    assert aws.get_function_configuration(FunctionName=f"{LOCAL_ACCOUNT}:function:{name}")["FunctionName"] == name
    assert aws.get_function_configuration(FunctionName=f"{name}:$LATEST")["FunctionName"] == name
    aws.get_waiter("function_active_v2").wait(FunctionName=name)

    new_code = make_zip({"app.py": ECHO + "\n# v2\n"})
    updated = aws.update_function_code(FunctionName=name, ZipFile=new_code)
    assert updated["CodeSha256"] == base64.b64encode(hashlib.sha256(new_code).digest()).decode()
    assert updated["RevisionId"] != created["RevisionId"]
    configured = aws.update_function_configuration(FunctionName=name, Timeout=11, Environment={"Variables": {}},
                                                   Description="second")
    assert (configured["Timeout"], configured["Description"], configured["CodeSha256"]) == (
        11, "second", updated["CodeSha256"])
    assert "Environment" not in configured
    aws.get_waiter("function_updated_v2").wait(FunctionName=name)

    deleted = aws.delete_function(FunctionName=name)
    assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 204
    assert not (home / "lambda" / name).exists()
    with pytest.raises(ClientError) as excinfo:
        aws.get_function(FunctionName=name)
    assert error_of(excinfo) == ("ResourceNotFoundException", 404)


def test_list_functions_pages_with_the_paginator(aws):
    names = sorted(f"ls-{uuid.uuid4().hex[:8]}-{i}" for i in range(3))
    for name in names:
        create(aws, ECHO, name)
    pages = list(aws.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 1}))
    listed = [f["FunctionName"] for page in pages for f in page["Functions"]]
    assert all(len(page["Functions"]) <= 1 for page in pages)
    assert [n for n in listed if n in names] == names
    assert len(listed) == len(set(listed))
    first = aws.list_functions(MaxItems=1)
    assert len(first["Functions"]) == 1 and first["NextMarker"]
    with pytest.raises(ClientError) as excinfo:
        aws.list_functions(Marker="not-a-marker")
    assert error_of(excinfo) == ("InvalidParameterValueException", 400)


def test_duplicate_create_is_a_conflict(aws):
    name = create(aws, ECHO)["FunctionName"]
    with pytest.raises(ClientError) as excinfo:
        create(aws, ECHO, name)
    assert error_of(excinfo) == ("ResourceConflictException", 409)
    assert name in excinfo.value.response["Error"]["Message"]


def test_unknown_function_is_not_found(aws):
    for call_ in (lambda: aws.get_function(FunctionName="no-such-fn"),
                  lambda: aws.invoke(FunctionName="no-such-fn"),
                  lambda: aws.update_function_configuration(FunctionName="no-such-fn", Timeout=5),
                  lambda: aws.update_function_code(FunctionName="no-such-fn", ZipFile=make_zip({"a.py": ""})),
                  lambda: aws.delete_function(FunctionName="no-such-fn"),
                  lambda: aws.get_function(FunctionName=f"arn:aws:lambda:{LOCAL_REGION}:123456789012:function:x")):
        with pytest.raises(ClientError) as excinfo:
            call_()
        assert error_of(excinfo) == ("ResourceNotFoundException", 404)
    assert "Function not found: arn:aws:lambda:" in excinfo.value.response["Error"]["Message"]


def test_invalid_parameters(local_aws_env, aws):
    with pytest.raises(ParamValidationError):
        aws.create_function(FunctionName="x", Role=LOCAL_ROLE_ARN, Code={"ZipFile": b""}, Timeout="soon")
    unvalidated = boto3.client("lambda", config=Config(parameter_validation=False, retries={"max_attempts": 0}))
    with pytest.raises(ClientError) as excinfo:  # no Role, no Code: botocore's own report, from the server
        unvalidated.create_function(FunctionName=function_name(), Runtime="python3.12", Handler="app.handler")
    assert error_of(excinfo) == ("ValidationException", 400)
    assert "Missing required parameter" in excinfo.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as excinfo:  # the model's pattern, checked server-side as Lambda does
        create(aws, ECHO, name="bad name!")
    assert error_of(excinfo) == ("ValidationException", 400)
    assert "failed to satisfy constraint" in excinfo.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as excinfo:
        create(aws, b"this is not a zip")
    assert error_of(excinfo) == ("InvalidParameterValueException", 400)
    with pytest.raises(ClientError) as excinfo:
        create(aws, ECHO, Environment={"Variables": {"AWS_REGION": "eu-west-1"}})
    assert error_of(excinfo) == ("InvalidParameterValueException", 400)
    with pytest.raises(ClientError) as excinfo:
        aws.create_function(FunctionName=function_name(), Runtime="nodejs20.x", Role=LOCAL_ROLE_ARN,
                            Handler="index.handler", Code={"ZipFile": make_zip({"index.js": ""})})
    assert error_of(excinfo) == ("InvalidParameterValueException", 400)
    with pytest.raises(ClientError) as excinfo:  # an operation of the model that is not served locally
        aws.list_aliases(FunctionName="x")
    assert error_of(excinfo)[0] == "UnknownOperationException"


def test_unsafe_zip_is_refused_and_nothing_is_written(local_aws_env, aws, tmp_path):
    _, home = local_aws_env
    name = function_name()
    evil = make_zip({"app.py": ECHO, "../evil.py": "print('escaped')\n"})
    with pytest.raises(ClientError) as excinfo:
        create(aws, evil, name)
    assert error_of(excinfo) == ("InvalidParameterValueException", 400)
    assert "'../evil.py'" in excinfo.value.response["Error"]["Message"]
    assert not list(home.rglob("evil.py"))
    assert not (home / "lambda" / name).exists()
    assert not any((home / "lambda" / ".staging").iterdir())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        link = zipfile.ZipInfo("link.py")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(ClientError) as excinfo:
        create(aws, buffer.getvalue(), name)
    assert error_of(excinfo) == ("InvalidParameterValueException", 400)


def test_code_from_the_local_s3_store(aws, s3, bucket):
    code = make_zip({"pkg/__init__.py": "", "pkg/app.py": ECHO})
    s3.put_object(Bucket=bucket, Key="code/fn.zip", Body=code)
    name = function_name()
    created = aws.create_function(FunctionName=name, Runtime="python3.12", Role=LOCAL_ROLE_ARN,
                                  Handler="pkg/app.handler", Code={"S3Bucket": bucket, "S3Key": "code/fn.zip"})
    assert created["CodeSha256"] == base64.b64encode(hashlib.sha256(code).digest()).decode()
    assert call(aws, name, {"a": 1})[1]["echo"] == {"a": 1}
    with pytest.raises(ClientError) as excinfo:
        aws.update_function_code(FunctionName=name, S3Bucket=bucket, S3Key="code/missing.zip")
    assert error_of(excinfo) == ("InvalidParameterValueException", 400)
    assert "NoSuchKey" in excinfo.value.response["Error"]["Message"]


# -------------------------------------------------------------------------------------------------------- invoke


def test_invoke_returns_the_handler_result(local_aws_env, aws):
    _, home = local_aws_env
    created = create(aws, ECHO, MemorySize=512)
    response, result = call(aws, created["FunctionName"], {"x": [1, 2]})
    assert response["StatusCode"] == 200 and "FunctionError" not in response
    assert response["ExecutedVersion"] == "$LATEST"
    assert result["echo"] == {"x": [1, 2]}
    assert (result["name"], result["arn"], result["memory"]) == (created["FunctionName"], created["FunctionArn"],
                                                                 "512")
    assert 0 < result["remaining"] <= 3000
    assert (home / "lambda" / created["FunctionName"] / "logs" / f"{result['request_id']}.log").is_file()
    empty = aws.invoke(FunctionName=created["FunctionArn"])  # no payload: the event is {}
    assert json.loads(empty["Payload"].read())["echo"] == {}
    assert aws.invoke(FunctionName=created["FunctionName"], InvocationType="DryRun")["StatusCode"] == 204
    with pytest.raises(ClientError) as excinfo:
        aws.invoke(FunctionName=created["FunctionName"], Payload=b"{not json")
    assert error_of(excinfo) == ("InvalidRequestContentException", 400)


def test_handler_reads_its_environment(aws):
    code = ("import os\n"
            "def handler(event, context):\n"
            "    return {k: os.environ.get(k) for k in ('GREETING', 'AWS_LAMBDA_FUNCTION_NAME', "
            "'AWS_LAMBDA_FUNCTION_VERSION', 'AWS_LAMBDA_FUNCTION_MEMORY_SIZE', 'LAMBDA_TASK_ROOT', "
            "'AWS_ENDPOINT_URL')} | {'cwd': os.getcwd()}\n")
    name = create(aws, code, Environment={"Variables": {"GREETING": "bonjour"}})["FunctionName"]
    _, result = call(aws, name)
    assert result["GREETING"] == "bonjour"
    assert (result["AWS_LAMBDA_FUNCTION_NAME"], result["AWS_LAMBDA_FUNCTION_VERSION"]) == (name, "$LATEST")
    assert result["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "128"
    assert result["LAMBDA_TASK_ROOT"] == result["cwd"]
    assert result["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")


S3_WRITER = """
import json, boto3
def handler(event, context):
    boto3.client("s3").put_object(Bucket=event["bucket"], Key=event["key"], Body=json.dumps(event).encode())
    return {"written": event["key"]}
"""


def test_handler_talks_to_the_local_s3_service(aws, s3, bucket):
    name = create(aws, S3_WRITER, Timeout=60)["FunctionName"]
    response, result = call(aws, name, {"bucket": bucket, "key": "out/sync.json"})
    assert "FunctionError" not in response, result
    assert result == {"written": "out/sync.json"}
    assert json.loads(s3.get_object(Bucket=bucket, Key="out/sync.json")["Body"].read())["bucket"] == bucket


def test_event_invocation_runs_in_the_background(aws, s3, bucket):
    name = create(aws, S3_WRITER, Timeout=60)["FunctionName"]
    response = aws.invoke(FunctionName=name, InvocationType="Event",
                          Payload=json.dumps({"bucket": bucket, "key": "out/async.json"}))
    assert response["StatusCode"] == 202
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix="out/async.json").get("Contents", [])
        if listed:
            break
        time.sleep(0.2)
    assert [o["Key"] for o in listed] == ["out/async.json"]


def test_handler_exception_is_an_unhandled_function_error(aws):
    code = "def handler(event, context):\n    raise ValueError('the event is bad: ' + str(event['n']))\n"
    name = create(aws, code)["FunctionName"]
    response, error = call(aws, name, {"n": 7}, LogType="Tail")
    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    assert (error["errorType"], error["errorMessage"]) == ("ValueError", "the event is bad: 7")
    assert any("app.py" in frame and "in handler" in frame for frame in error["stackTrace"])
    assert "[ERROR] ValueError: the event is bad: 7" in base64.b64decode(response["LogResult"]).decode()
    missing = create(aws, ECHO, handler="app.nothing")["FunctionName"]
    response, error = call(aws, missing)
    assert (response["FunctionError"], error["errorType"]) == ("Unhandled", "Runtime.HandlerNotFound")


def test_log_tail_has_the_printed_lines(aws):
    code = ("import sys\n"
            "def handler(event, context):\n"
            "    print('x' * 6000)\n"
            "    print('hello from the handler', event['n'])\n"
            "    print('to stderr', file=sys.stderr)\n"
            "    return 1\n")
    name = create(aws, code)["FunctionName"]
    response, result = call(aws, name, {"n": 42}, LogType="Tail")
    assert result == 1
    raw = base64.b64decode(response["LogResult"])
    assert len(raw) <= 4096
    tail = raw.decode()
    assert "hello from the handler 42" in tail and "to stderr" in tail
    assert "REPORT RequestId:" in tail
    assert "LogResult" not in aws.invoke(FunctionName=name, Payload=b'{"n": 1}')


def test_timeout_kills_the_handler(aws):
    code = "import time\ndef handler(event, context):\n    time.sleep(5)\n    return 'late'\n"
    name = create(aws, code, Timeout=1)["FunctionName"]
    started = time.monotonic()
    response, error = call(aws, name)
    assert time.monotonic() - started < 4.5
    assert response["FunctionError"] == "Unhandled"
    assert "Task timed out after 1.00 seconds" in error["errorMessage"]


def test_in_process_invoke_api(local_aws_env, aws):
    from pipelines.local.api import lambda_

    url, _ = local_aws_env
    name = create(aws, ECHO)["FunctionName"]
    result = lambda_.invoke(name, b'{"k": "v"}', service_url=url, log_tail=True)
    assert (result.status_code, result.function_error, result.executed_version) == (200, None, "$LATEST")
    assert json.loads(result.payload)["echo"] == {"k": "v"}
    assert "START RequestId:" in base64.b64decode(result.log_tail or "").decode()
    assert lambda_.invoke(name, b"{}", service_url=url, invocation_type="DryRun").status_code == 204
    with pytest.raises(lambda_.FunctionNotFound):
        lambda_.invoke("no-such-function", b"{}", service_url=url)
    with pytest.raises(LookupError):
        lambda_.invoke(arns.lambda_function_arn(LOCAL_REGION, LOCAL_ACCOUNT, name) + ":7", b"{}", service_url=url)


def test_sagemaker_sdk_lambda_helper(local_aws_env, tmp_path: Path):
    import sagemaker
    from sagemaker.lambda_helper import Lambda

    script = tmp_path / "sm_handler.py"
    script.write_text("def handler(event, context):\n    return {'version': 1, 'event': event}\n")
    session = sagemaker.Session(boto3.Session())
    name = function_name()
    helper = Lambda(function_name=name, execution_role_arn=LOCAL_ROLE_ARN, script=str(script),
                    handler="sm_handler.handler", session=session)
    created = helper.create()
    assert created["FunctionName"] == name and created["Runtime"] == "python3.8"
    assert json.loads(helper.invoke()["Payload"].read()) == {"version": 1, "event": {}}
    script.write_text("def handler(event, context):\n    return {'version': 2}\n")
    updated = helper.upsert()  # exists: create fails with ResourceConflictException, the SDK updates the code
    assert updated["CodeSha256"] != created["CodeSha256"]
    response = helper.invoke()
    assert response["StatusCode"] == 200
    assert json.loads(response["Payload"].read()) == {"version": 2}
