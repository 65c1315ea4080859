"""Network construction, preprocessing transforms and model loading shared by trainer, evaluation and serving.

``model_config.json`` (written by the trainer next to ``model.pth``) holds everything needed to rebuild
the network and its preprocessing; ``load_model`` is the only place that turns a model directory back
into a ready-to-run ``nn.Module`` (``torch.load(..., weights_only=True)``).

A model directory is untrusted input (it comes out of an archive): ``weights_file`` must stay inside it,
``num_classes`` / ``hidden_units`` are range-checked before anything is allocated (also when they come in as
hyperparameters through ``build_model``), and whatever ``torch.load`` refuses becomes one
``InvalidModelError`` line naming the file (docs/LIMITS.md).

Architectures are torchvision names (``ARCHITECTURES``) or ``timm/<model_name>`` (any name ``timm.is_model``
knows, optionally with a pretrained tag: ``timm/efficientnet_lite0.ra_in1k``); :func:`is_supported_arch` is the one
check. A timm model's preprocessing comes from timm's data config (:func:`preprocessing_config`: mean/std,
``input_size``, ``crop_pct``, ``interpolation``; ``resize_size = round(image_size / crop_pct)``), recorded in
``model_config.json`` so evaluation and serving preprocess as training did.

Pretrained weights from a file (the training channel ``pretrained``): :func:`pretrained_file` picks the one weights
file of the channel (the placeholder ``NO_PRETRAINED_WEIGHTS.txt`` alone means none), and :func:`build_model` loads it
with :func:`load_backbone_weights` into the backbone *before* the head is replaced: the file's classifier keys are
dropped, every other key must exist in the network with the same shape and no backbone key may be missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
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
TIMM_PREFIX = "timm/"
#: The placeholder the pipeline's default ``PretrainedWeights`` points at (pipelines/packaging.py): no weights.
NO_PRETRAINED_WEIGHTS_FILE = "NO_PRETRAINED_WEIGHTS.txt"
WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin")
MAX_KEYS_LISTED = 10
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


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


def is_timm_arch(arch: Any) -> bool:
    """Whether ``arch`` names a timm model (``timm/<model_name>``)."""
    return isinstance(arch, str) and arch.startswith(TIMM_PREFIX)


def is_supported_arch(arch: Any) -> bool:
    """Whether ``arch`` is a torchvision architecture of ``ARCHITECTURES`` or ``timm/<name>`` for a model name
    ``timm.is_model`` knows (False when timm is not installed). The one check the trainer and the pipeline's
    parameter validation use."""
    if arch in ARCHITECTURES:
        return True
    if not is_timm_arch(arch):
        return False
    try:
        import timm
    except ImportError:
        logger.warning("%s needs timm, which is not installed", arch)
        return False
    name = arch.removeprefix(TIMM_PREFIX)
    return bool(name) and bool(timm.is_model(name))


def supported_archs_text() -> str:
    """The accepted architectures, for error messages."""
    return f"{', '.join(ARCHITECTURES)}, or timm/<name> for a model timm.list_models() knows"


def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise InvalidModelError("timm architectures need the timm package (pip install timm)") from exc
    return timm


@dataclass(frozen=True)
class TimmPretrained:
    """``--pretrained default`` for a timm architecture: timm's own pretrained weights of that model (tag)."""

    arch: str

    def __str__(self) -> str:
        return f"{self.arch} (timm pretrained)"


def resolve_weights(arch: str, pretrained: str | None) -> Any:
    """Map ``--pretrained`` (``none``, ``default`` or a torchvision enum member name such as
    ``IMAGENET1K_V1``) to a torchvision weights enum member, :class:`TimmPretrained` for a timm arch, or ``None``."""
    if not pretrained or pretrained.lower() in ("none", "false", "0", "no"):
        return None
    is_default = pretrained.lower() in ("default", "true", "1", "yes")
    if is_timm_arch(arch):
        if not is_default:
            raise ValueError(f"--pretrained {pretrained!r} for {arch}: timm architectures take none or default; "
                             "name a pretrained tag in the arch instead (timm/<name>.<tag>)")
        return TimmPretrained(arch)
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    if is_default:
        return enum.DEFAULT
    try:
        return enum[pretrained.split(".")[-1]]
    except KeyError as exc:
        raise ValueError(f"unknown weights {pretrained!r} for {arch}; choose from {[w.name for w in enum]}") from exc


