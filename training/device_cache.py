"""A split decoded once into device memory (uint8), served from there: no decoding, no loader workers, per epoch.

On a GPU instance the DataLoader is what caps training: each epoch decodes and crops every image again on the
instance's few vCPUs. The PrepareData step's output is small -- shorter side ``ResizeSize`` (256 px by default:
the 6,680 training images of the dog-breed set are about 1.3 GB as uint8) -- so it usually fits beside the model in
device memory. :func:`cache_split` decodes a split once (the trainer's own loader, in ``workers`` processes) into
one uint8 ``CHW`` tensor per image on the device; :class:`DecodedSplit` then applies the split's transform (the same
torchvision v2 random resized crop and flip, or resize and centre crop) to those tensors on the device, one sample
at a time, through an ordinary in-process ``DataLoader``.

What training sees does not change: a ``DecodedSplit`` has the folder's indices (an unreadable file stays a
``BadSample`` at its index), and its DataLoader shuffles with the same generator and draws the augmentations from
the same global RNG in the same order as the folder's loader with ``workers=0`` -- so on the CPU (``--device-cache
true``) both give the same batches, bit for bit (tests/test_train.py). With workers the folder's loader draws the
augmentations in the workers instead, from seeds of (seed, epoch): other, equally random crops.

``auto`` (the default) turns the cache on with CUDA only, when the decoded split (sized from the image headers,
without decoding) fits in :data:`DEVICE_MEMORY_FRACTION` of the free device memory; else the folder's loader
stays, and the log says why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import pil_to_tensor

from training.samples import BadSample, transformed

logger = logging.getLogger(__name__)

#: At most this share of the device's free memory (after the model is on it) holds the decoded images.
DEVICE_MEMORY_FRACTION = 0.4
#: The share of the machine's available memory a cache on the CPU device may take.
HOST_MEMORY_FRACTION = 0.25


class DecodedSplit(Dataset):
    """``images[i]`` (a uint8 ``CHW`` tensor on the device, or the folder's ``BadSample`` for an unreadable file)
    through ``transform``, with its target: a drop-in for the image folder it was decoded from."""

    def __init__(self, images: list[Any], targets: list[int], paths: list[str],
                 transform: Callable[[Any], Any] | None) -> None:
        self.images = images
        self.targets = targets
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        image = self.images[index]
        if isinstance(image, BadSample):
            return image  # reported by the collate function, as from the folder
        item = (image, self.targets[index])
        return item if self.transform is None else transformed(self.transform, item, self.paths[index])

    @property
    def nbytes(self) -> int:
        return sum(image.numel() for image in self.images if not isinstance(image, BadSample))


def decoded_bytes(paths: list[str]) -> int:
    """What the images at ``paths`` take as 8-bit RGB, from their headers (Pillow reads no pixel for ``size``);
    a file whose header cannot be read counts nothing (it will be a ``BadSample``)."""
    total = 0
    for path in paths:
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        total += 3 * width * height
    return total


def memory_budget(device: torch.device) -> int:
    """Bytes a cache may take on ``device``: a share of the free device memory, or of the host's available memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * DEVICE_MEMORY_FRACTION)
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * HOST_MEMORY_FRACTION)


def fits(folders: list[Any], device: torch.device) -> tuple[bool, str]:
    """Whether the decoded ``folders`` (image folders with ``samples``) fit the device's budget, and why (for logs)."""
    need = sum(decoded_bytes([path for path, _ in folder.samples]) for folder in folders)
    budget = memory_budget(device)
    verdict = f"{need / 2**20:.0f} MiB decoded, budget {budget / 2**20:.0f} MiB on {device}"
    return need <= budget, verdict


class _Decode(Dataset):
    """The folder's items before its transform, the sample a uint8 tensor (Pillow's RGB images made one)."""

    def __init__(self, folder: Any) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, index: int) -> Any:
        item = self.folder.decoded(index)
        if not isinstance(item, BadSample) and not isinstance(item[0], torch.Tensor):
            item = (pil_to_tensor(item[0]), item[1])
        return item


def cache_split(folder: Any, device: torch.device, workers: int) -> DecodedSplit:
    """Decode every image of ``folder`` once (in ``workers`` processes) onto ``device``; its transform comes along."""
    images: list[Any] = []
    targets: list[int] = []
    # A generator of its own: a loader without one draws its base seed from the global RNG, which the training
    # loop's augmentations draw from next (their stream must not depend on whether the cache was built).
    loader = DataLoader(_Decode(folder), batch_size=32, num_workers=workers, collate_fn=list,
                        generator=torch.Generator().manual_seed(0))
    for batch in loader:
        for item in batch:
            bad = isinstance(item, BadSample)
            images.append(item if bad else item[0].to(device))
            targets.append(-1 if bad else int(item[1]))
    split = DecodedSplit(images, targets, [path for path, _ in folder.samples], folder.transform)
    logger.info("decoded %d images of %s into %s memory (%.0f MiB)", len(images), folder.root, device,
                split.nbytes / 2**20)
    return split
