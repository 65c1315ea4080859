"""Network construction, preprocessing transforms and model loading shared by trainer, evaluation and serving.

``model_config.json`` (written by the trainer next to ``model.pth``) holds everything needed to rebuild
the network and its preprocessing; ``load_model`` is the only place that turns a model directory back
into a ready-to-run ``nn.Module`` (``torch.load(..., weights_only=True)``).

A model directory is untrusted input (it comes out of an archive): ``weights_file`` must stay inside it,
``num_classes`` / ``hidden_units`` are range-checked before anything is allocated (also when they come in as
hyperparameters through ``build_model``), and whatever ``torch.load`` refuses becomes one
``InvalidModelError`` line naming the file (docs/LIMITS.md).
"""

from __future__ import annotations

import json
import logging
import operator
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_FILE = "model.pth"
CONFIG_FILE = "model_config.json"
NUM_CLASSES_RANGE = (1, 100_000)  # ImageNet-21k has ~21.8k classes
HIDDEN_UNITS_RANGE = (0, 65_536)  # 0: linear head; 65,536 x 2,048 (resnet50) floats is 512 MiB already


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (typically: offline and not in ``TORCH_HOME``)."""


class InvalidModelError(ValueError):
    """A model config, hyperparameter or weights file that is refused (out of range, escaping, unloadable)."""


def checked_int(name: str, value: Any, bounds: tuple[int, int]) -> int:
    """``value`` as an int within ``bounds`` (inclusive), else ``InvalidModelError`` naming ``name``."""
    low, high = bounds
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
        value = int(value)
    try:
        n = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        n = None
    if n is None:
        raise InvalidModelError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    if not low <= n <= high:
        raise InvalidModelError(f"{name} = {n} is outside the allowed range {low}..{high} "
                                "(refused before building the network)")
    return n


def resolve_weights(arch: str, pretrained: str | None) -> Any:
    """Map ``--pretrained`` (``none``, ``default`` or a torchvision enum member name such as
    ``IMAGENET1K_V1``) to a torchvision weights enum member, or ``None``."""
    from torchvision.models import get_model_weights

    if not pretrained or pretrained.lower() in ("none", "false", "0", "no"):
        return None
    enum = get_model_weights(arch)
    if pretrained.lower() in ("default", "true", "1", "yes"):
        return enum.DEFAULT
    try:
        return enum[pretrained.split(".")[-1]]
    except KeyError as exc:
        raise ValueError(f"unknown weights {pretrained!r} for {arch}; choose from {[w.name for w in enum]}") from exc


def _backbone(arch: str, weights: Any) -> nn.Module:
    from torchvision import models

    if arch not in ARCHITECTURES:
        raise InvalidModelError(f"unsupported arch {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    try:
        return models.get_model(arch, weights=weights)
    except Exception as exc:  # URLError, OSError, RuntimeError from the hub download
        if weights is None:
            raise
        torch_home = os.environ.get("TORCH_HOME", "~/.cache/torch")
        raise PretrainedWeightsUnavailable(
            f"could not load pretrained weights {weights} for {arch}: {exc}. Weights are downloaded to "
            f"TORCH_HOME ({torch_home}/hub/checkpoints); offline, place the file there or train from scratch "
            "with --pretrained none (or --pretrained-fallback scratch)."
        ) from exc


def make_head(in_features: int, num_classes: int, hidden_units: int, dropout: float) -> nn.Module:
    """Linear→ReLU→Dropout→Linear, or a single (optionally dropout-preceded) Linear when hidden_units is 0."""
    if hidden_units and hidden_units > 0:
        return nn.Sequential(
            nn.Linear(in_features, hidden_units), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden_units, num_classes),
        )
    if dropout > 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Sequential(nn.Linear(in_features, num_classes))


def classifier_attr(arch: str) -> str:
    return "fc" if arch.startswith("resnet") else "classifier"


def build_model(arch: str, num_classes: int, hidden_units: int = 0, dropout: float = 0.0,
                weights: Any = None, freeze_backbone: bool = False) -> nn.Module:
    """A torchvision backbone with our classification head replacing its last layer. ``num_classes`` and
    ``hidden_units`` are checked against ``NUM_CLASSES_RANGE`` / ``HIDDEN_UNITS_RANGE`` first."""
    num_classes = checked_int("num_classes", num_classes, NUM_CLASSES_RANGE)
    hidden_units = checked_int("hidden_units", hidden_units or 0, HIDDEN_UNITS_RANGE)
    model = _backbone(arch, weights)
    if freeze_backbone:
        for param in model.parameters():
            param.requires_grad = False
    attr = classifier_attr(arch)
    old = getattr(model, attr)
    if isinstance(old, nn.Linear):
        in_features = old.in_features
    else:  # torchvision classifiers are Sequential(..., Linear)
        in_features = next(m for m in reversed(list(old.modules())) if isinstance(m, nn.Linear)).in_features
    setattr(model, attr, make_head(in_features, num_classes, hidden_units, dropout))
    return model


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild the (untrained) network described by a ``model_config.json`` dict."""
    return build_model(config.get("arch"), config.get("num_classes"), config.get("hidden_units", 0),
                       float(config.get("dropout", 0.0)), weights=None)


