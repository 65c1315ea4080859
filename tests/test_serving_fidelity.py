"""The trained model serves as on AWS: through SageMaker's PyTorch inference toolkit, locally and under real TorchServe,
and the local endpoint speaks the SageMaker runtime API to unchanged real clients (boto3, the SDK's ``Predictor``).

The model comes from ``training/train.py`` itself (1 epoch on drawn shapes), packed as SageMaker packs
``SM_MODEL_DIR``: whatever the trainer put there -- ``model.pth``, ``model_config.json`` and the handler in ``code/`` --
is all the serving side gets. ``IMGCLF_MODEL_TAR=<path to a model.tar.gz>`` runs the same checks on another
archive, e.g. the one ``make run`` registered (``models describe 1`` shows its model data).
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from pipelines.local.serving import endpoints
from pipelines.sample_data import CLASSES, draw_sample, make_dataset
from training.archives import safe_extract

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
IMAGE_SIZE = 32
MODEL_ENV = {"SAGEMAKER_PROGRAM": "inference.py"}  # the pipeline's Model environment (pipelines/pipeline.py)


@pytest.fixture(scope="module")
def model_tar(tmp_path_factory) -> Path:
    """``model.tar.gz`` of a real (tiny) training run, packed like SageMaker packs ``SM_MODEL_DIR``."""
    if os.environ.get("IMGCLF_MODEL_TAR"):
        return Path(os.environ["IMGCLF_MODEL_TAR"])
    tmp = tmp_path_factory.mktemp("trained")
    data = make_dataset(tmp / "data", per_class=6, size=IMAGE_SIZE, seed=5, with_bad_files=False)
    model_dir = tmp / "model"
    env = {**os.environ, "SM_CHANNEL_TRAIN": str(data), "SM_CHANNEL_VALIDATION": str(data),
           "SM_MODEL_DIR": str(model_dir), "SM_OUTPUT_DATA_DIR": str(tmp / "output"),
           "SM_CHECKPOINT_DIR": str(tmp / "checkpoints"), "SM_NUM_GPUS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "training" / "train.py"), "--arch", "resnet18", "--epochs", "1",
                           "--image-size", str(IMAGE_SIZE), "--batch-size", "8", "--workers", "0",
                           "--pretrained", "none"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    target = tmp / "model.tar.gz"
    with tarfile.open(target, "w:gz") as tar:
        for path in sorted(model_dir.rglob("*")):
            tar.add(path, arcname=path.relative_to(model_dir).as_posix(), recursive=False)
    return target


def jpegs(n: int = 6) -> list[bytes]:
    rng = random.Random(7)
    images = []
    for i in range(n):
        buf = io.BytesIO()
        draw_sample(sorted(CLASSES)[i % len(CLASSES)], 48, rng).save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
    return images


@pytest.fixture
def local_endpoint(tmp_path, monkeypatch, model_tar):
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "mlops"))
    model_dir = safe_extract(model_tar, tmp_path / "opt_ml_model")
    endpoint = endpoints.deploy("fidelity", model_dir, environment=MODEL_ENV, startup_timeout=120)
    yield endpoint
    endpoints.delete("fidelity")


def post(url: str, body: bytes, content_type: str, accept: str = "application/json") -> tuple[int, bytes]:
    request = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                     headers={"Content-Type": content_type, "Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


# Requests whose answers both servers must agree on: (body, Content-Type, Accept).
ERROR_CASES = [
    (b"\xff\xd8\xff truncated", "image/jpeg", "application/json"),  # 400: not a decodable image
    (b"a,b\n1,2", "text/csv", "application/json"),                   # 415: unsupported content type
    (b"{not json", "application/json", "application/json"),          # 400: invalid JSON
    (None, "image/jpeg", "text/csv"),                                 # 406: cannot answer text/csv
]


def answers(url: str) -> dict[str, object]:
    """Predictions for the same JPEGs and the (status, first line) of each error case."""
    good = [post(url, body, "image/jpeg") for body in jpegs()]
    assert all(status == 200 for status, _ in good), good
    errors = []
    for body, content_type, accept in ERROR_CASES:
        status, payload = post(url, body if body is not None else jpegs(1)[0], content_type, accept)
        errors.append((status, payload.decode("utf-8", "replace").split("\n", 1)[0]))
    return {"predictions": [json.loads(payload) for _, payload in good], "errors": errors}


def test_model_archive_carries_the_handler(model_tar):
    with tarfile.open(model_tar) as tar:
        names = set(tar.getnames())
    assert {"model.pth", "model_config.json", "code/inference.py", "code/training/__init__.py",
            "code/training/model.py", "code/training/images.py", "code/training/archives.py"} <= names


def test_boto3_invoke_endpoint_and_sdk_predictor(local_endpoint, monkeypatch):
    """Real clients, unchanged, against the local endpoint's URL (``endpoints list`` shows it as endpoint_url)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    runtime = boto3.client("sagemaker-runtime", region_name="us-east-1", endpoint_url=local_endpoint.url)
    image = jpegs(1)[0]
    response = runtime.invoke_endpoint(EndpointName="fidelity", Body=image, ContentType="image/jpeg",
                                       Accept="application/json", CustomAttributes="trace=1")
    prediction = json.loads(response["Body"].read())
    assert response["ContentType"] == "application/json" and response["InvokedProductionVariant"] == "AllTraffic"
    assert set(prediction) == {"predicted_label", "class_name", "confidence", "top_k"}
    assert prediction["class_name"] in CLASSES

    with pytest.raises(runtime.exceptions.ModelError) as bad:
        runtime.invoke_endpoint(EndpointName="fidelity", Body=b"\xff\xd8 not a jpeg", ContentType="image/jpeg")
    error = bad.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 424 and error["OriginalStatusCode"] == 400
    assert error["OriginalMessage"].startswith("image (") and "not a decodable image" in error["OriginalMessage"]
    assert error["Error"]["Message"].startswith("Received client error (400) from primary with message")
    assert error["LogStreamArn"].startswith("arn:aws:logs:us-east-1:")
    with pytest.raises(runtime.exceptions.ModelError) as unsupported:
        runtime.invoke_endpoint(EndpointName="fidelity", Body=b"a,b", ContentType="text/csv")
    assert unsupported.value.response["OriginalStatusCode"] == 415
    with pytest.raises(ClientError) as unknown:
        runtime.invoke_endpoint(EndpointName="no-such-endpoint", Body=image, ContentType="image/jpeg")
    assert unknown.value.response["Error"]["Code"] == "ValidationError"
    assert "Endpoint no-such-endpoint of account" in unknown.value.response["Error"]["Message"]

    from sagemaker.deserializers import JSONDeserializer
    from sagemaker.predictor import Predictor
    from sagemaker.serializers import IdentitySerializer
    from sagemaker.session import Session

    session = Session(boto_session=boto3.Session(region_name="us-east-1"), sagemaker_runtime_client=runtime)
    predictor = Predictor("fidelity", sagemaker_session=session, serializer=IdentitySerializer("image/jpeg"),
                          deserializer=JSONDeserializer())
    assert predictor.predict(image) == prediction
    with pytest.raises(ClientError, match="ModelError"):
        predictor.predict(b"GIF89a broken")
    assert post(local_endpoint.url, image, "image/jpeg")[0] == 200  # still serving after all of that


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchserve_missing() -> str | None:
    if shutil.which("java") is None:
        return "java not found (TorchServe's frontend is Java: apt-get install openjdk-17-jre-headless)"
    if not (VENV_BIN / "torchserve").exists():
        return f"torchserve not installed in {VENV_BIN} (pip install torchserve; it is in the dev extras)"
    return None


