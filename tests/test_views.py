"""Progress lines of ``start --wait`` / ``status --watch`` (pipelines/views.py) from SageMaker's answer shapes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipelines import views

pytestmark = pytest.mark.fast
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class _Pages:
    def __init__(self, summaries: list[dict[str, Any]]) -> None:
        self.summaries = summaries

    def paginate(self, **_: Any) -> list[dict[str, Any]]:
        return [{"TrainingJobSummaries": self.summaries}]


class _Answers:
    """DescribeHyperParameterTuningJob / ListTrainingJobsForHyperParameterTuningJob / DescribeTrainingJob answers."""

    def __init__(self, summaries: list[dict[str, Any]], total: int, parallel: int) -> None:
        self.summaries, self.total, self.parallel = summaries, total, parallel

    def describe_hyper_parameter_tuning_job(self, **_: Any) -> dict[str, Any]:
        statuses = [s["TrainingJobStatus"] for s in self.summaries]
        return {"HyperParameterTuningJobConfig": {"ResourceLimits": {
                    "MaxNumberOfTrainingJobs": self.total, "MaxParallelTrainingJobs": self.parallel}},
                "TrainingJobStatusCounters": {"Completed": statuses.count("Completed"),
                                              "InProgress": statuses.count("InProgress")}}

    def get_paginator(self, _name: str) -> _Pages:
        return _Pages(self.summaries)

    def describe_training_job(self, TrainingJobName: str) -> dict[str, Any]:  # noqa: N803 -- boto3's name
        summary = next(s for s in self.summaries if s["TrainingJobName"] == TrainingJobName)
        return {"TrainingJobName": TrainingJobName, "TrainingStartTime": summary["TrainingStartTime"],
                "HyperParameters": {"epochs": "4"},
                "FinalMetricDataList": [{"MetricName": "epoch", "Value": 1.0}]}


def _trial(name: str, status: str, started_s_ago: float, duration_s: float | None = None) -> dict[str, Any]:
    start = NOW - timedelta(seconds=started_s_ago)
    trial = {"TrainingJobName": name, "TrainingJobStatus": status, "TrainingStartTime": start}
    if duration_s is not None:
        trial["TrainingEndTime"] = start + timedelta(seconds=duration_s)
    return trial


def test_tuning_eta_counts_the_running_trials_time_already_spent():
    answers = _Answers([_trial("t1", "Completed", 200, 60), _trial("t2", "Completed", 140, 60),
                        _trial("t3", "InProgress", 40)], total=5, parallel=1)
    text = views.tuning_progress(answers, "tuning", NOW)
    # the running trial has 20 s of its (mean) 60 s left, then two queued trials of 60 s each
    assert text.startswith("trials 2/5 done, 1 running (") and text.endswith("· ETA 2m20s"), text


def test_tuning_eta_of_parallel_waves():
    answers = _Answers([_trial("t1", "Completed", 100, 50), _trial("t2", "InProgress", 10),
                        _trial("t3", "InProgress", 30)], total=7, parallel=2)
    # the running wave: 50 - 30 = 20 s left; 4 queued trials in 2 waves of 50 s
    assert views.tuning_progress(answers, "tuning", NOW).endswith("· ETA 2m00s")
