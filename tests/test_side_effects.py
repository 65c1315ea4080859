"""Side effects across crashes (issue 11): each happens exactly once, and what is reported is what is true.

A forked child runs the engine (or the CLI) and dies at a chosen point -- ``os._exit`` right after the service
committed its CreateModelPackage -- or the process that deploys, the local AWS service, gets a real ``kill -9``
while it deploys (a service started from tests/support/hanging_deploy_service.py, whose deploy hangs); the parent
then does what an operator does: ``retry`` the execution (``LocalEngine.resume``, what ``pipelines.run retry``
calls) or ``models approve`` again, and checks the resources that exist: one model package, one endpoint InService
serving the approved version from a live server. The endpoints serve a tiny handler (the toolkit's four functions)
so servers start in about a second.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.local.api import clients, server, stack
from pipelines.local.api.sagemaker_backend import SageMakerBackend
from pipelines.local.cli import models as cli_models
from pipelines.local.engine.core import LocalEngine
from pipelines.local.engine.steps import models as model_steps
from pipelines.local.serving import endpoints
from pipelines.local.storage import registry
from pipelines.local.storage.executions import ExecutionStore
from pipelines.local.storage.store import DEPLOY_FUNCTION_ARN, LOCAL_ROLE_ARN, ArtifactStore

pytestmark = pytest.mark.fast

GROUP = registry.DEFAULT_GROUP
ENDPOINT = "side-effects"
PIPELINE = "SideEffectsPipeline"
KILLED = 137  # the exit status the kill points use (as a shell reports SIGKILL)

HANDLER = '''
import json
from pathlib import Path


def model_fn(model_dir):
    return json.loads((Path(model_dir) / "model.json").read_text())


def input_fn(body, content_type):
    return json.loads(body)


def predict_fn(data, model):
    return {"version": model["version"]}


def output_fn(prediction, accept):
    return json.dumps(prediction)
'''


@pytest.fixture(autouse=True)
def mlops_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "mlops"))
    monkeypatch.setenv("SAGEMAKER_EXECUTION_ROLE_ARN", LOCAL_ROLE_ARN)
    monkeypatch.setenv("COLUMNS", "250")  # rich tables as wide as their content
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    # The deploy function, as `start` creates it (infra/template.yaml's, on the local AWS service).
    stack.ensure_deploy_function(clients.client("lambda"), GROUP, ENDPOINT)
    yield tmp_path / "mlops"
    for endpoint in endpoints.list_endpoints():  # never leave a server behind
        endpoints.delete(endpoint.name)
    server.down()


# ------------------------------------------------------------------------------------------------------ helpers


def model_uri(tmp_path: Path, version: int) -> str:
    """A model directory (model.json + code/handler.py) in the artifact store; its s3:// URI."""
    local = tmp_path / f"model-v{version}"
    (local / "code").mkdir(parents=True)
    (local / "model.json").write_text(json.dumps({"version": version}))
    (local / "code" / "handler.py").write_text(HANDLER)
    uri = f"s3://mlops-local/models/v{version}/model"
    ArtifactStore().copy_in(local, uri)
    return uri


def register_arguments(uri: str, version: int, approval: str = "Approved") -> dict:
    """The RegisterModel step's Arguments (a CreateModelPackage request), as the pipeline definition has them."""
    return {
        "ModelPackageGroupName": GROUP,
        "ModelPackageDescription": f"candidate {version}",
        "ModelApprovalStatus": approval,
        "InferenceSpecification": {
            "Containers": [{"Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.6-cpu-py312",
                            "ModelDataUrl": uri, "Environment": {"SAGEMAKER_PROGRAM": "handler.py"}}],
            "SupportedContentTypes": ["application/json"],
            "SupportedResponseMIMETypes": ["application/json"],
        },
    }