def _unavailable(arch: str, weights: Any, exc: BaseException) -> PretrainedWeightsUnavailable:
    if is_timm_arch(arch):
        where = (f"the Hugging Face hub cache (HF_HOME, {os.environ.get('HF_HOME', '~/.cache/huggingface')}) or "
                 f"TORCH_HOME ({os.environ.get('TORCH_HOME', '~/.cache/torch')}/hub/checkpoints)")
    else:
        where = f"TORCH_HOME ({os.environ.get('TORCH_HOME', '~/.cache/torch')}/hub/checkpoints)"
    return PretrainedWeightsUnavailable(
        f"could not load pretrained weights {weights} for {arch}: {exc}. Weights are downloaded to {where}; "
        "offline, place the file there, give a state dict file through the pretrained channel (pipeline parameter "
        "PretrainedWeights), or train from scratch with --pretrained none (or --pretrained-fallback scratch).")


def _backbone(arch: str, weights: Any) -> nn.Module:
    if not is_supported_arch(arch):
        raise InvalidModelError(f"unsupported arch {arch!r}; choose from {supported_archs_text()}")
    try:
        if is_timm_arch(arch):
            return _timm().create_model(arch.removeprefix(TIMM_PREFIX), pretrained=weights is not None)
        from torchvision import models

        return models.get_model(arch, weights=weights)
    except Exception as exc:  # URLError, OSError, RuntimeError, hub errors from the download
        if weights is None:
            raise
        raise _unavailable(arch, weights, exc) from exc


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
    """The classifier submodule of a torchvision architecture."""
    return "fc" if arch.startswith("resnet") else "classifier"


def classifier_name(model: nn.Module, arch: str) -> str:
    """The dotted name of the submodule ``make_head`` replaces: timm's ``pretrained_cfg["classifier"]`` for a timm
    model (``classifier``, ``head.fc``...), :func:`classifier_attr` for torchvision."""
    if not is_timm_arch(arch):
        return classifier_attr(arch)
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(name, list | tuple):
        if len(name) != 1:
            raise InvalidModelError(f"{arch} has {len(name)} classifier heads ({', '.join(name)}); only models "
                                    "with one classifier are supported")
        name = name[0]
    if not isinstance(name, str) or not name:
        raise InvalidModelError(f"{arch}: timm's pretrained_cfg names no classifier; cannot replace the head")
    return name


def _in_features(old: nn.Module, model: nn.Module, arch: str) -> int:
    if isinstance(old, nn.Linear):
        return old.in_features
    linears = [m for m in old.modules() if isinstance(m, nn.Linear)]
    if linears:  # torchvision classifiers are Sequential(..., Linear)
        return linears[-1].in_features
    raise InvalidModelError(f"{arch}: the classifier is a {type(old).__name__}, not a Linear layer (model "
                            f"num_features {getattr(model, 'num_features', '?')}); its head cannot be replaced")


