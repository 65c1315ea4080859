"""The local profile (``pipelines.local.cli.profile``): Parameters the user does not set are sized to the machine,
each value's origin is shown and recorded on the execution, and the fallback to scratch is never silent."""

from __future__ import annotations

import json

import pytest

from pipelines import run
from pipelines.local.cli import profile

pytestmark = pytest.mark.fast

LAPTOP = profile.Machine(cores=2, memory_gib=24.0, gpus=0)
WORKSTATION = profile.Machine(cores=16, memory_gib=64.0, gpus=0)
GPU_BOX = profile.Machine(cores=16, memory_gib=128.0, gpus=1)


def _defaults() -> dict:
    return {name: default for name, (_kind, default) in run.parameter_types().items()}


def _offline(_arch: str) -> None:
    return None


def test_machine_kinds():
    assert (LAPTOP.kind, WORKSTATION.kind, GPU_BOX.kind) == ("cpu-small", "cpu", "gpu")
    assert profile.Machine(cores=16, memory_gib=6.0, gpus=0).kind == "cpu-small"


def test_unset_parameters_come_from_the_profile_and_the_users_win():
    resolved = profile.resolve(_defaults(), {"EpochsMax": "9", "InputDataUrl": "/data"}, LAPTOP, _offline)
    values, origins = resolved.values, resolved.origins
    assert (values["Arch"], origins["Arch"]) == ("resnet18", profile.ORIGIN_PROFILE)
    assert (values["ImageSize"], values["MaxTrainingJobs"], values["DataLoaderWorkers"]) == ("64", "3", "0")
    assert (values["EpochsMax"], origins["EpochsMax"]) == ("9", profile.ORIGIN_USER)
    assert origins["EndpointInstanceType"] == profile.ORIGIN_DEFINITION
    sent = {p["Name"]: p["Value"] for p in resolved.overrides()}
    assert sent["InputDataUrl"] == "/data" and sent["Arch"] == "resnet18" and "EndpointInstanceType" not in sent
    # what is sent passes the start checks (ranges, relations)
    run.check_start_parameters(resolved.overrides(), local=True)


def test_workstation_and_gpu_columns():
    work = profile.resolve(_defaults(), {}, WORKSTATION, _offline).values
    assert (work["ImageSize"], work["MaxParallelTrainingJobs"], work["DataLoaderWorkers"]) == ("112", "3", "4")
    gpu = profile.resolve(_defaults(), {}, GPU_BOX, lambda arch: "cached").values
    assert (gpu["Arch"], gpu["ImageSize"], gpu["Pretrained"]) == ("resnet50", "224", "default")


def test_offline_without_weights_falls_back_to_scratch_with_warnings_on_the_record():
    resolved = profile.resolve(_defaults(), {}, LAPTOP, _offline)
    assert (resolved.values["Pretrained"], resolved.origins["Pretrained"]) == ("none", profile.ORIGIN_PROFILE)
    assert resolved.values["AccuracyThreshold"] == profile.SCRATCH_ACCURACY_THRESHOLD
    assert any("training from scratch" in w for w in resolved.warnings)
    description = resolved.description()
    assert "WARNING: no pretrained weights for resnet18" in description
    assert "Arch=resnet18 (local profile)" in description and len(description) <= profile.DESCRIPTION_LIMIT


def test_cached_or_given_weights_keep_pretraining():
    cached = profile.resolve(_defaults(), {}, LAPTOP, lambda arch: "/cache/resnet18.pth")
    assert cached.values["Pretrained"] == "default" and not cached.warnings
    given = profile.resolve(_defaults(), {"PretrainedWeights": "/w/model.pth"}, LAPTOP, _offline)
    assert given.values["Pretrained"] == "default" and not given.warnings
    assert given.values["AccuracyThreshold"] == "0.7"
    chosen = profile.resolve(_defaults(), {"Pretrained": "none", "AccuracyThreshold": "0.5"}, LAPTOP, _offline)
    assert not chosen.warnings and chosen.values["AccuracyThreshold"] == "0.5"


def test_torchvision_weights_lookup_is_offline_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert profile.torchvision_weights_available("timm/resnet18") is None
    assert profile.torchvision_weights_available("no-such-arch") is None
    from torchvision.models import get_model_weights

    name = get_model_weights("resnet18").DEFAULT.url.rsplit("/", 1)[-1]
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / name).write_bytes(b"x")
    assert profile.torchvision_weights_available("resnet18") == str(tmp_path / "hub" / "checkpoints" / name)


def test_start_prints_the_table_and_records_it_on_the_execution(local_aws_env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(profile, "detect_machine", lambda: LAPTOP)
    monkeypatch.setattr(profile, "torchvision_weights_available", _offline)
    # a folder that is not image data: PrepareData fails fast; the execution record is what is checked here
    (tmp_path / "empty").mkdir()
    code = run.main(["start", "--param", f"InputDataUrl={tmp_path / 'empty'}"])
    out, err = capsys.readouterr()
    assert code == 0
    arn = out.strip().splitlines()[-1]
    assert "local profile cpu-small" in err and "Origin" in err and "training from scratch" in err
    sm = run.local_clients().sagemaker
    described = sm.describe_pipeline_execution(PipelineExecutionArn=arn)
    assert "ImageSize=64 (local profile)" in described["PipelineExecutionDescription"]
    assert f"InputDataUrl={tmp_path / 'empty'} (user)" in described["PipelineExecutionDescription"]
    params = {p["Name"]: p["Value"] for p in sm.list_pipeline_parameters_for_execution(
        PipelineExecutionArn=arn)["PipelineParameters"]}
    assert params["Arch"] == "resnet18" and params["Pretrained"] == "none"
    run.main(["stop", arn])
    run.sagemaker_wait(run.local_clients(), arn, 0.5, 300)
    capsys.readouterr()
    assert run.main(["status", arn, "--output", "json"]) in (0, 1)
    record = json.loads(capsys.readouterr().out)
    assert set(record) == {"PipelineExecutionArn", "PipelineExecutionStatus", "FailureReason", "Steps", "Progress"}
