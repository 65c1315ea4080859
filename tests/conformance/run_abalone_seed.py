"""Driver: the SageMaker Projects MLOps template's model-build seed code, ``pipelines/abalone`` (vendored in
``vendored/abalone_seed``), run as its ``run_pipeline.py`` runs it: ``get_pipeline(region, role, default_bucket,
...)``, ``upsert``, ``start`` with the defaults.

The pipeline's ``InputDataUrl`` defaults to ``s3://sagemaker-servicecatalog-seedcode-<region>/dataset/
abalone-dataset.csv``; a small synthetic abalone CSV (the real columns, no header) is uploaded there.

    python run_abalone_seed.py --pipeline-name NAME
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import boto3
import sagemaker

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conformance_driver as driver  # noqa: E402

MODULE = driver.VENDORED / "abalone_seed" / "pipelines" / "abalone" / "pipeline.py"
MODEL_PACKAGE_GROUP = "AbalonePackageGroup"  # get_pipeline's default


def load_vendored():
    # Loaded by path: the seed code's package is called ``pipelines``, as this project's is.
    spec = importlib.util.spec_from_file_location("abalone_seed_pipeline", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline-name", required=True)
    args = parser.parse_args()

    def build(extra):
        region = boto3.Session().region_name
        default_bucket = sagemaker.Session().default_bucket()  # the SDK defaults file names it
        data_uri = f"s3://sagemaker-servicecatalog-seedcode-{region}/dataset/abalone-dataset.csv"
        driver.put_object(data_uri, driver.csv_bytes(driver.abalone_rows()))
        pipeline = load_vendored().get_pipeline(
            region=region, role=driver.local_role(), default_bucket=default_bucket,
            model_package_group_name=MODEL_PACKAGE_GROUP, pipeline_name=args.pipeline_name)
        extra.update(input_data=data_uri, default_bucket=default_bucket, model_package_group=MODEL_PACKAGE_GROUP)
        return pipeline, [("default", None)]

    return driver.main(build, name=args.pipeline_name)


if __name__ == "__main__":
    sys.exit(main())
