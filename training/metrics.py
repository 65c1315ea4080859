"""The one place that defines the trainer's metric lines and the regexes that read them.

The trainer prints one line per epoch, e.g.::

    epoch=3 train_loss=0.8400 train_accuracy=0.7012 valid_loss=0.9100 valid_accuracy=0.7712;

SageMaker reads these lines from the training job's log with ``METRIC_DEFINITIONS`` (estimator
``metric_definitions`` and the tuning objective); the local engine's tuner uses the very same regexes.
"""

from __future__ import annotations

import math
import re

OBJECTIVE_METRIC = "valid_accuracy"
OBJECTIVE_TYPE = "Maximize"

# Order matters only for printing; each name is distinct and not a substring of another name.
METRIC_NAMES = ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy")

_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan|inf)"

METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": name, "Regex": f"{name}={_NUMBER};?"} for name in METRIC_NAMES
] + [{"Name": "epoch", "Regex": r"epoch=([0-9]+) train_loss="}]

_EPOCH_LINE = re.compile(r"^epoch=(\d+) (.*);\s*$")


def format_epoch_metrics(epoch: int, **metrics: float) -> str:
    """Return the fixed-format metric line for one epoch (``name=value`` pairs, ``;``-terminated)."""
    unknown = set(metrics) - set(METRIC_NAMES)
    if unknown:
        raise ValueError(f"unknown metric names: {sorted(unknown)}")
    parts = [f"epoch={int(epoch)}"]
    for name in METRIC_NAMES:
        if name in metrics:
            value = float(metrics[name])
            parts.append(f"{name}={'nan' if math.isnan(value) else f'{value:.4f}'}")
    return " ".join(parts) + ";"


def metric_regex(name: str) -> re.Pattern[str]:
    """Compiled regex of the metric definition called ``name``."""
    for definition in METRIC_DEFINITIONS:
        if definition["Name"] == name:
            return re.compile(definition["Regex"])
    raise KeyError(f"no metric definition named {name!r}")


def parse_metric_values(text: str, name: str, regex: str | None = None) -> list[float]:
    """All values of metric ``name`` in a log, in order, as SageMaker would extract them."""
    pattern = re.compile(regex) if regex else metric_regex(name)
    return [float(m.group(1)) for m in pattern.finditer(text)]


def parse_epoch_lines(text: str) -> list[dict[str, float]]:
    """Parse every epoch metric line of a log into dicts (``{"epoch": 1, "train_loss": ...}``)."""
    rows: list[dict[str, float]] = []
    for line in text.splitlines():
        match = _EPOCH_LINE.match(line.strip())
        if not match:
            continue
        row: dict[str, float] = {"epoch": int(match.group(1))}
        for pair in match.group(2).split():
            key, _, value = pair.partition("=")
            if key in METRIC_NAMES:
                row[key] = float(value)
        rows.append(row)
    return rows
