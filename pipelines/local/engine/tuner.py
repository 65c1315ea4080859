"""Hyperparameter tuning jobs run locally with Optuna.

A resolved CreateHyperParameterTuningJob request becomes an Optuna study (stored with ``RDBStorage`` in
``$MLOPS_HOME/optuna.db``) whose trials are real training jobs (:func:`pipelines.local.jobs.runtime.run_training_job`):

- sampler from ``Strategy``: Bayesian -> TPE, Random -> random, Grid -> grid (categorical/integer ranges),
  Hyperband -> TPE with Optuna's ``HyperbandPruner`` (``MinResource``/``MaxResource`` from the strategy config);
- ``TrainingJobEarlyStoppingType: Auto`` -> ``MedianPruner`` (SageMaker stops a job whose objective is worse than the
  median of earlier jobs at the same epoch);
- the objective metric is read with the definition's own ``MetricDefinitions`` regex from each trial's live log; every
  value is reported to the trial (one step per value, i.e. per epoch) and a pruned trial's process is killed;
- ``MaxNumberOfTrainingJobs`` and ``MaxParallelTrainingJobs`` are honoured (parallel trials run in threads);
- each trial is a training job with the definition's ``StoppingCondition``: one that reaches its
  ``MaxRuntimeInSeconds`` is ``Stopped`` with the reason ``MaxRuntimeExceeded: ...`` (a pruned trial for Optuna);
- ranges keep SageMaker's semantics: Continuous/Integer with ``ScalingType`` (Logarithmic -> log scale,
  ReverseLogarithmic, Auto/Linear -> linear), Categorical values passed verbatim as the hyperparameter string.

The result has the DescribeHyperParameterTuningJob shape (``BestTrainingJob.TunedHyperParameters`` as strings,
``FinalHyperParameterTuningJobObjectiveMetric``) plus ``TrainingJobSummaries`` sorted best first.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from pipelines.local.jobs import runtime as jobs
from pipelines.local.storage.executions import ExecutionStore
from pipelines.local.storage.store import SQLITE_TIMEOUT_S, ArtifactStore, file_lock, mlops_home

logger = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)


class TuningError(RuntimeError):
    """The tuning request cannot run locally, or no training job succeeded."""


@dataclass(frozen=True)
class Range:
    name: str
    kind: str  # continuous | integer | categorical
    low: float = 0.0
    high: float = 0.0
    scaling: str = "Auto"
    values: tuple[str, ...] = ()

    def suggest(self, trial: optuna.Trial) -> str:
        """Sample a value; return it as the hyperparameter string SageMaker would pass."""
        if self.kind == "categorical":
            return str(trial.suggest_categorical(self.name, list(self.values)))
        if self.kind == "integer":
            return str(trial.suggest_int(self.name, int(self.low), int(self.high),
                                         log=self.scaling == "Logarithmic"))
        if self.scaling == "ReverseLogarithmic":
            # SageMaker: sample 1 - x on a log scale (for values close to 1).
            u = trial.suggest_float(f"{self.name}__reverse", 1.0 - self.high, 1.0 - self.low, log=True)
            trial.set_user_attr(self.name, 1.0 - u)
            return repr(1.0 - u)
        return repr(trial.suggest_float(self.name, self.low, self.high, log=self.scaling == "Logarithmic"))


def parse_ranges(parameter_ranges: Mapping[str, Any]) -> list[Range]:
    ranges: list[Range] = []
    for item in parameter_ranges.get("ContinuousParameterRanges") or []:
        low, high = float(item["MinValue"]), float(item["MaxValue"])
        scaling = item.get("ScalingType", "Auto")
        if low > high:
            raise TuningError(f"range {item['Name']}: MinValue {low} > MaxValue {high}")
        if scaling == "Logarithmic" and low <= 0:
            raise TuningError(f"range {item['Name']}: Logarithmic scaling needs MinValue > 0, got {low}")
        if scaling == "ReverseLogarithmic" and not (0 <= low and high < 1):
            raise TuningError(f"range {item['Name']}: ReverseLogarithmic needs 0 <= values < 1")
        ranges.append(Range(item["Name"], "continuous", low, high, scaling))
    for item in parameter_ranges.get("IntegerParameterRanges") or []:
        low, high = int(float(item["MinValue"])), int(float(item["MaxValue"]))
        scaling = item.get("ScalingType", "Auto")
        if low > high:
            raise TuningError(f"range {item['Name']}: MinValue {low} > MaxValue {high}")
        if scaling == "Logarithmic" and low <= 0:
            raise TuningError(f"range {item['Name']}: Logarithmic scaling needs MinValue > 0, got {low}")
        ranges.append(Range(item["Name"], "integer", low, high, scaling))
    for item in parameter_ranges.get("CategoricalParameterRanges") or []:
        values = tuple(str(v) for v in item.get("Values") or [])
        if not values:
            raise TuningError(f"range {item['Name']}: no values")
        ranges.append(Range(item["Name"], "categorical", values=values))
    return ranges


def make_sampler_and_pruner(config: Mapping[str, Any], ranges: list[Range], seed: int | None
                            ) -> tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner]:
    strategy = config.get("Strategy", "Bayesian")
    early = config.get("TrainingJobEarlyStoppingType", "Off")
    pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    if early == "Auto":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1)
    if strategy == "Bayesian":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(seed=seed)
    elif strategy == "Random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    elif strategy == "Grid":
        space: dict[str, list[Any]] = {}
        for r in ranges:
            if r.kind == "continuous":
                raise TuningError(f"Grid strategy supports categorical and integer ranges only; {r.name} is continuous")
            space[r.name] = list(r.values) if r.kind == "categorical" else list(range(int(r.low), int(r.high) + 1))
        sampler = optuna.samplers.GridSampler(space, seed=seed)
    elif strategy == "Hyperband":
        hb = ((config.get("StrategyConfig") or {}).get("HyperbandStrategyConfig") or {})
        min_r = int(hb.get("MinResource", 1))
        max_r = hb.get("MaxResource")
        sampler = optuna.samplers.TPESampler(seed=seed)
        pruner = optuna.pruners.HyperbandPruner(min_resource=min_r, max_resource=int(max_r) if max_r else "auto")
    else:
        raise TuningError(f"unsupported tuning Strategy {strategy!r} (Bayesian, Random, Grid, Hyperband)")
    return sampler, pruner


def optuna_storage() -> optuna.storages.RDBStorage:
    """Optuna's storage, ``$MLOPS_HOME/optuna.db`` (SQLite), safe to open from several engines at once.

    ``RDBStorage`` creates its tables and inserts its version row when it opens a database; two processes doing
    that together on a fresh ``MLOPS_HOME`` fail with ``IntegrityError``. So opening is serialized by a file lock
    (``optuna.db.lock``), and the database is switched to WAL under it; every connection then waits for locks up to
    :data:`~pipelines.local.storage.store.SQLITE_TIMEOUT_S` (SQLite's busy timeout) instead of failing.
    """
    home = mlops_home()
    path = home / "optuna.db"
    with file_lock(home / "optuna.db.lock"):
        conn = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()
        return optuna.storages.RDBStorage(f"sqlite:///{path}",
                                          engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}})


def _objective_regex(definition: Mapping[str, Any], metric_name: str) -> re.Pattern[str]:
    for metric in jobs.metric_definitions(definition.get("AlgorithmSpecification") or {}):
        if metric.get("Name") == metric_name:
            return re.compile(metric["Regex"])
    raise TuningError(f"objective metric {metric_name!r} has no MetricDefinitions entry in the training job "
                      "definition (the local tuner reads it from the trial log with that regex)")


def trial_job_name(tuning_job_name: str, index: int, hyperparameters: Mapping[str, str]) -> str:
    digest = hashlib.sha1(repr(sorted(hyperparameters.items())).encode()).hexdigest()[:8]
    return f"{tuning_job_name[:50]}-{index:03d}-{digest}"


def run_tuning_job(request: Mapping[str, Any], tuning_job_name: str, step_dir: Path, artifacts: ArtifactStore, *,
                   execution_id: str, step_name: str, records: ExecutionStore, control: jobs.JobControl,
                   on_message: Callable[[str], None] | None = None, log_path: Path | None = None,
                   study_name: str | None = None) -> dict[str, Any]:
    """Run a resolved tuning request; return DescribeHyperParameterTuningJob-shaped properties."""
    config = request.get("HyperParameterTuningJobConfig") or {}
    definitions = request.get("TrainingJobDefinitions")
    definition = request.get("TrainingJobDefinition") or (definitions[0] if definitions else None)
    if not definition:
        raise TuningError("tuning request has no TrainingJobDefinition")
    if definitions and len(definitions) > 1:
        raise TuningError("multi-algorithm tuning (several TrainingJobDefinitions) is not supported locally")
    objective = config.get("HyperParameterTuningJobObjective") or {}
    metric_name = objective.get("MetricName")
    if not metric_name:
        raise TuningError("HyperParameterTuningJobObjective.MetricName is missing")
    direction = "maximize" if objective.get("Type", "Maximize") == "Maximize" else "minimize"
    regex = _objective_regex(definition, metric_name)
    limits = config.get("ResourceLimits") or {}
    max_jobs = int(limits.get("MaxNumberOfTrainingJobs", 1))
    max_parallel = max(1, int(limits.get("MaxParallelTrainingJobs", 1)))
    if max_jobs < 1:
        raise TuningError(f"MaxNumberOfTrainingJobs must be >= 1, got {max_jobs}")
    ranges = parse_ranges(config.get("ParameterRanges") or {})
    static = {k: str(v) for k, v in (definition.get("StaticHyperParameters") or {}).items()}
    overlap = sorted(set(static) & {r.name for r in ranges})
    if overlap:
        raise TuningError(f"hyperparameters both static and tuned: {', '.join(overlap)}")
    seed = config.get("RandomSeed", os.environ.get("MLOPS_TUNER_SEED"))
    sampler, pruner = make_sampler_and_pruner(config, ranges, int(seed) if seed is not None else None)
    storage = optuna_storage()
    study_name = study_name or f"{execution_id}/{step_name}/{tuning_job_name}"
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                                direction=direction, load_if_exists=True)
    training_request = {k: v for k, v in definition.items()
                        if k not in ("StaticHyperParameters", "HyperParameterRanges", "TuningObjective",
                                     "DefinitionName", "HyperParameterTuningResourceConfig")}
    training_request["ResourceConfig"] = definition.get("ResourceConfig") or \
        definition.get("HyperParameterTuningResourceConfig") or {}
    builtin = jobs.images.parse(str((definition.get("AlgorithmSpecification") or {}).get("TrainingImage") or "")
                                ).algorithm and "sagemaker_program" not in static
    lock = threading.Lock()
    counter = {"next": 0}
    summaries: list[dict[str, Any]] = []
    step_dir.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(f"[tuner] {message}\n")
        if on_message:
            on_message(message)

    def trial_request(hps: dict[str, str], job_name: str) -> dict[str, Any]:
        """The trial's CreateTrainingJob request. SageMaker runs every trial as its own training job (its own
        name); we keep trials from resuming each other's checkpoints by giving each one the prefix
        ``<definition's CheckpointConfig.S3Uri>/<trial's training job name>``."""
        if builtin:  # SageMaker tells a built-in algorithm's trials what they are tuned for
            hps = {**hps, "_tuning_objective_metric": metric_name}
        job_request = {**training_request, "HyperParameters": hps}
        checkpoint = training_request.get("CheckpointConfig") or {}
        if checkpoint.get("S3Uri"):
            job_request["CheckpointConfig"] = {**checkpoint,
                                               "S3Uri": f"{str(checkpoint['S3Uri']).rstrip('/')}/{job_name}"}
        return job_request

    def one_trial() -> None:
        while not control.stopped:
            with lock:
                if counter["next"] >= max_jobs:
                    return
                counter["next"] += 1
                index = counter["next"]
                trial = study.ask()
                tuned = {r.name: r.suggest(trial) for r in ranges}
            hps = {**static, **tuned}
            job_name = trial_job_name(tuning_job_name, index, tuned)
            trial_log = step_dir / "trials" / f"{job_name}.log"
            trial.set_user_attr("job_name", job_name)
            values: list[float] = []
            started = time.time()
            records.record_trial(execution_id, step_name, index, job_name, "InProgress", tuned,
                                 started_at=started, log_path=str(trial_log))
            say(f"trial {index}/{max_jobs} {job_name} started: {tuned}")

            def on_line(line: str, trial: optuna.Trial = trial, values: list[float] = values,
                        index: int = index) -> bool:
                match = regex.search(line)
                if not match:
                    return False
                try:
                    value = float(match.group(1))
                except (ValueError, IndexError):
                    return False
                if math.isnan(value):
                    return False
                values.append(value)
                step = len(values)
                with lock:
                    trial.report(value, step)
                    prune = trial.should_prune()
                say(f"trial {index} epoch {step}: {metric_name}={value:.4f}" + (" -> pruned" if prune else ""))
                return prune

            status, reason, result = "Completed", None, None
            try:
                result = jobs.run_training_job(trial_request(hps, job_name), job_name,
                                               step_dir / "trials" / job_name, artifacts, trial_log,
                                               on_line=on_line, control=control)
            except jobs.JobStopped as exc:
                status, reason = ("Stopped", str(exc))
            except (jobs.JobError, OSError, ValueError) as exc:
                status, reason = "Failed", str(exc)
            final = values[-1] if values else None
            with lock:
                if status == "Completed" and final is not None:
                    study.tell(trial, final)
                elif status == "Stopped" and not control.stopped:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                else:
                    if status == "Completed":
                        status, reason = "Failed", f"objective metric {metric_name} not found in the log"
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
            ended = time.time()
            summary = {
                "TrainingJobName": job_name,
                "TrainingJobArn": jobs._arn("training-job", job_name),
                "TrainingJobStatus": status,
                "TunedHyperParameters": tuned,
                "TrainingStartTime": started,
                "TrainingEndTime": ended,
                "ObjectiveStatus": "Succeeded" if final is not None and status != "Failed" else "Failed",
                "OptunaTrialNumber": trial.number,
            }
            if final is not None:
                summary["FinalHyperParameterTuningJobObjectiveMetric"] = {"MetricName": metric_name, "Value": final}
            if reason:
                summary["FailureReason"] = reason
            if result:
                summary["ModelArtifacts"] = result["ModelArtifacts"]
            with lock:
                summaries.append(summary)
            records.record_trial(execution_id, step_name, index, job_name, status, tuned, objective=final,
                                 metrics={"objective_history": values}, started_at=started, ended_at=ended,
                                 log_path=str(trial_log), failure_reason=reason)
            say(f"trial {index}/{max_jobs} {job_name} {status}" +
                (f": {metric_name}={final:.4f}" if final is not None else "") + (f" ({reason})" if reason else ""))

    with ThreadPoolExecutor(max_workers=min(max_parallel, max_jobs), thread_name_prefix="trial") as pool:
        futures = [pool.submit(one_trial) for _ in range(min(max_parallel, max_jobs))]
        for future in futures:
            future.result()
    if control.stopped:
        raise jobs.JobStopped("tuning job stopped on request")

    sign = 1.0 if direction == "maximize" else -1.0

    def rank(s: dict[str, Any]) -> tuple[int, float]:
        metric = s.get("FinalHyperParameterTuningJobObjectiveMetric")
        usable = s["TrainingJobStatus"] == "Completed" and metric is not None
        return (0 if usable else 1 if metric is not None else 2, -sign * metric["Value"] if metric else 0.0)

    summaries.sort(key=rank)
    completed = [s for s in summaries if s["TrainingJobStatus"] == "Completed"]
    if not completed:
        reasons = "; ".join(f"{s['TrainingJobName']}: {s.get('FailureReason', s['TrainingJobStatus'])}"
                            for s in summaries[:3])
        raise TuningError(f"no training job of the tuning job completed ({len(summaries)} run): {reasons}")
    counters = {k: sum(1 for s in summaries if s["TrainingJobStatus"] == k)
                for k in ("Completed", "InProgress", "Failed", "Stopped")}
    counters["RetryableError"] = 0
    counters["NonRetryableError"] = counters["Failed"]
    best = dict(completed[0])
    return {
        "HyperParameterTuningJobName": tuning_job_name,
        "HyperParameterTuningJobArn": jobs._arn("hyper-parameter-tuning-job", tuning_job_name),
        "HyperParameterTuningJobStatus": "Completed",
        "HyperParameterTuningJobConfig": config,
        "TrainingJobDefinition": definition,
        "BestTrainingJob": best,
        "TrainingJobSummaries": summaries,
        "TrainingJobStatusCounters": counters,
        "ObjectiveStatusCounters": {"Succeeded": sum(1 for s in summaries if s["ObjectiveStatus"] == "Succeeded"),
                                    "Pending": 0,
                                    "Failed": sum(1 for s in summaries if s["ObjectiveStatus"] == "Failed")},
        "OptunaStudyName": study_name,
        "OptunaStorage": str(mlops_home() / "optuna.db"),
    }
