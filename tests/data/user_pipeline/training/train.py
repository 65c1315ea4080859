"""Training script (SageMaker script mode): fits y = a*x + b to the ``train`` channel's CSV by least squares, writes
the coefficients to SM_MODEL_DIR and prints the fit's mean squared error."""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--model-dir", default=os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    parser.add_argument("--train", default=os.environ.get("SM_CHANNEL_TRAIN", "/opt/ml/input/data/train"))
    args = parser.parse_args()

    points = []
    for path in sorted(Path(args.train).glob("*.csv")):
        with path.open(newline="") as fh:
            points.extend((float(row["x"]), float(row["y"])) for row in csv.DictReader(fh))
    if len(points) < 2:
        raise SystemExit(f"need at least 2 rows under {args.train}, found {len(points)}")
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    a = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    b = mean_y - a * mean_x
    mse = sum((a * x + b - y) ** 2 for x, y in points) / n
    for epoch in range(args.epochs):
        print(f"epoch {epoch + 1}/{args.epochs}: mse={mse:.6f}")
    model_dir = Path(args.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.json").write_text(json.dumps({"a": a, "b": b, "rows": n, "scale": args.scale}))


if __name__ == "__main__":
    main()
