"""The SageMaker built-in XGBoost algorithm (algorithm mode: no ``sagemaker_program``), run without Docker.

The local engine runs ``<python of an environment with xgboost> xgboost_algorithm.py train`` with
``SAGEMAKER_BASE_DIR=<job dir>`` standing for ``/opt/ml`` (``/opt/ml`` when unset). This file is that program: it
imports only the standard library at module level, and xgboost, numpy and scipy (pandas when present, for faster CSV
reading) inside the functions that need them -- never anything from this project, as it runs in another virtualenv.

Behaviour followed: aws/sagemaker-xgboost-container at tag ``v1.7-1`` (``algorithm_mode/train.py``,
``hyperparameter_validation.py``, ``metrics.py``, ``train_utils.py``, ``metrics/custom_metrics.py``,
``data_utils.py``, ``channel_validation.py``, ``algorithm_mode/serve.py`` and ``serve_utils.py``), and where the
``1.0-1`` image differs, its behaviour when the installed xgboost is older than 1.3 (the 1.0-1 / 1.2-x images):

- input: ``input/config/hyperparameters.json`` (string values, parsed per the container's table: ``num_round``
  required, aliases ``learning_rate``/``min_split_loss``/``reg_lambda``/``reg_alpha``, unknown names rejected),
  ``input/config/inputdataconfig.json`` (channels ``train`` required, ``validation`` optional, ``code`` allowed; the
  train channel's ``ContentType`` is used for both, as the container does: ``text/csv``/``csv`` = CSV with the label
  in the first column and no header (``csv_weights=1``: instance weights in the second), ``libsvm``/``text/libsvm``/
  ``text/x-libsvm`` = LIBSVM, absent = LIBSVM), data under ``input/data/<channel>/``;
- no ``objective``/``eval_metric`` given: xgboost's own defaults (``reg:squarederror``; the objective's metric, e.g.
  ``rmse``). ``eval_metric`` names xgboost lacks (``accuracy``, ``f1``, ``mse``, ``r2``... and, as in 1.7-1, ``rmse``
  and ``mae`` too; 1.0-1: ``accuracy``, ``f1``, ``mse``) are computed by a custom metric as the container's
  ``custom_metrics.py`` does (numpy here instead of scikit-learn); ``_tuning_objective_metric`` (set by tuning) is
  added to the metrics; ``early_stopping_rounds`` stops on the tuning metric, else the last ``eval_metric`` (1.7-1:
  nothing else, and the best iteration is kept; xgboost < 1.3: xgb.train's own, on the last metric printed);
- output: ``model/xgboost-model``. xgboost >= 1.3 (the 1.3-1 .. 1.7-1 images): ``Booster.save_model`` to that name
  (no extension: xgboost 1.x writes its binary format; load it with ``xgboost.Booster().load_model(path)``);
  xgboost < 1.3 (1.0-1, 1.2-x images): ``pickle.dump`` of the ``Booster`` (``pickle.load(open(path, "rb"))``).
  ``train --model-format pickle|xgboost`` overrides. :func:`load_model` reads both, as the container's serving does;
- failure: ``output/failure`` holds one line, ``ClientError: <reason>`` for bad hyperparameters, channels or data (the
  container's ``UserError``), ``AlgorithmError: <reason>`` otherwise; exit status 1 either way (as the container's);
  success writes an empty ``output/success`` (sagemaker-containers does).

Evaluation log lines: xgboost prints ``[3]<TAB>train-rmse:0.51234<TAB>validation-rmse:0.60321`` (``%.5f``); in
CloudWatch the tab shows as ``#011`` (syslog's octal escape), and that is what the container's metric definitions --
used by SageMaker for ``FinalMetricDataList`` and by tuning for objectives such as ``validation:rmse`` -- match:
``.*\\[[0-9]+\\].*#011validation-rmse:(\\S+)``. So the lines are printed here with ``#011`` in place of each tab
(``[3]#011train-rmse:0.51234#011validation-rmse:0.60321``): the container's own regexes and a user's copied metric
definitions match the local log as they match CloudWatch. :func:`metric_definitions` gives ``train:`` and
``validation:`` definitions for every metric the container knows, each capturing a number only and accepting a tab
as well as ``#011``.

Differences from the container, on purpose:

- single host, File mode only (a Pipe channel is read from its directory); no checkpoints (``checkpointconfig.json``
  is ignored), no ``save_model_on_termination``, no Dask/GPU training, no cross-validation (``_kfold``: error);
  parquet and recordio-protobuf channels fail with a clear ``ClientError`` (the container reads them with mlio);
- the files of a channel are all its files, recursively, in path order, skipping hidden (``.``) and ``_`` files with a
  warning (1.7-1 fails on a hidden file and reads only the first leaf directory); an empty ``ContentType`` (what
  the engine writes for none) means none; parameters such as ``;charset=utf8`` are accepted (``label_size`` must be 1);
- CSV is parsed with pandas/numpy (empty fields are missing values), not xgboost's CSV URI parser; LIBSVM uses
  xgboost's own parser (``<file>?format=libsvm``) on the concatenated files;
- ``eval_metric`` given without ``objective``: checked against ``reg:squarederror`` (1.7-1 raises a ``KeyError``);
  metric order stays as given (1.7-1 uses a set); ``monotone_constraints`` is read with ``ast.literal_eval``, not
  ``eval``;
- ``output/failure`` is one line; the traceback goes to the log (sagemaker-containers writes ``framework error:``
  and the traceback);
- serving (:func:`predict`): one model file (no ensemble), no selectable inference output
  (``SAGEMAKER_INFERENCE_OUTPUT``), ``text/csv`` and ``application/json`` accepts only; a one-column CSV payload is
  one feature (the container's sniffer guesses a delimiter from the digits).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("sagemaker_xgboost_algorithm")

MODEL_NAME = "xgboost-model"
DEFAULT_BASE_DIR = "/opt/ml"
DEFAULT_OBJECTIVE = "reg:squarederror"  # xgboost's default objective (1.0 and later)
#: What xgboost prints in place of each tab of an evaluation line here: CloudWatch's rendering (module docstring).
LOG_SEPARATOR = "#011"
PKL_FORMAT = "pkl_format"
XGB_FORMAT = "xgb_format"

#: xgb_constants.py (1.7-1): metrics by direction; the metric definitions are ``<train|validation>:<name>``.
MAXIMIZE_METRICS = ("accuracy", "auc", "aucpr", "balanced_accuracy", "f1", "f1_binary", "f1_macro", "map", "ndcg",
                    "precision", "r2", "recall", "precision_macro", "precision_micro", "recall_macro", "recall_micro")
MINIMIZE_METRICS = ("aft-nloglik", "cox-nloglik", "error", "gamma-deviance", "gamma-nloglik",
                    "interval-regression-accuracy", "logloss", "mae", "mape", "merror", "mlogloss", "mphe", "mse",
                    "poisson-nloglik", "rmse", "rmsle", "tweedie-nloglik")
#: custom_metrics.py (1.7-1): computed by the container, not by xgboost.
CUSTOM_METRICS = ("accuracy", "balanced_accuracy", "f1", "f1_binary", "f1_macro", "mse", "rmse", "mae", "precision",
                  "precision_macro", "precision_micro", "r2", "recall", "recall_macro", "recall_micro")
#: custom_metrics.py (1.0-1): the custom metrics with xgboost < 1.3.
LEGACY_CUSTOM_METRICS = ("accuracy", "f1", "mse")
#: xgboost errors the container reports as the user's (xgb_constants.CUSTOMER_ERRORS).
CUSTOMER_ERRORS = (
    "label must be in [0,1] for logistic regression",
    "label must be in [0, num_class)",
    "Target is multiclass but average='binary'",
    "feature_names mismatch",
    "Check failed: preds.size() == info.labels_.size()",
    "Check failed: !auc_error AUC: the dataset only contains pos or neg samples",
    "Check failed: base_score > 0.0f && base_score < 1.0f base_score must be in (0,1) for logistic loss",
    "Check failed: label_correct PoissonRegression: label must be nonnegative",
    "Check failed: label_correct TweedieRegression: label must be nonnegative",
    "Parameter reg_lambda should be greater equal to 0",
)
OBJECTIVES = ("aft_loss_distribution", "binary:logistic", "binary:logitraw", "binary:hinge", "count:poisson",
              "multi:softmax", "multi:softprob", "rank:pairwise", "rank:ndcg", "rank:map", "reg:linear",
              "reg:squarederror", "reg:logistic", "reg:gamma", "reg:pseudohubererror", "reg:squaredlogerror",
              "reg:tweedie", "survival:aft", "survival:cox")
UPDATERS = ("grow_colmaker", "distcol", "grow_histmaker", "grow_skmaker", "sync", "refresh", "prune", "shotgun",
            "coord_descent")
ALIASES = {"learning_rate": "eta", "min_split_loss": "gamma", "reg_lambda": "lambda", "reg_alpha": "alpha"}

#: data_utils.get_content_type: accepted ContentType values (lower case, without parameters) -> file type.
CONTENT_TYPES = {"csv": "csv", "text/csv": "csv", "libsvm": "libsvm", "text/libsvm": "libsvm",
                 "text/x-libsvm": "libsvm", "parquet": "parquet", "application/x-parquet": "parquet",
                 "recordio-protobuf": "recordio-protobuf", "application/x-recordio-protobuf": "recordio-protobuf"}
LOCAL_FILE_TYPES = ("csv", "libsvm")
CHANNELS = {"train": True, "validation": False, "code": False}  # name -> required
SUPPORTED_ACCEPTS = ("text/csv", "application/json")
_NUMBER = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


class UserError(Exception):
    """The job's configuration or data is wrong (the container's ``UserError``): ``ClientError`` in the failure."""


class AlgorithmError(Exception):
    """Training itself failed (``AlgorithmError`` in the failure)."""


class InferenceError(Exception):
    """A prediction request failed; ``status`` is the HTTP status the container's server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------------ hyperparameters

