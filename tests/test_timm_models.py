"""timm architectures (``--arch timm/<name>``): one support check shared with the pipeline's validation, timm's
preprocessing in ``model_config.json``, build/save/load round trip, the serving ``code/requirements.txt`` and how
evaluation and local endpoints install it (as the SageMaker PyTorch serving toolkit does at container start)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch

from pipelines import sample_data
from pipelines.local.serving import endpoints
from pipelines.sample_data import make_dataset
from pipelines.validation import check_parameters
from steps import evaluate as evaluate_step
from training import model as model_lib
from training import serving_code, train

ROOT = Path(__file__).resolve().parents[1]
ARCH = "timm/mobilenetv3_small_050"
CLASSES = ["circle", "square", "triangle"]
TIMM_PIN = f"timm=={metadata.version('timm')}"


def test_one_support_check_for_trainer_and_validation() -> None:
    for arch in (*model_lib.ARCHITECTURES, "timm/efficientnet_lite0", "timm/efficientnet_lite0.ra_in1k", ARCH):
        assert model_lib.is_supported_arch(arch), arch
    for arch in ("timm/nope", "timm/", "nope", "", None, "efficientnet_lite0"):
        assert not model_lib.is_supported_arch(arch), arch
    assert check_parameters({"Arch": "timm/efficientnet_lite0"}) == []
    problems = check_parameters({"Arch": "timm/nope"})
    assert len(problems) == 1 and "Arch='timm/nope' is not a supported architecture" in problems[0]
    assert train.parse_args(["--arch", "timm/efficientnet_lite0"]).arch == "timm/efficientnet_lite0"
    assert train.parse_args(["--arch", "ResNet18"]).arch == "resnet18"
    with pytest.raises(SystemExit):
        train.parse_args(["--arch", "timm/nope"])


@pytest.mark.parametrize("arch", ["timm/efficientnet_lite0", ARCH, "timm/resnet18.a1_in1k"])
def test_preprocessing_follows_timms_data_config_of_the_model(arch: str) -> None:
    import timm
    from timm.data import resolve_data_config

    data = resolve_data_config({}, model=timm.create_model(arch.removeprefix("timm/"), pretrained=False))
    config = model_lib.preprocessing_config(arch, 64)
    assert config["mean"] == list(data["mean"]) and config["std"] == list(data["std"])
    assert config["input_size"] == list(data["input_size"]) and config["crop_pct"] == data["crop_pct"]
    assert config["interpolation"] == data["interpolation"]
    assert config["resize_size"] == round(64 / data["crop_pct"])
    # torchvision: unchanged (ImageNet statistics, the 256/224 resize)
    assert model_lib.preprocessing_config("resnet18", 224) == {
        "image_size": 224, "resize_size": 256, "mean": list(model_lib.IMAGENET_MEAN),
        "std": list(model_lib.IMAGENET_STD)}


def test_tf_port_records_its_own_normalisation() -> None:
    config = model_lib.preprocessing_config("timm/tf_efficientnet_lite0", 224)
    assert config["mean"] == [0.5, 0.5, 0.5] and config["std"] == [0.5, 0.5, 0.5]


def test_timm_build_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = model_lib.build_model(ARCH, 4, hidden_units=16, dropout=0.1).eval()
    assert isinstance(model.classifier, torch.nn.Sequential) and model.classifier[-1].out_features == 4
    config = {"arch": ARCH, "num_classes": 4, "classes": list("abcd"), "hidden_units": 16, "dropout": 0.1,
              **model_lib.preprocessing_config(ARCH, 48), "weights_file": model_lib.MODEL_FILE}
    model_lib.save_model(model, config, tmp_path)
    loaded, loaded_config = model_lib.load_model(tmp_path)
    assert loaded_config["mean"] == config["mean"] and loaded_config["interpolation"] == "bicubic"
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x))
    image = sample_data.draw_sample("circle", 80)
    assert model_lib.eval_transform(loaded_config)(image).shape == (3, 48, 48)


def test_offline_timm_default_weights_fail_like_torchvision(tmp_path: Path) -> None:
    """``--pretrained default`` goes through timm's own download: offline it is PretrainedWeightsUnavailable."""
    code = ("from training.model import build_model, resolve_weights, PretrainedWeightsUnavailable\n"
            f"arch = {ARCH!r}\n"
            "try:\n    build_model(arch, 3, weights=resolve_weights(arch, 'default'))\n"
            "except PretrainedWeightsUnavailable as exc:\n    print('UNAVAILABLE', exc)\n")
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "HTTPS_PROXY": dead,
           "https_proxy": dead, "HTTP_PROXY": dead, "http_proxy": dead, "PYTHONPATH": str(ROOT)}
    # a dead proxy alone works too, but huggingface_hub's retries then take ~50 s; its offline switch fails at once
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert "UNAVAILABLE could not load pretrained weights" in result.stdout, result.stderr[-3000:]
    assert "pretrained channel" in result.stdout