def eval_transform(config: dict[str, Any]):
    """Deterministic preprocessing: resize shorter side, center crop, to float tensor, normalize."""
    from torchvision.transforms import v2

    size = int(config.get("image_size", 224))
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(int(config.get("resize_size", round(size * 256 / 224))), antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(config.get("mean", IMAGENET_MEAN)), list(config.get("std", IMAGENET_STD))),
    ])


def train_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Training augmentation: random resized crop + horizontal flip, then normalize."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def save_model(model: nn.Module, config: dict[str, Any], model_dir: str | Path) -> None:
    """Write ``model.pth`` (state_dict only) and ``model_config.json`` into ``model_dir``."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, model_dir / MODEL_FILE)
    (model_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def weights_path(model_dir: str | Path, weights_file: Any) -> Path:
    """``model_dir/weights_file``, refused (``InvalidModelError``) unless it resolves to a file inside
    ``model_dir``: no absolute paths, no ``..`` or symlinks out of it."""
    base = Path(model_dir).resolve()
    if not isinstance(weights_file, str) or not weights_file or Path(weights_file).is_absolute():
        raise InvalidModelError(f"weights_file {weights_file!r} in {CONFIG_FILE} must be a relative path inside "
                                f"the model directory {base}")
    path = (base / weights_file).resolve()
    if not path.is_relative_to(base) or path == base:
        raise InvalidModelError(f"weights_file {weights_file!r} in {CONFIG_FILE} points outside the model "
                                f"directory {base}; refused")
    if not path.is_file():
        raise FileNotFoundError(f"weights_file {weights_file!r} ({path}) is missing or not a regular file")
    return path


def _refusal(exc: BaseException) -> str:
    """torch's multi-paragraph weights_only message -> its one informative sentence."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        text = text.split(". Please use", 1)[0]
    text = " ".join(text.split())[:300]
    return f"{type(exc).__name__}: {text}" if text else f"{type(exc).__name__}, an empty or truncated file"


def _load_state(path: Path) -> Mapping[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, RuntimeError (zip), ...: the file is refused
        raise InvalidModelError(f"{path}: torch.load(weights_only=True) refused it ({_refusal(exc)})") from exc
    if not isinstance(state, Mapping):
        raise InvalidModelError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


def _read_config(config_path: Path) -> dict[str, Any]:
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a model directory written by training/train.py")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidModelError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidModelError(f"{config_path} holds a {type(config).__name__}, not a JSON object")
    return config


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load ``model_config.json`` + ``model.pth`` (``weights_only=True``) from a directory; eval mode.
    Raises ``InvalidModelError`` (a ``ValueError``) for a refused config or weights file."""
    model_dir = Path(model_dir)
    config = _read_config(model_dir / CONFIG_FILE)
    path = weights_path(model_dir, config.get("weights_file", MODEL_FILE))
    model = model_from_config(config)
    state = _load_state(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InvalidModelError(f"{path} does not match the network in {CONFIG_FILE}: "
                                f"{' '.join(str(exc).split())[:300]}") from exc
    model.to(device).eval()
    return model, config
