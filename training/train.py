"""Image-classification trainer run by SageMaker training jobs (TrainingStep, TuningStep trials) and the local engine.

Container contract (every path is a flag whose default comes from the SageMaker env var):
``--train`` ($SM_CHANNEL_TRAIN) and ``--validation`` ($SM_CHANNEL_VALIDATION) are ImageFolder directories
(``<class>/<file>``), ``--model-dir`` ($SM_MODEL_DIR), ``--output-data-dir`` ($SM_OUTPUT_DATA_DIR),
``--checkpoint-dir`` ($SM_CHECKPOINT_DIR, default ``/opt/ml/checkpoints``), ``--num-gpus`` ($SM_NUM_GPUS),
``--pretrained-dir`` ($SM_CHANNEL_PRETRAINED, the ``pretrained`` channel: only ``NO_PRETRAINED_WEIGHTS.txt``, or
nothing, means no weights; otherwise exactly one ``.pth``/``.pt``/``.bin`` state dict, loaded with
``weights_only=True`` into the backbone before the head is replaced -- shape-checked, see
``training.model.load_backbone_weights`` -- and winning over ``--pretrained``).
``--arch`` is a torchvision name or ``timm/<model_name>`` (``training.model.is_supported_arch``).
Hyperparameters arrive as ``--name value`` strings (booleans ``True``/``False``); canonical names use
underscores (``--batch_size``), dashed aliases (``--batch-size``) are accepted too; unknown arguments are
logged and ignored.

Outputs
-------
* stdout: one metric line per epoch (``training.metrics.format_epoch_metrics``), read by SageMaker's and
  the local tuner's regexes.
* ``model-dir``: the best epoch's weights via ``training.model.save_model`` (``model.pth`` +
  ``model_config.json``, CONTRACTS §5; ``classes`` in ``class_to_idx`` order; preprocessing from
  ``training.model.preprocessing_config`` -- for timm also timm's ``input_size``, ``crop_pct``, ``interpolation``;
  ``pretrained_weights``: what the backbone started from, ``pretrained_file``: ``{"file", "sha256"}`` (the first 12
  hex digits) of the channel's file or null) and ``code/`` for serving (``code/requirements.txt`` pins timm for a
  timm architecture).
* ``checkpoint-dir/checkpoint.pth`` after every epoch (written to a temp file, fsynced, renamed): model,
  optimizer, scheduler, epoch, best weights/epoch/accuracy, early-stopping counter, epoch history, RNG
  states (python, numpy, torch, CUDA), bad files seen, a fingerprint of the hyperparameters that shape
  training, a fingerprint of the data (sorted relative paths and sizes of the train and validation channel
  files) and the epoch target (``--epochs``). A restarted job (managed spot) resumes after the last finished
  epoch. A checkpoint of other data or another epoch target is not resumed: a WARNING says why, the file is
  renamed ``checkpoint.pth.stale-<UTC time>`` and training starts at epoch 1. A checkpoint of the same data
  whose hyperparameter fingerprint or classes differ is refused with an error (nothing is overwritten).
* ``output-data-dir`` (CONTRACTS §6):

  - ``metrics/epochs.jsonl``: one object per finished epoch (the whole history, rewritten atomically
    every epoch, so it is complete after a resume)::

        {"epoch": 1, "train_loss": 1.2, "train_accuracy": 0.5, "valid_loss": 1.1, "valid_accuracy": 0.6,
         "lr": 0.001, "epoch_time_s": 3.2}

  - ``profiler/system_metrics.jsonl``: see ``training.system_monitor`` (every
    ``--system-monitor-interval-ms``; ``{"timestamp", "cpu_percent", "memory_percent", "rss_mb",
    "gpu_utilization", "gpu_memory_mb"}``).
  - ``profiler/step_timings.jsonl``: one object per train/eval step, appended at the end of each epoch::

        {"timestamp": 1700000000.1, "epoch": 1, "step": 3, "mode": "train", "data_time_s": 0.004,
         "compute_time_s": 0.051, "batch_size": 32}

    ``data_time_s`` is the wall time spent waiting for the DataLoader; ``compute_time_s`` is host→device
    copy + forward + backward + optimizer step (CUDA: measured with CUDA events, no per-step sync).
  - ``profiler/summary.json``: totals of this process's run::

        {"device", "cuda_device_name", "num_gpus", "workers", "amp", "channels_last", "start_epoch",
         "epochs_completed", "resumed", "early_stopped", "best_epoch", "best_valid_accuracy",
         "pretrained_weights", "pretrained_file", "wall_time_s",
         "train": {"steps", "samples", "data_time_s", "compute_time_s", "samples_per_s", "data_time_fraction"},
         "eval": {...same...}, "bad_files_skipped", "bad_files": [{"path", "reason"}, ...],
         "system_monitor": {"samples", "interval_s", "max_cpu_percent", "max_rss_mb"}, "debugger_hook",
         "cuda_max_memory_allocated_mb"}

Data: JPEGs are decoded by ``torchvision.io.decode_jpeg`` (:func:`image_loader`, Pillow's pixels), other files by
Pillow. With ``--device-cache`` (auto: on CUDA when it fits) each split is decoded once into device memory and
augmented there with no loader workers (:mod:`training.device_cache`); with ``workers=0`` that gives the very
batches the folder's loader gives.

Unreadable images never stop a job: the dataset returns a marker instead of a sample, the collate
function drops it, the file is logged once (warning) and counted (``bad_files_skipped``). Truncated
images are loaded as far as they go (``ImageFile.LOAD_TRUNCATED_IMAGES``).

Debugger: see ``training.debugger`` (hook only when SageMaker wrote a Debugger config).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image, ImageFile
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_jpeg

from training import debugger, device_cache
from training.images import to_rgb
from training.metrics import format_epoch_metrics
from training.model import (
    ARCHITECTURES,
    MODEL_FILE,
    PretrainedWeightsUnavailable,
    build_model,
    eval_transform,
    file_sha256,
    is_supported_arch,
    normalize_on_device,
    preprocessing_config,
    pretrained_file,
    resolve_weights,
    save_model,
    serving_requirements,
    supported_archs_text,
    train_transform,
)
from training.samples import BadSample, transformed
from training.serving_code import write_serving_code
from training.system_monitor import SystemMonitor

logger = logging.getLogger("training.train")

CHECKPOINT_FILE = "checkpoint.pth"
CHECKPOINT_VERSION = 1
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULERS = ("cosine", "step", "none")
PRETRAINED_FALLBACKS = ("fail", "scratch")
# Hyperparameters whose change makes an existing checkpoint a different training run.
FINGERPRINT_KEYS = ("arch", "pretrained", "freeze_backbone", "hidden_units", "dropout", "lr", "batch_size",
                    "optimizer", "momentum", "weight_decay", "label_smoothing", "lr_scheduler", "lr_step_size",
                    "lr_gamma", "image_size", "seed")
HYPERPARAMETER_KEYS = (*FINGERPRINT_KEYS, "pretrained_fallback", "test_batch_size", "epochs",
                       "early_stopping_patience", "amp", "channels_last", "workers")
MAX_BAD_FILES_LISTED = 100


# --------------------------------------------------------------------------- arguments

def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def str2bool(value: str | bool) -> bool:
    """SageMaker passes booleans as strings: ``True``/``False``/``true``/``1``/``0`` ..."""
    if isinstance(value, bool):
        return value
    text = _unquote(value).lower()
    if text in ("true", "t", "yes", "y", "1", "on"):
        return True
    if text in ("false", "f", "no", "n", "0", "off", "none", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def _int(value: str) -> int:
    text = _unquote(value)
    try:
        return int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        return int(number)


def _float(value: str) -> float:
    try:
        return float(_unquote(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None


def _choice(choices: tuple[str, ...]):
    def parse(value: str) -> str:
        text = _unquote(value).lower()
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(choices)}")
        return text
    parse.__name__ = "choice"
    return parse


def _str(value: str) -> str:
    return _unquote(value)


def _arch(value: str) -> str:
    """A torchvision architecture (case-insensitive) or ``timm/<model_name>`` (training.model.is_supported_arch)."""
    text = _unquote(value)
    if text.lower() in ARCHITECTURES:
        return text.lower()
    if not is_supported_arch(text):
        raise argparse.ArgumentTypeError(f"{value!r} is not a supported architecture ({supported_archs_text()})")
    return text


def _add(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add ``--name`` (canonical, underscores) and its dashed alias."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*flags, dest=name, **kwargs)


def _bool(parser: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    _add(parser, name, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)


def _auto_bool(value: str | bool | None) -> bool | None:
    """``auto`` (None: decided by the device, see :func:`resolve_device_options`) or a boolean."""
    if value is None or (isinstance(value, str) and _unquote(value).strip().lower() == "auto"):
        return None
    return str2bool(value)


def _auto(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    _add(parser, name, type=_auto_bool, nargs="?", const=True, default=None, metavar="auto|BOOL",
         help=f"{help} (default auto: on when training on CUDA)")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The trainer's CLI; path defaults are read from the ``SM_*`` environment at call time."""
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Train an image classifier (SageMaker container contract).",
                                     add_help=add_help, allow_abbrev=False)
    # channels, directories
    _add(parser, "train", type=str, default=env("SM_CHANNEL_TRAIN", "/opt/ml/input/data/train"),
         help="training ImageFolder directory ($SM_CHANNEL_TRAIN)")
    _add(parser, "validation", type=str, default=env("SM_CHANNEL_VALIDATION", "/opt/ml/input/data/validation"),
         help="validation ImageFolder directory ($SM_CHANNEL_VALIDATION)")
    _add(parser, "model_dir", type=str, default=env("SM_MODEL_DIR", "/opt/ml/model"), help="($SM_MODEL_DIR)")
    _add(parser, "output_data_dir", type=str, default=env("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"),
         help="side outputs: metrics/, profiler/ ($SM_OUTPUT_DATA_DIR)")
    _add(parser, "checkpoint_dir", type=str, default=env("SM_CHECKPOINT_DIR", "/opt/ml/checkpoints"),
         help="per-epoch checkpoint, resumed on restart ($SM_CHECKPOINT_DIR)")
    _add(parser, "num_gpus", type=_int, default=_int(env("SM_NUM_GPUS") or "-1"),
         help="GPUs the job has ($SM_NUM_GPUS); 0 forces CPU; -1 (unset): use CUDA when available")
    _add(parser, "pretrained_dir", type=str, default=env("SM_CHANNEL_PRETRAINED", ""),
         help="pretrained channel ($SM_CHANNEL_PRETRAINED): one state dict file (.pth/.pt/.bin) loaded into the "
              "backbone before the head is replaced, or only NO_PRETRAINED_WEIGHTS.txt (no weights); a file wins "
              "over --pretrained")
    # model
    _add(parser, "arch", type=_arch, default="resnet18",
         help="|".join(ARCHITECTURES) + "|timm/<model_name>")
    _add(parser, "pretrained", type=_str, default="none",
         help="none | default | a torchvision weights name such as IMAGENET1K_V1 (timm/<name>: none | default)")
    _add(parser, "pretrained_fallback", type=_choice(PRETRAINED_FALLBACKS), default="fail",
         help="when pretrained weights cannot be loaded (offline): fail, or train from scratch")
    _add(parser, "download_timeout", type=_float, default=60.0,
         help="socket timeout (s) while downloading pretrained weights")
    _bool(parser, "freeze_backbone", False, "train only the classification head")
    _add(parser, "hidden_units", type=_int, default=0, help="hidden layer width of the head (0: linear head)")
    _add(parser, "dropout", type=_float, default=0.0)
    # optimisation
    _add(parser, "lr", type=_float, default=1e-3)
    _add(parser, "batch_size", type=_int, default=32)
    _add(parser, "test_batch_size", type=_int, default=64)
    _add(parser, "epochs", type=_int, default=10)
    _add(parser, "optimizer", type=_choice(OPTIMIZERS), default="adamw", help="|".join(OPTIMIZERS))
    _add(parser, "momentum", type=_float, default=0.9, help="SGD momentum")
    _add(parser, "weight_decay", type=_float, default=1e-4)
    _add(parser, "label_smoothing", type=_float, default=0.0)
    _add(parser, "lr_scheduler", type=_choice(LR_SCHEDULERS), default="cosine", help="|".join(LR_SCHEDULERS))
    _add(parser, "lr_step_size", type=_int, default=0, help="StepLR period in epochs (0: epochs // 3)")
    _add(parser, "lr_gamma", type=_float, default=0.1, help="StepLR decay factor")
    _add(parser, "early_stopping_patience", type=_int, default=0,
         help="stop after this many epochs without a better valid_accuracy (0: off)")
    # data / runtime
    _add(parser, "image_size", type=_int, default=224)
    _add(parser, "workers", type=_int, default=min(8, os.cpu_count() or 1), help="DataLoader worker processes")
    _add(parser, "seed", type=_int, default=42)
    _auto(parser, "amp", "bf16 autocast (CUDA only; float32 on the CPU whatever is asked)")
    _auto(parser, "channels_last", "channels-last memory format for model and inputs")
    _auto(parser, "device_normalize", "uint8 batches to the device, float conversion and normalisation there "
          "(4x fewer bytes over PCIe than float32; CPU workers stop at the uint8 crop)")
    _auto(parser, "persistent_workers", "keep DataLoader workers across epochs (no re-fork per epoch; a resumed run "
          "then sees other augmentations than an uninterrupted one)")
    _auto(parser, "device_cache", "decode the data once into device memory and augment it there, with no loader "
          "workers (auto: on CUDA when it fits; training.device_cache)")
    _add(parser, "prefetch_factor", type=_int, default=0,
         help="batches each worker loads ahead (0: auto, 4 on CUDA, else PyTorch's 2)")
    _bool(parser, "compile", False, "torch.compile the network for training and validation")
    _add(parser, "system_monitor_interval_ms", type=_int, default=500)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse known arguments; unknown ones are kept in ``args.ignored_args`` (logged by ``main``)."""
    args, unknown = get_args_parser().parse_known_args(argv)
    args.ignored_args = unknown
    return args


def _validate_args(args: argparse.Namespace) -> None:
    checks = [
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.test_batch_size >= 1, f"--test-batch-size must be >= 1, got {args.test_batch_size}"),
        (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (0.0 <= args.dropout < 1.0, f"--dropout must be in [0, 1), got {args.dropout}"),
        (0.0 <= args.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {args.label_smoothing}"),
        (args.hidden_units >= 0, f"--hidden-units must be >= 0, got {args.hidden_units}"),
        (args.image_size >= 16, f"--image-size must be >= 16, got {args.image_size}"),
        (args.workers >= 0, f"--workers must be >= 0, got {args.workers}"),
        (args.early_stopping_patience >= 0, "--early-stopping-patience must be >= 0"),
        (args.system_monitor_interval_ms > 0, "--system-monitor-interval-ms must be > 0"),
    ]
    errors = [message for ok, message in checks if not ok]
    if errors:
        raise ValueError("invalid hyperparameters: " + "; ".join(errors))


# --------------------------------------------------------------------------- data

def pil_loader(path: str) -> Image.Image:
    """Open an image as RGB with the project's conversion rules (training.images.to_rgb)."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


