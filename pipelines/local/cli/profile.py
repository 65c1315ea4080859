"""The local profile: pipeline Parameters sized to the machine a ``--target local`` execution runs on.

The definition's defaults are SageMaker's (ResNet-50, ImageNet weights, 224 px, 12 trials of 5-20 epochs on a GPU
instance): hours on a laptop CPU, and a failure offline, where ImageNet weights cannot be downloaded. For every
Parameter the user does not set (``--param``), ``start --target local`` takes the value of the machine's profile
column below; what the user sets always wins, and the definition's default stays wherever the profile has no row.

=========================  ===================  =====================  ==================
Parameter                  ``cpu-small``        ``cpu``                ``gpu``
=========================  ===================  =====================  ==================
Arch                       resnet18             resnet18               resnet50 (def.)
ImageSize / ResizeSize     64 / 72              112 / 128              224 / 256 (def.)
MaxTrainingJobs            3                    6                      12 (def.)
MaxParallelTrainingJobs    1                    cores // 4 (1..3)      1
EpochsMin / EpochsMax      3 / 6                3 / 10                 5 / 20 (def.)
DataLoaderWorkers          0 (<= 2 cores) or 1  min(4, cores - 2)      min(8, cores - 1)
Pretrained                 the definition's (``default``) when the architecture's torchvision weights are in
                           ``TORCH_HOME`` or downloadable, or ``PretrainedWeights`` is given; else ``none``:
                           from scratch, with a warning
AccuracyThreshold          the definition's (0.7), except when training falls back to scratch: 0.3
=========================  ===================  =====================  ==================

``cpu-small``: no GPU and at most 4 cores or under 8 GiB of memory; ``cpu``: no GPU, more; ``gpu``: an NVIDIA GPU
(``nvidia-smi -L`` lists one). ``start`` prints the resolved table with each value's origin (``definition`` /
``local profile`` / ``user``) and records it on the execution (``PipelineExecutionDescription``, which
``describe`` shows); warnings (the fallback to scratch) go to stderr and onto the record too -- never silently.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ORIGIN_DEFINITION, ORIGIN_PROFILE, ORIGIN_USER = "definition", "local profile", "user"
#: SageMaker's limit on PipelineExecutionDescription.
DESCRIPTION_LIMIT = 3072
SCRATCH_ACCURACY_THRESHOLD = "0.3"
#: The Parameters the profile sizes, in display order.
PROFILE_PARAMETERS = ("Arch", "Pretrained", "ImageSize", "ResizeSize", "MaxTrainingJobs", "MaxParallelTrainingJobs",
                      "EpochsMin", "EpochsMax", "DataLoaderWorkers", "AccuracyThreshold", "PretrainedWeights")


@dataclass(frozen=True)
class Machine:
    """What the profile is chosen by."""

    cores: int
    memory_gib: float
    gpus: int

    @property
    def kind(self) -> str:
        if self.gpus:
            return "gpu"
        return "cpu-small" if self.cores <= 4 or self.memory_gib < 8 else "cpu"


def detect_machine() -> Machine:
    """Cores this process may use, physical memory, NVIDIA GPUs (``nvidia-smi -L``; no torch import)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory = 0.0
    return Machine(cores=cores, memory_gib=round(memory, 1), gpus=_gpu_count())


def _gpu_count() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU "))


