"""Local implementations of the SageMaker Debugger built-in rules the pipeline uses.

The ``smdebug`` pip package ships the trial API, the :class:`smdebug.rules.Rule` base class and ``invoke_rule``,
but not the built-in rules (those live only in AWS's rule container image). This module re-implements the ones
our pipeline attaches, following the parameters and semantics AWS documents for each built-in rule:

* tensor rules (``smdebug.rules.Rule`` subclasses, run with ``invoke_rule`` over the saved tensors):
  ``LossNotDecreasing``, ``Overfit``, ``Overtraining``, ``VanishingGradient``, ``PoorWeightInitialization``;
* profiler rules (read the trainer's ``profiler/*.jsonl`` side outputs, CONTRACTS §6): ``LowGPUUtilization``
  and the data-loading analysis the ``ProfilerReport`` aggregates.

Rule parameters arrive as the definition's ``RuleParameters`` strings (``rule_to_invoke`` and ``action_json``, which
the SDK writes, are removed by the caller). Every tensor rule accepts exactly the parameters AWS documents for that
built-in rule ("List of Debugger built-in rules", docs.aws.amazon.com/sagemaker/latest/dg/debugger-built-in-rules.html),
listed with their documented defaults in its ``PARAMETERS``; an unknown name (e.g. Overtraining's ``patience_train``
given to Overfit) or a malformed value raises :class:`RuleParameterError` naming it, so the rule reports ``Error``
instead of silently running with defaults.
Each tensor rule records human-readable sentences in ``findings`` (the last one explains why it fired) and
``notes`` (what it looked at), which the runner turns into ``StatusDetails``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from smdebug.core.modes import ModeKeys
from smdebug.rules import Rule

log = logging.getLogger(__name__)

_MODES = {"TRAIN": ModeKeys.TRAIN, "EVAL": ModeKeys.EVAL, "GLOBAL": ModeKeys.GLOBAL, "PREDICT": ModeKeys.PREDICT}


class RuleParameterError(ValueError):
    """A rule parameter from the definition could not be parsed."""


# ----------------------------------------------------------------------------------------------------------------
# parameter parsing (RuleParameters are strings in the definition)


def _param(params: Mapping[str, Any], name: str, default: Any, kind: type) -> Any:
    raw = params.get(name)
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return default
    try:
        if kind is bool:
            text = str(raw).strip().lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(float(str(raw)))
        if kind is float:
            value = float(str(raw))
            if math.isnan(value):
                raise ValueError(raw)
            return value
        return kind(raw)
    except (TypeError, ValueError) as exc:
        raise RuleParameterError(f"rule parameter {name}={raw!r} is not a valid {kind.__name__}") from exc


def _regex_list(params: Mapping[str, Any], name: str, default: list[str] | None = None) -> list[str]:
    raw = params.get(name)
    if raw is None or str(raw).strip() == "":
        return list(default or [])
    patterns = [p.strip() for p in str(raw).split(",") if p.strip()]
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RuleParameterError(f"rule parameter {name}: invalid regex {pattern!r}: {exc}") from exc
    return patterns


def _mode(params: Mapping[str, Any]) -> ModeKeys | None:
    raw = params.get("mode")
    if raw is None or str(raw).strip() == "":
        return None
    key = str(raw).strip().upper().removeprefix("MODES.").removeprefix("MODEKEYS.")
    if key not in _MODES:
        raise RuleParameterError(f"rule parameter mode={raw!r} is not one of {sorted(_MODES)}")
    return _MODES[key]


def _scalar(value: Any) -> float:
    array = np.asarray(value, dtype=np.float64)
    return float(array.reshape(-1)[0]) if array.size else float("nan")


def _fmt(value: float) -> str:
    return f"{value:.4g}"


# ----------------------------------------------------------------------------------------------------------------
# tensor rules


@dataclass
class _Plateau:
    """The best (lowest) value so far and how many updates have passed since one beat it by more than ``delta``."""

    delta: float = 0.0
    best: float = math.inf
    wait: int = 0

    def update(self, value: float) -> bool:
        """Record ``value``; True when it is a new optimum (the wait restarts)."""
        if value < self.best - self.delta:
            self.best, self.wait = value, 0
            return True
        self.wait += 1
        return False


class _TensorRule(Rule):
    """Common plumbing: parameter check, findings/notes, loss tensor selection, mode lookup."""

    # The documented parameters of the built-in rule (``base_trial`` aside) and their documented defaults.
    PARAMETERS: dict[str, Any] = {}

    def __init__(self, base_trial: Any, params: Mapping[str, Any]) -> None:
        unknown = sorted(set(params) - set(self.PARAMETERS))
        if unknown:
            raise RuleParameterError(
                f"{type(self).__name__} has no parameter {', '.join(unknown)} (its parameters: "
                f"{', '.join(self.PARAMETERS) or 'none'})")
        # Actions (e.g. StopTraining) are never executed locally: the rules run after the job has finished.
        super().__init__(base_trial, action_str="")
        self.params = dict(params)
        self.findings: list[str] = []
        self.notes: list[str] = []
        self.evaluations = 0

    def _param(self, name: str, kind: type) -> Any:
        """A documented parameter, parsed, or its documented default."""
        return _param(self.params, name, self.PARAMETERS[name], kind)

    def _regex_list(self, name: str) -> list[str]:
        """A documented list parameter (comma-separated string), or its documented default."""
        default = self.PARAMETERS[name]
        return _regex_list(self.params, name, [default] if isinstance(default, str) else default)

    def _mode_of(self, step: int) -> ModeKeys:
        try:
            return self.base_trial.mode(step)
        except Exception:  # noqa: BLE001 - smdebug raises several types for unknown steps
            return ModeKeys.GLOBAL

    def _loss_names(self, regexes: list[str], use_losses_collection: bool = True,
                    collection_names: list[str] | None = None) -> list[str]:
        names: set[str] = set()
        for pattern in regexes:
            names.update(self.base_trial.tensor_names(regex=pattern))
        collections = self.base_trial.collections()
        for collection in [*(collection_names or []), *(["losses"] if use_losses_collection else [])]:
            if collection in collections:
                names.update(self.base_trial.tensor_names(collection=collection))
        return sorted(names)

    def _value(self, name: str, step: int) -> float | None:
        tensor = self.base_trial.tensor(name)
        if step not in tensor.steps():
            return None
        return _scalar(tensor.value(step))


class LossNotDecreasing(_TensorRule):
    """Fires when the loss does not decrease by ``diff_percent`` % over at least ``num_steps`` steps.

    Parameters (AWS defaults): ``collection_names`` (None), ``tensor_regex`` (None), ``use_losses_collection``
    (True), ``num_steps`` (10), ``diff_percent`` (0.0: the loss only has to decrease), ``mode`` (None: EVAL, then
    TRAIN, then GLOBAL, the first mode that has loss values). Evaluation happens every ``num_steps``: the loss at the
    current step is compared with the loss at the last evaluated step, at least ``num_steps`` (mode steps) behind.
    A loss that is not finite fires at once.
    """

    PARAMETERS = {"collection_names": None, "tensor_regex": None, "use_losses_collection": True, "num_steps": 10,
                  "diff_percent": 0.0, "mode": None}

    def __init__(self, base_trial: Any, params: Mapping[str, Any]) -> None:
        super().__init__(base_trial, params)
        self.collection_names = self._regex_list("collection_names")
        self.tensor_regex = self._regex_list("tensor_regex")
        self.use_losses_collection = self._param("use_losses_collection", bool)
        self.num_steps = self._param("num_steps", int)
        self.diff_percent = self._param("diff_percent", float)
        if self.num_steps < 1:
            raise RuleParameterError(f"rule parameter num_steps={self.num_steps} must be >= 1")
        self.losses = self._loss_names(self.tensor_regex, self.use_losses_collection, self.collection_names)
        self.mode = _mode(params) or self._default_mode()
        self._last: dict[str, tuple[int, float]] = {}
        self.notes.append(f"losses {self.losses or 'none found'} in mode {self.mode.name}")

    def _default_mode(self) -> ModeKeys:
        for mode in (ModeKeys.EVAL, ModeKeys.TRAIN):
            for name in self.losses:
                if self.base_trial.tensor(name).steps(mode=mode):
                    return mode
        return ModeKeys.GLOBAL

    def invoke_at_step(self, step: int) -> bool:
        if self.mode != ModeKeys.GLOBAL and self._mode_of(step) != self.mode:
            return False
        mode_step = step if self.mode == ModeKeys.GLOBAL else self.base_trial.mode_step(step)
        fired = False
        for name in self.losses:
            loss = self._value(name, step)
            if loss is None:
                continue
            if not math.isfinite(loss):
                self.findings.append(f"{name} is {loss} at step {step}: training diverged")
                fired = True
                continue
            if name not in self._last:
                self._last[name] = (mode_step, loss)
                continue
            last_step, last_loss = self._last[name]
            if mode_step - last_step < self.num_steps:
                continue
            self.evaluations += 1
            self._last[name] = (mode_step, loss)
            decrease = (last_loss - loss) / abs(last_loss) * 100.0 if last_loss else 0.0
            if decrease < self.diff_percent:
                self.findings.append(
                    f"{name} went from {_fmt(last_loss)} ({self.mode.name} step {last_step}) to {_fmt(loss)} "
                    f"({self.mode.name} step {mode_step}): decreased {decrease:.2f}% < diff_percent "
                    f"{self.diff_percent:g}%"
                )
                fired = True
        return fired


def _phases(trial: Any, names: list[str], start_step: int = 0) -> list[tuple[ModeKeys, list[int], float]]:
    """Consecutive runs of saved steps in the same mode, with the mean loss of each run (one value per step:
    the mean over the selected loss tensors)."""
    steps: dict[int, list[float]] = {}
    for name in names:
        tensor = trial.tensor(name)
        for step in tensor.steps():
            if step >= start_step:
                steps.setdefault(step, []).append(_scalar(tensor.value(step)))
    phases: list[tuple[ModeKeys, list[int], list[float]]] = []
    for step in sorted(steps):
        mode = trial.mode(step)
        if phases and phases[-1][0] == mode:
            phases[-1][1].append(step)
            phases[-1][2].extend(steps[step])
        else:
            phases.append((mode, [step], list(steps[step])))
    return [(mode, phase_steps, float(np.mean(values))) for mode, phase_steps, values in phases]


class Overfit(_TensorRule):
    """Fires when validation loss exceeds training loss by more than ``ratio_threshold`` (relative) ``patience``
    times in a row.

    Parameters (AWS defaults): ``tensor_regex`` (None: the ``losses`` collection), ``start_step`` (0: steps before
    it are not compared), ``patience`` (1: how many comparisons in a row may exceed the threshold before the rule
    fires), ``ratio_threshold`` (0.1: the largest allowed ``(mean validation loss - mean training loss) / mean
    training loss``). Each validation pass (a run of EVAL steps) is compared with the training steps just before it.
    """

    PARAMETERS = {"tensor_regex": None, "start_step": 0, "patience": 1, "ratio_threshold": 0.1}

    def __init__(self, base_trial: Any, params: Mapping[str, Any]) -> None:
        super().__init__(base_trial, params)
        self.tensor_regex = self._regex_list("tensor_regex")
        self.start_step = self._param("start_step", int)
        self.patience = self._param("patience", int)
        if self.patience < 1:
            raise RuleParameterError(f"rule parameter patience={self.patience} must be >= 1")
        self.ratio_threshold = self._param("ratio_threshold", float)
        self.losses = self._loss_names(self.tensor_regex)
        self._phases = _phases(base_trial, self.losses, self.start_step)
        self._phase_end = {steps[-1]: i for i, (_, steps, _) in enumerate(self._phases)}
        self._streak = 0
        self.notes.append(f"losses {self.losses or 'none found'}; ratio_threshold {self.ratio_threshold:g}")

    def invoke_at_step(self, step: int) -> bool:
        index = self._phase_end.get(step)
        if index is None or step < self.start_step:
            return False
        mode, steps, mean_val = self._phases[index]
        if mode != ModeKeys.EVAL:
            return False
        train = next((p for p in reversed(self._phases[:index]) if p[0] == ModeKeys.TRAIN), None)
        if train is None or train[2] == 0:
            return False
        self.evaluations += 1
        ratio = (mean_val - train[2]) / abs(train[2])
        if ratio > self.ratio_threshold:
            self._streak += 1
        else:
            self._streak = 0
        if self._streak >= self.patience:
            self.findings.append(
                f"validation loss {_fmt(mean_val)} (steps {steps[0]}-{steps[-1]}) vs training loss {_fmt(train[2])}: "
                f"(val - train) / train = {ratio:.2f} > ratio_threshold {self.ratio_threshold:g} for "
                f"{self._streak} validation pass(es)"
            )
            return True
        return False


class Overtraining(_TensorRule):
    """Fires when the training loss stops improving for ``patience_train`` saved training steps, or the validation
    loss for ``patience_validation`` validation passes.

    Parameters (AWS defaults): ``patience_train`` (5), ``patience_validation`` (10), ``delta`` (0.1: the minimum
    improvement that counts as a new optimum). The losses are the ``losses`` collection. Training losses are
    compared per saved step; validation losses per validation pass (mean over its steps).
    """

    PARAMETERS = {"patience_train": 5, "patience_validation": 10, "delta": 0.1}

    def __init__(self, base_trial: Any, params: Mapping[str, Any]) -> None:
        super().__init__(base_trial, params)
        self.patience_train = self._param("patience_train", int)
        self.patience_validation = self._param("patience_validation", int)
        self.delta = self._param("delta", float)
        self.losses = self._loss_names([])
        self._phases = _phases(base_trial, self.losses)
        self._phase_end = {steps[-1]: i for i, (_, steps, _) in enumerate(self._phases)}
        self._train = _Plateau(self.delta)
        self._val = _Plateau(self.delta)
        self.notes.append(f"losses {self.losses or 'none found'}; delta {self.delta:g}")

    def invoke_at_step(self, step: int) -> bool:
        mode = self._mode_of(step)
        if mode == ModeKeys.TRAIN:
            values = [v for v in (self._value(n, step) for n in self.losses) if v is not None]
            if not values:
                return False
            loss = float(np.mean(values))
            self.evaluations += 1
            self._train.update(loss)
            if self._train.wait >= self.patience_train:
                self.findings.append(
                    f"training loss has not improved by more than delta {self.delta:g} below {_fmt(self._train.best)} "
                    f"for {self._train.wait} training steps (patience_train {self.patience_train}); at step {step}"
                )
                return True
        elif mode == ModeKeys.EVAL and step in self._phase_end:
            _, steps, loss = self._phases[self._phase_end[step]]
            self.evaluations += 1
            self._val.update(loss)
            if self._val.wait >= self.patience_validation:
                self.findings.append(
                    f"validation loss has not improved by more than delta {self.delta:g} below {_fmt(self._val.best)} "
                    f"for {self._val.wait} validation passes (patience_validation {self.patience_validation})"
                )
                return True
        return False


class VanishingGradient(_TensorRule):
    """Fires when the mean absolute value of a gradient falls below ``threshold`` (AWS default 1e-7).

    Gradients are the ``gradients`` collection (falling back to tensors named ``gradient/...``).
    """

    PARAMETERS = {"threshold": 1e-7}

    def __init__(self, base_trial: Any, params: Mapping[str, Any]) -> None:
        super().__init__(base_trial, params)
        self.threshold = self._param("threshold", float)
        names = base_trial.tensor_names(collection="gradients") if "gradients" in base_trial.collections() else []
        self.gradients = sorted(set(names) | set(base_trial.tensor_names(regex="^gradient/")))
        self.notes.append(f"{len(self.gradients)} gradient tensors; threshold {self.threshold:g}")

    def invoke_at_step(self, step: int) -> bool:
        for name in self.gradients:
            tensor = self.base_trial.tensor(name)
            if step not in tensor.steps():
                continue
            self.evaluations += 1
            mean_abs = float(np.mean(np.abs(np.asarray(tensor.value(step), dtype=np.float64))))
            if mean_abs < self.threshold:
                self.findings.append(
                    f"mean |{name}| = {mean_abs:.3g} < threshold {self.threshold:g} at step {step}: gradients vanish"
                )
                return True
        return False


class PoorWeightInitialization(_TensorRule):
    """Checks the first ``steps`` steps for signs of a poor initialisation (AWS semantics):

    * the ratio between the largest and smallest variance of the activation inputs (``activation_inputs_regex``,
      default ``.*relu_input``) across layers exceeds ``threshold`` (10.0);
    * the spread between the 5th and 95th percentile of all gradients is below ``distribution_range`` (0.001);
    * the loss does not reach a new minimum for ``patience`` (5) consecutive saved steps.
    """

    PARAMETERS = {"activation_inputs_regex": ".*relu_input", "threshold": 10.0, "distribution_range": 0.001,
                  "patience": 5, "steps": 10}

    def __init__(self, base_trial: Any, params: Mapping[str, Any]) -> None:
        super().__init__(base_trial, params)
        self.activation_regex = self._regex_list("activation_inputs_regex")
        self.threshold = self._param("threshold", float)
        self.distribution_range = self._param("distribution_range", float)
        self.patience = self._param("patience", int)
        self.steps = self._param("steps", int)
        self.activations = sorted({n for p in self.activation_regex for n in base_trial.tensor_names(regex=p)})
        collections = base_trial.collections()
        grads = base_trial.tensor_names(collection="gradients") if "gradients" in collections else []
        self.gradients = sorted(set(grads) | set(base_trial.tensor_names(regex="^gradient/")))
        self.losses = self._loss_names([])
        self._loss = _Plateau()
        self.notes.append(
            f"{len(self.activations)} activation inputs, {len(self.gradients)} gradients, first {self.steps} steps"
        )

    def invoke_at_step(self, step: int) -> bool:
        if step >= self.steps:
            return False
        variances = {}
        for name in self.activations:
            tensor = self.base_trial.tensor(name)
            if step in tensor.steps():
                variances[name] = float(np.var(np.asarray(tensor.value(step), dtype=np.float64)))
        if len(variances) >= 2:
            self.evaluations += 1
            low, high = min(variances.values()), max(variances.values())
            ratio = high / low if low > 0 else math.inf
            if ratio > self.threshold:
                self.findings.append(
                    f"activation-input variances range {low:.3g}..{high:.3g} across {len(variances)} layers at step "
                    f"{step}: max/min ratio {ratio:.3g} > threshold {self.threshold:g}"
                )
                return True
        grads = [
            np.asarray(self.base_trial.tensor(n).value(step), dtype=np.float64).reshape(-1)
            for n in self.gradients
            if step in self.base_trial.tensor(n).steps()
        ]
        if grads:
            self.evaluations += 1
            values = np.concatenate(grads)
            spread = float(np.percentile(values, 95) - np.percentile(values, 5))
            if spread < self.distribution_range:
                self.findings.append(
                    f"gradient distribution too narrow at step {step}: p95 - p5 = {spread:.3g} < distribution_range "
                    f"{self.distribution_range:g}"
                )
                return True
        losses = [v for v in (self._value(n, step) for n in self.losses) if v is not None]
        if losses and self._mode_of(step) in (ModeKeys.TRAIN, ModeKeys.GLOBAL):
            loss = float(np.mean(losses))
            self.evaluations += 1
            if not self._loss.update(loss) and self._loss.wait >= self.patience:
                self.findings.append(
                    f"loss did not improve on {_fmt(self._loss.best)} for {self._loss.wait} steps in the first "
                    f"{self.steps} steps (patience {self.patience})"
                )
                return True
        return False


TENSOR_RULES: dict[str, type[_TensorRule]] = {
    cls.__name__: cls for cls in (LossNotDecreasing, Overfit, Overtraining, VanishingGradient, PoorWeightInitialization)
}


# ----------------------------------------------------------------------------------------------------------------
# profiler rules (on the trainer's side outputs)


@dataclass
class ProfilerFinding:
    """One observation of a profiler rule: ``triggered`` marks a problem; ``advice`` says what to do about it."""

    rule: str
    triggered: bool
    detail: str
    advice: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def low_gpu_utilization(system_metrics: Iterable[Mapping[str, Any]], params: Mapping[str, Any]) -> ProfilerFinding:
    """AWS ``LowGPUUtilization``: after ``patience`` datapoints, over sliding windows of ``window`` datapoints, the
    GPU is under-utilised when the 95th percentile is below ``threshold_p95`` (70) and fluctuating when the 95th
    percentile is above it while the 5th percentile is below ``threshold_p5`` (10). A CPU-only run has no GPU
    datapoints and reports no issue."""
    threshold_p95 = _param(params, "threshold_p95", 70.0, float)
    threshold_p5 = _param(params, "threshold_p5", 10.0, float)
    window = _param(params, "window", 500, int)
    patience = _param(params, "patience", 1000, int)
    if window < 1:
        raise RuleParameterError(f"rule parameter window={window} must be >= 1")
    values = [float(m["gpu_utilization"]) for m in system_metrics if m.get("gpu_utilization") is not None]
    if not values:
        return ProfilerFinding("LowGPUUtilization", False, "No GPU was used in this training job (CPU-only run).")
    series = np.asarray(values[patience:], dtype=np.float64)
    if series.size < window:
        return ProfilerFinding(
            "LowGPUUtilization",
            False,
            f"Only {len(values)} GPU datapoints: fewer than patience ({patience}) + window ({window}); not evaluated.",
        )
    under = fluct = 0
    checked = 0
    for start in range(0, series.size - window + 1, window):
        chunk = series[start : start + window]
        p95, p5 = float(np.percentile(chunk, 95)), float(np.percentile(chunk, 5))
        checked += 1
        if p95 < threshold_p95:
            under += 1
        elif p5 < threshold_p5:
            fluct += 1
    data = {"windows": checked, "underutilized": under, "fluctuating": fluct, "median": float(np.median(series))}
    if under or fluct:
        return ProfilerFinding(
            "LowGPUUtilization",
            True,
            f"GPU under-utilised in {under} and fluctuating in {fluct} of {checked} windows of {window} datapoints "
            f"(p95 threshold {threshold_p95:g}%, p5 threshold {threshold_p5:g}%; median {data['median']:.0f}%).",
            "Keep the GPU busy: raise the batch size, raise --workers so data loading keeps up, or use a smaller "
            "instance type.",
            data,
        )
    detail = f"GPU utilisation fine in {checked} windows (median {data['median']:.0f}%)."
    return ProfilerFinding("LowGPUUtilization", False, detail, "", data)


def data_loading_bottleneck(
    step_timings: Iterable[Mapping[str, Any]], summary: Mapping[str, Any], max_ratio: float = 0.5
) -> ProfilerFinding:
    """Share of training step time spent waiting for data; above ``max_ratio`` the input pipeline is the
    bottleneck (the local counterpart of the ProfilerReport's Dataloader/CPUBottleneck analysis)."""
    data_s = compute_s = 0.0
    steps = 0
    for row in step_timings:
        if row.get("mode", "train") != "train":
            continue
        try:
            data_s += float(row.get("data_time_s") or 0.0)
            compute_s += float(row.get("compute_time_s") or 0.0)
        except (TypeError, ValueError):
            continue
        steps += 1
    total = data_s + compute_s
    if steps == 0 or total <= 0:
        return ProfilerFinding("Dataloader", False, "No training step timings recorded; data loading not analysed.")
    ratio = data_s / total
    workers = next((summary[k] for k in ("workers", "num_workers", "data_loader_workers") if k in summary), None)
    data = {"data_time_s": data_s, "compute_time_s": compute_s, "ratio": ratio, "steps": steps, "workers": workers}
    detail = (
        f"Data loading takes {ratio:.0%} of training step time ({data_s:.2f} s of {total:.2f} s over {steps} steps"
        + (f", {workers} workers" if workers is not None else "")
        + ")."
    )
    if ratio > max_ratio:
        current = f" (currently {workers})" if workers is not None else ""
        return ProfilerFinding(
            "Dataloader",
            True,
            detail,
            f"Data loading takes {ratio:.0%} of step time: raise --workers{current}, pre-resize images in the "
            "preprocessing step, or move to an instance with more CPU cores.",
            data,
        )
    return ProfilerFinding("Dataloader", False, detail, "", data)


def cpu_saturation(system_metrics: Iterable[Mapping[str, Any]], threshold: float = 90.0) -> ProfilerFinding:
    """95th percentile of CPU utilisation above ``threshold`` %: the job is CPU-bound."""
    values = [float(m["cpu_percent"]) for m in system_metrics if m.get("cpu_percent") is not None]
    if not values:
        return ProfilerFinding("CPUBottleneck", False, "No CPU utilisation recorded.")
    p95 = float(np.percentile(values, 95))
    detail = f"CPU utilisation p95 {p95:.0f}% over {len(values)} datapoints (threshold {threshold:g}%)."
    if p95 > threshold:
        return ProfilerFinding(
            "CPUBottleneck",
            True,
            detail,
            "The CPU is saturated: use fewer --workers if they compete with the training process, pre-resize images, "
            "or choose an instance with more vCPUs (or a GPU instance).",
            {"p95": p95},
        )
    return ProfilerFinding("CPUBottleneck", False, detail, "", {"p95": p95})


def memory_pressure(system_metrics: Iterable[Mapping[str, Any]], threshold: float = 90.0) -> ProfilerFinding:
    """Peak host memory utilisation above ``threshold`` %."""
    values = [float(m["memory_percent"]) for m in system_metrics if m.get("memory_percent") is not None]
    if not values:
        return ProfilerFinding("MemoryUsage", False, "No memory utilisation recorded.")
    peak = max(values)
    detail = f"Peak host memory utilisation {peak:.0f}% (threshold {threshold:g}%)."
    if peak > threshold:
        return ProfilerFinding(
            "MemoryUsage",
            True,
            detail,
            "Host memory is nearly exhausted: lower the batch size or --workers, or use an instance with more memory.",
            {"peak": peak},
        )
    return ProfilerFinding("MemoryUsage", False, detail, "", {"peak": peak})


# Advice shown in the report next to a tensor rule that found issues.
TENSOR_RULE_ADVICE = {
    "LossNotDecreasing": "Lower --learning-rate (a diverging or flat loss usually means it is too high), check the "
    "labels, and make sure the model is not frozen.",
    "Overfit": "Regularise: more data augmentation, higher --dropout, weight decay, fewer --epochs or early stopping; "
    "a larger training set helps most.",
    "Overtraining": "Stop earlier: fewer --epochs (the best epoch is kept in model_config.json) or early stopping.",
    "VanishingGradient": "Raise --learning-rate, use normalisation/residual layers, or start from pretrained weights.",
    "PoorWeightInitialization": "Start from pretrained weights or a Kaiming/Xavier initialisation; check the "
    "input normalisation.",
}