JPEG_MAGIC = b"\xff\xd8\xff"


def image_loader(path: str) -> torch.Tensor | Image.Image:
    """The trainer's loader. A JPEG of three components is decoded by ``torchvision.io.decode_jpeg`` straight to a
    uint8 ``CHW`` tensor: the same libjpeg-turbo decode as Pillow's, to the same pixels, without a PIL image in
    between (decode and augmentation of one sample 1.3-1.5x faster; a 2-worker DataLoader 1.15x,
    ``benchmarks/bench_dataloading.py``). Anything else -- PNG and the other formats, a grayscale or CMYK JPEG, a
    file torchvision refuses (truncated, corrupt) -- goes through :func:`pil_loader`, so its conversion rules and the
    errors a bad file is reported with stay Pillow's. ``train_transform``/``eval_transform`` take either."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:3] == JPEG_MAGIC:
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
        except RuntimeError:
            image = None
        if image is not None and image.shape[0] == 3:
            return image
    return pil_loader(path)


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder that yields ``BadSample`` for unreadable files and can reuse another split's
    ``class_to_idx`` (so validation labels match training even when a class folder is missing)."""

    def __init__(self, root: str | Path, transform: Any, class_to_idx: dict[str, int] | None = None,
                 allow_empty: bool = False) -> None:
        self._fixed_class_to_idx = class_to_idx
        super().__init__(str(root), transform=transform, loader=image_loader, allow_empty=allow_empty)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        if self._fixed_class_to_idx is None:
            return super().find_classes(directory)
        present = {entry.name for entry in os.scandir(directory) if entry.is_dir()}
        unknown = sorted(present - set(self._fixed_class_to_idx))
        if unknown:
            raise ValueError(f"{directory} has class folders that the training channel lacks: {unknown}")
        missing = sorted(set(self._fixed_class_to_idx) - present)
        if missing:
            logger.warning("%s has no folder for classes %s", directory, missing)
        mapping = dict(self._fixed_class_to_idx)
        return sorted(mapping, key=mapping.__getitem__), mapping

    def decoded(self, index: int) -> tuple[Any, int] | BadSample:
        """Item ``index`` before the transform: what the loader returns, or a ``BadSample``."""
        path, target = self.samples[index]
        try:
            return self.loader(path), target
        except Exception as exc:  # any decoder error of one file must not end the job
            return BadSample(path, f"{type(exc).__name__}: {exc}")

    def __getitem__(self, index: int) -> tuple[Any, int] | BadSample:
        item = self.decoded(index)
        if isinstance(item, BadSample) or self.transform is None:
            return item
        return transformed(self.transform, item, self.samples[index][0])


