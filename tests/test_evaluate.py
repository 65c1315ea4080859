"""Evaluation step (steps/evaluate.py): metrics against hand-computed cases, and the script on a real model."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.sample_data import CORRUPT_FILES, make_dataset
from steps import evaluate
from training.model import IMAGENET_MEAN, IMAGENET_STD, build_model, save_model

ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["circle", "cross", "square", "triangle"]

# 3 classes, 6 samples: predictions 0,0,1 | 1,2 | 2 ; row 4's top-2 is {2, 0} (a top-2 miss).
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PROB = [[.7, .2, .1], [.6, .3, .1], [.3, .6, .1], [.1, .8, .1], [.35, .05, .6], [.2, .2, .6]]


def value(metrics: dict, name: str) -> float:
    return metrics[name]["value"]


@pytest.mark.fast
def test_compute_metrics_hand_computed():
    m = evaluate.compute_metrics(Y_TRUE, Y_PROB, ["a", "b", "c"], n_bootstrap=0)["multiclass_classification_metrics"]
    assert value(m, "accuracy") == pytest.approx(4 / 6)
    # precision a=2/2, b=1/2, c=1/2; recall a=2/3, b=1/2, c=1/1; f1 a=.8, b=.5, c=2/3
    assert {c: v["value"] for c, v in m["precision"].items()} == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.5})
    assert {c: v["value"] for c, v in m["recall"].items()} == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 1.0})
    assert value(m, "macro_f1") == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert value(m, "weighted_f1") == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert value(m, "weighted_precision") == pytest.approx((3 * 1.0 + 2 * 0.5 + 0.5) / 6)
    assert value(m, "weighted_recall") == pytest.approx(4 / 6)  # weighted recall == accuracy
    assert value(m, "top_5_accuracy") == 1.0  # k = min(5, 3) = 3 classes: always a hit
    assert m["confusion_matrix"] == {"a": {"a": 2, "b": 1, "c": 0}, "b": {"a": 0, "b": 1, "c": 1},
                                     "c": {"a": 0, "b": 0, "c": 1}}
    assert all(m[k]["standard_deviation"] == 0.0 for k in ("accuracy", "macro_f1", "weighted_f1"))
    top2 = evaluate.compute_metrics(Y_TRUE, Y_PROB, ["a", "b", "c"], n_bootstrap=0, top_k=2)
    assert value(top2["multiclass_classification_metrics"], "top_5_accuracy") == pytest.approx(5 / 6)


@pytest.mark.fast
def test_bootstrap_standard_error_matches_binomial():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 4, 400)
    correct = rng.random(400) < 0.7
    y_pred = np.where(correct, y_true, (y_true + 1) % 4)
    y_prob = np.eye(4)[y_pred] * 0.9 + 0.025
    report = evaluate.compute_metrics(y_true, y_prob, CLASS_NAMES, n_bootstrap=1000, seed=1)
    acc = report["multiclass_classification_metrics"]["accuracy"]
    p = correct.mean()
    assert acc["value"] == pytest.approx(p)
    assert acc["standard_deviation"] == pytest.approx(math.sqrt(p * (1 - p) / 400), rel=0.1)
    again = evaluate.compute_metrics(y_true, y_prob, CLASS_NAMES, n_bootstrap=1000, seed=1)
    assert again == report  # seeded: reproducible
    per_class = report["multiclass_classification_metrics"]["recall"]["circle"]
    assert 0 < per_class["standard_deviation"] < 0.2


@pytest.mark.fast
def test_absent_class_and_perfect_predictions():
    # class "d" never occurs nor is predicted: reported as 0 but left out of the macro average (sklearn default)
    m = evaluate.compute_metrics([0, 1, 2, 2], np.eye(4)[[0, 1, 2, 2]], ["a", "b", "c", "d"],
                                 n_bootstrap=50)["multiclass_classification_metrics"]
    assert value(m, "accuracy") == value(m, "macro_f1") == value(m, "weighted_f1") == 1.0
    assert m["accuracy"]["standard_deviation"] == 0.0
    assert m["precision"]["d"] == {"value": 0.0, "standard_deviation": 0.0}
    assert m["confusion_matrix"]["d"] == {"a": 0, "b": 0, "c": 0, "d": 0}


@pytest.mark.fast
@pytest.mark.parametrize(("y_true", "y_prob", "fragment"), [
    ([], np.zeros((0, 3)), "non-empty 1-D"),
    ([0, 1], np.zeros((2, 2)), "must have shape (n_samples, n_classes) = (2, 3)"),
    ([0, 3], np.zeros((2, 3)), "labels outside 0..2"),
    ([0.0, 1.0], np.zeros((2, 3)), "integer class indices"),
])
def test_compute_metrics_rejects_bad_input(y_true, y_prob, fragment):
    with pytest.raises(ValueError) as info:
        evaluate.compute_metrics(y_true, y_prob, ["a", "b", "c"])
    assert fragment in str(info.value)


# ------------------------------------------------------------------------------------------------ the script


def write_fixed_model(model_dir: Path, predicted: str) -> Path:
    """A resnet18 whose head ignores the image and always predicts ``predicted``: every metric is known exactly."""
    torch.manual_seed(0)
    net = build_model("resnet18", len(CLASS_NAMES))
    with torch.no_grad():
        net.fc[-1].weight.zero_()
        net.fc[-1].bias.copy_(torch.tensor([4.0 if c == predicted else 0.0 for c in CLASS_NAMES]))
    config = {"arch": "resnet18", "num_classes": len(CLASS_NAMES), "classes": CLASS_NAMES, "hidden_units": 0,
              "dropout": 0.0, "image_size": 32, "resize_size": 36, "mean": list(IMAGENET_MEAN),
              "std": list(IMAGENET_STD), "weights_file": "model.pth", "best_epoch": 1, "best_valid_accuracy": 0.5,
              "hyperparameters": {}}
    save_model(net, config, model_dir)
    return model_dir


def pack(model_dir: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted(model_dir.iterdir()):
            tar.add(f, arcname=f.name)
    return archive


@pytest.fixture(scope="module")
def test_dir(tmp_path_factory) -> Path:
    # 3 good images per class + the sample generator's odd-but-valid files (5) and bad files (3)
    return make_dataset(tmp_path_factory.mktemp("test"), per_class=3, size=40, seed=5, with_bad_files=True)


@pytest.mark.fast
def test_script_on_packaged_model(tmp_path, test_dir):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    pack(write_fixed_model(tmp_path / "trained", "square"), model_dir / "model.tar.gz")
    out = tmp_path / "evaluation"
    proc = subprocess.run([sys.executable, str(ROOT / "steps" / "evaluate.py"), "--model-dir", str(model_dir),
                           "--test-dir", str(test_dir), "--output-dir", str(out), "--batch-size", "16",
                           "--workers", "0", "--bootstrap-samples", "200"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "evaluation.json").read_text())
    m = report["multiclass_classification_metrics"]
    readable_per_class = 3 + 5
    n = readable_per_class * len(CLASS_NAMES)
    assert report["dataset"]["item_count"] == n
    assert report["dataset"]["skipped_count"] == len(CORRUPT_FILES) * len(CLASS_NAMES)
    assert sorted(Path(s["path"]).name for s in report["dataset"]["skipped"]) == sorted(CORRUPT_FILES * 4)
    assert all(s["reason"] for s in report["dataset"]["skipped"])
    # always "square": accuracy 1/4, precision(square) 1/4, recall(square) 1, F1(square) 0.4, others 0
    assert value(m, "accuracy") == pytest.approx(0.25)
    assert m["accuracy"]["standard_deviation"] > 0
    assert value(m, "top_5_accuracy") == 1.0  # k = 4 classes
    assert value(m, "macro_f1") == pytest.approx(0.4 / 4)
    assert value(m, "weighted_f1") == pytest.approx(0.4 * 0.25)
    assert m["precision"]["square"]["value"] == pytest.approx(0.25)
    assert m["recall"]["square"]["value"] == 1.0 and m["recall"]["circle"]["value"] == 0.0
    assert m["confusion_matrix"] == {a: {p: (readable_per_class if p == "square" else 0) for p in CLASS_NAMES}
                                     for a in CLASS_NAMES}
    for name in ("accuracy", "top_5_accuracy", "macro_f1", "weighted_f1"):
        assert set(m[name]) == {"value", "standard_deviation"}
    with Image.open(out / "confusion_matrix.png") as png:
        assert png.format == "PNG" and png.size[0] >= 300
    assert "accuracy=0.2500" in proc.stdout
    wrong = report["dataset"]["misclassified"]  # every readable non-square image, path relative to the test input
    assert report["dataset"]["misclassified_count"] == len(wrong) == readable_per_class * (len(CLASS_NAMES) - 1)
    assert {w["predicted"] for w in wrong} == {"square"} and "square" not in {w["actual"] for w in wrong}
    assert all((test_dir / w["path"]).is_file() and Path(w["path"]).parts[0] == w["actual"] for w in wrong)
    assert [w["confidence"] for w in wrong] == sorted((w["confidence"] for w in wrong), reverse=True)


@pytest.mark.fast
def test_extracted_model_dir_and_workers(tmp_path, test_dir):
    model_dir = write_fixed_model(tmp_path / "model", "triangle")
    out = tmp_path / "out"
    assert evaluate.main(["--model-dir", str(model_dir), "--test-dir", str(test_dir), "--output-dir", str(out),
                          "--workers", "1", "--bootstrap-samples", "0"]) == 0
    m = json.loads((out / "evaluation.json").read_text())["multiclass_classification_metrics"]
    assert m["recall"]["triangle"]["value"] == 1.0 and value(m, "accuracy") == pytest.approx(0.25)
    assert (out / "confusion_matrix.png").stat().st_size > 0


@pytest.mark.fast
def test_unknown_test_class_is_an_error(tmp_path, test_dir, caplog):
    model_dir = write_fixed_model(tmp_path / "model", "circle")
    bad_test = tmp_path / "test"
    for name in ("circle", "hexagon"):
        (bad_test / name).mkdir(parents=True)
        Image.new("RGB", (40, 40)).save(bad_test / name / "a.jpg")
    out = tmp_path / "out"
    assert evaluate.main(["--model-dir", str(model_dir), "--test-dir", str(bad_test), "--output-dir", str(out),
                          "--workers", "0"]) == 1
    assert "test classes not known to the model: ['hexagon']" in caplog.text
    assert not (out / "evaluation.json").exists()


@pytest.mark.fast
def test_missing_model_and_hostile_archive(tmp_path, test_dir, caplog):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--test-dir", str(test_dir), "--output-dir", str(tmp_path / "out"), "--workers", "0"]
    assert evaluate.main(["--model-dir", str(empty), *args]) == 1
    assert "has neither model.tar.gz nor model_config.json" in caplog.text
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    with tarfile.open(hostile / "model.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    assert evaluate.main(["--model-dir", str(hostile), *args]) == 1
    assert "refusing to extract" in caplog.text
    assert not (tmp_path / "escape.txt").exists()


class _Evil:
    """Pickles as a call to ``print``: harmless if it ever ran, and exactly what weights_only must refuse."""

    def __reduce__(self):
        return (print, ("pwned",))


def _refused_weights(kind: str, good: bytes) -> bytes:
    if kind == "malicious":
        buf = io.BytesIO()
        torch.save({"fc.0.weight": torch.zeros(1), "payload": _Evil()}, buf)
        return buf.getvalue()
    return {"garbage": bytes(range(256)) * 4, "truncated": good[:300], "empty": b""}[kind]


@pytest.mark.fast
@pytest.mark.parametrize("kind", ["malicious", "garbage", "truncated", "empty"])
def test_refused_model_pth_is_one_clear_line(tmp_path, test_dir, caplog, capsys, kind):
    trained = write_fixed_model(tmp_path / "trained", "circle")
    weights = trained / "model.pth"
    weights.write_bytes(_refused_weights(kind, weights.read_bytes()))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    pack(trained, model_dir / "model.tar.gz")
    out = tmp_path / "out"
    caplog.set_level("ERROR")
    assert evaluate.main(["--model-dir", str(model_dir), "--test-dir", str(test_dir), "--output-dir", str(out),
                          "--workers", "0"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert "model.pth: torch.load(weights_only=True) refused it" in errors[0]
    assert str(model_dir) in errors[0]  # which input it came from, not only the scratch copy
    assert "pwned" not in capsys.readouterr().out
    assert not (out / "evaluation.json").exists()


@pytest.mark.fast
def test_refused_model_pth_script_prints_no_traceback(tmp_path, test_dir):
    trained = write_fixed_model(tmp_path / "model", "circle")
    (trained / "model.pth").write_bytes(_refused_weights("malicious", b""))
    proc = subprocess.run([sys.executable, str(ROOT / "steps" / "evaluate.py"), "--model-dir", str(trained),
                           "--test-dir", str(test_dir), "--output-dir", str(tmp_path / "out"), "--workers", "0"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "pwned" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "weights_only=True) refused it" in errors[0] and "Unsupported global" in errors[0]