def build_model(arch: str, num_classes: int, hidden_units: int = 0, dropout: float = 0.0,
                weights: Any = None, freeze_backbone: bool = False,
                pretrained_file: str | Path | None = None) -> nn.Module:
    """A torchvision or timm backbone with our classification head replacing its last layer. ``num_classes`` and
    ``hidden_units`` are checked against ``NUM_CLASSES_RANGE`` / ``HIDDEN_UNITS_RANGE`` first. ``pretrained_file``
    (a state dict file) is loaded into the backbone before the head is replaced (:func:`load_backbone_weights`)."""
    num_classes = checked_int("num_classes", num_classes, NUM_CLASSES_RANGE)
    hidden_units = checked_int("hidden_units", hidden_units or 0, HIDDEN_UNITS_RANGE)
    model = _backbone(arch, weights)
    name = classifier_name(model, arch)
    if pretrained_file is not None:
        load_backbone_weights(model, Path(pretrained_file), name)
    if freeze_backbone:
        for param in model.parameters():
            param.requires_grad = False
    in_features = _in_features(model.get_submodule(name), model, arch)
    model.set_submodule(name, make_head(in_features, num_classes, hidden_units, dropout))
    return model


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild the (untrained, randomly initialised) network described by a ``model_config.json`` dict."""
    return build_model(config.get("arch"), config.get("num_classes"), config.get("hidden_units", 0),
                       float(config.get("dropout", 0.0)), weights=None)


# ------------------------------------------------------------------------------------------ pretrained file


def pretrained_file(directory: str | Path | None) -> Path | None:
    """The weights file of the ``pretrained`` channel, or None when it holds none.

    Nothing, or nothing but the placeholder :data:`NO_PRETRAINED_WEIGHTS_FILE`: None. Otherwise exactly one file
    ending in one of :data:`WEIGHTS_SUFFIXES` (other files beside it are logged and ignored); none or several is an
    ``InvalidModelError`` listing what the channel holds. A path to a file is that file."""
    if not directory:
        return None
    base = Path(directory)
    if base.is_file():
        return base
    if not base.is_dir():
        return None
    files = sorted(p for p in base.rglob("*") if p.is_file() and p.name != NO_PRETRAINED_WEIGHTS_FILE)
    if not files:
        return None
    weights = [p for p in files if p.suffix.lower() in WEIGHTS_SUFFIXES]
    listing = ", ".join(p.relative_to(base).as_posix() for p in files[:20]) + (
        f" (and {len(files) - 20} more)" if len(files) > 20 else "")
    if len(weights) != 1:
        raise InvalidModelError(f"the pretrained channel {base} must hold exactly one weights file "
                                f"({'/'.join(WEIGHTS_SUFFIXES)}), it holds {len(weights)}: {listing}")
    if len(files) > 1:
        logger.warning("pretrained channel %s: using %s, ignoring the other files (%s)", base, weights[0].name, listing)
    return weights[0]


def file_sha256(path: str | Path, length: int = 12) -> str:
    """The first ``length`` hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def _state_dict_of(state: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``; ``module.`` stripped."""
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not state:
        raise InvalidModelError(f"{path} is not a state dict of tensors ({len(bad)} of {len(state)} entries are not "
                                f"name -> tensor: {', '.join(bad[:MAX_KEYS_LISTED])})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _listed(what: str, items: list[str]) -> str:
    shown = ", ".join(items[:MAX_KEYS_LISTED])
    more = f", ... ({len(items) - MAX_KEYS_LISTED} more)" if len(items) > MAX_KEYS_LISTED else ""
    return f"{len(items)} {what}: {shown}{more}"


def load_backbone_weights(model: nn.Module, path: Path, classifier: str) -> None:
    """Load the state dict file ``path`` (``weights_only=True``) into ``model``'s backbone, before its head is replaced.

    The file's keys under ``classifier`` (the 1000-class head) are dropped; every other key must exist in the model
    with the same shape and no backbone key may be missing (BatchNorm ``num_batches_tracked`` excepted, as
    ``load_state_dict`` fills it in), else ``InvalidModelError`` naming the mismatched keys."""
    given = _state_dict_of(_load_state(path), path)
    prefix = f"{classifier}."
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    given = {k: v for k, v in given.items() if not k.startswith(prefix)}
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in own]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in given.items()
              if k in own and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = [_listed(what, items) for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                    ("shape mismatches (file vs network)", shapes)) if items]
        raise InvalidModelError(f"{path} does not fit the backbone ({len(own)} tensors besides the classifier "
                                f"{classifier!r}): {'; '.join(problems)}")
    model.load_state_dict(given, strict=False)
    logger.info("loaded %d backbone tensors from %s (classifier %r left to the new head)", len(given), path,
                classifier)


# ------------------------------------------------------------------------------------------ preprocessing


def timm_data_config(arch: str, model: nn.Module | None = None) -> dict[str, Any]:
    """timm's data config (``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``...) of a timm arch:
    ``timm.data.resolve_data_config`` on ``model``, or on the model's pretrained config when none is given."""
    timm = _timm()
    from timm.data import resolve_data_config

    if model is not None:
        return dict(resolve_data_config({}, model=model))
    cfg = timm.models.get_pretrained_cfg(arch.removeprefix(TIMM_PREFIX))
    return dict(resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg is not None else {}))