def collate_skip_bad(batch: list[Any]) -> tuple[torch.Tensor | None, torch.Tensor | None, list[BadSample]]:
    """Default-collate the good samples; return the bad ones separately (``images`` is None if none is good)."""
    good = [item for item in batch if not isinstance(item, BadSample)]
    bad = [item for item in batch if isinstance(item, BadSample)]
    if not good:
        return None, None, bad
    images, targets = default_collate(good)
    return images, targets, bad


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive numpy/python seeds from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class BadFiles:
    """Unique unreadable files seen (each logged once)."""

    def __init__(self, known: list[dict[str, str]] | None = None) -> None:
        self.files: dict[str, str] = {item["path"]: item["reason"] for item in known or []}

    def add(self, bad: list[BadSample]) -> None:
        for item in bad:
            if item.path not in self.files:
                self.files[item.path] = item.reason
                logger.warning("skipping unreadable image %s (%s); %d skipped so far",
                               item.path, item.reason, len(self.files))

    def as_list(self) -> list[dict[str, str]]:
        return [{"path": path, "reason": reason} for path, reason in sorted(self.files.items())]


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, workers: int,
                generator: torch.Generator | None, pin_memory: bool, persistent_workers: bool = False,
                prefetch_factor: int = 2) -> DataLoader:
    """Without ``persistent_workers`` (the CPU default) workers are fresh each epoch: their seeds then depend only
    on (seed, epoch), so a resumed run sees the same augmentations as an uninterrupted one."""
    extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if workers else {}
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      collate_fn=collate_skip_bad, pin_memory=pin_memory, generator=generator,
                      worker_init_fn=seed_worker if workers else None, **extra)


