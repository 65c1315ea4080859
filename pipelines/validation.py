"""Checks on an execution's parameter values before anything runs (both targets).

SageMaker validates a parameter's *type* at ``StartPipelineExecution`` but not what the project's jobs need, so an
``EpochsMin`` above ``EpochsMax`` or an unknown ``Arch`` would only fail after ``PrepareData`` ran (minutes on
AWS, paid). :func:`check_parameters` takes the values an execution will see -- the definition's defaults with the
``--param`` overrides on top -- and returns every problem as one line; ``pipelines.run`` refuses the start with
them. The ranges are SageMaker's own limits where there is one (tuning job counts, instance counts) and the
trainer's where not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

APPROVAL_STATUSES = ("Approved", "Rejected", "PendingManualApproval")
#: SageMaker's CreateHyperParameterTuningJob ResourceLimits (MaxNumberOfTrainingJobs, MaxParallelTrainingJobs) >= 1.
_INTEGER_RANGES: dict[str, tuple[int, int]] = {
    "MaxTrainingJobs": (1, 750),
    "MaxParallelTrainingJobs": (1, 100),
    "EpochsMin": (1, 10_000),
    "EpochsMax": (1, 10_000),
    "ImageSize": (16, 1024),
    "ResizeSize": (16, 2048),
    "DataLoaderWorkers": (0, 64),
    "EndpointInstanceCount": (1, 100),
}
_INSTANCE_PARAMETERS = ("ProcessingInstanceType", "TrainingInstanceType", "EndpointInstanceType")


def _architectures() -> tuple[str, ...]:
    from training.model import ARCHITECTURES

    return ARCHITECTURES


def _ranges(values: Mapping[str, Any]) -> list[str]:
    problems = []
    for name, (low, high) in _INTEGER_RANGES.items():
        if name in values and not low <= int(values[name]) <= high:
            problems.append(f"{name}={values[name]} is out of range ({low}..{high})")
    return problems


def _relations(values: Mapping[str, Any]) -> list[str]:
    problems = []
    if "EpochsMin" in values and "EpochsMax" in values and int(values["EpochsMin"]) > int(values["EpochsMax"]):
        problems.append(f"EpochsMin={values['EpochsMin']} is greater than EpochsMax={values['EpochsMax']}")
    if "ImageSize" in values and "ResizeSize" in values and int(values["ResizeSize"]) < int(values["ImageSize"]):
        problems.append(f"ResizeSize={values['ResizeSize']} is smaller than ImageSize={values['ImageSize']} "
                        "(the center crop needs the resized image to be at least ImageSize)")
    return problems


def _supported_arch(arch: str) -> bool:
    """training.model's one check: a torchvision name or ``timm/<name>`` that timm knows."""
    from training.model import is_supported_arch

    return is_supported_arch(arch)


def _choices(values: Mapping[str, Any], architectures: Callable[[], tuple[str, ...]], local: bool) -> list[str]:
    problems = []
    arch = str(values.get("Arch", ""))
    if "Arch" in values and arch not in architectures() and not _supported_arch(arch):
        problems.append(f"Arch={arch!r} is not a supported architecture ({', '.join(architectures())}, or "
                        "timm/<name> for a model timm.list_models() knows)")
    weights = str(values.get("PretrainedWeights", "s3://"))
    if not weights.startswith("s3://") and not (local and Path(weights).expanduser().exists()):
        problems.append(f"PretrainedWeights={weights!r} must be an s3:// URI" +
                        (" or an existing local file or folder" if local else " (a local path works only with "
                         "--target local)"))
    if "ModelApprovalStatus" in values and values["ModelApprovalStatus"] not in APPROVAL_STATUSES:
        problems.append(f"ModelApprovalStatus={values['ModelApprovalStatus']!r} must be one of "
                        f"{', '.join(APPROVAL_STATUSES)}")
    threshold = values.get("AccuracyThreshold")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        problems.append(f"AccuracyThreshold={threshold} must be between 0 and 1")
    for name in _INSTANCE_PARAMETERS:
        if name in values and not str(values[name]).startswith("ml."):
            problems.append(f"{name}={values[name]!r} is not a SageMaker instance type (ml.*)")
    if "InputDataUrl" in values and not str(values["InputDataUrl"]).strip():
        problems.append("InputDataUrl is empty")
    return problems


def check_parameters(values: Mapping[str, Any], architectures: Callable[[], tuple[str, ...]] = _architectures, *,
                     local: bool = False) -> list[str]:
    """Every problem with an execution's parameter values (typed as the definition types them), one line each;
    ``local``: for the local target, where a local path is also an input location."""
    return _ranges(values) + _relations(values) + _choices(values, architectures, local)
