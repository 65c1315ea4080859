"""Evaluation ProcessingStep: score the trained model on the held-out test split.

Inputs: ``--model-dir`` (``model.tar.gz`` from the training job, extracted safely, or an already-extracted model
directory) and ``--test-dir`` (ImageFolder: ``<class>/<image>``). Output in ``--output-dir``:

- ``evaluation.json`` in SageMaker's model-quality format (CONTRACTS §7)::

    {"version": 0.0,
     "dataset": {"item_count", "evaluation_time", "skipped_count", "skipped": [{"path", "reason"}], ...},
     "multiclass_classification_metrics": {
        "accuracy": {"value", "standard_deviation"}, "top_5_accuracy": {...}, "macro_f1": {...},
        "weighted_f1": {...}, "weighted_precision": {...}, "weighted_recall": {...},
        "precision": {class: {"value", "standard_deviation"}}, "recall": {class: {...}},
        "confusion_matrix": {actual: {predicted: n}}}}

  ``standard_deviation`` is the **bootstrap** standard error: the standard deviation of the metric over
  ``--bootstrap-samples`` resamples (with replacement, fixed seed) of the test examples. "top_5" is top-k with
  k = min(5, number of classes) (``dataset.top_k`` records k). F1/precision/recall follow scikit-learn's
  ``zero_division=0`` convention; macro/weighted averages are over the classes present in the labels or predictions.
- ``confusion_matrix.png`` (matplotlib, Agg backend; skipped with a warning if matplotlib is missing).

A model archive with ``code/requirements.txt`` (a timm model's pins timm) gets it installed with ``sys.executable -m
pip install -r`` before the model is loaded, as the PyTorch serving toolkit does for endpoints, unless every
requirement is already installed (the usual case: the job's image has them).

Unreadable test images are skipped, logged and listed under ``dataset.skipped``. Test classes the model does not
know are an error (the test set and the model disagree, so the metrics would be meaningless). A ``model.pth`` that
``torch.load(weights_only=True)`` refuses (a malicious pickle, a corrupt or truncated file) or a refused
``model_config.json`` is one error line naming the file, exit status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from inference.inference import to_rgb
from training.archives import UnsafeArchiveError, safe_extract
from training.model import CONFIG_FILE, InvalidModelError, eval_transform, load_model
from training.serving_code import install_requirements, requirements_path, unsatisfied_requirements

logger = logging.getLogger("evaluate")

EVALUATION_FILE = "evaluation.json"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
MODEL_ARCHIVE = "model.tar.gz"
#: misclassified test images listed in evaluation.json (dataset.misclassified), most confident mistakes first
MAX_MISCLASSIFIED = 200


class EvaluationError(RuntimeError):
    """The inputs cannot be evaluated (no model, no test images, classes the model does not know)."""


# ------------------------------------------------------------------------------------------------ metrics


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)


def _point_metrics(y_true: np.ndarray, y_pred: np.ndarray, topk_hit: np.ndarray, n: int) -> dict[str, Any]:
    cm = _confusion(y_true, y_pred, n)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)  # actual
    predicted = cm.sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = (support > 0) | (predicted > 0)
    total = support.sum()
    return {
        "accuracy": float(tp.sum() / total),
        "top_k_accuracy": float(topk_hit.mean()),
        "macro_f1": float(f1[present].mean()),
        "weighted_f1": float((f1 * support).sum() / total),
        "weighted_precision": float((precision * support).sum() / total),
        "weighted_recall": float((recall * support).sum() / total),
        "precision": precision,
        "recall": recall,
    }


def compute_metrics(y_true: Any, y_prob: Any, class_names: list[str], *, n_bootstrap: int = 1000,
                    seed: int = 0, top_k: int = 5) -> dict[str, Any]:
    """Model-quality metrics for integer labels ``y_true`` (n,) and class probabilities ``y_prob`` (n, C).

    Returns ``{"multiclass_classification_metrics": {...}}`` (see the module docstring); every scalar metric is
    ``{"value", "standard_deviation"}`` with the bootstrap standard error (0.0 when ``n_bootstrap`` < 2).
    Predictions are ``argmax(y_prob)``; ties go to the lower class index.
    """
    y_true = np.asarray(y_true)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    n_classes = len(class_names)
    if y_true.ndim != 1 or y_true.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array of class indices; got shape {y_true.shape}")
    if y_prob.shape != (y_true.size, n_classes):
        raise ValueError(f"y_prob must have shape (n_samples, n_classes) = ({y_true.size}, {n_classes}); "
                         f"got {y_prob.shape}")
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices; got dtype {y_true.dtype}")
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise ValueError(f"y_true has labels outside 0..{n_classes - 1}: {sorted(set(y_true.tolist()))}")
    y_true = y_true.astype(np.int64)
    y_pred = y_prob.argmax(axis=1)
    k = max(1, min(top_k, n_classes))
    # top-k hit: the true class is among the k largest probabilities (stable: lower index wins ties)
    order = np.argsort(-y_prob, axis=1, kind="stable")[:, :k]
    topk_hit = (order == y_true[:, None]).any(axis=1)

    point = _point_metrics(y_true, y_pred, topk_hit, n_classes)
    scalar_names = ("accuracy", "top_k_accuracy", "macro_f1", "weighted_f1", "weighted_precision", "weighted_recall")
    boot_scalar = {name: [] for name in scalar_names}
    boot_prec: list[np.ndarray] = []
    boot_rec: list[np.ndarray] = []
    rng = np.random.default_rng(seed)
    n = y_true.size
    for _ in range(n_bootstrap if n_bootstrap >= 2 else 0):
        idx = rng.integers(0, n, n)
        sample = _point_metrics(y_true[idx], y_pred[idx], topk_hit[idx], n_classes)
        for name in scalar_names:
            boot_scalar[name].append(sample[name])
        boot_prec.append(sample["precision"])
        boot_rec.append(sample["recall"])

    def std(values: list) -> Any:
        return np.std(np.asarray(values), axis=0, ddof=1) if len(values) >= 2 else None

    def entry(value: float, sd: Any) -> dict[str, float]:
        return {"value": float(value), "standard_deviation": float(sd) if sd is not None else 0.0}

    prec_sd, rec_sd = std(boot_prec), std(boot_rec)
    cm = _confusion(y_true, y_pred, n_classes)
    metrics: dict[str, Any] = {
        "accuracy": entry(point["accuracy"], std(boot_scalar["accuracy"])),
        "top_5_accuracy": entry(point["top_k_accuracy"], std(boot_scalar["top_k_accuracy"])),
        "macro_f1": entry(point["macro_f1"], std(boot_scalar["macro_f1"])),
        "weighted_f1": entry(point["weighted_f1"], std(boot_scalar["weighted_f1"])),
        "weighted_precision": entry(point["weighted_precision"], std(boot_scalar["weighted_precision"])),
        "weighted_recall": entry(point["weighted_recall"], std(boot_scalar["weighted_recall"])),
        "precision": {c: entry(point["precision"][i], None if prec_sd is None else prec_sd[i])
                      for i, c in enumerate(class_names)},
        "recall": {c: entry(point["recall"][i], None if rec_sd is None else rec_sd[i])
                   for i, c in enumerate(class_names)},
        "confusion_matrix": {a: {p: int(cm[i, j]) for j, p in enumerate(class_names)}
                             for i, a in enumerate(class_names)},
    }
    return {"multiclass_classification_metrics": metrics}


def plot_confusion_matrix(confusion: dict[str, dict[str, int]], path: str | Path, title: str = "") -> Path:
    """Render ``{actual: {predicted: n}}`` as a PNG heatmap (counts annotated up to 30 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(confusion)
    cm = np.array([[confusion[a][p] for p in names] for a in names])
    size = min(24.0, max(4.0, 0.45 * len(names) + 2.5))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    try:
        im = ax.imshow(cm, cmap="Blues")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(len(names)), labels=names, rotation=90 if len(names) > 8 else 45, ha="right",
                      fontsize=8 if len(names) > 20 else 10)
        ax.set_yticks(range(len(names)), labels=names, fontsize=8 if len(names) > 20 else 10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(title or "Confusion matrix (test set)")
        if len(names) <= 30:
            threshold = cm.max() / 2 if cm.size else 0
            for i in range(len(names)):
                for j in range(len(names)):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                            color="white" if cm[i, j] > threshold else "black", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ data


class _TestImages(torch.utils.data.Dataset):
    """``(path, label)`` samples; unreadable images come back as ``None`` with the reason instead of raising."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Any) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int, str]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img.load()
                rgb = to_rgb(img)
            return self.transform(rgb), label, index, ""
        except Exception as exc:  # any decoder failure: skip the file, keep evaluating
            return None, label, index, f"{type(exc).__name__}: {exc}"


def _collate(batch: list[tuple[torch.Tensor | None, int, int, str]]):
    good = [(x, y, i) for x, y, i, _ in batch if x is not None]
    bad = [(i, reason) for x, _, i, reason in batch if x is None]
    if not good:
        return None, None, None, bad
    xs, ys, idx = zip(*good, strict=True)
    return torch.stack(xs), torch.tensor(ys), list(idx), bad


def find_test_samples(test_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """``test_dir/<class>/<file>`` → ``(path, index in the model's classes)``; unknown classes are an error."""
    if not test_dir.is_dir():
        raise EvaluationError(f"test directory {test_dir} does not exist")
    class_dirs = sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise EvaluationError(f"no class folders in {test_dir}; expected ImageFolder layout <class>/<image>")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    unknown = [p.name for p in class_dirs if p.name not in class_to_idx]
    if unknown:
        raise EvaluationError(f"test classes not known to the model: {unknown}; the model was trained on "
                              f"{classes}. Evaluate with the test split produced with this model's training data.")
    missing = sorted(set(classes) - {p.name for p in class_dirs})
    if missing:
        logger.warning("no test folder for model classes %s; their recall is reported as 0", missing)
    samples = [(f, class_to_idx[d.name]) for d in class_dirs for f in sorted(d.rglob("*"))
               if f.is_file() and not f.name.startswith(".")]
    if not samples:
        raise EvaluationError(f"no files under the class folders of {test_dir}")
    return samples


def resolve_model_dir(model_dir: Path, scratch: Path) -> Path:
    """A directory with ``model_config.json``: ``model_dir`` itself or its ``model.tar.gz`` extracted into
    ``scratch`` (path traversal and links refused by ``training.archives``)."""
    archive = model_dir / MODEL_ARCHIVE if model_dir.is_dir() else model_dir
    if archive.is_file():
        logger.info("extracting %s", archive)
        safe_extract(archive, scratch)
        candidates = [scratch, *sorted(p.parent for p in scratch.rglob(CONFIG_FILE))]
        for candidate in candidates:
            if (candidate / CONFIG_FILE).is_file():
                return candidate
        raise EvaluationError(f"{archive} holds no {CONFIG_FILE}; not a model archive written by training/train.py")
    if (model_dir / CONFIG_FILE).is_file():
        return model_dir
    raise EvaluationError(f"{model_dir} has neither {MODEL_ARCHIVE} nor {CONFIG_FILE}")


def install_model_requirements(model_dir: Path) -> list[str]:
    """Install the model archive's ``code/requirements.txt`` (timm for a timm model) with ``sys.executable -m pip
    install -r``, as the PyTorch serving toolkit does at container start, when one of its requirements is not
    already installed; returns those requirements (empty: nothing was installed)."""
    path = requirements_path(model_dir)
    if path is None:
        return []
    missing = unsatisfied_requirements(path)
    if not missing:
        logger.info("%s: every requirement is already installed", path)
        return []
    logger.info("%s: installing %s", path, ", ".join(missing))
    try:
        install_requirements(path)
    except RuntimeError as exc:
        raise EvaluationError(str(exc)) from exc
    return missing


def predict(model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
            samples: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]], list[int]]:
    """Labels, class probabilities, the skipped files with reasons, and the sample index of each prediction."""
    labels, probs, skipped, kept = [], [], [], []
    with torch.inference_mode():
        for x, y, indices, bad in loader:
            for index, reason in bad:
                path = samples[index][0]
                logger.warning("skipping unreadable test image %s: %s", path, reason)
                skipped.append({"path": str(path), "reason": reason})
            if x is None:
                continue
            logits = model(x.to(device, non_blocking=True))
            probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            labels.append(y.numpy())
            kept.extend(indices)
    if not labels:
        raise EvaluationError(f"none of the {len(samples)} test files could be read")
    return np.concatenate(labels), np.concatenate(probs), skipped, kept