@dataclass(frozen=True)
class Interval:
    """sagemaker_algorithm_toolkit's ``Interval``: ``in`` tests, ``str`` reads ``[1, +inf)``."""

    min_open: float | None = None
    min_closed: float | None = None
    max_open: float | None = None
    max_closed: float | None = None

    def __contains__(self, value: object) -> bool:
        v: Any = value
        return not ((self.min_open is not None and v <= self.min_open)
                    or (self.min_closed is not None and v < self.min_closed)
                    or (self.max_open is not None and v >= self.max_open)
                    or (self.max_closed is not None and v > self.max_closed))

    def __str__(self) -> str:
        low = f"({self.min_open}, " if self.min_open is not None else (
            f"[{self.min_closed}, " if self.min_closed is not None else "(-inf, ")
        high = f"{self.max_open})" if self.max_open is not None else (
            f"{self.max_closed}]" if self.max_closed is not None else "+inf)")
        return low + high


class Choices:
    """A range given by a list of values and, optionally, a check that replaces plain membership."""

    def __init__(self, values: Iterable[str], check: Callable[[str], bool] | None = None) -> None:
        self.values = list(values)
        self.check = check

    def __contains__(self, value: object) -> bool:
        return self.check(str(value)) if self.check else value in self.values

    def __str__(self) -> str:
        return str(self.values)


def _eval_metric_in_range(metric: str) -> bool:
    """hyperparameter_validation.eval_metric_range_validator."""
    if "<function" in metric:
        raise UserError(f"User defined evaluation metric {metric} is not supported yet.")
    if "@" in metric:
        name, threshold = (part.strip() for part in metric.split("@", 1))
        if name not in ("error", "ndcg", "map"):
            raise UserError(f"Metric '{metric}' is not supported. Parameter 'eval_metric' with customized threshold "
                            "should be one of these options: 'error', 'ndcg', 'map'.")
        try:
            float(threshold)
        except ValueError as exc:
            raise UserError(f"Threshold value 't' in '{name}@t' expects float input.") from exc
        return True
    return metric in MAXIMIZE_METRICS + MINIMIZE_METRICS


@dataclass(frozen=True)
class Spec:
    kind: str  # int, float, categorical, list (comma-separated), tuple, nested (list of lists)
    range: Any


def _int(**bounds: float) -> Spec:
    return Spec("int", Interval(**bounds))


def _float(**bounds: float) -> Spec:
    return Spec("float", Interval(**bounds))


def _cat(*values: str) -> Spec:
    return Spec("categorical", list(values))


def _tuning_metric_names() -> list[str]:
    return [f"validation:{name}" for name in MAXIMIZE_METRICS + MINIMIZE_METRICS]


