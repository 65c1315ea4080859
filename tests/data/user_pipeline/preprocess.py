"""Processing script (runs in the processing container): scales the input CSV's label column and adds an offset read
from a config object in S3, writes the training CSV and a small report. The container paths come as arguments
(their defaults are the same paths)."""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import boto3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, required=True)
    parser.add_argument("--input-dir", type=Path, default=Path("/opt/ml/processing/input/data"))
    parser.add_argument("--output-dir", type=Path, default=Path("/opt/ml/processing/output"))
    args = parser.parse_args()

    # The job's own AWS calls: the config object, read with boto3 as any script would.
    s3 = boto3.client("s3")
    config = json.loads(s3.get_object(Bucket=os.environ["CONFIG_BUCKET"], Key=os.environ["CONFIG_KEY"])["Body"].read())

    rows = []
    for path in sorted(args.input_dir.glob("*.csv")):
        with path.open(newline="") as fh:
            rows.extend(csv.DictReader(fh))
    if not rows:
        raise SystemExit(f"no CSV rows under {args.input_dir}")
    label = config["label_column"]
    out = args.output_dir / "train"
    out.mkdir(parents=True, exist_ok=True)
    with (out / "train.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["x", "y"])
        for row in rows:
            writer.writerow([row["x"], int(row[label]) * args.scale + config["offset"]])
    report = args.output_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    (report / "report.json").write_text(json.dumps({"rows": len(rows), "scale": args.scale,
                                                    "offset": config["offset"],
                                                    "job": os.environ.get("PROCESSING_JOB_NAME")}))
    print(f"wrote {len(rows)} rows (scale {args.scale}, offset {config['offset']})")


if __name__ == "__main__":
    main()