# --------------------------------------------------------------------------- profiling helpers

class StepTimer:
    """Per-step data/compute timings, written to ``step_timings.jsonl`` once per epoch."""

    def __init__(self, path: Path, cuda: bool) -> None:
        self.path = path
        self.cuda = cuda
        self._pending: list[tuple[dict[str, Any], Any]] = []
        self.totals = {mode: {"steps": 0, "samples": 0, "data_time_s": 0.0, "compute_time_s": 0.0}
                       for mode in ("train", "eval")}

    def start(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, start: Any, *, epoch: int, step: int, mode: str, data_time_s: float, batch_size: int) -> None:
        row = {"timestamp": round(time.time(), 4), "epoch": epoch, "step": step, "mode": mode,
               "data_time_s": round(data_time_s, 6), "compute_time_s": None, "batch_size": batch_size}
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((row, (start, end)))
        else:
            row["compute_time_s"] = round(time.perf_counter() - start, 6)
            self._pending.append((row, None))

    def flush(self) -> None:
        if not self._pending:
            return
        if self.cuda:
            torch.cuda.synchronize()
        with self.path.open("a", encoding="utf-8") as fh:
            for row, events in self._pending:
                if events is not None:
                    row["compute_time_s"] = round(events[0].elapsed_time(events[1]) / 1000.0, 6)
                totals = self.totals[row["mode"]]
                totals["steps"] += 1
                totals["samples"] += row["batch_size"]
                totals["data_time_s"] += row["data_time_s"]
                totals["compute_time_s"] += row["compute_time_s"]
                fh.write(json.dumps(row) + "\n")
        self._pending.clear()

    def summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for mode, totals in self.totals.items():
            busy = totals["data_time_s"] + totals["compute_time_s"]
            out[mode] = {**{k: round(v, 4) if isinstance(v, float) else v for k, v in totals.items()},
                         "samples_per_s": round(totals["samples"] / busy, 2) if busy else None,
                         "data_time_fraction": round(totals["data_time_s"] / busy, 4) if busy else None}
        return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- training

class _Context(NamedTuple):
    device: torch.device
    amp: bool
    channels_last: bool
    timer: StepTimer
    bad_files: BadFiles
    hook: Any
    normalize: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, std) on the device: uint8 batches come in
    forward: nn.Module | None = None  # the network as called (torch.compile'd with --compile), else the model


def _to_device(images: torch.Tensor, targets: torch.Tensor, ctx: _Context) -> tuple[torch.Tensor, torch.Tensor]:
    images = images.to(ctx.device, non_blocking=True)
    if ctx.normalize is not None:
        images = normalize_on_device(images, *ctx.normalize)
    if ctx.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(ctx.device, non_blocking=True)