def profile_values(machine: Machine) -> dict[str, str]:
    """The profile column of ``machine`` (``Pretrained`` and ``AccuracyThreshold`` are decided by :func:`resolve`)."""
    cores = machine.cores
    if machine.kind == "gpu":
        return {"MaxParallelTrainingJobs": "1", "DataLoaderWorkers": str(max(0, min(8, cores - 1)))}
    if machine.kind == "cpu":
        return {"Arch": "resnet18", "ImageSize": "112", "ResizeSize": "128", "MaxTrainingJobs": "6",
                "MaxParallelTrainingJobs": str(max(1, min(3, cores // 4))), "EpochsMin": "3", "EpochsMax": "10",
                "DataLoaderWorkers": str(max(0, min(4, cores - 2)))}
    return {"Arch": "resnet18", "ImageSize": "64", "ResizeSize": "72", "MaxTrainingJobs": "3",
            "MaxParallelTrainingJobs": "1", "EpochsMin": "3", "EpochsMax": "6",
            "DataLoaderWorkers": "0" if cores <= 2 else "1"}


def torchvision_weights_available(arch: str, timeout_s: float = 3.0) -> str | None:
    """Where ``arch``'s default torchvision weights would come from: the cached file under ``TORCH_HOME``
    (``hub/checkpoints``), or their URL when it answers within ``timeout_s`` (a HEAD request, nothing downloaded);
    ``None`` offline, and for a timm or unknown architecture."""
    if arch.startswith("timm/"):
        return None
    try:
        from torch.hub import get_dir
        from torchvision.models import get_model_weights

        weights = get_model_weights(arch).DEFAULT
    except (ImportError, ValueError, KeyError):
        return None
    path = Path(get_dir()) / "checkpoints" / Path(weights.url).name
    if path.is_file():
        return str(path)
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(weights.url, method="HEAD"), timeout=timeout_s):
            return weights.url
    except OSError:  # URLError, timeouts, refused connections: offline
        return None


@dataclass
class Resolved:
    """A start's parameter values with where each came from, and the warnings to show and record."""

    machine: Machine
    values: dict[str, str]
    origins: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    def overrides(self) -> list[dict[str, str]]:
        """StartPipelineExecution's ``PipelineParameters``: what the user and the profile set."""
        return [{"Name": name, "Value": self.values[name]} for name in self.values
                if self.origins[name] != ORIGIN_DEFINITION]

    def rows(self) -> list[tuple[str, str, str]]:
        """``(parameter, value, origin)`` of the sized Parameters, then the other user-set ones."""
        shown = [name for name in PROFILE_PARAMETERS if name in self.values]
        shown += [name for name in self.values if name not in shown and self.origins[name] == ORIGIN_USER]
        return [(name, self.values[name], self.origins[name]) for name in shown]

    def description(self) -> str:
        """The record written on the execution (``PipelineExecutionDescription``, at most 3072 characters)."""
        head = (f"local profile {self.machine.kind} ({self.machine.cores} cores, {self.machine.memory_gib:g} GiB, "
                f"{self.machine.gpus} GPU)")
        lines = [head, *(f"{name}={value} ({origin})" for name, value, origin in self.rows())]
        lines += [f"WARNING: {warning}" for warning in self.warnings]
        text = "\n".join(lines)
        return text if len(text) <= DESCRIPTION_LIMIT else text[:DESCRIPTION_LIMIT - 1] + "…"

    def as_json(self) -> dict[str, Any]:
        return {"profile": self.machine.kind, "machine": vars(self.machine),
                "parameters": {name: {"value": value, "origin": origin} for name, value, origin in self.rows()},
                "warnings": self.warnings}


def resolve(defaults: Mapping[str, Any], user: Mapping[str, str], machine: Machine | None = None,
            weights_available: Any = torchvision_weights_available) -> Resolved:
    """Values for every Parameter of ``defaults`` (``{name: default}``): the user's, else the profile's, else the
    definition's. ``Pretrained`` falls back to ``none`` (with a warning, and the scratch accuracy gate) when no
    weights can be had: none given through ``PretrainedWeights``, none cached for the architecture, no network."""
    machine = machine or detect_machine()
    values = {name: "" if value is None else str(value) for name, value in defaults.items()}
    origins = dict.fromkeys(values, ORIGIN_DEFINITION)
    for name, value in profile_values(machine).items():
        if name in values:
            values[name], origins[name] = value, ORIGIN_PROFILE
    for name, value in user.items():
        values[name], origins[name] = str(value), ORIGIN_USER
    resolved = Resolved(machine, values, origins)
    _decide_pretrained(resolved, str(defaults.get("PretrainedWeights") or ""), weights_available)
    return resolved


def _decide_pretrained(resolved: Resolved, default_weights: str, weights_available: Any) -> None:
    values, origins = resolved.values, resolved.origins
    if "Pretrained" not in values or origins["Pretrained"] == ORIGIN_USER:
        return
    given = origins.get("PretrainedWeights") == ORIGIN_USER and values.get("PretrainedWeights") != default_weights
    arch = values.get("Arch", "")
    if given:
        return  # the trainer loads the file; Pretrained only matters without one
    if str(values["Pretrained"]).lower() in ("none", "false", "0", "no") or weights_available(arch):
        return
    values["Pretrained"], origins["Pretrained"] = "none", ORIGIN_PROFILE
    resolved.warnings.append(
        f"no pretrained weights for {arch}: none given (--param PretrainedWeights=<s3:// URI or local state dict "
        "file>), none cached in TORCH_HOME and none downloadable (offline) -- training from scratch")
    if origins.get("AccuracyThreshold") == ORIGIN_DEFINITION:
        values["AccuracyThreshold"], origins["AccuracyThreshold"] = SCRATCH_ACCURACY_THRESHOLD, ORIGIN_PROFILE
        resolved.warnings.append(f"AccuracyThreshold lowered to {SCRATCH_ACCURACY_THRESHOLD} for training from "
                                 "scratch (set it with --param AccuracyThreshold=...)")
