"""What the trainer's datasets hand the loader for one image: ``(sample, target)``, or a :class:`BadSample` naming
the file and why it could not be used. One module both the trainer and :mod:`training.device_cache` import, so the
class is one class even when ``train.py`` runs as ``__main__`` (as the training toolkit runs it)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class BadSample(NamedTuple):
    """Returned by the datasets instead of a sample whose file cannot be read."""
    path: str
    reason: str


def transformed(transform: Any, item: tuple[Any, int], path: str) -> tuple[Any, int] | BadSample:
    """``(transform(sample), target)``, or a ``BadSample`` naming ``path`` when the transform fails on it."""
    try:
        return transform(item[0]), item[1]
    except torch.OutOfMemoryError:
        raise  # the device's problem, not the image's (training.device_cache augments on the GPU)
    except Exception as exc:  # one odd image must not end the job
        return BadSample(path, f"{type(exc).__name__}: {exc}")
