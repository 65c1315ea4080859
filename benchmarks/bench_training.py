"""Trainer throughput: the project's trainer vs a seed-style baseline loop, and its own configurations, same run.

Both run as fresh subprocesses with the same environment on the same generated dataset:

- ``seed_loop`` (the baseline every ratio is against): what the project started from -- plain
  ``torchvision.datasets.ImageFolder`` with its default PIL loader, torchvision v2 transforms (random resized crop,
  flip, float32 normalisation in the CPU workers), ``DataLoader(num_workers=--seed-workers)`` (default 2) with the
  default prefetch, no persistent workers, no pinned memory, and a plain fp32 loop (``model(x)``, cross-entropy,
  SGD), on CUDA when present. Run by this script itself (``--seed-loop``); it imports nothing from the project;
- the project's trainer (the real ``training/train.py``, the container contract, env vars and all), read from each
  run's ``profiler/summary.json``: ``baseline_fp32`` (``--amp False --channels_last False``),
  ``bf16_channels_last`` (both on) and ``fp32_device_cache`` (the data decoded once into device memory and
  augmented there, ``training.device_cache``; the others read the folder with workers); on CUDA also ``bf16`` and
  ``channels_last`` alone and ``bf16_channels_last_device_cache``. On CPU ``--amp`` is a documented no-op, so the
  second configuration shows channels_last alone. ``--trainer-flag`` appends flags to
  every trainer configuration (e.g. options the trainer gains later).

``samples_per_s`` is training images per second of the train loop (images / the loop's time, data wait included:
the trainer's ``data_time_s + compute_time_s``, the seed loop's time from ``iter(loader)`` to its last step, summed
over epochs; worker start-up each epoch is in both). Each configuration runs ``--rounds`` times, the order rotated
per round; medians are reported. ``ratios``: each configuration's ``samples_per_s`` / the seed loop's (of the
medians, and the median of the per-round ratios), and ``compute_speedup`` (bf16+channels_last / fp32 compute-only
images/s) as before. On a machine shared with other work, use ``--rounds 3`` or more: one round is noise.

    .venv/bin/python benchmarks/bench_training.py [--arch resnet50] [--image-size 224] [--images-per-class 64]
    .venv/bin/python benchmarks/bench_training.py --arch resnet18 --image-size 64 --images-per-class 32 \\
        --epochs 1 --workers 1 --batch-size 32          # make benchmark: about 1 minute on 2 CPU cores

Writes JSON to ``--out`` (default ``benchmarks/results/training.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import report_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = "seed_loop"
CONFIGS = {
    "baseline_fp32": ["--amp", "False", "--channels_last", "False", "--device_cache", "False"],
    "bf16_channels_last": ["--amp", "True", "--channels_last", "True", "--device_cache", "False"],
    "fp32_device_cache": ["--amp", "False", "--channels_last", "False", "--device_cache", "True"],
}
CUDA_CONFIGS = {
    "bf16": ["--amp", "True", "--channels_last", "False", "--device_cache", "False"],
    "channels_last": ["--amp", "False", "--channels_last", "True", "--device_cache", "False"],
    "bf16_channels_last_device_cache": ["--amp", "True", "--channels_last", "True", "--device_cache", "True"],
}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ------------------------------------------------------------------------------------------------ seed loop


def seed_loop(args: argparse.Namespace) -> dict[str, Any]:
    """The seed-style loop on ``args.train``; imports only torch and torchvision."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, models
    from torchvision.transforms import v2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    transform = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(args.image_size, antialias=True),
                            v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    dataset = datasets.ImageFolder(args.train, transform=transform)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.seed_workers)
    model = getattr(models, args.arch)(weights=None, num_classes=len(dataset.classes)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    samples, loop_s, compute_s = 0, 0.0, 0.0
    for _ in range(args.epochs):
        started = time.perf_counter()
        for images, targets in loader:
            step = time.perf_counter()
            images, targets = images.to(device), targets.to(device)
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the per-step host sync a plain loop has (printing/accumulating the loss)
            compute_s += time.perf_counter() - step
            samples += targets.shape[0]
        loop_s += time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {"device": device.type, "cuda_device_name": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "amp": False, "channels_last": False, "workers": args.seed_workers, "samples": samples,
            "samples_per_s": round(samples / loop_s, 1), "compute_samples_per_s": round(samples / compute_s, 1),
            "data_time_fraction": round(1 - compute_s / loop_s, 4),
            "cuda_max_memory_allocated_mb": round(peak, 1) if peak else None, "wall_time_s": round(loop_s, 3)}


def run_seed(data: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = work / f"seed-{time.monotonic_ns()}.json"
    cmd = [sys.executable, __file__, "--seed-loop", str(out), "--train", str(data / "train"), "--arch", args.arch,
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
           "--seed-workers", str(args.seed_workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{SEED} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ trainer


def run_config(name: str, flags: list[str], data: Path, work: Path, args: argparse.Namespace) -> dict:
    out = work / f"{name}-{time.monotonic_ns()}"
    env = {**os.environ, "SM_CHANNEL_TRAIN": str(data / "train"), "SM_CHANNEL_VALIDATION": str(data / "validation"),
           "SM_MODEL_DIR": str(out / "model"), "SM_OUTPUT_DATA_DIR": str(out / "output"),
           "SM_CHECKPOINT_DIR": str(out / "checkpoints")}
    cmd = [sys.executable, str(ROOT / "training" / "train.py"), "--arch", args.arch, "--image_size",
           str(args.image_size), "--batch_size", str(args.batch_size), "--epochs", str(args.epochs),
           "--workers", str(args.workers), "--lr", "0.01", "--optimizer", "sgd", *flags, *args.trainer_flag]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "output" / "profiler" / "summary.json").read_text())
    train = summary["train"]
    return {"device": summary["device"], "cuda_device_name": summary["cuda_device_name"],
            "amp": summary["amp"], "channels_last": summary["channels_last"], "workers": args.workers,
            "samples_per_s": train["samples_per_s"],
            "compute_samples_per_s": round(train["samples"] / train["compute_time_s"], 1),
            "data_time_fraction": train["data_time_fraction"],
            "cuda_max_memory_allocated_mb": summary.get("cuda_max_memory_allocated_mb"),
            "max_rss_mb": summary["system_monitor"].get("max_rss_mb"),
            "best_valid_accuracy": summary["best_valid_accuracy"], "wall_time_s": summary["wall_time_s"]}


# ------------------------------------------------------------------------------------------------ rounds


def configurations(cuda: bool) -> dict[str, list[str] | None]:
    """name -> trainer flags (``None``: the seed loop)."""
    return {SEED: None, **CONFIGS, **(CUDA_CONFIGS if cuda else {})}


def measure(data: Path, work: Path, args: argparse.Namespace, cuda: bool) -> dict[str, list[dict[str, Any]]]:
    configs = configurations(cuda)
    names = list(configs)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for round_no in range(args.rounds):
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            flags = configs[name]
            result = run_seed(data, work, args) if flags is None else run_config(name, flags, data, work, args)
            runs[name].append(result)
            print(f"round {round_no + 1}/{args.rounds} {name}: {result['samples_per_s']} img/s", flush=True)
    return runs


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median ``samples_per_s`` (its other figures with it), plus every round's figure."""
    chosen = report_file.median_run(runs, "samples_per_s")
    chosen["samples_per_s"] = statistics.median(r["samples_per_s"] for r in runs)
    return chosen


def ratios(results: dict[str, dict[str, Any]], runs: dict[str, list[dict[str, Any]]]) -> dict[str, float | None]:
    """Medians' ratios to the seed loop, and the median of the per-round ratios (robust to a machine whose
    background load changes between rounds: both runs of a round saw about the same)."""
    seed = results[SEED]["samples_per_s"]
    out: dict[str, float | None] = {}
    for name, result in results.items():
        if name == SEED:
            continue
        out[f"{name}_vs_seed_loop"] = round(result["samples_per_s"] / seed, 2)
        per_round = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs[name], runs[SEED], strict=True)]
        out[f"{name}_vs_seed_loop_per_round_median"] = round(statistics.median(per_round), 2)
    base, opt = results["baseline_fp32"], results["bf16_channels_last"]
    out["compute_speedup"] = round(opt["compute_samples_per_s"] / base["compute_samples_per_s"], 2)
    if base["cuda_max_memory_allocated_mb"] and opt["cuda_max_memory_allocated_mb"]:
        out["cuda_memory_ratio"] = round(opt["cuda_max_memory_allocated_mb"] / base["cuda_max_memory_allocated_mb"],
                                         2)
    return out


