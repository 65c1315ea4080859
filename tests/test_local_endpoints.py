"""Local endpoint servers: the SageMaker container contract served through SageMaker's PyTorch inference toolkit,
model swaps under load, restarts, and the approve -> EventBridge event -> steps.deploy -> local endpoint path with
the project's inference handler (from ``code/`` inside model.tar.gz)."""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import signal
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from botocore.validate import ParamValidator

from pipelines import sample_data
from pipelines.local.api.sagemaker_backend import SageMakerBackend
from pipelines.local.cli import models as cli_models
from pipelines.local.serving import endpoints
from pipelines.local.storage import registry
from pipelines.local.storage.store import ArtifactStore

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# A tiny handler with the toolkit's four functions: fast to start, precise about which model answered. Errors that
# should reach the client with their own status subclass the toolkit's BaseInferenceToolkitError (others are 500s).
HANDLER = '''
import json, os, time
from pathlib import Path

from sagemaker_inference.errors import BaseInferenceToolkitError


class HandlerError(BaseInferenceToolkitError):
    def __init__(self, status, message):
        super().__init__(status, message, message)


def model_fn(model_dir):
    time.sleep(float(os.environ.get("TEST_LOAD_DELAY", "0")))
    config = json.loads((Path(model_dir) / "model.json").read_text())
    if config.get("fail"):
        raise RuntimeError("cannot load this model: " + config["fail"])
    return config


def input_fn(body, content_type):
    if content_type != "application/json":
        raise HandlerError(415, f"unsupported content type {content_type}")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise HandlerError(400, f"invalid JSON: {exc}")


def predict_fn(data, model):
    if data.get("boom"):
        return 1 / 0
    time.sleep(float(data.get("sleep", 0)))
    return {"version": model["version"], "echo": data.get("x")}


def output_fn(prediction, accept):
    if accept != "application/json":
        raise HandlerError(406, f"cannot produce {accept}")
    return json.dumps(prediction)
'''


@pytest.fixture
def mlops_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "mlops"))
    monkeypatch.setenv("SAGEMAKER_EXECUTION_ROLE_ARN", "arn:aws:iam::000000000000:role/MLOpsLocalExecutionRole")
    yield tmp_path / "mlops"
    for endpoint in endpoints.list_endpoints():  # never leave a server behind
        endpoints.delete(endpoint.name)


HANDLER_ENV = {"SAGEMAKER_PROGRAM": "handler.py"}


def tiny_model(tmp_path: Path, version: int, **extra) -> Path:
    """A model directory as the container sees /opt/ml/model: model.json and the handler in code/."""
    path = tmp_path / f"model-v{version}-{len(extra)}"
    (path / "code").mkdir(parents=True)
    (path / "model.json").write_text(json.dumps({"version": version, **extra}))
    (path / "code" / "handler.py").write_text(HANDLER)
    return path


