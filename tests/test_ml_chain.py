"""The ML chain through the scripts' container contracts: preprocess → train → model.tar.gz → evaluate → handler.

preprocess and train run as subprocesses with their CLI flags / ``SM_*`` environment exactly as the jobs run them;
evaluate runs in-process through ``main(argv)`` (its subprocess form is covered by tests/test_evaluate.py); the
serving handler loads the packaged model like the SageMaker PyTorch container (extracted ``model.tar.gz``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from inference import inference as handler
from pipelines.sample_data import CLASSES, CORRUPT_FILES, draw_sample, make_dataset
from steps import evaluate
from training.archives import safe_extract

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 48


# One intra-op thread: on a small shared CPU, OpenMP threads spin against each other (3-4x slower steps).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def one_torch_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def run_script(args: list[str], env: dict[str, str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ONE_THREAD, **(env or {})}, cwd=ROOT)
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_preprocess_train_evaluate_serve(tmp_path, one_torch_thread):
    started = time.monotonic()
    raw = make_dataset(tmp_path / "raw", per_class=30, size=IMAGE_SIZE, seed=11, with_bad_files=True)
    base = tmp_path / "processing"

    # --- preprocess (ProcessingStep contract)
    run_script([str(ROOT / "steps" / "preprocess.py"), "--input-dir", str(raw), "--output-dir", str(base),
                "--workers", "1"])
    manifest = json.loads((base / "manifest" / "manifest.json").read_text())
    classes = sorted(CLASSES)
    assert manifest["classes"] == classes
    quarantined = {Path(q["path"]).name for q in manifest["quarantined"]}
    assert set(CORRUPT_FILES) <= quarantined
    for split in ("train", "validation", "test"):
        assert sorted(p.name for p in (base / split).iterdir()) == classes

    # --- train (TrainingJob contract: SM_* env + hyperparameters as flags)
    model_dir, output_dir = tmp_path / "model", tmp_path / "output"
    train = run_script(
        [str(ROOT / "training" / "train.py"), "--arch", "resnet18", "--epochs", "2", "--image-size", str(IMAGE_SIZE),
         "--batch-size", "16", "--lr", "0.001", "--workers", "0"],
        env={"SM_CHANNEL_TRAIN": str(base / "train"), "SM_CHANNEL_VALIDATION": str(base / "validation"),
             "SM_MODEL_DIR": str(model_dir), "SM_OUTPUT_DATA_DIR": str(output_dir),
             "SM_CHECKPOINT_DIR": str(tmp_path / "checkpoints"), "SM_NUM_GPUS": "0"})
    assert train.stdout.count("valid_accuracy=") == 2, train.stdout
    config = json.loads((model_dir / "model_config.json").read_text())
    assert config["classes"] == classes and config["image_size"] == IMAGE_SIZE

    # --- package the model dir the way SageMaker does
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    with tarfile.open(artifacts / "model.tar.gz", "w:gz") as tar:
        for f in sorted(model_dir.rglob("*")):
            tar.add(f, arcname=f.relative_to(model_dir).as_posix(), recursive=False)
    with tarfile.open(artifacts / "model.tar.gz") as tar:  # the handler travels with the weights (code/)
        assert {"model.pth", "model_config.json", "code/inference.py", "code/training/model.py"} <= set(tar.getnames())

    # --- evaluate (ProcessingStep contract)
    eval_out = tmp_path / "evaluation"
    assert evaluate.main(["--model-dir", str(artifacts), "--test-dir", str(base / "test"), "--output-dir",
                          str(eval_out), "--workers", "0", "--bootstrap-samples", "200"]) == 0
    report = json.loads((eval_out / "evaluation.json").read_text())
    accuracy = report["multiclass_classification_metrics"]["accuracy"]
    n_test = sum(manifest["counts"]["test"].values())
    assert report["dataset"]["item_count"] == n_test
    assert (eval_out / "confusion_matrix.png").stat().st_size > 0
    print(f"\nml chain: test accuracy {accuracy['value']:.3f} ± {accuracy['standard_deviation']:.3f} on {n_test} "
          f"images (chance {1 / len(classes):.2f}); train log: {train.stdout.strip().splitlines()[-1]}")
    assert accuracy["value"] > 1 / len(classes) + 0.25, report

    # --- serve: the container extracts model.tar.gz into /opt/ml/model and calls the handler
    serving_dir = safe_extract(artifacts / "model.tar.gz", tmp_path / "opt_ml_model")
    model = handler.model_fn(str(serving_dir))

    def serve(body, content_type):
        return json.loads(handler.output_fn(handler.predict_fn(handler.input_fn(body, content_type), model),
                                            "application/json"))

    # same files, same preprocessing: the endpoint scores the test split exactly as the evaluation did
    test_files = sorted((base / "test").glob("*/*.jpg"))
    served = serve(json.dumps({"instances": [base64.b64encode(f.read_bytes()).decode() for f in test_files]}),
                   "application/json")
    served_accuracy = sum(r["class_name"] == f.parent.name for r, f in zip(served, test_files, strict=True))
    assert served_accuracy / len(test_files) == pytest.approx(accuracy["value"])

    # a fresh JPEG of the class the model knows best comes back with that class name
    recall = report["multiclass_classification_metrics"]["recall"]
    best = max(classes, key=lambda c: recall[c]["value"])
    rng = random.Random(2024)
    predictions = {}
    for name in classes:
        buf = io.BytesIO()
        draw_sample(name, IMAGE_SIZE, rng).save(buf, "JPEG", quality=90)
        result = serve(buf.getvalue(), "image/jpeg")
        assert set(result) == {"predicted_label", "class_name", "confidence", "top_k"}
        predictions[name] = result["class_name"]
    print(f"ml chain: handler on fresh JPEGs {predictions} (best-recall class {best!r}); "
          f"{time.monotonic() - started:.1f}s")
    assert predictions[best] == best, predictions