def misclassified(y_true: np.ndarray, y_prob: np.ndarray, kept: list[int], samples: list[tuple[Path, int]],
                  test_dir: Path, classes: list[str], limit: int = MAX_MISCLASSIFIED) -> list[dict[str, Any]]:
    """The wrongly predicted test images, most confident mistakes first (at most ``limit``): ``{"path"`` (relative
    to the test input), ``"actual"``, ``"predicted"``, ``"confidence"}``."""
    predicted = y_prob.argmax(axis=1)
    wrong = [(float(y_prob[row, predicted[row]]), row) for row in range(len(kept)) if predicted[row] != y_true[row]]
    items = []
    for confidence, row in sorted(wrong, reverse=True)[:limit]:
        path = samples[kept[row]][0]
        items.append({"path": path.relative_to(test_dir).as_posix() if path.is_relative_to(test_dir) else str(path),
                      "actual": classes[int(y_true[row])], "predicted": classes[int(predicted[row])],
                      "confidence": round(confidence, 4)})
    return items


# ------------------------------------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a trained model on the test split.")
    parser.add_argument("--model-dir", type=Path, default=Path("/opt/ml/processing/model"),
                        help="directory with model.tar.gz (or an extracted model directory, or the archive itself)")
    parser.add_argument("--test-dir", type=Path, default=Path("/opt/ml/processing/test"))
    parser.add_argument("--output-dir", type=Path, default=Path("/opt/ml/processing/evaluation"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--bootstrap-samples", type=int, default=1000,
                        help="resamples for the standard_deviation of each metric (0: report 0.0)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    return args


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="evaluate-model-") as scratch:
        model_dir = resolve_model_dir(args.model_dir, Path(scratch))
        install_model_requirements(model_dir)
        try:
            model, config = load_model(model_dir, device=device)
        except InvalidModelError as exc:
            raise EvaluationError(f"model refused: {exc} (model from {args.model_dir})") from exc
    classes = [str(c) for c in config.get("classes") or range(int(config["num_classes"]))]
    samples = find_test_samples(args.test_dir, classes)
    logger.info("evaluating %s (%d classes) on %d test files from %s (device %s)", config.get("arch"),
                len(classes), len(samples), args.test_dir, device)
    loader = torch.utils.data.DataLoader(_TestImages(samples, eval_transform(config)), batch_size=args.batch_size,
                                         shuffle=False, num_workers=args.workers, collate_fn=_collate,
                                         pin_memory=device.type == "cuda")
    y_true, y_prob, skipped, kept = predict(model, loader, device, samples)
    report = compute_metrics(y_true, y_prob, classes, n_bootstrap=args.bootstrap_samples, seed=args.seed)
    report = {
        "version": 0.0,
        "dataset": {
            "item_count": int(y_true.size),
            "evaluation_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files_found": len(samples),
            "skipped_count": len(skipped),
            "skipped": skipped,
            "classes": classes,
            "top_k": min(5, len(classes)),
            "standard_deviation_method": f"bootstrap ({args.bootstrap_samples} resamples, seed {args.seed})",
            "model_arch": config.get("arch"),
            "evaluation_seconds": round(time.time() - started, 3),
            "misclassified_count": int((y_prob.argmax(axis=1) != y_true).sum()),
            "misclassified": misclassified(y_true, y_prob, kept, samples, args.test_dir, classes),
        },
        **report,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / EVALUATION_FILE).write_text(json.dumps(report, indent=2))
    metrics = report["multiclass_classification_metrics"]
    acc = metrics["accuracy"]["value"]
    try:
        plot_confusion_matrix(metrics["confusion_matrix"], args.output_dir / CONFUSION_MATRIX_PNG,
                              title=f"Confusion matrix (test, n={y_true.size}, accuracy {acc:.3f})")
    except ImportError as exc:  # an image without matplotlib: the metrics matter more than the picture
        logger.warning("matplotlib unavailable (%s); %s not written", exc, CONFUSION_MATRIX_PNG)
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        report = evaluate(args)
    except (EvaluationError, UnsafeArchiveError, InvalidModelError, FileNotFoundError) as exc:
        logger.error("evaluation failed: %s", exc)
        return 1
    m = report["multiclass_classification_metrics"]
    sys.stdout.write(f"accuracy={m['accuracy']['value']:.4f} top_5_accuracy={m['top_5_accuracy']['value']:.4f} "
                     f"macro_f1={m['macro_f1']['value']:.4f} weighted_f1={m['weighted_f1']['value']:.4f} "
                     f"n={report['dataset']['item_count']} skipped={report['dataset']['skipped_count']}\n"
                     f"wrote {args.output_dir / EVALUATION_FILE} and {args.output_dir / CONFUSION_MATRIX_PNG}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
