"""Tests of training/train.py: run as SageMaker would (subprocess, SM_* env vars, string hyperparameters)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.sample_data import make_dataset
from training import train
from training.metrics import METRIC_DEFINITIONS, METRIC_NAMES, parse_epoch_lines, parse_metric_values

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "training" / "train.py"
CLASSES = ["circle", "square", "triangle"]
# every hyperparameter as SageMaker passes it: "--name" "string value"
HYPERPARAMETERS = {"arch": "resnet18", "epochs": "2", "batch_size": "8", "test-batch-size": "16", "lr": "0.002",
                   "optimizer": "adam", "image_size": "32", "workers": "0", "seed": "7", "amp": "True",
                   "channels-last": "false", "pretrained": "default", "pretrained_fallback": "scratch",
                   "system_monitor_interval_ms": "200"}


def _hp_args(overrides: dict[str, str] | None = None) -> list[str]:
    args: list[str] = []
    for name, value in {**HYPERPARAMETERS, **(overrides or {})}.items():
        args += [f"--{name}", value]
    return args


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    # train: 6 good images per class + odd-but-valid files + empty / not-an-image / truncated files
    make_dataset(root / "train", per_class=6, size=40, seed=1, classes=CLASSES, with_bad_files=True)
    make_dataset(root / "validation", per_class=5, size=40, seed=2, classes=CLASSES)
    return root


def _job_env(job: Path, data: Path, debug_config: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "SM_CHANNEL_TRAIN": str(data / "train"), "SM_CHANNEL_VALIDATION": str(data / "validation"),
        "SM_MODEL_DIR": str(job / "model"), "SM_OUTPUT_DATA_DIR": str(job / "output" / "data"),
        "SM_OUTPUT_DIR": str(job / "output"), "SM_CHECKPOINT_DIR": str(job / "checkpoints"), "SM_NUM_GPUS": "0",
        # offline for pretrained weights, whatever network this machine has: empty hub cache, dead proxy
        "TORCH_HOME": str(job / "torch_home"), "HTTPS_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
        "SMDEBUG_CONFIG_FILE_PATH": str(debug_config or job / "no-debughookconfig.json"),
        "PYTHONPATH": str(ROOT),
        # one intra-op thread: tiny tensors, and spinning OpenMP threads only burn CPU on a shared test machine
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    })
    env.pop("TRAINING_JOB_NAME", None)
    return env


def _run(job: Path, data: Path, args: list[str], debug_config: Path | None = None,
         timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TRAIN_PY), *args], env=_job_env(job, data, debug_config),
                          capture_output=True, text=True, timeout=timeout, cwd=job)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def full_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted 2-epoch job with a SageMaker-format Debugger hook config."""
    job = tmp_path_factory.mktemp("job_full")
    config = job / "debughookconfig.json"
    config.write_text(json.dumps({
        "LocalPath": str(job / "tensors"),
        "S3OutputPath": "s3://bucket/prefix/debug-output",
        "HookParameters": {"save_interval": "1"},
        "CollectionConfigurations": [{"CollectionName": "losses", "CollectionParameters": {"save_interval": "1"}}],
    }))
    # unknown extra argument: must be logged and ignored
    result = _run(job, data_dir, [*_hp_args(), "--sagemaker_extra", "x"], debug_config=config)
    assert result.returncode == 0, result.stderr[-4000:]
    return job, result