def test_code_requirements_for_timm_only(tmp_path: Path) -> None:
    assert model_lib.serving_requirements(ARCH) == [TIMM_PIN]
    assert model_lib.serving_requirements("resnet18") == []
    written = serving_code.write_serving_code(tmp_path / "timm", requirements=model_lib.serving_requirements(ARCH))
    assert "code/requirements.txt" in written
    assert (tmp_path / "timm" / "code" / "requirements.txt").read_text() == f"{TIMM_PIN}\n"
    written = serving_code.write_serving_code(tmp_path / "tv", requirements=model_lib.serving_requirements("resnet18"))
    assert "code/requirements.txt" not in written and serving_code.requirements_path(tmp_path / "tv") is None


def test_unsatisfied_requirements(tmp_path: Path) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text(f"# comment\n{TIMM_PIN}\ntorch>=1.0  # inline\n\nnot-installed-pkg-xyz==1.0\ntimm==0.0.1\n"
                    "never-on-this-os==1; sys_platform == 'nonexistent'\n")
    assert serving_code.unsatisfied_requirements(path) == ["not-installed-pkg-xyz==1.0", "timm==0.0.1"]


def _wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel ``mlops-timm-probe 0.1`` (module ``mlops_timm_probe``)."""
    files = {"mlops_timm_probe/__init__.py": b"VALUE = 7\n",
             "mlops_timm_probe-0.1.dist-info/METADATA":
                 b"Metadata-Version: 2.1\nName: mlops-timm-probe\nVersion: 0.1\n",
             "mlops_timm_probe-0.1.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for name, data in files.items()]
    files["mlops_timm_probe-0.1.dist-info/RECORD"] = ("\n".join([*record, "mlops_timm_probe-0.1.dist-info/RECORD,,"])
                                                       + "\n").encode()
    path = directory / "mlops_timm_probe-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_evaluate_installs_code_requirements_only_when_missing(tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(evaluate_step, "install_requirements", lambda path: calls.append(Path(path)))
    (tmp_path / "code").mkdir()
    assert evaluate_step.install_model_requirements(tmp_path) == []  # no requirements.txt
    (tmp_path / "code" / "requirements.txt").write_text(f"{TIMM_PIN}\n")
    assert evaluate_step.install_model_requirements(tmp_path) == [] and calls == []  # satisfied: no pip
    (tmp_path / "code" / "requirements.txt").write_text(f"{TIMM_PIN}\nnot-installed-pkg-xyz==1.0\n")
    assert evaluate_step.install_model_requirements(tmp_path) == ["not-installed-pkg-xyz==1.0"]
    assert calls == [tmp_path / "code" / "requirements.txt"]


def test_evaluate_reports_a_failed_install(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "requirements.txt").write_text(f"{tmp_path / 'missing-0.1-py3-none-any.whl'}\n")
    with pytest.raises(evaluate_step.EvaluationError, match="failed to install the required packages"):
        evaluate_step.install_model_requirements(tmp_path)


@pytest.fixture(scope="module")
def timm_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch training job of a small timm model (random init) on tiny images."""
    root = tmp_path_factory.mktemp("timm_job")
    make_dataset(root / "data" / "train", per_class=4, size=40, seed=1, classes=CLASSES)
    make_dataset(root / "data" / "validation", per_class=2, size=40, seed=2, classes=CLASSES)
    make_dataset(root / "data" / "test", per_class=2, size=40, seed=3, classes=CLASSES)
    args = train.parse_args([
        "--train", str(root / "data" / "train"), "--validation", str(root / "data" / "validation"),
        "--model-dir", str(root / "model"), "--output-data-dir", str(root / "output"),
        "--checkpoint-dir", str(root / "checkpoints"), "--num-gpus", "0", "--arch", ARCH, "--epochs", "1",
        "--batch-size", "4", "--image-size", "32", "--workers", "0", "--pretrained-dir", str(root / "none")])
    train.main(args)
    return root