#: hyperparameter_validation.initialize (1.7-1): name -> how it parses and its valid range.
HYPERPARAMETERS: dict[str, Spec] = {
    "num_round": _int(min_closed=1), "csv_weights": _int(min_closed=0, max_closed=1),
    "early_stopping_rounds": _int(min_closed=1), "booster": _cat("gbtree", "gblinear", "dart"),
    "verbosity": _int(min_closed=0, max_closed=3), "nthread": _int(min_closed=1),
    "eta": _float(min_closed=0, max_closed=1), "gamma": _float(min_closed=0), "max_depth": _int(min_closed=0),
    "min_child_weight": _float(min_closed=0), "max_delta_step": _float(min_closed=0),
    "subsample": _float(min_open=0, max_closed=1), "colsample_bytree": _float(min_open=0, max_closed=1),
    "colsample_bylevel": _float(min_open=0, max_closed=1), "colsample_bynode": _float(min_open=0, max_closed=1),
    "lambda": _float(min_closed=0), "alpha": _float(min_closed=0),
    "tree_method": Spec("categorical", Choices(["auto", "exact", "approx", "hist", "gpu_hist"])),
    "sketch_eps": _float(min_open=0, max_open=1), "scale_pos_weight": _float(min_open=0),
    "updater": Spec("list", list(UPDATERS)), "dsplit": _cat("row", "col"),
    "refresh_leaf": _int(min_closed=0, max_closed=1), "process_type": _cat("default", "update"),
    "grow_policy": _cat("depthwise", "lossguide"), "max_leaves": _int(min_closed=0), "max_bin": _int(min_closed=0),
    "predictor": Spec("categorical", Choices(["auto", "cpu_predictor", "gpu_predictor"])),
    "monotone_constraints": Spec("tuple", [-1, 0, 1]),
    "interaction_constraints": Spec("nested", Interval(min_closed=1)),
    "sample_type": _cat("uniform", "weighted"), "normalize_type": _cat("tree", "forest"),
    "rate_drop": _float(min_closed=0, max_closed=1), "one_drop": _int(min_closed=0, max_closed=1),
    "skip_drop": _float(min_closed=0, max_closed=1), "lambda_bias": _float(min_closed=0, max_closed=1),
    "tweedie_variance_power": _float(min_open=1, max_open=2), "objective": _cat(*OBJECTIVES),
    "num_class": _int(min_closed=2), "base_score": _float(min_closed=0), "_kfold": _int(min_closed=2),
    "_num_cv_round": _int(min_closed=1), "_tuning_objective_metric": _cat(*_tuning_metric_names()),
    "eval_metric": Spec("list", Choices(MAXIMIZE_METRICS + MINIMIZE_METRICS, _eval_metric_in_range)),
    "seed": _int(min_open=-(2 ** 31), max_open=2 ** 31 - 1), "num_parallel_tree": _int(min_closed=1),
    "save_model_on_termination": _cat("true", "false"),
    "aft_loss_distribution": _cat("normal", "logistic", "extreme"),
    "aft_loss_distribution_scale": _float(min_closed=0), "deterministic_histogram": _cat("true", "false"),
    "sampling_method": _cat("uniform", "gradient_based"), "prob_buffer_row": _int(min_open=1.0),
    "use_dask_gpu_training": _cat("true", "false"),
}
REQUIRED_HYPERPARAMETERS = ("num_round",)


def _parse_value(name: str, spec: Spec, value: Any) -> Any:
    text = value if isinstance(value, str) else json.dumps(value)
    try:
        if spec.kind == "int":
            return int(text)
        if spec.kind == "float":
            return float(text)
        if spec.kind == "list":
            return text.split(",")
        if spec.kind in ("tuple", "nested"):
            parsed = ast.literal_eval(text)
            if not isinstance(parsed, (tuple, list)):
                raise ValueError(f"{text!r} is not a {spec.kind}")
            return tuple(parsed) if spec.kind == "tuple" else parsed
        return text
    except (ValueError, SyntaxError, TypeError) as exc:
        raise UserError(f"Hyperparameter {name}: could not parse value (caused by {type(exc).__name__})") from exc


def _check_range(name: str, spec: Spec, value: Any) -> None:
    if spec.kind == "list":
        if any(item not in spec.range for item in value):
            raise UserError(f"Hyperparameter {name}: value {value} not in range {spec.range}")
        return
    if spec.kind in ("tuple", "nested"):
        try:
            items = list(value) if spec.kind == "tuple" else [item for inner in value for item in inner]
        except TypeError as exc:
            raise UserError(f"Hyperparameter {name}: {value} is not a list of lists") from exc
        if any(item not in spec.range for item in items):
            raise UserError(f"Hyperparameter {name}: value {value} not in range {spec.range}")
        return
    if value not in spec.range:
        raise UserError(f"Hyperparameter {name}: {value} is not in {spec.range}")


def _check_updater(value: list[str], booster: str | None, process_type: str | None) -> None:
    """hyperparameter_validation.updater_validator."""
    tree = ("grow_colmaker", "distcol", "grow_histmaker", "grow_skmaker", "sync", "refresh", "prune",
            "grow_quantile_histmaker")
    builders = ("grow_colmaker", "distcol", "grow_histmaker", "grow_quantile_histmaker")
    if booster == "gblinear":
        if not (len(value) == 1 and value[0] in ("shotgun", "coord_descent")):
            raise UserError("Linear updater should be one of these options: 'shotgun', 'coord_descent'.")
    elif process_type == "update":
        if not all(x in ("refresh", "prune") for x in value):
            raise UserError("process_type 'update' can only be used with updater 'refresh' and 'prune'")
    else:
        if not all(x in tree for x in value):
            raise UserError("Tree updater should be selected from these options: 'grow_colmaker', 'distcol', "
                            "'grow_histmaker', 'grow_skmaker', 'grow_quantile_histmaker', 'sync', 'refresh', "
                            "'prune', 'shortgun', 'coord_descent'.")
        if sum(1 for x in value if x in builders) > 1:
            raise UserError("Only one tree grow plugin can be selected. Choose one from thefollowing: "
                            "'grow_colmaker', 'distcol', 'grow_histmaker', 'grow_skmaker'")


def _check_dependencies(hps: Mapping[str, Any]) -> None:
    """The container's dependency validators (each runs only when its hyperparameter is given)."""
    if hps.get("objective") in ("multi:softmax", "multi:softprob") and hps.get("num_class") is None:
        raise UserError("Require input for parameter 'num_class' for multi-classification")
    if "eval_metric" in hps:
        objective = hps.get("objective", DEFAULT_OBJECTIVE)
        if "auc" in hps["eval_metric"] and not objective.startswith(("binary:", "rank:")):
            raise UserError("Metric 'auc' can only be applied for classification and ranking problems.")
        if "aft-nloglik" in hps["eval_metric"] and objective != "survival:aft":
            raise UserError("Metric 'aft-nloglik' can only be applied for 'survival:aft' objective.")
    tree_method = hps.get("tree_method")
    if hps.get("monotone_constraints") is not None and tree_method not in ("exact", "hist"):
        raise UserError("monotone_constraints can be used only when the tree_method parameter is set to either "
                        "'exact' or 'hist'.")
    if hps.get("interaction_constraints") is not None and tree_method not in ("exact", "hist", "approx"):
        raise UserError("interaction_constraints can be used only when the tree_method parameter is set to either "
                        "'exact', 'hist' or 'approx'.")
    if "updater" in hps:
        _check_updater(hps["updater"], hps.get("booster"), hps.get("process_type"))


