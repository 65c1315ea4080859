"""A SageMaker pipeline as a user writes it with the SageMaker Python SDK (v2), nothing in it specific to where it
runs: the SDK's default session, its default bucket, a processing step (``ScriptProcessor``) and a training step
(the PyTorch framework estimator) fed by the processing step's output.

    python pipeline.py --role-arn arn:aws:iam::<account>:role/<SageMakerExecutionRole> [--pipeline-name NAME]

Uploads a small CSV and a JSON config to ``s3://<default bucket>/<pipeline name>/``, upserts the pipeline, starts
it, waits for it and prints the execution's steps as JSON (the last line of stdout); exits 1 if it did not succeed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

import sagemaker
from botocore.exceptions import WaiterError
from sagemaker import image_uris
from sagemaker.inputs import TrainingInput
from sagemaker.processing import ProcessingInput, ProcessingOutput, ScriptProcessor
from sagemaker.pytorch import PyTorch
from sagemaker.s3 import S3Uploader
from sagemaker.workflow.parameters import ParameterInteger, ParameterString
from sagemaker.workflow.pipeline import Pipeline
from sagemaker.workflow.pipeline_context import PipelineSession
from sagemaker.workflow.steps import ProcessingStep, TrainingStep

HERE = Path(__file__).resolve().parent
FRAMEWORK_VERSION, PY_VERSION = "2.1", "py310"


def upload_inputs(session: sagemaker.Session, prefix: str) -> tuple[str, str]:
    """A CSV of (x, y) rows and a config object; their S3 URIs."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.csv"
        with data.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["x", "y"])
            writer.writerows([i, 2 * i + 1] for i in range(20))
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps({"label_column": "y", "offset": 10}))
        data_uri = S3Uploader.upload(str(data), f"{prefix}/input", sagemaker_session=session)
        config_uri = S3Uploader.upload(str(config), f"{prefix}/config", sagemaker_session=session)
    return data_uri, config_uri


def build(name: str, role: str, session: sagemaker.Session) -> Pipeline:
    region = session.boto_region_name
    prefix = f"s3://{session.default_bucket()}/{name}"
    data_uri, config_uri = upload_inputs(session, prefix)

    pipeline_session = PipelineSession()
    input_data = ParameterString("InputData", default_value=data_uri)
    instance_type = ParameterString("InstanceType", default_value="ml.m5.large")
    scale = ParameterInteger("Scale", default_value=3)

    image = image_uris.retrieve("pytorch", region, version=FRAMEWORK_VERSION, py_version=PY_VERSION,
                                instance_type="ml.m5.large", image_scope="training")
    config_bucket, config_key = config_uri.removeprefix("s3://").split("/", 1)
    processor = ScriptProcessor(
        image_uri=image, command=["python3"], role=role, instance_count=1, instance_type=instance_type,
        env={"CONFIG_BUCKET": config_bucket, "CONFIG_KEY": config_key}, base_job_name=f"{name}-prep",
        sagemaker_session=pipeline_session,
    )
    step_process = ProcessingStep(
        name="Preprocess",
        step_args=processor.run(
            code=str(HERE / "preprocess.py"),
            inputs=[ProcessingInput(source=input_data, destination="/opt/ml/processing/input/data")],
            outputs=[ProcessingOutput(output_name="train", source="/opt/ml/processing/output/train"),
                     ProcessingOutput(output_name="report", source="/opt/ml/processing/output/report")],
            arguments=["--scale", scale.to_string(), "--input-dir", "/opt/ml/processing/input/data",
                       "--output-dir", "/opt/ml/processing/output"],
        ),
    )

    estimator = PyTorch(
        entry_point="train.py", source_dir=str(HERE / "training"), framework_version=FRAMEWORK_VERSION,
        py_version=PY_VERSION, role=role, instance_count=1, instance_type=instance_type,
        hyperparameters={"scale": scale, "epochs": 2}, output_path=f"{prefix}/models",
        metric_definitions=[{"Name": "train:mse", "Regex": r"mse=([0-9.]+)"}],
        base_job_name=f"{name}-train", sagemaker_session=pipeline_session,
    )
    step_train = TrainingStep(
        name="Train",
        step_args=estimator.fit({"train": TrainingInput(
            s3_data=step_process.properties.ProcessingOutputConfig.Outputs["train"].S3Output.S3Uri,
            content_type="text/csv")}),
    )
    return Pipeline(name=name, parameters=[input_data, instance_type, scale], steps=[step_process, step_train],
                    sagemaker_session=pipeline_session)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role-arn", default=os.environ.get("SAGEMAKER_ROLE_ARN"), required=False)
    parser.add_argument("--pipeline-name", default="user-csv-pipeline")
    parser.add_argument("--max-attempts", type=int, default=300, help="polls of the execution, 2 s apart")
    args = parser.parse_args()
    if not args.role_arn:
        parser.error("--role-arn (or SAGEMAKER_ROLE_ARN) is required")

    session = sagemaker.Session()
    pipeline = build(args.pipeline_name, args.role_arn, session)
    pipeline.upsert(role_arn=args.role_arn, description="CSV preprocessing and a PyTorch training job")
    execution = pipeline.start()
    print(f"started {execution.arn}", file=sys.stderr)
    succeeded = True
    try:
        execution.wait(delay=2, max_attempts=args.max_attempts)
    except WaiterError as exc:
        print(f"execution did not succeed: {exc}", file=sys.stderr)
        succeeded = False
    print(json.dumps(execution.list_steps(), default=str))
    return 0 if succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