def post(url: str, body: bytes, content_type: str = "application/json", accept: str = "application/json"):
    request = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                     headers={"Content-Type": content_type, "Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:  # the toolkit's error body: the message, then the traceback
        return exc.code, first_line(exc.read())


def first_line(body: bytes) -> str:
    return body.decode("utf-8", "replace").split("\n", 1)[0]


def ping(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.fast
def test_container_contract_and_error_mapping(mlops_home, tmp_path):
    ep = endpoints.deploy("contract", tiny_model(tmp_path, 1), environment=HANDLER_ENV, max_body_bytes=4096,
                          startup_timeout=60)
    assert ep.alive and ep.url.startswith("http://127.0.0.1:")
    assert (mlops_home / "endpoints" / "contract" / "server.json").is_file()
    assert ping(ep.url) == 200
    assert post(ep.url, b'{"x": 7}') == (200, {"version": 1, "echo": 7})
    assert endpoints.invoke("contract", b'{"x": 8}', "application/json") == (200, b'{"version": 1, "echo": 8}')

    assert post(ep.url, b"a,b", "text/csv") == (415, "unsupported content type text/csv")
    status, body = post(ep.url, b"{nope")
    assert status == 400 and body.startswith("invalid JSON")
    assert post(ep.url, b"{}", accept="text/csv") == (406, "cannot produce text/csv")
    assert post(ep.url, b'{"boom": true}') == (500, "division by zero")  # the toolkit's GenericInferenceToolkitError
    request = urllib.request.Request(f"{ep.url}/invocations", data=b'{"x": "' + b"y" * 5000 + b'"}', method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as too_big:
        urllib.request.urlopen(request, timeout=10)
    assert too_big.value.code == 413 and "exceeds the endpoint's limit of 4096 bytes" in too_big.value.read().decode()
    request = urllib.request.Request(f"{ep.url}/_mlops/reload", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 403  # no token

    assert post(ep.url, b'{"x": 9}') == (200, {"version": 1, "echo": 9})  # still serving after all of that
    assert [(e.name, e.alive) for e in endpoints.list_endpoints()] == [("contract", True)]


@pytest.mark.fast
def test_redeploy_swaps_model_under_load_without_failures(mlops_home, tmp_path):
    ep = endpoints.deploy("swap", tiny_model(tmp_path, 1), environment=HANDLER_ENV, startup_timeout=60)
    results: list[tuple[int, int]] = []
    failures: list[object] = []
    pings: list[int] = []
    stop = threading.Event()

    def hammer(worker: int) -> None:
        while not stop.is_set():
            try:
                status, body = post(ep.url, json.dumps({"x": worker, "sleep": 0.02}).encode())
            except Exception as exc:  # a dropped connection is a failure too
                failures.append(exc)
                continue
            if status != 200:
                failures.append((status, body))
            else:
                results.append((worker, body["version"]))

    def pinger() -> None:
        while not stop.is_set():
            pings.append(ping(ep.url))
            time.sleep(0.02)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)] + [threading.Thread(target=pinger)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        # model_fn takes a second here: the old model must keep answering meanwhile.
        swapped = endpoints.deploy("swap", tiny_model(tmp_path, 2),
                                   environment={**HANDLER_ENV, "TEST_LOAD_DELAY": "1.0"})
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert failures == []
    assert swapped.pid == ep.pid and swapped.port == ep.port  # same process, same URL
    assert set(pings) == {200}
    versions = [v for _, v in results]
    assert versions.count(1) > 5 and versions.count(2) > 5
    for worker in range(4):  # each worker's sequential requests never go back to the old model
        seen = [v for w, v in results if w == worker]
        assert seen == sorted(seen)
    assert endpoints.server_status("swap")["loaded"]["generation"] == 2

    # A model that cannot load: the deploy fails, the running model keeps serving.
    with pytest.raises(endpoints.EndpointError, match="cannot load this model: corrupt"):
        endpoints.deploy("swap", tiny_model(tmp_path, 3, fail="corrupt"), environment=HANDLER_ENV)
    assert post(ep.url, b'{"x": 1}') == (200, {"version": 2, "echo": 1})


@pytest.mark.fast
def test_stale_server_is_restarted_and_delete_stops_it(mlops_home, tmp_path):
    ep = endpoints.deploy("stale", tiny_model(tmp_path, 1), environment=HANDLER_ENV, startup_timeout=60)
    os.kill(ep.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while endpoints.get("stale").alive and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not endpoints.get("stale").alive
    with pytest.raises(endpoints.EndpointError, match="is not running"):
        endpoints.invoke("stale", b"{}", "application/json")

    restarted = endpoints.deploy("stale", tiny_model(tmp_path, 2), environment=HANDLER_ENV, startup_timeout=60)
    assert restarted.alive and restarted.pid != ep.pid
    assert restarted.port == ep.port  # the old port was free again, so the URL is unchanged
    assert endpoints.invoke("stale", b'{"x": 1}', "application/json")[0] == 200

    assert endpoints.delete("stale") is True
    assert not pid_alive(restarted.pid)
    assert not (mlops_home / "endpoints" / "stale").exists()
    with pytest.raises(endpoints.EndpointNotFound):
        endpoints.invoke("stale", b"{}", "application/json")
    assert endpoints.delete("stale") is False


@pytest.mark.fast
def test_startup_failure_reports_the_server_log(mlops_home, tmp_path):
    with pytest.raises(endpoints.EndpointError) as info:
        endpoints.deploy("broken", tiny_model(tmp_path, 1, fail="bad weights"), environment=HANDLER_ENV,
                         startup_timeout=60)
    message = str(info.value)
    assert "exited with code 1 during startup" in message and "cannot load this model: bad weights" in message
    # No such SAGEMAKER_PROGRAM in code/: the toolkit's default PyTorch handler takes over and, as on AWS, refuses a
    # model directory without exactly one .pt/.pth file.
    with pytest.raises(endpoints.EndpointError, match="Exactly one .pth or .pt file is required"):
        endpoints.deploy("broken", tiny_model(tmp_path, 2), environment={"SAGEMAKER_PROGRAM": "missing.py"},
                         startup_timeout=60)
    assert endpoints.list_endpoints() == []
    with pytest.raises(ValueError, match="invalid endpoint name"):
        endpoints.deploy("../escape", tiny_model(tmp_path, 3), environment=HANDLER_ENV)


# ------------------------------------------------------------------------------- the real handler, end to end


@functools.cache
def _resnet18(num_classes: int):
    from training.model import build_model

    return build_model("resnet18", num_classes)  # built once: initialising it is the slow part on a small CPU


def _biased_model_tar(tmp_path: Path, favourite: int, classes: list[str]) -> bytes:
    """A resnet18 whose head always picks ``classes[favourite]`` (zero weights, biased bias), as model.tar.gz."""
    import torch

    from training.model import save_model
    from training.serving_code import write_serving_code

    model = _resnet18(len(classes))
    with torch.no_grad():
        model.fc[0].weight.zero_()
        model.fc[0].bias.copy_(torch.tensor([8.0 if i == favourite else -8.0 for i in range(len(classes))]))
    config = {"arch": "resnet18", "num_classes": len(classes), "classes": classes, "hidden_units": 0,
              "dropout": 0.0, "image_size": 32, "resize_size": 36, "weights_file": "model.pth"}
    model_dir = tmp_path / f"model-{favourite}"
    save_model(model, config, model_dir)
    write_serving_code(model_dir)  # what training/train.py does: the handler travels in code/
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(model_dir.rglob("*")):
            tar.add(path, arcname=path.relative_to(model_dir).as_posix(), recursive=False)
    return buf.getvalue()


def _register(classes: list[str], tmp_path: Path, favourite: int, accuracy: float) -> str:
    store = ArtifactStore()
    model_uri = f"s3://mlops-local/models/v{favourite}/model.tar.gz"
    store.put_bytes(model_uri, _biased_model_tar(tmp_path, favourite, classes))
    metrics_uri = f"s3://mlops-local/models/v{favourite}/evaluation.json"
    store.put_bytes(metrics_uri, json.dumps(
        {"multiclass_classification_metrics": {"accuracy": {"value": accuracy, "standard_deviation": 0.0}}}).encode())
    return registry.create_model_package({
        "ModelPackageGroupName": registry.DEFAULT_GROUP,
        "ModelApprovalStatus": "PendingManualApproval",
        "InferenceSpecification": {
            "Containers": [{"Image": "pytorch-inference:2.1-cpu-py310", "ModelDataUrl": model_uri,
                            "Environment": {"SAGEMAKER_PROGRAM": "inference.py"}}],
            "SupportedContentTypes": ["image/jpeg"], "SupportedResponseMIMETypes": ["application/json"]},
        "ModelMetrics": {"ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": metrics_uri}}},
    })["ModelPackageArn"]


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli_models.add_subcommands(parser.add_subparsers(dest="command"))
    return cli_models.run(parser.parse_args(list(argv)))


@pytest.mark.slow
def test_approve_deploys_through_steps_deploy_and_swaps_versions(mlops_home, tmp_path, capsys, monkeypatch):
    classes = ["circle", "square"]
    _register(classes, tmp_path, favourite=0, accuracy=0.81)
    _register(classes, tmp_path, favourite=1, accuracy=0.93)
    client = SageMakerBackend(startup_timeout=120)
    name = "imgclf-test"

    assert _cli("models", "approve", "1", "--endpoint-name", name, "--description", "first") == 0
    described = client.describe_endpoint(EndpointName=name)
    assert described["EndpointStatus"] == "InService", described.get("FailureReason")
    shape = registry.operation_model("DescribeEndpoint").output_shape
    report = ParamValidator().validate({k: v for k, v in described.items() if k != "ResponseMetadata"}, shape)
    assert not report.has_errors(), report.generate_report()
    server = endpoints.get(name)
    assert Path(server.model_dir).is_relative_to(mlops_home / "endpoints" / name / "models")  # model.tar.gz, extracted
    assert Path(server.code_dir) == Path(server.model_dir) / "code"
    loaded = endpoints.server_status(name)["loaded"]
    assert {"inference", "training.model", "training.images"} <= set(loaded["modules_from_code_dir"])

    jpeg = io.BytesIO()
    sample_data.draw_sample("square", 48).save(jpeg, "JPEG")
    status, body = endpoints.invoke(name, jpeg.getvalue(), "image/jpeg")
    prediction = json.loads(body)
    assert status == 200 and prediction["class_name"] == "circle" and prediction["predicted_label"] == 0
    assert prediction["confidence"] > 0.99 and [k["class_name"] for k in prediction["top_k"]] == classes
    status, body = endpoints.invoke(name, b"\xff\xd8 truncated", "image/jpeg")
    assert status == 400 and "not a decodable image" in first_line(body)
    status, body = endpoints.invoke(name, b"a,b", "text/csv")
    assert status == 415 and "text/csv" in first_line(body)

    # Approving version 2 while requests are running: every request answered, then the new model answers.
    answers: list[str] = []
    failures: list[object] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                code, payload = endpoints.invoke(name, jpeg.getvalue(), "image/jpeg")
            except Exception as exc:
                failures.append(exc)
                continue
            answers.append(json.loads(payload)["class_name"]) if code == 200 else failures.append((code, payload))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert _cli("models", "approve", f"{registry.DEFAULT_GROUP}/2", "--endpoint-name", name) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == [] and "circle" in answers and answers[-1] == "square"
    assert endpoints.get(name).pid == server.pid  # swapped in place, not restarted
    updated = client.describe_endpoint(EndpointName=name)
    assert updated["EndpointStatus"] == "InService" and updated["EndpointConfigName"] != described["EndpointConfigName"]
    assert cli_models.served_package(client, updated["EndpointConfigName"]) == f"{registry.DEFAULT_GROUP}/2"

    # Rejecting version 2 puts the newest approved one (version 1) back.
    assert _cli("models", "reject", "2", "--endpoint-name", name) == 0
    assert json.loads(endpoints.invoke(name, jpeg.getvalue(), "image/jpeg")[1])["class_name"] == "circle"

    capsys.readouterr()
    monkeypatch.setenv("COLUMNS", "250")  # rich tables as wide as their content
    assert _cli("models", "list") == 0
    listing = capsys.readouterr().out
    assert "0.8100" in listing and "0.9300" in listing and "Rejected" in listing
    assert _cli("endpoints", "list") == 0
    assert f"{registry.DEFAULT_GROUP}/1" in capsys.readouterr().out
    image = tmp_path / "dog.jpg"
    image.write_bytes(jpeg.getvalue())
    assert _cli("endpoints", "invoke", name, "--file", str(image)) == 0
    assert '"class_name": "circle"' in capsys.readouterr().out

    assert _cli("endpoints", "delete", name) == 0
    assert not pid_alive(server.pid)
    assert client.list_endpoints()["Endpoints"] == []
    assert _cli("endpoints", "invoke", name, "--file", str(image)) == 1
