"""Side effects across crashes (issue 11): each happens exactly once, and what is reported is what is true.

A forked child runs the engine (or the CLI) and dies at a chosen point -- ``os._exit`` right after the registry's
commit, or a real ``kill -9`` while it deploys -- and the parent then does what an operator does: ``retry`` the
execution (``LocalEngine.resume``, what ``pipelines.run retry`` calls) or ``models approve`` again, and checks the
resources that exist: one model package, one endpoint InService serving the approved version from a live server.
The endpoints serve a tiny handler (the toolkit's four functions) so servers start in about a second.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.local import cli_models, endpoints, registry
from pipelines.local.engine import LocalEngine
from pipelines.local.executions import ExecutionStore
from pipelines.local.sagemaker_client import LocalSageMakerClient
from pipelines.local.store import DEPLOY_FUNCTION_ARN, LOCAL_ROLE_ARN, ArtifactStore

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
    yield tmp_path / "mlops"
    for endpoint in endpoints.list_endpoints():  # never leave a server behind
        endpoints.delete(endpoint.name)


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


def hang_in_deploy(ready_fd: int) -> None:
    """In the child: ``endpoints.deploy`` reports that it started, then hangs until the parent kills -9."""
    def hang(*args, **kwargs):
        os.write(ready_fd, b"x")
        time.sleep(600)

    endpoints.deploy = hang


def kill_while_deploying(target: Callable[[], object]) -> None:
    """Run ``target`` in a child and ``kill -9`` it while it deploys (inside ``endpoints.deploy``)."""
    read_fd, write_fd = os.pipe()

    def child() -> None:
        hang_in_deploy(write_fd)
        target()

    pid = fork(child)
    ready, _, _ = select.select([read_fd], [], [], 120)
    os.close(write_fd)
    assert ready, "the child never reached the deploy"
    # While the deployer lives, the endpoint is honestly Creating: nobody may take it over.
    assert LocalSageMakerClient().describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "Creating"
    os.kill(pid, signal.SIGKILL)
    assert wait(pid) == -signal.SIGKILL
    os.close(read_fd)


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
        real = registry.create_model_package

        def create(request, **kwargs):
            created = real(request, **kwargs)
            os._exit(KILLED)  # the engine dies before it records the step's end
            return created

        registry.create_model_package = create
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
    client = LocalSageMakerClient(startup_timeout=60)
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
    described = LocalSageMakerClient().describe_endpoint(EndpointName=ENDPOINT)  # nobody deploys it any more
    assert described["EndpointStatus"] == "Failed" and "was interrupted" in described["FailureReason"]
    assert cli("endpoints", "list") == 0
    assert "was interrupted" in capsys.readouterr().out

    assert cli("models", "approve", "1", "--endpoint-name", ENDPOINT) == 0
    out = capsys.readouterr().out
    assert "deploy: Created" in out and "NoChange" not in out and "Failed endpoint" in out
    assert LocalSageMakerClient().describe_endpoint(EndpointName=ENDPOINT)["EndpointStatus"] == "InService"
    assert invoke_version() == 1
    # Once it serves, the same approval again is a true NoChange.
    assert cli("models", "approve", "1", "--endpoint-name", ENDPOINT) == 0
    assert "deploy: NoChange" in capsys.readouterr().out


def test_deployer_killed_after_its_server_came_up_or_mid_update_is_settled_truthfully(tmp_path):
    v1 = registry.create_model_package(register_arguments(model_uri(tmp_path, 1), 1))["ModelPackageArn"]
    v2 = registry.create_model_package(register_arguments(model_uri(tmp_path, 2), 2))["ModelPackageArn"]
    role = LOCAL_ROLE_ARN
    client = LocalSageMakerClient(startup_timeout=60)
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
        LocalSageMakerClient(startup_timeout=60).create_endpoint(EndpointName=ENDPOINT, EndpointConfigName="c1")

    assert wait(fork(server_up_then_die)) == KILLED
    described = client.describe_endpoint(EndpointName=ENDPOINT)
    assert (described["EndpointStatus"], described["EndpointConfigName"]) == ("InService", "c1")
    assert "FailureReason" not in described and invoke_version() == 1

    read_fd, write_fd = os.pipe()

    def update() -> None:
        hang_in_deploy(write_fd)
        LocalSageMakerClient().update_endpoint(EndpointName=ENDPOINT, EndpointConfigName="c2")

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
