"""Data-loading throughput: raw photos (baseline) vs the PrepareData step's pre-resized output, same run.

The trainer's input pipeline (ImageFolder + training.model.train_transform + DataLoader) is timed over
1) a folder of large raw JPEGs (what users hand us) and 2) the same images after ``steps/preprocess.py``
(shorter side 256), both decoded by Pillow (torchvision's default loader), and 3) the pre-resized images through
the trainer's own loader (``training.train.image_loader``: ``torchvision.io.decode_jpeg`` to a uint8 tensor, same
pixels). Each is timed ``--rounds`` times, alternating, and the median run is reported. ``speedup`` is 2) over 1);
``decode_speedup`` 3) over 2). Prints a side-by-side table and writes JSON to
``benchmarks/results/``. ``--uint8``: batches stay uint8 (normalised on the device afterwards: the trainer's GPU
data path), a quarter of float32's bytes between the workers and the main process.

    .venv/bin/python benchmarks/bench_dataloading.py [--images 200] [--raw-size 1600x1200] [--workers 2]
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import report_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402
from torchvision.datasets.folder import default_loader  # noqa: E402

from pipelines.sample_data import CLASSES, draw_sample  # noqa: E402
from training.model import train_transform  # noqa: E402
from training.train import image_loader  # noqa: E402


def make_raw(root: Path, n: int, size: tuple[int, int]) -> None:
    import random

    rng = random.Random(0)
    names = list(CLASSES)
    for i in range(n):
        name = names[i % len(names)]
        (root / name).mkdir(parents=True, exist_ok=True)
        draw_sample(name, 256, rng).resize(size).save(root / name / f"{i:05d}.jpg", quality=92)


def time_loader(folder: Path, image_size: int, batch_size: int, workers: int, epochs: int, uint8: bool,
                loader: Callable[[str], Any] = default_loader) -> dict:
    dataset = ImageFolder(str(folder), transform=train_transform(image_size, normalize=not uint8), loader=loader)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)
    next(iter(loader))  # warm-up: worker start, first decode
    start = time.perf_counter()
    seen = 0
    for _ in range(epochs):
        for images, _labels in loader:
            seen += images.shape[0]
    elapsed = time.perf_counter() - start
    size_mb = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 2**20
    return {"images": seen, "seconds": round(elapsed, 3), "images_per_s": round(seen / elapsed, 1),
            "dataset_mb": round(size_mb, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--raw-size", default="1600x1200")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant (median)")
    parser.add_argument("--uint8", action="store_true",
                        help="uint8 batches, normalised later (the trainer's GPU data path), not float32 ones")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dataloading.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    w, h = (int(v) for v in args.raw_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        raw, prepared = Path(tmp) / "raw", Path(tmp) / "prepared"
        make_raw(raw, args.images, (w, h))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "steps" / "preprocess.py"), "--input-dir", str(raw),
                        "--output-dir", str(prepared), "--train-fraction", "1", "--validation-fraction", "0",
                        "--test-fraction", "0", "--min-valid-fraction", "0.5"], check=True, capture_output=True)
        preprocess_s = time.perf_counter() - t0
        common = (args.image_size, args.batch_size, args.workers, args.epochs, args.uint8)
        variants = {"baseline_raw": (raw, default_loader), "preresized": (prepared / "train", default_loader),
                    "preresized_trainer_loader": (prepared / "train", image_loader)}
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for round_ in range(args.rounds):  # alternating, the order rotated per round: the same background load
            names = list(variants)[round_ % len(variants):] + list(variants)[:round_ % len(variants)]
            for name in names:
                folder, loader = variants[name]
                runs[name].append(time_loader(folder, *common, loader=loader))
        baseline, ours, trainer = (report_file.median_run(runs[name], "images_per_s") for name in variants)
    result = {
        "benchmark": "dataloading", "python": platform.python_version(), "torch": torch.__version__,
        "cpus": torch.get_num_threads(), "params": vars(args),
        "baseline_raw": baseline, "preresized": ours, "preresized_trainer_loader": trainer,
        "preprocess_seconds_once": round(preprocess_s, 2),
        "speedup": round(ours["images_per_s"] / baseline["images_per_s"], 2),
        "decode_speedup": round(trainer["images_per_s"] / ours["images_per_s"], 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(f"{'':18}{'raw ' + args.raw_size:>20}{'pre-resized 256':>20}{'+ trainer loader':>20}")
    print(f"{'images/s':18}{baseline['images_per_s']:>20}{ours['images_per_s']:>20}{trainer['images_per_s']:>20}")
    print(f"{'dataset MB':18}{baseline['dataset_mb']:>20}{ours['dataset_mb']:>20}{trainer['dataset_mb']:>20}")
    print(f"speed-up x{result['speedup']}  (one-off preprocessing {result['preprocess_seconds_once']} s); "
          f"trainer loader x{result['decode_speedup']} over Pillow")
    report_file.write(args.out, result)


if __name__ == "__main__":
    main()
