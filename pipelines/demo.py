"""``make run``: the whole pipeline on this machine, ending with a real image sent to the deployed local endpoint.

1. generates a small synthetic dataset (4 shape classes, plus a few corrupt/odd files the preprocessor quarantines
   or converts) into ``$MLOPS_HOME/demo-data`` -- no download needed;
2. runs ``python -m pipelines.run start --wait`` (the same boto3 code as ``--target sagemaker``, against the local AWS
   service) with parameters sized for a laptop with 2 CPU cores: small images, resnet18 from scratch, 3 tuning
   trials, ``ModelApprovalStatus=Approved`` so the pipeline's Lambda step deploys the model to a local endpoint;
3. waits for the endpoint (boto3's ``endpoint_in_service`` waiter), draws a fresh image of a known class, sends it
   through the SageMaker runtime's ``InvokeEndpoint`` and prints the prediction.

Use your own data with ``python -m pipelines.demo --data /path/to/dogImages`` (or run
``python -m pipelines.run start --param InputDataUrl=/path/to/dogImages ...`` directly).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from pipelines import sample_data
from pipelines.local.storage.store import mlops_home

console = Console()
logger = logging.getLogger("pipelines.demo")

#: Parameters sized for a pipeline of about 20-25 s on 2 CPU cores (benchmarks/bench_startup.py).
DEMO_PARAMETERS = {
    "Arch": "resnet18",
    "Pretrained": "none",
    "ImageSize": "48",
    "ResizeSize": "56",
    "DataLoaderWorkers": "0",
    "MaxTrainingJobs": "3",
    "MaxParallelTrainingJobs": "1",
    "EpochsMin": "2",
    "EpochsMax": "3",
    "AccuracyThreshold": "0.3",
    "ModelApprovalStatus": "Approved",
    "EndpointName": "imgclf-endpoint",
}


def prepare_data(per_class: int, size: int) -> Path:
    target = mlops_home() / "demo-data"
    marker = target / ".complete"
    if marker.is_file() and marker.read_text() == f"{per_class}:{size}":
        console.print(f"using the generated dataset in {target}")
        return target
    if target.exists():
        import shutil

        shutil.rmtree(target)
    sample_data.make_dataset(target, per_class=per_class, size=size, seed=7, with_bad_files=True)
    marker.write_text(f"{per_class}:{size}")
    console.print(f"generated a dataset of {len(sample_data.CLASSES)} classes x {per_class} images "
                  f"(+ corrupt/odd files) in {target}")
    return target


def ask_endpoint(runtime: Any, endpoint_name: str, class_name: str, size: int) -> dict:
    """Send a freshly drawn JPEG of ``class_name`` through the SageMaker runtime's ``InvokeEndpoint``."""
    image = sample_data.draw_sample(class_name, size, random.Random(12345))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92)
    answer = runtime.invoke_endpoint(EndpointName=endpoint_name, Body=buf.getvalue(), ContentType="image/jpeg",
                                     Accept="application/json")
    return json.loads(answer["Body"].read())


def wait_for_endpoint(sagemaker: Any, endpoint_name: str, timeout_s: float = 300.0) -> None:
    """boto3's ``endpoint_in_service`` waiter (the deploy function answers while the endpoint is Creating)."""
    delay = 2
    sagemaker.get_waiter("endpoint_in_service").wait(
        EndpointName=endpoint_name, WaiterConfig={"Delay": delay, "MaxAttempts": int(timeout_s / delay)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="your own image folder/archive (default: a generated dataset)")
    parser.add_argument("--per-class", type=int, default=30, help="generated images per class")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="override a demo parameter (repeatable)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLOPS_TUNER_SEED", "0")
    started = time.time()
    data = Path(args.data).expanduser().resolve() if args.data else prepare_data(args.per_class, 64)
    params = dict(DEMO_PARAMETERS, InputDataUrl=str(data))
    for pair in args.param:
        name, _, value = pair.partition("=")
        params[name] = value
    command = ["start", "--wait"] + [x for name, value in params.items() for x in ("--param", f"{name}={value}")]
    console.rule("python -m pipelines.run " + " ".join(command[:1]) + " (local target)")
    from pipelines import run

    code = run.main(command)
    if code != 0:
        console.print(f"[red]the pipeline did not succeed (exit {code})[/red]; see `python -m pipelines.run "
                      "describe latest` and the step logs under "
                      f"{mlops_home() / 'runs'}")
        return code
    if args.data:
        console.print(f"pipeline finished in {time.time() - started:.0f}s")
        return 0
    class_name = "triangle"
    clients = run.local_clients()
    runtime = run.local_client("sagemaker-runtime")
    try:
        wait_for_endpoint(clients.sagemaker, params["EndpointName"])
        prediction = ask_endpoint(runtime, params["EndpointName"], class_name, 64)
    except Exception as exc:  # noqa: BLE001 -- explain and fail
        console.print(f"[red]could not query the endpoint:[/red] {exc}")
        return 1
    console.rule("prediction from the local endpoint")
    console.print(f"sent a freshly drawn [bold]{class_name}[/bold] JPEG; the endpoint answered:")
    console.print_json(json.dumps(prediction))
    console.print(f"done in {time.time() - started:.0f}s. Try: python -m pipelines.run endpoints list · "
                  "python -m pipelines.run models list · python -m pipelines.run describe latest")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