def _timed_batches(loader: DataLoader, epoch: int, mode: str, ctx: _Context
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield device batches of ``loader``, recording data-loading vs compute time per step and skipped files.

    The caller's work on a batch (forward, backward, step) happens between the ``yield`` and the timer stop.
    """
    last = time.perf_counter()
    for step, (images, targets, bad) in enumerate(loader, start=1):
        data_time = time.perf_counter() - last
        ctx.bad_files.add(bad)
        if images is None:
            last = time.perf_counter()
            continue
        start = ctx.timer.start()
        images, targets = _to_device(images, targets, ctx)
        yield images, targets
        ctx.timer.stop(start, epoch=epoch, step=step, mode=mode, data_time_s=data_time, batch_size=targets.shape[0])
        last = time.perf_counter()


class _Tally:
    """Sample-weighted loss and accuracy, accumulated on the device (no per-step host sync)."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.samples = 0

    def add(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        batch = targets.shape[0]
        self.loss_sum += loss.detach().double() * batch
        self.correct += (outputs.detach().argmax(dim=1) == targets).sum()
        self.samples += batch

    def result(self, what: str) -> dict[str, float]:
        if self.samples == 0:
            raise RuntimeError(f"no readable {what} image")
        return {"loss": self.loss_sum.item() / self.samples, "accuracy": self.correct.item() / self.samples,
                "samples": self.samples}


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                    epoch: int, ctx: _Context) -> dict[str, float]:
    """One pass over ``loader``; returns ``{"loss", "accuracy", "samples"}`` (sample-weighted)."""
    model.train()
    debugger.set_mode(ctx.hook, "train")
    tally = _Tally(ctx.device)
    network = ctx.forward or model
    for images, targets in _timed_batches(loader, epoch, "train", ctx):
        with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
            outputs = network(images)
            loss = criterion(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tally.add(loss, outputs, targets)
    return tally.result("training")


def evaluate(model: nn.Module, criterion: nn.Module, loader: DataLoader, epoch: int, ctx: _Context) -> dict[str, float]:
    """Loss and accuracy over ``loader`` without gradients; returns ``{"loss", "accuracy", "samples"}``."""
    model.eval()
    debugger.set_mode(ctx.hook, "eval")
    tally = _Tally(ctx.device)
    network = ctx.forward or model
    with torch.no_grad():
        for images, targets in _timed_batches(loader, epoch, "eval", ctx):
            with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
                outputs = network(images)
                loss = criterion(outputs, targets)
            tally.add(loss, outputs, targets)
    return tally.result("validation")


def resolve_device_options(args: argparse.Namespace, device: torch.device) -> None:
    """Turn the ``auto`` options (amp, channels_last, device_normalize, persistent_workers, prefetch_factor) into
    values for ``device``: on CUDA the GPU data path is on, on the CPU everything stays as before (float32,
    contiguous, normalisation in the workers, fresh workers per epoch)."""
    cuda = device.type == "cuda"
    for name in ("amp", "channels_last", "device_normalize"):
        if getattr(args, name) is None:
            setattr(args, name, cuda)
    if args.persistent_workers is None:
        args.persistent_workers = cuda and args.workers > 0
    if not args.prefetch_factor:
        args.prefetch_factor = 4 if cuda else 2
    if args.amp and not cuda:
        logger.info("--amp requested but training on %s: bf16 autocast is CUDA-only, running in float32", device)
        args.amp = False


def select_device(args: argparse.Namespace) -> torch.device:
    if args.num_gpus != 0 and torch.cuda.is_available():
        if args.num_gpus > 1 or torch.cuda.device_count() > 1:
            logger.info("%d GPUs visible; this trainer uses one (cuda:0)", torch.cuda.device_count())
        return torch.device("cuda", 0)
    if args.num_gpus > 0:
        logger.warning("SM_NUM_GPUS=%d but CUDA is not available to torch; training on CPU", args.num_gpus)
    return torch.device("cpu")


def configure_determinism(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True  # speed over bitwise reproducibility on GPU
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def _fingerprint(args: argparse.Namespace, classes: list[str], pretrained: dict[str, str] | None = None) -> str:
    payload = {key: getattr(args, key) for key in FINGERPRINT_KEYS} | {"classes": classes}
    if pretrained:  # only then: a run without a file keeps the fingerprint older trainers wrote
        payload["pretrained_file_sha256"] = pretrained["sha256"]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _data_fingerprint(channels: dict[str, str | Path]) -> str:
    """Fingerprint of the data: the sorted relative paths and sizes of every file of each channel (one ``stat``
    per file; contents are not read). Another data set, or the same one re-split, gives another fingerprint."""
    digest = hashlib.sha256()
    for name, root in sorted(channels.items()):
        base = Path(root)
        entries = []
        for dirpath, _, filenames in os.walk(base, followlinks=True):  # as ImageFolder walks it
            for filename in filenames:
                path = Path(dirpath) / filename
                with contextlib.suppress(OSError):
                    entries.append((path.relative_to(base).as_posix(), path.stat().st_size))
        for rel, size in sorted(entries):
            digest.update(f"{name}/{rel}\0{size}\n".encode())
    return digest.hexdigest()[:16]


def _build_network(args: argparse.Namespace, num_classes: int, weights_file: Path | None = None,
                   pretrained: dict[str, str] | None = None) -> tuple[nn.Module, str | None]:
    """The model, and the name of the pretrained weights actually loaded (None: from scratch). A file of the
    pretrained channel (``weights_file``) wins over ``--pretrained``."""
    if weights_file is not None:
        if resolve_weights(args.arch, args.pretrained) is not None:
            logger.info("--pretrained %s is ignored: the pretrained channel holds %s, which wins", args.pretrained,
                        weights_file.name)
        model = build_model(args.arch, num_classes, args.hidden_units, args.dropout, None, args.freeze_backbone,
                            pretrained_file=weights_file)
        used = f"{weights_file.name} (sha256 {pretrained['sha256'] if pretrained else file_sha256(weights_file)})"
        logger.info("pretrained weights from the pretrained channel: %s", used)
        return model, used
    weights = resolve_weights(args.arch, args.pretrained)
    if weights is None:
        if args.freeze_backbone:
            logger.warning("--freeze-backbone without --pretrained trains only the head on a random backbone")
        return build_model(args.arch, num_classes, args.hidden_units, args.dropout, None, args.freeze_backbone), None
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(args.download_timeout)  # a blackholed network must not hang the job
    try:
        model = build_model(args.arch, num_classes, args.hidden_units, args.dropout, weights, args.freeze_backbone)
        return model, str(weights)
    except PretrainedWeightsUnavailable as exc:
        if args.pretrained_fallback != "scratch":
            raise
        logger.warning("%s -- continuing from scratch because --pretrained-fallback scratch", exc)
        return build_model(args.arch, num_classes, args.hidden_units, args.dropout, None, args.freeze_backbone), None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _make_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def _make_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer) -> Any:
    if args.lr_scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    if args.lr_scheduler == "step":
        step = args.lr_step_size or max(1, args.epochs // 3)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=args.lr_gamma)
    return None


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _stale_reason(state: dict[str, Any], fingerprint: str, data_fingerprint: str, epochs: int) -> str | None:
    """Why a checkpoint belongs to an earlier run that must not be resumed (other data, or the same data and
    hyperparameters with another epoch target), or None. Same data with other hyperparameters is not stale: the
    caller refuses it (two jobs sharing a checkpoint directory)."""
    recorded = state.get("data_fingerprint")
    if recorded is None:
        return "it records no data fingerprint (written by an older trainer), so its data cannot be checked"
    if recorded != data_fingerprint:
        return (f"it was written for other data (data fingerprint {recorded}, the train and validation channels "
                f"now give {data_fingerprint})")
    if state.get("fingerprint") != fingerprint:
        return None
    if state.get("epochs") != epochs:
        return f"it was written for a run of {state.get('epochs')} epochs, this job trains {epochs}"
    return None


def _move_aside(path: Path) -> Path:
    """Rename a stale checkpoint to ``<name>.stale-<UTC time>`` (never overwriting an earlier one)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.stale-{stamp}")
    counter = 1
    while target.exists():
        target = path.with_name(f"{path.name}.stale-{stamp}-{counter}")
        counter += 1
    os.replace(path, target)
    return target


def _load_checkpoint(path: Path, fingerprint: str, classes: list[str], data_fingerprint: str,
                     epochs: int) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None (none there, or a stale one that was moved aside)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"checkpoint {path} cannot be read ({exc}); move it away to start afresh") from exc
    if state.get("version") != CHECKPOINT_VERSION:
        raise RuntimeError(f"checkpoint {path} has version {state.get('version')}, expected {CHECKPOINT_VERSION}")
    stale = _stale_reason(state, fingerprint, data_fingerprint, epochs)
    if stale:
        moved = _move_aside(path)
        logger.warning("not resuming from %s: %s; moved it to %s and starting at epoch 1", path, stale, moved.name)
        return None
    if state["classes"] != classes:
        raise ValueError(f"checkpoint {path} was trained on classes {state['classes']}, the training channel has "
                         f"{classes}; use another --checkpoint-dir")
    if state["fingerprint"] != fingerprint:
        raise ValueError(f"checkpoint {path} belongs to a run with other hyperparameters "
                         f"({state.get('hyperparameters')}); use another --checkpoint-dir or remove it")
    return state


def _write_epochs(path: Path, history: list[dict[str, Any]]) -> None:
    _atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in history))


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train per ``args``; returns the run summary (also written to ``profiler/summary.json``)."""
    # Tolerate truncated JPEGs in training data: decode as far as they go (set here, not at import time).
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    started = time.time()
    if getattr(args, "ignored_args", None):
        logger.warning("ignoring unknown arguments: %s", " ".join(args.ignored_args))
    _validate_args(args)
    device = select_device(args)
    resolve_device_options(args, device)
    configure_determinism(args.seed, device)
    output_dir = Path(args.output_data_dir)
    (output_dir / "metrics").mkdir(parents=True, exist_ok=True)
    (output_dir / "profiler").mkdir(parents=True, exist_ok=True)
    monitor = SystemMonitor(output_dir / "profiler" / "system_metrics.jsonl",
                            args.system_monitor_interval_ms / 1000.0, cuda=device.type == "cuda")
    monitor.start()
    try:
        return _run(args, device, output_dir, monitor, started)
    finally:
        monitor.stop()


class _Data(NamedTuple):
    train_set: SafeImageFolder
    val_set: SafeImageFolder
    classes: list[str]
    transform_config: dict[str, Any]


class _Setup(NamedTuple):
    """The objects of one run (network, optimisation, where and what it checkpoints)."""
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    checkpoint_path: Path
    checkpoint: dict[str, Any] | None
    fingerprint: str
    data_fingerprint: str
    weights_used: str | None
    pretrained_file: dict[str, str] | None


@dataclass
class _Progress:
    """What the epoch loop carries from one epoch to the next (and a checkpoint restores)."""
    start_epoch: int = 1
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "valid_accuracy": -1.0,
                                                          "valid_loss": math.inf, "state": None})
    history: list[dict[str, Any]] = field(default_factory=list)
    stale_epochs: int = 0
    bad_files: BadFiles = field(default_factory=BadFiles)
    early_stopped: bool = False
    epochs_completed: int = 0


def _load_data(args: argparse.Namespace) -> _Data:
    for name, path in (("train", args.train), ("validation", args.validation)):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{name} channel {path} is not a directory (set SM_CHANNEL_{name.upper()} "
                                    f"or --{name})")
    transform_config = preprocessing_config(args.arch, args.image_size)
    on_workers = not args.device_normalize  # else the workers stop at uint8 (normalize_on_device)
    train_set = SafeImageFolder(args.train, train_transform(args.image_size, transform_config["mean"],
                                                            transform_config["std"],
                                                            transform_config.get("interpolation"), on_workers))
    classes = list(train_set.classes)
    if len(classes) < 2:
        raise ValueError(f"training channel {args.train} has {len(classes)} class folder(s); need at least 2")
    val_set = SafeImageFolder(args.validation, eval_transform(transform_config, on_workers),
                              class_to_idx=train_set.class_to_idx, allow_empty=True)
    if len(val_set) == 0:
        raise ValueError(f"validation channel {args.validation} has no images")
    logger.info("data: %d training images, %d validation images, %d classes", len(train_set), len(val_set),
                len(classes))
    return _Data(train_set, val_set, classes, transform_config)


def _setup(args: argparse.Namespace, device: torch.device, classes: list[str]) -> _Setup:
    """Find the pretrained file, load a checkpoint to resume (if any), build the network, optimizer, scheduler."""
    weights_file = pretrained_file(args.pretrained_dir)
    pretrained = {"file": weights_file.name, "sha256": file_sha256(weights_file)} if weights_file else None
    fingerprint = _fingerprint(args, classes, pretrained)
    data_fingerprint = _data_fingerprint({"train": args.train, "validation": args.validation})
    checkpoint_path = Path(args.checkpoint_dir) / CHECKPOINT_FILE
    checkpoint = _load_checkpoint(checkpoint_path, fingerprint, classes, data_fingerprint, args.epochs)
    if checkpoint is None:
        model, weights_used = _build_network(args, len(classes), weights_file, pretrained)
    else:  # every weight comes from the checkpoint: no download needed (a restarted job may be offline)
        model = build_model(args.arch, len(classes), args.hidden_units, args.dropout, None, args.freeze_backbone)
        weights_used = checkpoint.get("weights_used")
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    optimizer = _make_optimizer(args, model)
    return _Setup(model, criterion, optimizer, _make_scheduler(args, optimizer), checkpoint_path, checkpoint,
                  fingerprint, data_fingerprint, weights_used, pretrained)


def _resume(args: argparse.Namespace, setup: _Setup) -> _Progress:
    """The progress to start from: the checkpoint's (model, optimizer, scheduler and RNG states restored), or fresh."""
    checkpoint = setup.checkpoint
    if checkpoint is None:
        logger.info("no checkpoint at %s; starting at epoch 1", setup.checkpoint_path)
        return _Progress()
    setup.model.load_state_dict(checkpoint["model"])
    setup.optimizer.load_state_dict(checkpoint["optimizer"])
    if setup.scheduler is not None and checkpoint.get("scheduler") is not None:
        setup.scheduler.load_state_dict(checkpoint["scheduler"])
    progress = _Progress(
        start_epoch=checkpoint["epoch"] + 1, history=list(checkpoint["history"]),
        best={"epoch": checkpoint["best_epoch"], "valid_accuracy": checkpoint["best_valid_accuracy"],
              "valid_loss": checkpoint["best_valid_loss"], "state": checkpoint["best_state"]},
        stale_epochs=checkpoint["epochs_without_improvement"], bad_files=BadFiles(checkpoint.get("bad_files")),
        early_stopped=bool(checkpoint.get("early_stopped")))
    _set_rng_state(checkpoint["rng"])
    logger.info("resuming from %s: epoch %d done (best epoch %d, valid_accuracy %.4f)", setup.checkpoint_path,
                checkpoint["epoch"], progress.best["epoch"], progress.best["valid_accuracy"])
    if progress.early_stopped:
        progress.start_epoch = args.epochs + 1
    return progress


def _checkpoint_state(args: argparse.Namespace, setup: _Setup, progress: _Progress, epoch: int,
                      classes: list[str]) -> dict[str, Any]:
    best = progress.best
    return {
        "version": CHECKPOINT_VERSION, "epoch": epoch, "model": setup.model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict() if setup.scheduler is not None else None,
        "best_epoch": best["epoch"], "best_valid_accuracy": best["valid_accuracy"],
        "best_valid_loss": best["valid_loss"], "best_state": best["state"],
        "epochs_without_improvement": progress.stale_epochs, "early_stopped": progress.early_stopped,
        "history": progress.history, "rng": _rng_state(), "bad_files": progress.bad_files.as_list(),
        "classes": classes, "fingerprint": setup.fingerprint, "weights_used": setup.weights_used,
        "data_fingerprint": setup.data_fingerprint, "epochs": args.epochs,
        "hyperparameters": {key: getattr(args, key) for key in FINGERPRINT_KEYS},
    }


def _run_epoch(args: argparse.Namespace, setup: _Setup, progress: _Progress, epoch: int, loaders: tuple[Any, Any],
               ctx: _Context, classes: list[str], output_dir: Path) -> dict[str, Any]:
    """Train and validate one epoch, update the best state, write ``epochs.jsonl``, the checkpoint and the metric
    line; returns the epoch's row."""
    epoch_start = time.perf_counter()
    lr = setup.optimizer.param_groups[0]["lr"]
    train_stats = train_one_epoch(setup.model, setup.criterion, setup.optimizer, loaders[0], epoch, ctx)
    val_stats = evaluate(setup.model, setup.criterion, loaders[1], epoch, ctx)
    if setup.scheduler is not None:
        setup.scheduler.step()
    row = {"epoch": epoch, "train_loss": train_stats["loss"], "train_accuracy": train_stats["accuracy"],
           "valid_loss": val_stats["loss"], "valid_accuracy": val_stats["accuracy"], "lr": lr,
           "epoch_time_s": round(time.perf_counter() - epoch_start, 3)}
    progress.history.append(row)
    if val_stats["accuracy"] > progress.best["valid_accuracy"]:
        progress.best = {"epoch": epoch, "valid_accuracy": val_stats["accuracy"], "valid_loss": val_stats["loss"],
                         "state": {k: v.detach().to("cpu", copy=True) for k, v in setup.model.state_dict().items()}}
        progress.stale_epochs = 0
    else:
        progress.stale_epochs += 1
    progress.early_stopped = bool(args.early_stopping_patience
                                  and progress.stale_epochs >= args.early_stopping_patience)
    _write_epochs(output_dir / "metrics" / "epochs.jsonl", progress.history)
    _save_checkpoint(setup.checkpoint_path, _checkpoint_state(args, setup, progress, epoch, classes))
    sys.stdout.write(format_epoch_metrics(epoch, **{k: row[k] for k in ("train_loss", "train_accuracy",
                                                                        "valid_loss", "valid_accuracy")}) + "\n")
    sys.stdout.flush()
    ctx.timer.flush()
    progress.epochs_completed += 1
    return row


def _use_device_cache(args: argparse.Namespace, data: _Data, device: torch.device) -> bool:
    """Resolve ``--device-cache`` (auto: CUDA only) against the memory it needs; the log says what and why."""
    if args.device_cache is False or (args.device_cache is None and device.type != "cuda"):
        args.device_cache = False
        return False
    ok, verdict = device_cache.fits([data.train_set, data.val_set], device)
    if not ok:
        (logger.warning if args.device_cache else logger.info)("device cache off, the loader stays: %s", verdict)
    else:
        logger.info("device cache on: %s", verdict)
    args.device_cache = ok
    return ok


def _loaders(args: argparse.Namespace, data: _Data, device: torch.device, generator: torch.Generator
             ) -> tuple[DataLoader, DataLoader]:
    """The train (shuffled by ``generator``) and validation loaders: over the image folders with ``--workers``, or
    over their decoded copies in device memory (:mod:`training.device_cache`), in this process."""
    if _use_device_cache(args, data, device):
        splits = [device_cache.cache_split(folder, device, args.workers) for folder in (data.train_set, data.val_set)]
        options: dict[str, Any] = {"workers": 0, "pin_memory": False}
    else:
        splits = [data.train_set, data.val_set]
        options = {"workers": args.workers, "pin_memory": device.type == "cuda",
                   "persistent_workers": args.persistent_workers, "prefetch_factor": args.prefetch_factor}
    return (make_loader(splits[0], args.batch_size, shuffle=True, generator=generator, **options),
            make_loader(splits[1], args.test_batch_size, shuffle=False, generator=None, **options))


def _train_epochs(args: argparse.Namespace, setup: _Setup, progress: _Progress, data: _Data, ctx: _Context,
                  output_dir: Path) -> None:
    """Epochs ``progress.start_epoch..args.epochs`` (stopping early, or raising when the loss diverges)."""
    generator = torch.Generator()
    loaders = _loaders(args, data, ctx.device, generator)
    logger.info("training %s on %s (amp=%s, channels_last=%s, device_normalize=%s, compile=%s, device_cache=%s, "
                "workers=%d, persistent_workers=%s, prefetch_factor=%d) for epochs %d..%d", args.arch, ctx.device,
                ctx.amp, args.channels_last, args.device_normalize, args.compile, args.device_cache, args.workers,
                args.persistent_workers, args.prefetch_factor, progress.start_epoch, args.epochs)
    for epoch in range(progress.start_epoch, args.epochs + 1):
        generator.manual_seed(args.seed + epoch)  # shuffling and worker seeds are a function of (seed, epoch)
        row = _run_epoch(args, setup, progress, epoch, loaders, ctx, data.classes, output_dir)
        if not math.isfinite(row["train_loss"]):
            raise RuntimeError(f"training diverged at epoch {epoch} (train_loss={row['train_loss']}); "
                               "try a lower --lr")
        if progress.early_stopped:
            logger.info("early stopping after epoch %d: no better valid_accuracy for %d epochs (best epoch %d)",
                        epoch, progress.stale_epochs, progress.best["epoch"])
            break


def _save_best(args: argparse.Namespace, setup: _Setup, progress: _Progress, data: _Data) -> None:
    """Write the best epoch's model, its ``model_config.json`` and the serving ``code/`` into ``--model-dir``."""
    best = progress.best
    if best["state"] is None:
        raise RuntimeError("no epoch finished; nothing to save")
    setup.model.load_state_dict(best["state"])
    hyperparameters = {key: getattr(args, key) for key in HYPERPARAMETER_KEYS}
    config = {"arch": args.arch, "num_classes": len(data.classes), "classes": data.classes,
              "hidden_units": args.hidden_units, "dropout": args.dropout, **data.transform_config,
              "weights_file": MODEL_FILE, "best_epoch": best["epoch"],
              "best_valid_accuracy": best["valid_accuracy"], "pretrained_weights": setup.weights_used,
              "pretrained_file": setup.pretrained_file, "hyperparameters": hyperparameters}
    save_model(setup.model, config, args.model_dir)
    # The PyTorch inference containers import the handler only from code/ inside model.tar.gz; a timm model's
    # code/requirements.txt gets them timm.
    write_serving_code(args.model_dir, requirements=serving_requirements(args.arch))
    logger.info("saved best model (epoch %d, valid_accuracy %.4f) to %s", best["epoch"], best["valid_accuracy"],
                args.model_dir)


def _summary(args: argparse.Namespace, device: torch.device, setup: _Setup, progress: _Progress, ctx: _Context,
             monitor: SystemMonitor, started: float) -> dict[str, Any]:
    cuda = device.type == "cuda"
    bad_files = progress.bad_files
    return {"device": str(device), "cuda_device_name": torch.cuda.get_device_name(device) if cuda else None,
            "num_gpus": torch.cuda.device_count() if cuda else 0,
            "workers": args.workers, "amp": ctx.amp, "channels_last": args.channels_last,
            "device_normalize": args.device_normalize, "compile": args.compile, "device_cache": args.device_cache,
            "persistent_workers": args.persistent_workers, "prefetch_factor": args.prefetch_factor,
            "start_epoch": progress.start_epoch, "epochs_completed": progress.epochs_completed,
            "resumed": setup.checkpoint is not None, "early_stopped": progress.early_stopped,
            "best_epoch": progress.best["epoch"], "best_valid_accuracy": progress.best["valid_accuracy"],
            "pretrained_weights": setup.weights_used, "pretrained_file": setup.pretrained_file,
            "wall_time_s": round(time.time() - started, 3),
            **ctx.timer.summary(), "bad_files_skipped": len(bad_files.files),
            "bad_files": bad_files.as_list()[:MAX_BAD_FILES_LISTED], "system_monitor": monitor.summary(),
            "debugger_hook": ctx.hook is not None,
            "cuda_max_memory_allocated_mb": (round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                                             if cuda else None)}


def _run(args: argparse.Namespace, device: torch.device, output_dir: Path, monitor: SystemMonitor,
         started: float) -> dict[str, Any]:
    data = _load_data(args)
    setup = _setup(args, device, data.classes)
    progress = _resume(args, setup)
    hook = debugger.create_hook(setup.model, setup.criterion)
    timer = StepTimer(output_dir / "profiler" / "step_timings.jsonl", cuda=device.type == "cuda")
    normalize = None
    if args.device_normalize:
        normalize = tuple(torch.tensor(data.transform_config[k], dtype=torch.float32, device=device).view(1, -1, 1, 1)
                          for k in ("mean", "std"))
    forward = torch.compile(setup.model) if args.compile else setup.model
    ctx = _Context(device, args.amp, args.channels_last, timer, progress.bad_files, hook, normalize, forward)
    try:
        _train_epochs(args, setup, progress, data, ctx, output_dir)
    finally:
        timer.flush()
        debugger.close(hook)
    _save_best(args, setup, progress, data)
    summary = _summary(args, device, setup, progress, ctx, monitor, started)
    _atomic_write_text(output_dir / "profiler" / "summary.json", json.dumps(summary, indent=2))
    if progress.bad_files.files:
        logger.warning("%d unreadable image(s) were skipped (listed in profiler/summary.json)",
                       len(progress.bad_files.files))
    return summary


def _write_failure(message: str) -> None:
    """SageMaker shows ``/opt/ml/output/failure`` as the job's FailureReason."""
    output_dir = os.environ.get("SM_OUTPUT_DIR")
    if output_dir:
        with contextlib.suppress(OSError):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "failure").write_text(message[:1024])


def run(argv: list[str] | None = None) -> int:
    """CLI entry point: configure logging, train, map errors to exit codes (2: bad input, 1: other)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        main(args)
    except (PretrainedWeightsUnavailable, ValueError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        _write_failure(f"{type(exc).__name__}: {exc}")
        return 2
    except Exception as exc:
        logger.exception("training failed")
        _write_failure(f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