@pytest.mark.slow
def test_metric_lines_model_and_learning(full_run: tuple[Path, subprocess.CompletedProcess], data_dir: Path) -> None:
    import torch

    from training.model import eval_transform, load_model

    job, result = full_run
    rows = parse_epoch_lines(result.stdout)
    assert [row["epoch"] for row in rows] == [1, 2]
    for definition in METRIC_DEFINITIONS:  # the regexes SageMaker and the tuner use
        assert len(parse_metric_values(result.stdout, definition["Name"])) == 2, definition
    assert "ignoring unknown arguments: --sagemaker_extra x" in result.stderr
    assert "bf16 autocast is CUDA-only" in result.stderr

    best = max(row["valid_accuracy"] for row in rows)
    assert best > 1 / len(CLASSES) + 0.15, rows  # clearly above chance after 2 epochs

    model, config = load_model(job / "model")
    assert config["classes"] == CLASSES and config["num_classes"] == 3
    assert config["best_valid_accuracy"] == pytest.approx(best, abs=5e-5)
    assert rows[config["best_epoch"] - 1]["valid_accuracy"] == best
    hyper = config["hyperparameters"]
    # what ran: --amp true was asked, but bf16 autocast is CUDA-only
    assert (hyper["lr"], hyper["batch_size"], hyper["amp"], hyper["channels_last"]) == (0.002, 8, False, False)
    assert {"arch", "hidden_units", "dropout", "image_size", "resize_size", "mean", "std",
            "weights_file"} <= set(config)
    # the saved weights are the best epoch's: they reproduce its validation accuracy
    dataset = train.SafeImageFolder(data_dir / "validation", eval_transform(config))
    with torch.no_grad():
        correct = sum(int(model(image.unsqueeze(0)).argmax(1).item() == target) for image, target in dataset)
    assert correct / len(dataset) == pytest.approx(best, abs=5e-5)