#: Hyperparameters the 1.0-1 image accepts and 1.2-1 removed (its hyperparameter_validation.py at tag v1.0-1).
LEGACY_HYPERPARAMETERS: dict[str, Spec] = {"silent": _int(min_closed=0, max_closed=1)}


def validate_hyperparameters(raw: Mapping[str, Any]) -> dict[str, Any]:
    """hyperparameters.json (string values) -> typed values, as the container's ``Hyperparameters.validate``:
    aliases replaced, required present, every name known, values parsed and in range, dependencies checked.
    Raises :class:`UserError` with the container's messages."""
    given = {ALIASES.get(name, name): value for name, value in raw.items()}
    for name in REQUIRED_HYPERPARAMETERS:
        if name not in given:
            raise UserError(f"Missing required hyperparameter: {name}")
    parsed: dict[str, Any] = {}
    for name, value in given.items():
        spec = HYPERPARAMETERS.get(name)
        if spec is None and name in LEGACY_HYPERPARAMETERS and xgboost_version() < (1, 2):
            spec = LEGACY_HYPERPARAMETERS[name]  # the 1.0-1 image still takes them (the MLOps template sets silent)
        if spec is None:
            raise UserError(f"Extraneous hyperparameter found: {name}")
        parsed[name] = _parse_value(name, spec, value)
    for name, value in parsed.items():
        _check_range(name, HYPERPARAMETERS.get(name) or LEGACY_HYPERPARAMETERS[name], value)
    _check_dependencies(parsed)
    return parsed


# ------------------------------------------------------------------------------------------------------- metrics

def metric_names() -> list[str]:
    """Every metric the container defines, ``validation:`` and ``train:`` (``train:rmse``, ``validation:auc``...)."""
    return [f"{data}:{name}" for data in ("train", "validation") for name in MAXIMIZE_METRICS + MINIMIZE_METRICS]


def metric_regex(metric_name: str) -> str:
    """The regex whose one group is the value of ``metric_name`` (``validation:rmse``) in an evaluation line.

    The container's regex (``.*\\[[0-9]+\\].*#011validation-rmse:(\\S+)``), with the value narrowed to a number
    (``\\S+`` would swallow ``#011validation-mae:...`` after it) and a tab accepted as well as ``#011``."""
    data, _, name = metric_name.partition(":")
    return rf".*\[[0-9]+\].*(?:{LOG_SEPARATOR}|\t){data}-{name}:{_NUMBER}.*"


def metric_definitions() -> list[dict[str, str]]:
    """``[{"Name": "train:accuracy", "Regex": ...}, ...]``: SageMaker ``MetricDefinitions`` for every metric."""
    return [{"Name": name, "Regex": metric_regex(name)} for name in metric_names()]


def metric_direction(metric_name: str) -> str:
    """``Maximize`` or ``Minimize`` for ``validation:auc`` / ``validation:rmse`` (the container's tuning table)."""
    name = metric_name.partition(":")[2] or metric_name
    if name in MAXIMIZE_METRICS:
        return "Maximize"
    if name in MINIMIZE_METRICS:
        return "Minimize"
    raise KeyError(f"unknown XGBoost metric {metric_name!r}; known: {', '.join(metric_names())}")


def format_evaluation(iteration: int, results: Iterable[tuple[str, float]]) -> str:
    """``[3]#011train-rmse:0.51234#011validation-rmse:0.60321``: xgboost's evaluation line (``%.5f`` values)
    with :data:`LOG_SEPARATOR` for its tabs."""
    return LOG_SEPARATOR.join([f"[{iteration}]", *(f"{name}:{value:.5f}" for name, value in results)])


