"""Network construction, preprocessing transforms and model loading shared by trainer, evaluation and serving.

``model_config.json`` (written by the trainer next to ``model.pth``) holds everything needed to rebuild
the network and its preprocessing; ``load_model`` is the only place that turns a model directory back
into a ready-to-run ``nn.Module`` (``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import json
import logging
import os
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


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (typically: offline and not in ``TORCH_HOME``)."""


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
        raise ValueError(f"unsupported arch {arch!r}; choose from {', '.join(ARCHITECTURES)}")
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
    """A torchvision backbone with our classification head replacing its last layer."""
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
    return build_model(config["arch"], int(config["num_classes"]), int(config.get("hidden_units", 0)),
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


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load ``model_config.json`` + ``model.pth`` (``weights_only=True``) from a directory; eval mode."""
    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a model directory written by training/train.py")
    config = json.loads(config_path.read_text())
    model = model_from_config(config)
    state = torch.load(model_dir / config.get("weights_file", MODEL_FILE), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device).eval()
    return model, config