@pytest.mark.slow
def test_side_outputs_and_bad_files(full_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    job, result = full_run
    out = job / "output" / "data"
    epochs = _read_jsonl(out / "metrics" / "epochs.jsonl")
    assert [row["epoch"] for row in epochs] == [1, 2]
    assert {*METRIC_NAMES, "lr", "epoch_time_s"} <= set(epochs[0])
    for row, parsed in zip(epochs, parse_epoch_lines(result.stdout), strict=True):
        assert parsed["valid_accuracy"] == pytest.approx(row["valid_accuracy"], abs=5e-5)

    system = _read_jsonl(out / "profiler" / "system_metrics.jsonl")
    assert system, "no system metrics sampled"
    assert set(system[0]) == {"timestamp", "cpu_percent", "memory_percent", "rss_mb", "gpu_utilization",
                              "gpu_memory_mb"}
    assert system[0]["gpu_utilization"] is None and system[0]["rss_mb"] > 50

    steps = _read_jsonl(out / "profiler" / "step_timings.jsonl")
    summary = json.loads((out / "profiler" / "summary.json").read_text())
    for mode in ("train", "eval"):
        mine = [s for s in steps if s["mode"] == mode]
        assert len(mine) == summary[mode]["steps"] > 0
        assert sum(s["batch_size"] for s in mine) == summary[mode]["samples"]
        assert all(s["compute_time_s"] > 0 and s["data_time_s"] >= 0 for s in mine)
    assert summary["eval"]["samples"] == 2 * 5 * len(CLASSES)
    assert summary["device"] == "cpu" and summary["workers"] == 0 and summary["epochs_completed"] == 2

    # empty and not-an-image files are skipped (a truncated one may or may not be decodable), counted once each
    skipped = {f"{Path(item['path']).name}@{Path(item['path']).parent.name}" for item in summary["bad_files"]}
    expected = {f"{name}@{cls}" for cls in CLASSES for name in ("empty.jpg", "not_an_image.jpg")}
    assert expected <= skipped
    assert skipped - expected <= {f"truncated.jpg@{cls}" for cls in CLASSES}
    assert summary["bad_files_skipped"] == len(skipped)
    assert summary["train"]["samples"] == 2 * (len(CLASSES) * (6 + 5 + 3) - len(skipped))
    assert "skipping unreadable image" in result.stderr


@pytest.mark.slow
def test_debugger_hook_saves_losses(full_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    from smdebug import modes
    from smdebug.trials import create_trial

    job, _ = full_run
    summary = json.loads((job / "output" / "data" / "profiler" / "summary.json").read_text())
    assert summary["debugger_hook"] is True
    trial = create_trial(str(job / "tensors"))
    names = trial.tensor_names(collection="losses")
    assert names, "no loss tensors saved"
    loss = trial.tensor(names[0])
    assert len(loss.steps(mode=modes.TRAIN)) == summary["train"]["steps"]
    assert len(loss.steps(mode=modes.EVAL)) == summary["eval"]["steps"]
    assert loss.value(loss.steps(mode=modes.TRAIN)[0], mode=modes.TRAIN) > 0


@pytest.mark.slow
def test_pretrained_offline_falls_back_to_scratch(full_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    job, result = full_run
    assert "could not load pretrained weights" in result.stderr and "continuing from scratch" in result.stderr
    config = json.loads((job / "model" / "model_config.json").read_text())
    assert config["pretrained_weights"] is None


@pytest.mark.slow
def test_pretrained_offline_fails_clearly(data_dir: Path, tmp_path: Path) -> None:
    result = _run(tmp_path, data_dir, _hp_args({"pretrained_fallback": "fail", "epochs": "1"}))
    assert result.returncode == 2
    assert "could not load pretrained weights" in result.stderr
    assert "--pretrained-fallback scratch" in result.stderr and "Traceback" not in result.stderr
    assert "could not load pretrained weights" in (tmp_path / "output" / "failure").read_text()
    assert not (tmp_path / "model" / "model.pth").exists()


@pytest.mark.slow
def test_killed_job_resumes_from_checkpoint(data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                            full_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    import torch

    full_job, _ = full_run
    reference = _read_jsonl(full_job / "output" / "data" / "metrics" / "epochs.jsonl")
    env = _job_env(tmp_path, data_dir, None)
    # first attempt: killed (like a reclaimed spot instance) as soon as epoch 1 is reported
    proc = subprocess.Popen([sys.executable, str(TRAIN_PY), *_hp_args()], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)
    try:
        line = "-"
        while line and not line.startswith("epoch="):  # other stdout lines (e.g. torch.hub's) are allowed
            line = proc.stdout.readline()
        assert line.startswith("epoch=1 "), line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "checkpoints" / "checkpoint.pth").is_file()
    assert not (tmp_path / "model" / "model.pth").exists()

    second = _run(tmp_path, data_dir, _hp_args())
    assert second.returncode == 0, second.stderr[-4000:]
    assert [row["epoch"] for row in parse_epoch_lines(second.stdout)] == [2]  # resumed, not restarted
    assert "resuming from" in second.stderr
    history = _read_jsonl(tmp_path / "output" / "data" / "metrics" / "epochs.jsonl")
    assert [row["epoch"] for row in history] == [1, 2]
    # deterministic on CPU: interrupted + resumed == uninterrupted (model, optimizer, RNG, shuffling restored)
    for got, want in zip(history, reference, strict=True):
        for name in METRIC_NAMES:
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), (name, got, want)
    summary = json.loads((tmp_path / "output" / "data" / "profiler" / "summary.json").read_text())
    assert summary["resumed"] is True and summary["start_epoch"] == 2 and summary["epochs_completed"] == 1
    # no Debugger config -> no hook, no tensors
    assert summary["debugger_hook"] is False and not (tmp_path / "tensors").exists()
    assert "no hook config" in second.stderr

    # a checkpoint of other hyperparameters is refused and left alone
    before = (tmp_path / "checkpoints" / "checkpoint.pth").read_bytes()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        dirs = {"train": data_dir / "train", "validation": data_dir / "validation",
                "checkpoint-dir": tmp_path / "checkpoints", "model-dir": tmp_path / "other_model",
                "output-data-dir": tmp_path / "other_out"}
        code = train.run(_hp_args({"lr": "0.5", **{name: str(path) for name, path in dirs.items()}}))
    finally:  # main() configures determinism for the process; give pytest's back
        torch.use_deterministic_algorithms(deterministic)
    assert code == 2
    assert "belongs to a run with other hyperparameters" in caplog.text
    assert (tmp_path / "checkpoints" / "checkpoint.pth").read_bytes() == before
    assert not (tmp_path / "other_model").exists()


@pytest.mark.fast
def test_no_debugger_config_means_no_smdebug_import(tmp_path: Path) -> None:
    code = ("import sys; from training import debugger; "
            "assert debugger.create_hook(None, None) is None; assert 'smdebug' not in sys.modules; print('ok')")
    env = {**os.environ, "SMDEBUG_CONFIG_FILE_PATH": str(tmp_path / "missing.json"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.fast
def test_debugger_config_problems_disable_hook_without_crashing(tmp_path: Path, monkeypatch) -> None:
    from training import debugger

    bad = tmp_path / "debughookconfig.json"
    bad.write_text("{not json")
    monkeypatch.setenv("SMDEBUG_CONFIG_FILE_PATH", str(bad))
    assert debugger.create_hook(None, None) is None
    finished = tmp_path / "tensors"
    finished.mkdir()
    (finished / debugger.TRAINING_END_FILE).write_text("")
    bad.write_text(json.dumps({"LocalPath": str(finished)}))
    assert debugger.create_hook(None, None) is None


@pytest.mark.fast
def test_hyperparameters_as_sagemaker_passes_them(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SM_CHANNEL_TRAIN", str(tmp_path / "tr"))
    monkeypatch.setenv("SM_CHECKPOINT_DIR", str(tmp_path / "ck"))
    monkeypatch.setenv("SM_NUM_GPUS", "1")
    args = train.parse_args(["--batch-size", "16", "--hidden_units", "128", "--freeze-backbone", "True",
                             "--amp", "false", "--channels_last", "--lr", "1e-4", "--epochs", "3.0",
                             "--arch", '"mobilenet_v2"', "--optimizer", "SGD", "--unknown", "1"])
    assert (args.batch_size, args.hidden_units, args.freeze_backbone, args.amp, args.channels_last) == (
        16, 128, True, False, True)
    assert (args.lr, args.epochs, args.arch, args.optimizer) == (1e-4, 3, "mobilenet_v2", "sgd")
    assert (args.train, args.checkpoint_dir, args.num_gpus) == (str(tmp_path / "tr"), str(tmp_path / "ck"), 1)
    assert args.ignored_args == ["--unknown", "1"]
    for bad in (["--arch", "vgg11"], ["--epochs", "2.5"], ["--amp", "maybe"], ["--lr", "fast"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)
    with pytest.raises(ValueError, match="--dropout must be in"):
        train._validate_args(train.parse_args(["--dropout", "1.5"]))


@pytest.mark.fast
def test_the_trainer_loader_decodes_rgb_jpegs_to_the_pixels_pillow_gives(tmp_path: Path) -> None:
    """``image_loader``: an RGB JPEG (every chroma subsampling) comes back as a uint8 CHW tensor equal to Pillow's
    decode, so the augmentations and the CPU results are unchanged; the files it leaves to Pillow come back as
    ``pil_loader`` returns them, and a truncated JPEG fails the way Pillow fails."""
    import numpy as np
    import torch
    from PIL import Image

    from training.model import train_transform

    make_dataset(tmp_path / "d", per_class=1, size=64, seed=5, classes=CLASSES, with_bad_files=True)
    for subsampling in (0, 1, 2):
        path = tmp_path / f"rgb-{subsampling}.jpg"
        Image.open(tmp_path / "d" / "circle" / "circle_0000.jpg").convert("RGB").resize((75, 61)).save(
            path, quality=90, subsampling=subsampling)
        decoded = train.image_loader(str(path))
        assert isinstance(decoded, torch.Tensor) and decoded.dtype == torch.uint8 and decoded.shape == (3, 61, 75)
        expected = np.asarray(train.pil_loader(str(path))).transpose(2, 0, 1)
        assert np.array_equal(decoded.numpy(), expected)
        torch.manual_seed(0)
        from_tensor = train_transform(48)(decoded)
        torch.manual_seed(0)
        assert torch.equal(from_tensor, train_transform(48)(train.pil_loader(str(path))))
    for name in ("odd_cmyk.jpg", "odd_png_named.jpg", "odd_16bit.png", "odd_gray.png"):
        path = str(tmp_path / "d" / "circle" / name)
        loaded = train.image_loader(path)
        assert isinstance(loaded, Image.Image) and loaded.mode == "RGB", name
        assert np.array_equal(np.asarray(loaded), np.asarray(train.pil_loader(path))), name
    gray = tmp_path / "gray.jpg"
    Image.new("L", (20, 10), 128).save(gray)
    assert isinstance(train.image_loader(str(gray)), Image.Image)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((tmp_path / "rgb-0.jpg").read_bytes()[:400])
    (tmp_path / "empty.jpg").write_bytes(b"")
    for bad in (truncated, tmp_path / "empty.jpg", tmp_path / "d" / "circle" / "not_an_image.jpg"):
        with pytest.raises(OSError) as by_pillow:
            train.pil_loader(str(bad))
        with pytest.raises(OSError) as by_trainer:
            train.image_loader(str(bad))
        assert (type(by_trainer.value), str(by_trainer.value)) == (type(by_pillow.value), str(by_pillow.value))


@pytest.mark.fast
def test_bad_files_become_markers_and_validation_uses_training_classes(tmp_path: Path) -> None:
    from training.model import train_transform

    make_dataset(tmp_path / "train", per_class=2, size=32, seed=3, classes=CLASSES, with_bad_files=True)
    dataset = train.SafeImageFolder(tmp_path / "train", train_transform(32))
    items = [dataset[i] for i in range(len(dataset))]
    bad = [item for item in items if isinstance(item, train.BadSample)]
    names = {Path(item.path).name for item in bad}
    assert {"empty.jpg", "not_an_image.jpg"} <= names and names <= {"empty.jpg", "not_an_image.jpg", "truncated.jpg"}
    images, targets, dropped = train.collate_skip_bad(items[:8])
    assert images.shape[1:] == (3, 32, 32) and len(targets) + len(dropped) == 8
    assert train.collate_skip_bad(bad[:2]) == (None, None, bad[:2])
    # odd formats (16-bit, CMYK, RGBA, grayscale, PNG named .jpg) all load as RGB
    for name in ("odd_16bit.png", "odd_cmyk.jpg", "odd_rgba.png", "odd_gray.png", "odd_png_named.jpg"):
        image = train.pil_loader(str(tmp_path / "train" / "circle" / name))
        assert image.mode == "RGB" and max(image.getextrema()[0]) > 0

    make_dataset(tmp_path / "val", per_class=1, size=32, seed=4, classes=["square", "triangle"])
    val = train.SafeImageFolder(tmp_path / "val", None, class_to_idx=dataset.class_to_idx, allow_empty=True)
    assert val.classes == CLASSES and sorted({t for _, t in val.samples}) == [1, 2]
    make_dataset(tmp_path / "val2", per_class=1, size=32, seed=4, classes=["circle", "cross"])
    with pytest.raises(ValueError, match="lacks: \\['cross'\\]"):
        train.SafeImageFolder(tmp_path / "val2", None, class_to_idx=dataset.class_to_idx, allow_empty=True)


# --------------------------------------------------------------------------- resume: data and epoch target

TINY_HPS = {"arch": "mobilenet_v2", "epochs": "1", "batch_size": "8", "image_size": "32", "workers": "0",
            "pretrained": "none", "seed": "7", "system_monitor_interval_ms": "1000"}


def _tiny_data(root: Path, per_class: int, seed: int) -> Path:
    make_dataset(root / "train", per_class=per_class, size=32, seed=seed, classes=CLASSES[:2])
    make_dataset(root / "validation", per_class=2, size=32, seed=seed + 1, classes=CLASSES[:2])
    return root


def _train_in_process(data: Path, checkpoints: Path, out: Path, **overrides: str) -> dict:
    """train.run as SageMaker would call it (string hyperparameters); returns profiler/summary.json."""
    import torch

    args: list[str] = []
    for name, value in {**TINY_HPS, **overrides}.items():
        args += [f"--{name}", value]
    args += ["--train", str(data / "train"), "--validation", str(data / "validation"),
             "--checkpoint-dir", str(checkpoints), "--model-dir", str(out / "model"),
             "--output-data-dir", str(out / "data")]
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        assert train.run(args) == 0
    finally:  # main() configures determinism for the process; give pytest's back
        torch.use_deterministic_algorithms(deterministic)
    assert (out / "model" / "model.pth").is_file()
    return json.loads((out / "data" / "profiler" / "summary.json").read_text())


@pytest.fixture
def finished_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """Data A and the checkpoint of a finished 1-epoch run on it."""
    data = _tiny_data(tmp_path / "data_a", per_class=4, seed=1)
    checkpoints = tmp_path / "checkpoints"
    summary = _train_in_process(data, checkpoints, tmp_path / "first")
    assert summary["resumed"] is False and summary["epochs_completed"] == 1
    return data, checkpoints


def _stale_files(checkpoints: Path) -> list[Path]:
    return sorted(checkpoints.glob(f"{train.CHECKPOINT_FILE}.stale-*"))


@pytest.mark.fast
def test_checkpoint_of_other_data_is_moved_aside_and_training_starts_over(
        finished_checkpoint: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import torch

    _, checkpoints = finished_checkpoint
    other = _tiny_data(tmp_path / "data_b", per_class=5, seed=3)  # same classes and hyperparameters, other data
    with caplog.at_level("WARNING", logger="training.train"):
        summary = _train_in_process(other, checkpoints, tmp_path / "second")
    # before: "resumed" at epoch 2 of 1, trained nothing and shipped the previous run's model
    assert summary["resumed"] is False and summary["start_epoch"] == 1 and summary["epochs_completed"] == 1
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING" and "not resuming" in r.getMessage()]
    assert "other data" in warning.getMessage() and "starting at epoch 1" in warning.getMessage()
    (stale,) = _stale_files(checkpoints)
    assert stale.name in warning.getMessage()
    fresh = torch.load(checkpoints / train.CHECKPOINT_FILE, weights_only=True)
    assert (fresh["epoch"], fresh["epochs"]) == (1, 1)  # the checkpoint records the epoch target and the data
    assert fresh["data_fingerprint"] == train._data_fingerprint({"train": other / "train",
                                                                   "validation": other / "validation"})


@pytest.mark.fast
def test_checkpoint_of_another_epoch_target_is_not_resumed(
        finished_checkpoint: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, checkpoints = finished_checkpoint
    with caplog.at_level("WARNING", logger="training.train"):
        summary = _train_in_process(data, checkpoints, tmp_path / "second", epochs="2")
    assert summary["resumed"] is False and summary["start_epoch"] == 1 and summary["epochs_completed"] == 2
    assert "written for a run of 1 epochs, this job trains 2" in caplog.text
    assert len(_stale_files(checkpoints)) == 1


@pytest.mark.fast
def test_genuine_resume_of_a_finished_checkpoint_keeps_working(
        finished_checkpoint: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # e.g. a spot interruption after the last epoch's checkpoint, before the model was uploaded
    data, checkpoints = finished_checkpoint
    with caplog.at_level("WARNING", logger="training.train"):
        summary = _train_in_process(data, checkpoints, tmp_path / "restarted")
    assert summary["resumed"] is True and summary["start_epoch"] == 2 and summary["epochs_completed"] == 0
    assert "not resuming" not in caplog.text and not _stale_files(checkpoints)
    # other hyperparameters on the same data: still refused, checkpoint left alone (as before)
    before = (checkpoints / train.CHECKPOINT_FILE).read_bytes()
    args = [f"--{k}={v}" for k, v in {**TINY_HPS, "lr": "0.5"}.items()]
    args += [f"--train={data / 'train'}", f"--validation={data / 'validation'}", f"--checkpoint-dir={checkpoints}",
             f"--model-dir={tmp_path / 'other' / 'model'}", f"--output-data-dir={tmp_path / 'other' / 'data'}"]
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        assert train.run(args) == 2
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert "belongs to a run with other hyperparameters" in caplog.text
    assert (checkpoints / train.CHECKPOINT_FILE).read_bytes() == before and not _stale_files(checkpoints)


@pytest.mark.fast
def test_data_fingerprint_is_paths_and_sizes(tmp_path: Path) -> None:
    for root in (tmp_path / "one", tmp_path / "two"):
        (root / "train" / "cat").mkdir(parents=True)
        (root / "validation" / "cat").mkdir(parents=True)
        (root / "train" / "cat" / "a.jpg").write_bytes(b"12345")
        (root / "validation" / "cat" / "b.jpg").write_bytes(b"123")

    def fingerprint(root: Path) -> str:
        return train._data_fingerprint({"train": root / "train", "validation": root / "validation"})

    first = fingerprint(tmp_path / "one")
    assert fingerprint(tmp_path / "two") == first  # where the channels are mounted does not matter
    os.utime(tmp_path / "two" / "train" / "cat" / "a.jpg", (0, 0))
    assert fingerprint(tmp_path / "two") == first  # neither do mtimes (S3 downloads reset them)
    (tmp_path / "two" / "train" / "cat" / "a.jpg").write_bytes(b"1234")
    assert fingerprint(tmp_path / "two") != first
    (tmp_path / "two" / "train" / "cat" / "a.jpg").write_bytes(b"12345")
    assert fingerprint(tmp_path / "two") == first
    (tmp_path / "two" / "validation" / "cat" / "b.jpg").rename(tmp_path / "two" / "train" / "cat" / "b.jpg")
    assert fingerprint(tmp_path / "two") != first  # a file moved from validation to train


@pytest.mark.fast
def test_gpu_data_path_options_resolve_off_on_the_cpu_and_on_on_cuda() -> None:
    import torch

    args = train.parse_args(["--workers", "2"])
    assert (args.amp, args.channels_last, args.device_normalize, args.persistent_workers) == (None,) * 4
    train.resolve_device_options(args, torch.device("cpu"))
    assert (args.amp, args.channels_last, args.device_normalize, args.persistent_workers, args.prefetch_factor) == (
        False, False, False, False, 2)
    args = train.parse_args(["--workers", "2", "--amp", "auto", "--channels-last", "false"])
    train.resolve_device_options(args, torch.device("cuda", 0))  # only resolved, nothing runs on it
    assert (args.amp, args.channels_last, args.device_normalize, args.persistent_workers, args.prefetch_factor) == (
        True, False, True, True, 4)
    args = train.parse_args(["--amp", "true"])
    train.resolve_device_options(args, torch.device("cpu"))
    assert args.amp is False  # bf16 autocast is CUDA-only


@pytest.mark.fast
def test_normalising_on_the_device_equals_normalising_in_the_workers() -> None:
    import random

    import torch

    from pipelines.sample_data import draw_sample
    from training.model import eval_transform, normalize_on_device

    config = {"image_size": 40, "resize_size": 48, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    image = draw_sample("circle", 64, random.Random(0))
    on_workers = eval_transform(config)(image)
    raw = eval_transform(config, normalize=False)(image)
    assert raw.dtype == torch.uint8 and raw.shape == on_workers.shape
    mean, std = (torch.tensor(config[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    assert torch.allclose(normalize_on_device(raw.unsqueeze(0), mean, std)[0], on_workers, atol=1e-6)


@pytest.mark.fast
def test_device_normalize_on_the_cpu_trains_to_the_same_result(tmp_path: Path) -> None:
    """The uint8 path (forced on the CPU) gives the run the default CPU path gives: same metrics, same weights to
    float rounding (SGD: Adam's first steps are +-lr whatever the gradient, so rounding would become lr-sized)."""
    import torch

    data = _tiny_data(tmp_path / "data", per_class=4, seed=5)
    runs = {}
    for name, value in (("workers", "false"), ("device", "true")):
        summary = _train_in_process(data, tmp_path / f"ck-{name}", tmp_path / name, device_normalize=value,
                                   optimizer="sgd")
        assert summary["device_normalize"] is (value == "true")
        runs[name] = (summary["best_valid_accuracy"],
                      torch.load(tmp_path / name / "model" / "model.pth", weights_only=True))
    assert runs["workers"][0] == runs["device"][0]
    for key, tensor in runs["workers"][1].items():
        assert torch.allclose(tensor.float(), runs["device"][1][key].float(), atol=1e-5), key


@pytest.mark.fast
def test_the_device_cache_trains_to_the_very_result_of_the_folder_loader(tmp_path: Path) -> None:
    """``--device-cache true`` on the CPU (decoded once, augmented from memory) against the folder's loader with
    ``workers=0``: the same shuffles and augmentations in the same order, so the same weights bit for bit, bad files
    skipped the same way (they keep their index in the cache)."""
    import torch

    data = tmp_path / "data"
    make_dataset(data / "train", per_class=4, size=32, seed=5, classes=CLASSES[:2], with_bad_files=True)
    make_dataset(data / "validation", per_class=2, size=32, seed=6, classes=CLASSES[:2])
    runs = {}
    for value in ("false", "true"):
        summary = _train_in_process(data, tmp_path / f"ck-{value}", tmp_path / value, device_cache=value,
                                   optimizer="sgd", epochs="2")
        assert summary["device_cache"] is (value == "true")
        runs[value] = (summary, torch.load(tmp_path / value / "model" / "model.pth", weights_only=True))
    (folder, folder_weights), (cache, cache_weights) = runs["false"], runs["true"]
    assert cache["bad_files_skipped"] == folder["bad_files_skipped"] > 0
    assert cache["bad_files"] == folder["bad_files"]
    assert cache["best_valid_accuracy"] == folder["best_valid_accuracy"]
    for key, tensor in folder_weights.items():
        assert torch.equal(tensor, cache_weights[key]), key


@pytest.mark.fast
def test_a_device_cache_that_does_not_fit_leaves_the_loader(tmp_path: Path, monkeypatch, caplog) -> None:
    from training import device_cache

    monkeypatch.setattr(device_cache, "memory_budget", lambda device: 1000)
    data = _tiny_data(tmp_path / "data", per_class=4, seed=1)
    with caplog.at_level("WARNING", logger="training.train"):
        summary = _train_in_process(data, tmp_path / "ck", tmp_path / "out", device_cache="true")
    assert summary["device_cache"] is False
    assert any("device cache off, the loader stays" in r.getMessage() and "budget 0 MiB" in r.getMessage()
               for r in caplog.records)


@pytest.mark.fast
def test_a_failing_transform_skips_the_image_but_a_device_out_of_memory_stops_the_job() -> None:
    import torch

    from training.samples import BadSample, transformed

    def odd(_sample):
        raise ValueError("too small to crop")

    def oom(_sample):
        raise torch.OutOfMemoryError("CUDA out of memory")

    assert transformed(odd, ("x", 1), "a.jpg") == BadSample("a.jpg", "ValueError: too small to crop")
    with pytest.raises(torch.OutOfMemoryError):
        transformed(oom, ("x", 1), "a.jpg")
