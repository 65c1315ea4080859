"""Trainer throughput and memory: baseline (fp32, contiguous) vs ``--amp --channels-last``, same run.

Runs the real ``training/train.py`` as a subprocess (the container contract, env vars and all) on a generated
dataset, once per configuration, and reads each run's ``profiler/summary.json``. On CUDA the optimised run uses
bf16 autocast + channels_last; on CPU ``--amp`` is a documented no-op, so the comparison shows channels_last alone.
Prints a side-by-side table and writes JSON to ``benchmarks/results/training.json``.

    .venv/bin/python benchmarks/bench_training.py [--arch resnet50] [--image-size 224] [--images-per-class 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.sample_data import make_dataset  # noqa: E402

CONFIGS = {
    "baseline_fp32": ["--amp", "False", "--channels_last", "False"],
    "bf16_channels_last": ["--amp", "True", "--channels_last", "True"],
}


def run_config(name: str, flags: list[str], data: Path, work: Path, args: argparse.Namespace) -> dict:
    out = work / name
    env = {**os.environ, "SM_CHANNEL_TRAIN": str(data / "train"), "SM_CHANNEL_VALIDATION": str(data / "validation"),
           "SM_MODEL_DIR": str(out / "model"), "SM_OUTPUT_DATA_DIR": str(out / "output"),
           "SM_CHECKPOINT_DIR": str(out / "checkpoints")}
    cmd = [sys.executable, str(ROOT / "training" / "train.py"), "--arch", args.arch, "--image_size",
           str(args.image_size), "--batch_size", str(args.batch_size), "--epochs", str(args.epochs),
           "--workers", str(args.workers), "--lr", "0.01", "--optimizer", "sgd", *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "output" / "profiler" / "summary.json").read_text())
    train = summary["train"]
    return {"device": summary["device"], "cuda_device_name": summary["cuda_device_name"],
            "amp": summary["amp"], "channels_last": summary["channels_last"],
            "samples_per_s": train["samples_per_s"],
            "compute_samples_per_s": round(train["samples"] / train["compute_time_s"], 1),
            "data_time_fraction": train["data_time_fraction"],
            "cuda_max_memory_allocated_mb": summary.get("cuda_max_memory_allocated_mb"),
            "max_rss_mb": summary["system_monitor"].get("max_rss_mb"),
            "best_valid_accuracy": summary["best_valid_accuracy"], "wall_time_s": summary["wall_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--images-per-class", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_dataset(data / "train", per_class=args.images_per_class, size=args.image_size, seed=0)
        make_dataset(data / "validation", per_class=max(4, args.images_per_class // 4), size=args.image_size, seed=1)
        results = {name: run_config(name, flags, data, Path(tmp), args) for name, flags in CONFIGS.items()}
    base, opt = results["baseline_fp32"], results["bf16_channels_last"]
    report = {"benchmark": "training", "python": platform.python_version(), "params": vars(args), **results,
              "compute_speedup": round(opt["compute_samples_per_s"] / base["compute_samples_per_s"], 2)}
    if base["cuda_max_memory_allocated_mb"] and opt["cuda_max_memory_allocated_mb"]:
        base_mb, opt_mb = base["cuda_max_memory_allocated_mb"], opt["cuda_max_memory_allocated_mb"]
        report["cuda_memory_ratio"] = round(opt_mb / base_mb, 2)
    print(f"device: {base['device']} {base['cuda_device_name'] or ''}  arch={args.arch} image={args.image_size} "
          f"batch={args.batch_size}")
    print(f"{'':30}{'baseline fp32':>18}{'bf16+channels_last':>22}")
    for key in ("samples_per_s", "compute_samples_per_s", "data_time_fraction", "cuda_max_memory_allocated_mb",
                "max_rss_mb", "wall_time_s"):
        print(f"{key:30}{base[key]!s:>18}{opt[key]!s:>22}")
    print(f"compute speed-up x{report['compute_speedup']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