def print_table(report: dict[str, Any]) -> None:
    results = report["results"]
    first = results[SEED]
    print(f"device: {first['device']} {first['cuda_device_name'] or ''}  arch={report['params']['arch']} "
          f"image={report['params']['image_size']} batch={report['params']['batch_size']}")
    print(f"{'':30}" + "".join(f"{name:>20}" for name in results))
    for key in ("samples_per_s", "compute_samples_per_s", "data_time_fraction", "workers",
                "cuda_max_memory_allocated_mb", "wall_time_s"):
        print(f"{key:30}" + "".join(f"{r.get(key)!s:>20}" for r in results.values()))
    for key, value in report["ratios"].items():
        print(f"{key}: x{value}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="the trainer's workers")
    parser.add_argument("--seed-workers", type=int, default=2, help="the seed loop's DataLoader workers")
    parser.add_argument("--images-per-class", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every configuration (median)")
    parser.add_argument("--trainer-flag", action="append", default=[], help="extra trainer argument (repeatable)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training.json"))
    parser.add_argument("--seed-loop", metavar="JSON", help=argparse.SUPPRESS)  # internal: run the seed loop only
    parser.add_argument("--train", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seed_loop:
        Path(args.seed_loop).write_text(json.dumps(seed_loop(args)))
        return 0
    import torch

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        from pipelines.sample_data import make_dataset

        data = Path(tmp) / "data"
        make_dataset(data / "train", per_class=args.images_per_class, size=args.image_size, seed=0)
        make_dataset(data / "validation", per_class=max(4, args.images_per_class // 4), size=args.image_size, seed=1)
        runs = measure(data, Path(tmp), args, cuda)
    results = {name: median_result(values) for name, values in runs.items()}
    params = {k: v for k, v in vars(args).items() if k not in ("seed_loop", "train")}
    report = {"benchmark": "training", "python": platform.python_version(), "cpus": os.cpu_count(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "params": params, "baseline": SEED,
              "results": results, "ratios": ratios(results, runs)}
    print_table(report)
    report_file.write(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