def preprocessing_config(arch: str, image_size: int) -> dict[str, Any]:
    """The ``model_config.json`` entries that define preprocessing: ``image_size``, ``resize_size``, ``mean``, ``std``;
    for a timm arch also timm's ``input_size``, ``crop_pct`` and ``interpolation`` (``resize_size`` then follows
    ``crop_pct``: ``round(image_size / crop_pct)``)."""
    if not is_timm_arch(arch):
        return {"image_size": image_size, "resize_size": round(image_size * 256 / 224), "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD)}
    data = timm_data_config(arch)
    crop_pct = float(data.get("crop_pct") or 0.875)
    return {"image_size": image_size, "resize_size": max(image_size, round(image_size / crop_pct)),
            "mean": [float(v) for v in data["mean"]], "std": [float(v) for v in data["std"]],
            "input_size": [int(v) for v in data["input_size"]], "crop_pct": crop_pct,
            "interpolation": str(data.get("interpolation", "bilinear"))}


def _interpolation(name: Any) -> Any:
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name if name in _INTERPOLATIONS else "bilinear")


def _normalize(mean: Any, std: Any) -> list[Any]:
    from torchvision.transforms import v2

    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def eval_transform(config: dict[str, Any], normalize: bool = True):
    """Deterministic preprocessing: resize shorter side, center crop, to float tensor, normalize (interpolation per
    the config's ``interpolation``, bilinear when absent). ``normalize=False`` stops at the uint8 ``CHW`` tensor
    (the trainer's GPU data path: :func:`normalize_on_device` then runs on the device)."""
    from torchvision.transforms import v2

    size = int(config.get("image_size", 224))
    steps = [v2.ToImage(), v2.Resize(int(config.get("resize_size", round(size * 256 / 224))),
                                     interpolation=_interpolation(config.get("interpolation")), antialias=True),
             v2.CenterCrop(size)]
    if normalize:
        steps += _normalize(config.get("mean", IMAGENET_MEAN), config.get("std", IMAGENET_STD))
    return v2.Compose(steps)


def train_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str | None = None,
                    normalize: bool = True):
    """Training augmentation: random resized crop + horizontal flip, then normalize (``normalize=False``: uint8
    out, as :func:`eval_transform`)."""
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=(0.5, 1.0),
                                                interpolation=_interpolation(interpolation), antialias=True),
             v2.RandomHorizontalFlip()]
    if normalize:
        steps += _normalize(mean, std)
    return v2.Compose(steps)


def normalize_on_device(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A uint8 ``NCHW`` batch (already on its device) -> float32 in [0, 1], normalized by ``mean``/``std`` (``1x3x1x1``
    tensors on that device): what ``ToDtype(scale=True)`` + ``Normalize`` do per sample, once per batch."""
    return images.float().mul_(1.0 / 255).sub_(mean).div_(std)  # torchvision's own ops, in its order


def serving_requirements(arch: str) -> list[str]:
    """The pip requirements the serving and evaluation containers need beyond the PyTorch image for ``arch``
    (``timm==<installed version>`` for a timm arch; none for torchvision)."""
    if not is_timm_arch(arch):
        return []
    from importlib.metadata import version

    return [f"timm=={version('timm')}"]


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