def definition(uri: str, version: int, *, deploy: bool = True) -> dict:
    """RegisterModel (Approved) -> DeployApprovedModel (the deploy Lambda), shaped like pipelines/pipeline.py's."""
    steps: list[dict] = [{"Name": "RegisterModel", "Type": "RegisterModel",
                          "Arguments": register_arguments(uri, version)}]
    if deploy:
        steps.append({
            "Name": "DeployApprovedModel", "Type": "Lambda", "DependsOn": ["RegisterModel"],
            "FunctionArn": DEPLOY_FUNCTION_ARN,
            "Arguments": {"model_package_group_name": GROUP, "endpoint_name": ENDPOINT,
                          "instance_type": "ml.m5.large", "instance_count": 1, "role_arn": LOCAL_ROLE_ARN},
            "OutputParameters": [{"OutputName": n, "OutputType": "String"}
                                 for n in ("status", "message", "model_package_arn")],
        })
    return {"Version": "2020-12-01", "Metadata": {}, "Parameters": [], "Steps": steps}


def fork(target: Callable[[], object]) -> int:
    """Run ``target`` in a forked child (exit 0 when it returns, 1 when it raises); returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            target()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 120) -> int:
    """The child's exit status (``-N`` when killed by signal N)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish within {timeout}s")


ROOT = Path(__file__).resolve().parents[1]


def hang_in_deploy(ready_fd: int) -> None:
    """In a child that deploys with the backend itself: ``endpoints.deploy`` reports that it started, then hangs
    until the parent kills -9."""
    def hang(*args, **kwargs):
        os.write(ready_fd, b"x")
        time.sleep(600)

    endpoints.deploy = hang


