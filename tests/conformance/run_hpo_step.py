"""Driver: aws-samples/sample-sagemaker-pipeline-with-hpo-step's ``src/Pipeline.py`` (vendored in
``vendored/hpo_step``): ``get_pipeline(region, role, default_bucket, model_package_group_name, base_job_prefix,
pipeline_name)``, ``upsert``, ``start``.

The authors start it from a Lambda function that UNLOADs a Redshift table (``PARALLEL OFF``: one object, ``000``)
to ``s3://<bucket>/abalone-training=<timestamp>/`` and passes that prefix as ``InputDataUrl``; ``preprocess.py``
reads ``/opt/ml/processing/input/000``. The driver uploads a small synthetic abalone CSV (the real columns, no
header) as that ``000`` object and starts the pipeline with the same parameter.

    python run_hpo_step.py --pipeline-name NAME
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import boto3
import sagemaker

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conformance_driver as driver  # noqa: E402

MODULE = driver.VENDORED / "hpo_step" / "src" / "Pipeline.py"
MODEL_PACKAGE_GROUP = "AbaloneHPOPackageGroup"
BASE_JOB_PREFIX = "abalone-hpo"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline-name", required=True)
    args = parser.parse_args()

    def build(extra):
        region = boto3.Session().region_name
        default_bucket = sagemaker.Session().default_bucket()  # the SDK defaults file names it
        location = f"s3://{default_bucket}/abalone-training={time.strftime('%m%d%Y%H%M%S')}/"
        driver.put_object(location + "000", driver.csv_bytes(driver.abalone_rows()))
        spec = importlib.util.spec_from_file_location("hpo_step_pipeline", MODULE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        pipeline = module.get_pipeline(region, driver.local_role(), default_bucket, MODEL_PACKAGE_GROUP,
                                       BASE_JOB_PREFIX, args.pipeline_name)
        extra.update(input_data=location, default_bucket=default_bucket, model_package_group=MODEL_PACKAGE_GROUP,
                     model_path=f"s3://{default_bucket}/{BASE_JOB_PREFIX}/AbaloneTrain")
        return pipeline, [("default", {"InputDataUrl": location})]

    return driver.main(build, name=args.pipeline_name)


if __name__ == "__main__":
    sys.exit(main())