def test_trained_timm_model_config_and_evaluation(timm_job: Path, tmp_path: Path) -> None:
    config = json.loads((timm_job / "model" / model_lib.CONFIG_FILE).read_text())
    expected = model_lib.preprocessing_config(ARCH, 32)
    assert {k: config[k] for k in expected} == expected
    assert config["resize_size"] == round(32 / config["crop_pct"])
    assert (timm_job / "model" / "code" / "requirements.txt").read_text() == f"{TIMM_PIN}\n"
    model, _ = model_lib.load_model(timm_job / "model")
    assert type(model).__module__.startswith("timm.")
    out = tmp_path / "evaluation"
    assert evaluate_step.main(["--model-dir", str(timm_job / "model"), "--test-dir", str(timm_job / "data" / "test"),
                               "--output-dir", str(out), "--workers", "0", "--bootstrap-samples", "10"]) == 0
    report = json.loads((out / evaluate_step.EVALUATION_FILE).read_text())
    assert report["dataset"]["model_arch"] == ARCH and report["dataset"]["item_count"] == 6


# ------------------------------------------------------------------------------------------------ local endpoints

HANDLER = '''
import json
from pathlib import Path


def model_fn(model_dir):
    import mlops_timm_probe
    return {"value": mlops_timm_probe.VALUE, "file": mlops_timm_probe.__file__}


def input_fn(body, content_type):
    return json.loads(body)


def predict_fn(data, model):
    return model


def output_fn(prediction, accept):
    return json.dumps(prediction)
'''


@pytest.fixture
def mlops_home(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "mlops"))
    yield tmp_path / "mlops"
    for endpoint in endpoints.list_endpoints():  # never leave a server behind
        endpoints.delete(endpoint.name)


def _handler_model(path: Path, requirements: str) -> Path:
    (path / "code").mkdir(parents=True)
    (path / "code" / "handler.py").write_text(HANDLER)
    (path / "code" / "requirements.txt").write_text(requirements)
    return path


def test_endpoint_installs_code_requirements_into_its_own_environment(mlops_home: Path, tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    model_dir = _handler_model(tmp_path / "model", f"{TIMM_PIN}\n{wheel}\n")
    ep = endpoints.deploy("probe", model_dir, environment={"SAGEMAKER_PROGRAM": "handler.py"}, startup_timeout=120)
    status, body = endpoints.invoke("probe", b"{}", "application/json")
    answer = json.loads(body)
    env_dir = mlops_home / "endpoints" / "probe" / endpoints.ENV_DIR
    assert status == 200 and answer["value"] == 7
    assert Path(answer["file"]).is_relative_to(env_dir)  # installed into the endpoint's environment ...
    with pytest.raises(metadata.PackageNotFoundError):  # ... not into the engine's
        metadata.version("mlops-timm-probe")
    assert ep.alive


def test_endpoint_fails_the_deploy_when_pip_fails(mlops_home: Path, tmp_path: Path) -> None:
    model_dir = _handler_model(tmp_path / "model", f"{tmp_path / 'absent-0.1-py3-none-any.whl'}\n")
    with pytest.raises(endpoints.EndpointError, match="endpoint 'broken': failed to install the required packages"):
        endpoints.deploy("broken", model_dir, environment={"SAGEMAKER_PROGRAM": "handler.py"}, startup_timeout=60)


def test_trained_timm_model_served_by_a_local_endpoint(mlops_home: Path, timm_job: Path) -> None:
    endpoints.deploy("timm", timm_job / "model", environment={"SAGEMAKER_PROGRAM": "inference.py"},
                     startup_timeout=180)
    jpeg = io.BytesIO()
    sample_data.draw_sample("square", 48).save(jpeg, "JPEG")
    status, body = endpoints.invoke("timm", jpeg.getvalue(), "image/jpeg")
    prediction = json.loads(body)
    assert status == 200 and prediction["class_name"] in CLASSES
    assert (mlops_home / "endpoints" / "timm" / endpoints.ENV_DIR / "pyvenv.cfg").is_file()