def start_hanging_service() -> subprocess.Popen:
    """Replace the local AWS service by one whose deploys hang (tests/support/hanging_deploy_service.py)."""
    server.down()
    # The last argument names the service on the command line, where server.up looks for it.
    proc = subprocess.Popen([sys.executable, "tests/support/hanging_deploy_service.py", "pipelines.local.api.server"],
                            cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while server.status() is None:
        assert proc.poll() is None and time.monotonic() < deadline, "the hanging service did not start"
        time.sleep(0.1)
    return proc


def kill_while_deploying(target: Callable[[], object]) -> None:
    """Run ``target`` in a child and ``kill -9`` the local AWS service while it deploys for it."""
    service = start_hanging_service()
    started = Path(os.environ["MLOPS_HOME"]) / "deploy-started"
    pid = fork(target)
    deadline = time.monotonic() + 120
    while not started.exists():
        assert time.monotonic() < deadline, "the service never reached the deploy"
        time.sleep(0.05)
    # While the deployer lives, the endpoint is honestly Creating: nobody may take it over.
    assert SageMakerBackend().describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "Creating"
    service.kill()
    service.wait(30)
    started.unlink()
    os.kill(pid, signal.SIGKILL)  # and the caller: what it would report does not matter here
    wait(pid)


def invoke_version() -> int:
    status, body = endpoints.invoke(ENDPOINT, b"{}", "application/json")
    assert status == 200, body
    return json.loads(body)["version"]


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli_models.add_subcommands(parser.add_subparsers(dest="command"))
    return cli_models.run(parser.parse_args(list(argv)))


def steps_of(execution_id: str) -> dict[str, dict]:
    return {s["step_name"]: s for s in ExecutionStore().steps(execution_id)}


# -------------------------------------------------------------------------------- 1. RegisterModel exactly once


def test_crash_after_the_registry_commit_then_retry_registers_the_artifact_once(tmp_path):
    pipeline = definition(model_uri(tmp_path, 1), 1, deploy=False)

    def commit_then_die() -> None:
        real = model_steps.local_client

        def local_client(service: str):
            client = real(service)
            if service == "sagemaker":
                create = client.create_model_package

                def create_then_die(**request):
                    create(**request)  # the service has committed it
                    os._exit(KILLED)  # the engine dies before it records the step's end

                client.create_model_package = create_then_die
            return client

        model_steps.local_client = local_client  # the RegisterModel step's client
        LocalEngine(pipeline, pipeline_name=PIPELINE).start()

    assert wait(fork(commit_then_die)) == KILLED
    [execution] = ExecutionStore().list_executions()
    assert steps_of(execution["execution_id"])["RegisterModel"]["status"] == "Executing"
    [first] = registry.list_packages()

    final = LocalEngine(pipeline, pipeline_name=PIPELINE).resume(execution["execution_id"])

    assert final["status"] == "Succeeded", final.get("failure_reason")
    assert [(p.version, p.approval_status) for p in registry.list_packages()] == [(1, "Approved")]
    step = steps_of(execution["execution_id"])["RegisterModel"]
    assert (step["status"], step["attempt"]) == ("Succeeded", 2)
    assert step["properties"]["ModelPackageArn"] == first.arn
    assert step["arguments"]["ClientToken"] == registry.client_token(execution["arn"], "RegisterModel")
    assert "reused (an earlier attempt registered it)" in Path(step["log_path"]).read_text()
    # Another execution is another request identity: it registers a new version.
    assert LocalEngine(pipeline, pipeline_name=PIPELINE).start()["status"] == "Succeeded"
    assert [p.version for p in registry.list_packages()] == [1, 2]


# ------------------------------------------------------------------------- 2. an interrupted deploy is not wedged


def test_kill_9_during_deploy_then_retry_serves_the_approved_version(tmp_path):
    pipeline = definition(model_uri(tmp_path, 1), 1)

    kill_while_deploying(lambda: LocalEngine(pipeline, pipeline_name=PIPELINE).start())
    [execution] = ExecutionStore().list_executions()

    final = LocalEngine(pipeline, pipeline_name=PIPELINE).resume(execution["execution_id"])

    assert final["status"] == "Succeeded", final.get("failure_reason")
    [package] = registry.list_packages()
    client = SageMakerBackend(startup_timeout=60)
    described = client.describe_endpoint(EndpointName=ENDPOINT)
    assert described["EndpointStatus"] == "InService" and "FailureReason" not in described
    assert client.package_of_config(described["EndpointConfigName"]) == package.arn
    assert endpoints.get(ENDPOINT).alive and invoke_version() == 1
    deploy_step = steps_of(execution["execution_id"])["DeployApprovedModel"]
    assert deploy_step["properties"]["OutputParameters"]["status"] == "Created"
    assert [e["EndpointName"] for e in client.list_endpoints()["Endpoints"]] == [ENDPOINT]  # exactly one

    # The next execution deploys its version (no EndpointBusyError from a wedged endpoint).
    second = LocalEngine(definition(model_uri(tmp_path, 2), 2), pipeline_name=PIPELINE).start()
    assert second["status"] == "Succeeded", second.get("failure_reason")
    assert invoke_version() == 2


def test_approve_again_after_kill_9_redeploys_instead_of_no_change(tmp_path, capsys):
    registry.create_model_package(register_arguments(model_uri(tmp_path, 1), 1, approval="PendingManualApproval"))

    kill_while_deploying(lambda: cli("models", "approve", "1", "--endpoint-name", ENDPOINT))
    capsys.readouterr()
    described = SageMakerBackend().describe_endpoint(EndpointName=ENDPOINT)  # nobody deploys it any more
    assert described["EndpointStatus"] == "Failed" and "was interrupted" in described["FailureReason"]
    assert cli("endpoints", "list") == 0
    assert "was interrupted" in capsys.readouterr().out

    # Approving the (already Approved) version again sends its state-change event to the deploy function again.
    assert cli("models", "approve", "1", "--endpoint-name", ENDPOINT) == 0
    out = capsys.readouterr().out
    assert "already Approved" in out
    assert "deploy: Created" in out and "NoChange" not in out and "Failed endpoint" in out
    assert SageMakerBackend().describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "InService"
    assert invoke_version() == 1
    serving = endpoints.get(ENDPOINT).pid
    # Once it serves, the same approval again is a true NoChange.
    assert cli("models", "approve", "1", "--endpoint-name", ENDPOINT) == 0
    assert "deploy: NoChange" in capsys.readouterr().out
    assert endpoints.get(ENDPOINT).pid == serving


def test_deployer_killed_after_its_server_came_up_or_mid_update_is_settled_truthfully(tmp_path):
    v1 = registry.create_model_package(register_arguments(model_uri(tmp_path, 1), 1))["ModelPackageArn"]
    v2 = registry.create_model_package(register_arguments(model_uri(tmp_path, 2), 2))["ModelPackageArn"]
    role = LOCAL_ROLE_ARN
    client = SageMakerBackend(startup_timeout=60)
    for version, arn in ((1, v1), (2, v2)):
        client.create_model(ModelName=f"m{version}", PrimaryContainer={"ModelPackageName": arn},
                            ExecutionRoleArn=role)
        client.create_endpoint_config(EndpointConfigName=f"c{version}", ProductionVariants=[{
            "VariantName": "AllTraffic", "ModelName": f"m{version}", "InstanceType": "ml.m5.large",
            "InitialInstanceCount": 1}])

    def server_up_then_die() -> None:
        real = endpoints.deploy

        def deploy(*args, **kwargs):
            real(*args, **kwargs)
            os._exit(KILLED)  # the server is up; the endpoint's record still says Creating

        endpoints.deploy = deploy
        SageMakerBackend(startup_timeout=60).create_endpoint(EndpointName=ENDPOINT, EndpointConfigName="c1")

    assert wait(fork(server_up_then_die)) == KILLED
    described = client.describe_endpoint(EndpointName=ENDPOINT)
    assert (described["EndpointStatus"], described["EndpointConfigName"]) == ("InService", "c1")
    assert "FailureReason" not in described and invoke_version() == 1

    read_fd, write_fd = os.pipe()

    def update() -> None:
        hang_in_deploy(write_fd)
        SageMakerBackend().update_endpoint(EndpointName=ENDPOINT, EndpointConfigName="c2")

    pid = fork(update)
    assert select.select([read_fd], [], [], 60)[0]
    during = client.describe_endpoint(EndpointName=ENDPOINT)
    assert during["EndpointStatus"] == "Updating"
    assert during["PendingDeploymentSummary"]["EndpointConfigName"] == "c2"
    os.kill(pid, signal.SIGKILL)
    wait(pid)
    after = client.describe_endpoint(EndpointName=ENDPOINT)
    assert (after["EndpointStatus"], after["EndpointConfigName"]) == ("InService", "c1")  # the old server serves
    assert "update to endpoint configuration 'c2' was interrupted" in after["FailureReason"]
    assert "PendingDeploymentSummary" not in after and invoke_version() == 1
    os.close(read_fd)
    os.close(write_fd)


# ---------------------------------------------------------------------- 3. rejecting the only approved version


def test_rejecting_the_only_served_approved_version_is_flagged_and_exits_1(tmp_path, capsys):
    registry.create_model_package(register_arguments(model_uri(tmp_path, 1), 1, approval="PendingManualApproval"))
    registry.create_model_package(register_arguments(model_uri(tmp_path, 2), 2, approval="PendingManualApproval"))
    assert cli("models", "approve", "1", "--endpoint-name", ENDPOINT) == 0
    capsys.readouterr()

    assert cli("models", "reject", "1", "--endpoint-name", ENDPOINT) == 1

    captured = capsys.readouterr()
    assert "deploy: NothingApproved" in captured.out
    assert "still serves" in captured.err and "which is Rejected: nothing approved to roll back to" in captured.err
    assert invoke_version() == 1  # the policy: it keeps serving (as the Lambda leaves it on AWS), flagged
    note = "serving a Rejected version: nothing approved to roll back to"
    assert cli("endpoints", "list") == 0
    assert note in capsys.readouterr().out
    assert cli("models", "describe", "1") == 0
    described = capsys.readouterr().out
    assert f"{ENDPOINT} (InService)" in described and note in described

    assert cli("models", "approve", "2", "--endpoint-name", ENDPOINT) == 0
    assert invoke_version() == 2
    capsys.readouterr()
    assert cli("endpoints", "list") == 0
    assert "Rejected version" not in capsys.readouterr().out