@pytest.fixture
def torchserve(tmp_path, model_tar):
    """The PyTorch inference container's own ``serve`` entry point on the extracted model.tar.gz."""
    reason = _torchserve_missing()
    if reason:
        print(f"skipping the TorchServe comparison: {reason}")
        pytest.skip(reason)
    base = tmp_path / "container"
    safe_extract(model_tar, base / "model")
    port = _free_port()
    env = {**os.environ, **MODEL_ENV, "SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_BIND_TO_PORT": str(port),
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "torchserve.log", "wb")  # noqa: SIM115 -- closed below
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "support" / "torchserve_serve.py")], cwd=base,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:  # /ping is healthy before the workers have loaded the model: wait for a real answer
            if proc.poll() is not None:
                pytest.fail(f"TorchServe exited with {proc.returncode}:\n"
                            f"{(tmp_path / 'torchserve.log').read_text(errors='replace')[-4000:]}")
            try:
                if post(url, jpegs(1)[0], "image/jpeg")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"TorchServe did not answer within 180 s:\n"
                            f"{(tmp_path / 'torchserve.log').read_text(errors='replace')[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-g", str(proc.pid)], check=False)
        log.close()


@pytest.mark.slow
def test_real_torchserve_and_the_local_endpoint_answer_alike(torchserve, local_endpoint):
    under_torchserve = answers(torchserve)
    locally = answers(local_endpoint.url)
    assert [e[0] for e in under_torchserve["errors"]] == [400, 415, 400, 406]
    assert locally["errors"] == under_torchserve["errors"]
    for ours, theirs in zip(locally["predictions"], under_torchserve["predictions"], strict=True):
        assert ours["class_name"] == theirs["class_name"] and ours["predicted_label"] == theirs["predicted_label"]
        assert ours["confidence"] == pytest.approx(theirs["confidence"], abs=1e-5)
    print(f"\nTorchServe and the local endpoint agree on {len(locally['predictions'])} JPEGs "
          f"({[p['class_name'] for p in locally['predictions']]}) and on errors {locally['errors']}")