def _emit_evaluation(iteration: int, results: Iterable[tuple[str, float]]) -> None:
    sys.stdout.write(format_evaluation(iteration, results) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------- custom metrics

def _class_labels(preds: Any, margins: bool) -> Any:
    """custom_metrics.margin_to_class_label (xgboost >= 1.3 passes margins to ``feval``) or, for probabilities
    (older xgboost), 1.0-1's rounding."""
    import numpy as np

    if preds.ndim == 2:
        return np.argmax(preds, axis=-1)
    return (preds > 0.0).astype(int) if margins else np.round(preds).astype(int)


def _binary_classes(labels: Any, predicted: Any) -> list[int]:
    """The classes of ``average='binary'`` (positive label 1), with scikit-learn's errors for other targets."""
    import numpy as np

    present = np.union1d(labels, predicted)
    if len(present) > 2:
        raise ValueError("Target is multiclass but average='binary'. Please choose another average setting, one of "
                         "[None, 'micro', 'macro', 'weighted'].")
    if len(present) == 2 and 1 not in present:
        raise ValueError(f"pos_label=1 is not a valid label. It should be one of {present.tolist()}")
    return [1]


def _counts(labels: Any, predicted: Any, classes: Iterable[Any]) -> tuple[float, float, float]:
    """``(tp, fp, fn)`` summed over ``classes``."""
    import numpy as np

    tp = fp = fn = 0.0
    for c in classes:
        tp += float(np.sum((labels == c) & (predicted == c)))
        fp += float(np.sum((labels != c) & (predicted == c)))
        fn += float(np.sum((labels == c) & (predicted != c)))
    return tp, fp, fn


def _score(kind: str, tp: float, fp: float, fn: float) -> float:
    """precision / recall / f1 from counts; 0 where undefined (scikit-learn's zero_division default, warned there)."""
    denominator = {"precision": tp + fp, "recall": tp + fn, "f1": 2 * tp + fp + fn}[kind]
    numerator = 2 * tp if kind == "f1" else tp
    return numerator / denominator if denominator else 0.0


def classification_metric(name: str, labels: Any, predicted: Any) -> float:
    """The container's classification metrics (scikit-learn's definitions) on class labels."""
    import numpy as np

    labels, predicted = np.asarray(labels), np.asarray(predicted)
    if name == "accuracy":
        return float(np.mean(labels == predicted))
    if name == "balanced_accuracy":
        return float(np.mean([np.mean(predicted[labels == c] == c) for c in np.unique(labels)]))
    kind, _, average = name.partition("_")
    average = average or ("macro" if kind == "f1" else "binary")
    if average == "binary":
        return _score(kind, *_counts(labels, predicted, _binary_classes(labels, predicted)))
    classes = np.union1d(labels, predicted)
    if average == "micro":
        return _score(kind, *_counts(labels, predicted, classes))
    return float(np.mean([_score(kind, *_counts(labels, predicted, [c])) for c in classes]))


def regression_metric(name: str, labels: Any, preds: Any) -> float:
    """mse, rmse, mae, r2 (scikit-learn's definitions; r2 of constant labels: 1.0 when exact, else 0.0)."""
    import numpy as np

    labels, preds = np.asarray(labels, dtype=float), np.asarray(preds, dtype=float)
    errors = labels - preds
    if name == "mse":
        return float(np.mean(errors ** 2))
    if name == "rmse":
        return float(np.sqrt(np.mean(errors ** 2)))
    if name == "mae":
        return float(np.mean(np.abs(errors)))
    residual, total = float(np.sum(errors ** 2)), float(np.sum((labels - labels.mean()) ** 2))
    if total == 0.0:
        return 1.0 if residual == 0.0 else 0.0
    return 1.0 - residual / total


def custom_metric(name: str, preds: Any, labels: Any, margins: bool) -> float:
    """custom_metrics.CUSTOM_METRICS[name] on xgboost's ``feval`` predictions."""
    import numpy as np

    preds = np.asarray(preds)
    if name in ("mse", "rmse", "mae", "r2"):
        return regression_metric(name, labels, preds)
    if preds.size == 0:
        return 0.0
    return classification_metric(name, labels, _class_labels(preds, margins))


def eval_metrics(tuning_metric: str | None, eval_metric: list[str] | None,
                 custom_names: Sequence[str] = CUSTOM_METRICS) -> tuple[list[str], list[str], list[str]]:
    """train_utils.get_eval_metrics_and_feval: ``(xgboost's eval_metric, custom metrics, tuning metrics)``.

    The tuning metric (``validation:rmse`` -> ``rmse``) joins ``eval_metric`` (sorted union when both are given);
    names in ``custom_names`` are computed by the custom metric, the rest by xgboost."""
    tuning = tuning_metric.split(":")[1].split(",") if tuning_metric else []
    if tuning and eval_metric:
        union = sorted(set(tuning) | set(eval_metric))
    else:
        union = list(tuning or eval_metric or [])
    custom = [name for name in union if name in custom_names]
    native = [name for name in union if name not in custom]
    return native, custom, tuning


# -------------------------------------------------------------------------------------------------------- data

def resolve_content_type(value: str | None) -> str:
    """data_utils.get_content_type: a channel's ``ContentType`` -> ``csv``, ``libsvm``, ``parquet`` or
    ``recordio-protobuf``; none (or empty) -> ``libsvm``. Raises :class:`UserError` for anything else."""
    if value is None or not str(value).strip():
        return "libsvm"
    media, *params = (part.strip() for part in str(value).lower().split(";"))
    kind = CONTENT_TYPES.get(media)
    if kind is None:
        raise UserError(f"{value} is not an accepted ContentType: {', '.join(CONTENT_TYPES)}.")
    options = dict(p.split("=", 1) for p in params if "=" in p)
    if kind == "csv" and options.get("label_size", "1").strip() != "1":
        raise UserError(f"{value} is not an accepted csv ContentType. Optional parameter label_size must be "
                        "equal to 1")
    return kind


def validate_channels(data_config: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """channel_validation (1.7-1): ``train`` required, only ``train``/``validation``/``code``; each channel's
    content type resolved into ``FileType`` (an empty ``ContentType`` is none: LIBSVM)."""
    for name, required in CHANNELS.items():
        if required and name not in data_config:
            raise UserError(f"Missing required channel: {name}")
    channels: dict[str, dict[str, Any]] = {}
    for name, config in data_config.items():
        if name not in CHANNELS:
            raise UserError(f"Extraneous channel found: {name}")
        config = dict(config)
        if name == "code":
            channels[name] = config
            continue
        config["FileType"] = resolve_content_type(config.get("ContentType"))
        mode = config.get("TrainingInputMode") or "File"
        if mode == "Pipe" and config["FileType"] == "libsvm":
            raise UserError(f"Channel configuration for '{name}' channel is not supported: {dict(config)} "
                            "(Pipe mode not supported for LibSVM)")
        channels[name] = config
    return channels


def channel_files(path: Path) -> list[Path]:
    """The data files of a channel directory, recursively, in path order; hidden (``.``) and ``_`` files and
    xgboost cache files are skipped (with a warning for the hidden ones)."""
    files = []
    for item in sorted(path.rglob("*")):
        if not item.is_file():
            continue
        parts = item.relative_to(path).parts
        if any(part.startswith(".") for part in parts):
            logger.warning("Ignoring hidden file %s in the data path", item)
            continue
        if item.name.startswith("_") or (".cache" in item.name and ("dtrain" in item.name or "dval" in item.name)):
            continue
        files.append(item)
    return files


def csv_delimiter(line: str) -> str:
    """data_utils._get_csv_delimiter: the delimiter ``csv.Sniffer`` finds in a file's first line."""
    try:
        delimiter = csv.Sniffer().sniff(line).delimiter
    except csv.Error as exc:
        raise UserError(f"Could not determine delimiter on line {line[:50]}:\n{exc}") from exc
    logger.info("Determined delimiter of CSV input is '%s'", delimiter)
    return delimiter


def _libsvm_features(line: str) -> int:
    """data_utils._get_num_valid_libsvm_features: -1 if ``line`` is not LIBSVM, else its number of features."""
    tokens = line.split(" ")
    label = tokens[0].split(":")
    try:
        if len(label) > 2:
            return -1
        for part in label:
            float(part)
    except ValueError:
        return -1
    for token in tokens[1:]:
        if ":" not in token or len(tokens[1].split(":")) != 2:
            return -1
    return len(tokens) - 1


def validate_libsvm_file(path: Path) -> None:
    """data_utils._validate_libsvm_format: the first line with features must be LIBSVM."""
    with open(path, errors="ignore") as fh:
        for line in fh:
            found = _libsvm_features(line)
            if found > 1:
                return
            if found < 0:
                raise UserError(f"First line '{line[:50]}...' of file '{path.name}' is not 'LIBSVM' format. Please "
                                "ensure the file is in 'LIBSVM' format.")
    logger.warning("File %s is not an invalid LIBSVM file but has no features. Accepting simple validation.",
                   path.name)


def _first_line(path: Path) -> str:
    with open(path, errors="ignore") as fh:
        return fh.readline()


def _csv_rows(path: Path, delimiter: str) -> Any:
    """One CSV file as a float array (empty fields: NaN); pandas when installed, else the standard library."""
    import numpy as np

    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is not None:
        frame = pd.read_csv(path, header=None, sep=delimiter, dtype=float, na_values=[""], keep_default_na=False,
                            skip_blank_lines=True, engine="c" if len(delimiter) == 1 else "python")
        return frame.to_numpy(dtype=float)
    with open(path, newline="") as fh:
        rows = [[field if field.strip() else "nan" for field in row] for row in csv.reader(fh, delimiter=delimiter)
                if any(field.strip() for field in row)]
    if len({len(row) for row in rows}) > 1:
        raise ValueError(f"rows of {path.name} have different numbers of fields")
    return np.array(rows, dtype=float)


def load_csv(files: Sequence[Path], csv_weights: int = 0) -> Any:
    """An ``xgboost.DMatrix`` of CSV files: label in column 0 (weights in column 1 when ``csv_weights`` is 1)."""
    import numpy as np
    import xgboost as xgb

    for path in files:
        csv_delimiter(_first_line(path))
    delimiter = csv_delimiter(_first_line(files[0]))
    try:
        data = np.vstack([_csv_rows(path, delimiter) for path in files])
    except Exception as exc:
        raise UserError(f"Failed to load csv data with exception:\n{exc} (the built-in algorithm reads CSV "
                        "without a header row, the label in the first column)") from exc
    first = 2 if csv_weights == 1 else 1
    if data.ndim != 2 or data.shape[1] < first + 1:
        raise UserError(f"Failed to load csv data: {data.shape[1] if data.ndim == 2 else 0} column(s); expected the "
                        "label, then the features")
    weight = data[:, 1].copy() if csv_weights == 1 else None
    return xgb.DMatrix(np.ascontiguousarray(data[:, first:]), label=data[:, 0].copy(), weight=weight)


def load_libsvm(files: Sequence[Path], scratch: Path) -> Any:
    """An ``xgboost.DMatrix`` of LIBSVM files, parsed by xgboost (``<file>?format=libsvm``), the files joined."""
    import xgboost as xgb

    for path in files:
        validate_libsvm_file(path)
    source = files[0]
    if len(files) > 1:
        source = scratch / "libsvm-data.txt"
        with open(source, "wb") as out:
            for path in files:
                content = path.read_bytes()
                out.write(content if content.endswith(b"\n") or not content else content + b"\n")
    try:
        return xgb.DMatrix(f"{source}?format=libsvm")
    except Exception as exc:
        raise UserError(f"Failed to load libsvm data with exception:\n{exc}") from exc


def load_channel(path: Path, file_type: str, csv_weights: int, scratch: Path) -> Any:
    """data_utils.get_dmatrix for one channel directory; ``None`` when it has no data."""
    if not path.exists():
        logger.info("File path %s does not exist!", path)
        return None
    files = channel_files(path)
    if sum(f.stat().st_size for f in files) == 0:
        return None
    matrix = load_csv(files, csv_weights) if file_type == "csv" else load_libsvm(files, scratch)
    if matrix.get_label().size == 0:
        raise UserError("Got input data without labels. Please check the input data set.")
    return matrix


def warn_redundant(train_dir: Path, val_dir: Path) -> None:
    """data_utils.check_data_redundancy: same-named files of equal size in both channels."""
    if train_dir.resolve() == val_dir.resolve():
        logger.warning("Found same path for training and validation. This is not recommended and results may not "
                       "be correct.")
        return
    for path in channel_files(train_dir):
        twin = val_dir / path.relative_to(train_dir)
        if twin.is_file() and twin.stat().st_size == path.stat().st_size:
            logger.warning("Suspected identical files found. (%s and %s with same size %d bytes). Note: Duplicate "
                           "data in the training set and validation set is usually not intentional and can impair "
                           "the validity of the model evaluation by the validation score.", path, twin,
                           path.stat().st_size)


# ------------------------------------------------------------------------------------------------------ training

def xgboost_version() -> tuple[int, ...]:
    import xgboost as xgb

    return tuple(int(part) for part in re.findall(r"\d+", xgb.__version__)[:3])


def legacy_xgboost() -> bool:
    """xgboost < 1.3: the 1.0-1 / 1.2-x images (pickled model, xgb.train's own early stopping, old callbacks)."""
    return xgboost_version() < (1, 3)


def _evaluation_monitor() -> Any:
    """A callback printing each iteration's evaluation line (:func:`format_evaluation`), in place of xgboost's."""
    import xgboost as xgb

    if legacy_xgboost():
        def monitor(env: Any) -> None:
            if env.rank == 0 and env.evaluation_result_list:
                _emit_evaluation(env.iteration, [(item[0], item[1]) for item in env.evaluation_result_list])
        return monitor

    class EvaluationMonitor(xgb.callback.TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: Mapping[str, Mapping[str, list]]) -> bool:
            if evals_log:
                _emit_evaluation(epoch, [(f"{data}-{name}", log[-1][0] if isinstance(log[-1], tuple) else log[-1])
                                         for data, metrics in evals_log.items() for name, log in metrics.items()])
            return False

    return EvaluationMonitor()


def _feval(names: Sequence[str], margins: bool) -> Callable[[Any, Any], list[tuple[str, float]]]:
    def feval(preds: Any, dmatrix: Any) -> list[tuple[str, float]]:
        labels = dmatrix.get_label()
        return [(name, custom_metric(name, preds, labels, margins)) for name in names]

    return feval


def _train_arguments(config: dict[str, Any], has_validation: bool) -> dict[str, Any]:
    """train.train_job's set-up: pops what is not an xgboost parameter and builds xgb.train's other arguments."""
    import inspect

    import xgboost as xgb

    legacy = legacy_xgboost()
    num_round = config.pop("num_round")
    config.pop("save_model_on_termination", None)
    eval_metric = config.get("eval_metric")
    native, custom, tuning = eval_metrics(config.pop("_tuning_objective_metric", None), eval_metric,
                                          LEGACY_CUSTOM_METRICS if legacy else CUSTOM_METRICS)
    if native:
        config["eval_metric"] = native
    else:
        config.pop("eval_metric", None)
    rounds = config.get("early_stopping_rounds") if legacy else config.pop("early_stopping_rounds", None)
    arguments: dict[str, Any] = {"num_boost_round": num_round, "verbose_eval": False,
                                 "callbacks": [_evaluation_monitor()]}
    if custom:
        feval_kw = "feval" if "feval" in inspect.signature(xgb.train).parameters else "custom_metric"
        arguments[feval_kw] = _feval(custom, margins=not legacy and feval_kw == "feval")
    metric = (tuning or eval_metric or [None])[-1] if rounds else None
    if legacy:
        arguments["early_stopping_rounds"] = rounds
    elif rounds and metric and has_validation:
        arguments["callbacks"].append(xgb.callback.EarlyStopping(
            rounds=rounds, data_name="validation", metric_name=metric, maximize=metric in MAXIMIZE_METRICS,
            save_best=True))
    elif rounds:
        logger.info("early_stopping_rounds=%s has no effect without a validation channel and an eval_metric or a "
                    "tuning objective (as in the SageMaker XGBoost 1.7-1 container)", rounds)
    return arguments


def fit(config: Mapping[str, Any], train: Any, validation: Any | None) -> Any:
    """train.train_job: ``xgb.train`` on the validated hyperparameters; the trained ``Booster``."""
    import xgboost as xgb

    params = dict(config)
    params.pop("_num_cv_round", None)
    if params.pop("_kfold", None) is not None:
        raise UserError("Cross validation (_kfold) is not supported by the local engine")
    if params.pop("use_dask_gpu_training", "false") == "true":
        raise UserError("use_dask_gpu_training is not supported by the local engine")
    if params.get("updater"):
        params["updater"] = ",".join(params["updater"])
    arguments = _train_arguments(params, validation is not None)
    logger.info("Train matrix has %d rows and %d columns", train.num_row(), train.num_col())
    evals = [(train, "train")]
    if validation is not None:
        logger.info("Validation matrix has %d rows", validation.num_row())
        evals.append((validation, "validation"))
    try:
        return xgb.train(params, train, evals=evals, **arguments)
    except Exception as exc:
        if any(message in str(exc) for message in CUSTOMER_ERRORS):
            raise UserError(str(exc)) from exc
        raise AlgorithmError(f"XGB train call failed with exception:\n {exc}") from exc


def save_model(booster: Any, model_dir: Path, model_format: str = "auto") -> Path:
    """``model_dir/xgboost-model``: pickled (xgboost < 1.3, or ``pickle``) or ``Booster.save_model``."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / MODEL_NAME
    if model_format == "auto":
        model_format = "pickle" if legacy_xgboost() else "xgboost"
    if model_format == "pickle":
        with open(path, "wb") as fh:
            pickle.dump(booster, fh, protocol=4)
    else:
        booster.save_model(str(path))
    logger.info("Stored trained model at %s (%s)", path, model_format)
    return path


def _read_json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path.name} is not valid JSON: {exc}") from exc


def _data_config(base: Path) -> dict[str, Any]:
    """inputdataconfig.json; without one, a channel per directory under ``input/data`` (no content type)."""
    found = _read_json(base / "input" / "config" / "inputdataconfig.json", None)
    if found is not None:
        return found
    data = base / "input" / "data"
    return {p.name: {} for p in sorted(data.iterdir()) if p.is_dir()} if data.is_dir() else {}


def train(base: Path, model_format: str = "auto") -> Path:
    """One training job in the ``/opt/ml`` layout at ``base``; the saved model's path."""
    logger.info("Running XGBoost Sagemaker in algorithm mode")
    raw = _read_json(base / "input" / "config" / "hyperparameters.json", {})
    config = validate_hyperparameters(raw)
    channels = validate_channels(_data_config(base))
    file_type = channels["train"]["FileType"]
    if file_type not in LOCAL_FILE_TYPES:
        raise UserError(f"ContentType {channels['train'].get('ContentType')} ({file_type}) is not supported by the "
                        "local engine's XGBoost algorithm: use text/csv or text/libsvm data")
    data = base / "input" / "data"
    train_dir, val_dir = data / "train", (data / "validation" if "validation" in channels else None)
    if val_dir is not None and train_dir.exists() and val_dir.exists():
        warn_redundant(train_dir, val_dir)
    scratch = Path(tempfile.mkdtemp(prefix="xgboost-algorithm-"))
    try:
        csv_weights = int(config.get("csv_weights", 0))
        dtrain = load_channel(train_dir, file_type, csv_weights, scratch)
        dval = load_channel(val_dir, file_type, csv_weights, scratch) if val_dir is not None else None
        if dtrain is None:
            raise UserError(f"No data in training channel path {train_dir}")
        if val_dir is not None and dval is None:
            raise UserError(f"No data in validation channel path {val_dir}")
        logger.info("Single node training.")
        booster = fit(config, dtrain, dval)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return save_model(booster, base / "model", model_format)


def write_failure(base: Path, reason: str) -> None:
    """``output/failure``: one line."""
    output = base / "output"
    output.mkdir(parents=True, exist_ok=True)
    (output / "failure").write_text(" ".join(reason.split()) + "\n", encoding="utf-8")


def run_training(base: Path, model_format: str = "auto") -> int:
    """:func:`train` with the container's exit protocol: 0 and ``output/success``, or 1 and ``output/failure``."""
    try:
        train(base, model_format)
    except UserError as exc:
        logger.error("Reporting training FAILURE\n%s", traceback.format_exc())
        write_failure(base, f"ClientError: {exc}")
        return 1
    except Exception as exc:  # the container reports anything else as the algorithm's error
        logger.error("Reporting training FAILURE\n%s", traceback.format_exc())
        write_failure(base, f"AlgorithmError: {exc if isinstance(exc, AlgorithmError) else repr(exc)}")
        return 1
    (base / "output").mkdir(parents=True, exist_ok=True)
    (base / "output" / "success").write_text("", encoding="utf-8")
    logger.info("Reporting training SUCCESS")
    return 0


# ------------------------------------------------------------------------------------------------------- serving

def load_model(model_dir: str) -> Any:
    """serve_utils.get_loaded_booster (one model): the model file (``xgboost-model`` first, dotfiles skipped),
    ``pickle.load`` else ``Booster.load_model``; ``nthread`` 1. Its format is in ``sagemaker_model_format``."""
    import xgboost as xgb

    directory = Path(model_dir)
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")) \
        if directory.is_dir() else []
    if not names:
        raise InferenceError(f"Unable to load model: no model file in {model_dir}", 500)
    path = directory / (MODEL_NAME if MODEL_NAME in names else names[0])
    logger.info("Loading the model from %s", path)
    try:
        with open(path, "rb") as fh:
            booster, model_format = pickle.load(fh), PKL_FORMAT
    except Exception as pickle_error:
        try:
            booster, model_format = xgb.Booster(), XGB_FORMAT
            booster.load_model(str(path))
        except Exception as xgb_error:
            raise InferenceError(f"Unable to load model: Model {path} cannot be loaded:\nPickle load error="
                                 f"{pickle_error}\nXGB load model error={xgb_error}", 500) from xgb_error
    booster.set_param("nthread", 1)
    booster.sagemaker_model_format = model_format
    return booster


def _csv_payload(text: str) -> Any:
    """encoder.csv_to_dmatrix: rows of features (no label), empty fields missing."""
    import numpy as np
    import xgboost as xgb

    first = text.split("\n")[0][:512]
    try:
        sniffed = csv.Sniffer().sniff(first).delimiter
    except csv.Error:
        sniffed = ","
    delimiter = "," if sniffed.isalnum() or sniffed in ".-+" else sniffed
    rows = [["nan" if x == "" else x for x in line.split(delimiter)] for line in text.split("\n")]
    return xgb.DMatrix(np.array(rows).astype(float))


def _libsvm_payload(text: str) -> Any:
    """serve_utils._get_sparse_matrix_from_libsvm: ``<label> <index>:<value> ...`` rows (labels ignored)."""
    import numpy as np
    import xgboost as xgb
    from scipy.sparse import csr_matrix

    rows, cols, values = [], [], []
    for row, line in enumerate(text.split("\n")):
        for item in line.split(" "):
            if ":" in item:
                col, value = item.split(":")[:2]
                rows.append(row)
                cols.append(int(col))
                values.append(float(value))
    return xgb.DMatrix(csr_matrix((np.array(values), (np.array(rows), np.array(cols)))))


def parse_payload(body: bytes, content_type: str | None) -> tuple[Any, str]:
    """serve_utils.parse_content_data: ``(DMatrix, file type)``; :class:`InferenceError` 415 when unreadable."""
    try:
        kind = resolve_content_type(content_type)
    except UserError as exc:
        raise InferenceError(str(exc), 415) from exc
    if kind not in LOCAL_FILE_TYPES:
        raise InferenceError(f"Content-type {content_type} is not supported by the local engine's XGBoost "
                             "algorithm (text/csv and text/libsvm are)", 415)
    try:
        text = body.strip().decode("utf-8")
        return (_csv_payload(text) if kind == "csv" else _libsvm_payload(text)), kind
    except Exception as exc:
        name = "csv" if kind == "csv" else "libsvm"
        raise InferenceError(f"Loading {name} data failed with Exception, please ensure data is in {name} format:\n "
                             f"{type(exc)}\n {exc}", 415) from exc


def _check_features(model: Any, dtest: Any, kind: str) -> None:
    """serve_utils.predict's feature-count check (pickled models only, as there)."""
    if getattr(model, "sagemaker_model_format", PKL_FORMAT) != PKL_FORMAT:
        return
    if not hasattr(model, "num_features"):  # xgboost < 1.3 (the 1.0-1 image) cannot tell: predict() checks
        return
    expected, given = model.num_features(), dtest.num_col()
    if kind == "libsvm" and given > expected + 1:
        raise InferenceError(f"Feature size of libsvm inference data {given} is larger than feature size of "
                             f"trained model {expected}.")
    if kind == "csv" and given not in (expected, expected - 1):
        raise InferenceError(f"Feature size of csv inference data {given} is not consistent with feature size of "
                             f"trained model {expected}.")


def _resolve_accept(accept: str | None) -> str:
    """serve._parse_accept: none or ``*/*`` -> ``SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT`` or ``text/csv``."""
    media = (accept or "").split(";")[0].strip().lower()
    if not media or media == "*/*":
        media = os.environ.get("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", "text/csv").lower()
    if media not in SUPPORTED_ACCEPTS:
        raise InferenceError(f"Accept type {accept} is not supported. Please use supported accept types: "
                             f"{list(SUPPORTED_ACCEPTS)}.", 406)
    return media


def encode_predictions(predictions: list, accept: str, batch: bool) -> bytes:
    """serve.invocations' response body: batch -> one prediction per line whatever the accept; JSON ->
    ``{"predictions": [{"score": ...}]}``; CSV -> one row per prediction (a row per class for probabilities)."""
    if batch:
        return ("\n".join(map(str, predictions)) + "\n").encode("utf-8")
    if accept == "application/json":
        return json.dumps({"predictions": [{"score": p} for p in predictions]}).encode("utf-8")
    lines = [",".join(map(str, p)) if isinstance(p, list) else str(p) for p in predictions]
    return ("\n".join(lines) + "\n").encode("utf-8")


def predict(model: Any, body: bytes, content_type: str | None, accept: str | None,
            batch: bool | None = None) -> tuple[bytes, str]:
    """One ``/invocations`` request of the container's server (algorithm mode): ``(response body, mimetype)``.

    ``content_type``: ``text/csv`` (features only, no label) or ``text/libsvm`` (none: LIBSVM, as there);
    ``accept``: ``text/csv`` or ``application/json`` (none or ``*/*``: ``SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT`` or
    CSV). ``batch`` (default: ``SAGEMAKER_BATCH`` set, as in a transform job): one prediction per line.
    Raises :class:`InferenceError` with the server's status (415 payload, 400 prediction, 406 accept)."""
    if not body:
        return b"", _resolve_accept(accept)
    dtest, kind = parse_payload(body, content_type)
    try:
        _check_features(model, dtest, kind)
        limit = getattr(model, "best_ntree_limit", 0)
        extra = {"ntree_limit": limit} if limit and legacy_xgboost() else {}
        predictions = model.predict(dtest, validate_features=False, **extra)
    except InferenceError as exc:
        raise InferenceError(f"Unable to evaluate payload provided: {exc}", exc.status) from exc
    except Exception as exc:
        raise InferenceError(f"Unable to evaluate payload provided: {exc}", 400) from exc
    media = _resolve_accept(accept)
    if batch is None:
        batch = bool(os.environ.get("SAGEMAKER_BATCH"))
    return encode_predictions(predictions.tolist(), media, batch), media


# ---------------------------------------------------------------------------------------------------------- main

def configure_logging() -> None:
    """The container's log format (``[2024-01-31:12:00:00:INFO] ...``), to stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s:%(levelname)s] %(message)s", "%Y-%m-%d:%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xgboost_algorithm.py",
                                     description="The SageMaker built-in XGBoost algorithm, without Docker.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train under SAGEMAKER_BASE_DIR (default /opt/ml)")
    train_parser.add_argument("--model-format", choices=("auto", "pickle", "xgboost"), default="auto",
                              help="auto: pickle with xgboost < 1.3 (1.0-1 images), else Booster.save_model")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    configure_logging()
    base = Path(os.environ.get("SAGEMAKER_BASE_DIR") or DEFAULT_BASE_DIR)
    return run_training(base, args.model_format)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
