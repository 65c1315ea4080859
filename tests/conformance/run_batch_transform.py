"""Driver: aws/amazon-sagemaker-examples' "Orchestrate Jobs to Train and Evaluate Models with Amazon SageMaker
Pipelines" notebook (``sagemaker-pipelines/tabular/abalone_build_train_deploy/sagemaker-pipelines-preprocess-train-
evaluate-batch-transform.ipynb``, vendored in ``vendored/batch_transform``), its code cells run in order as Jupyter
runs them, up to ``pipeline.upsert``; then the driver upserts, starts and waits as the notebook's next cells do.

The driver's changes to the notebook, each checked against the cell it changes:

- cell 7 (``!pip install -U sagemaker``) is skipped: the SDK is installed;
- cell 8: ``sagemaker.get_execution_role()`` (which only answers inside SageMaker) -> the local execution role.

The notebook downloads its two datasets from public buckets (cells 11 and 13) and uploads them to the default
bucket; those cells run unchanged, against the local S3, where the driver has put a small synthetic abalone CSV at
``s3://sagemaker-example-files-prod-<region>/datasets/tabular/uci_abalone/abalone.csv`` and preprocessed batch
records at ``s3://sagemaker-servicecatalog-seedcode-<region>/dataset/abalone-dataset-batch``.

Two executions: the defaults (``MseThreshold`` 6.0: the condition holds, the model is registered, created and
batch-transforms ``BatchData``), then ``MseThreshold=0.0`` (as the notebook's last execution lowers it to 3.0, but
below any MSE: the FailStep ``AbaloneMSEFail`` fails the execution).

    python run_batch_transform.py --workdir DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conformance_driver as driver  # noqa: E402

NOTEBOOK = driver.VENDORED / "batch_transform" / "sagemaker-pipelines-preprocess-train-evaluate-batch-transform.ipynb"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()

    def build(extra):
        region = boto3.Session().region_name
        driver.put_object(f"s3://sagemaker-example-files-prod-{region}/datasets/tabular/uci_abalone/abalone.csv",
                          driver.csv_bytes(driver.abalone_rows()))
        driver.put_object(f"s3://sagemaker-servicecatalog-seedcode-{region}/dataset/abalone-dataset-batch",
                          driver.csv_bytes(driver.batch_features()))
        notebook = driver.Notebook(
            NOTEBOOK, args.workdir,
            skip={7: "!pip install -U sagemaker"},
            substitute={8: [("sagemaker.get_execution_role()", "LOCAL_ROLE_ARN")]},
            stop_before="pipeline.upsert(role_arn=role)")
        ns = notebook.run({"__name__": "__main__", "LOCAL_ROLE_ARN": driver.local_role()})
        extra.update(notebook_changes=notebook.changes, default_bucket=ns["default_bucket"],
                     input_data=ns["input_data_uri"], batch_data=ns["batch_data_uri"],
                     model_package_group=ns["model_package_group_name"],
                     transform_output=f"s3://{ns['default_bucket']}/AbaloneTransform")
        return ns["pipeline"], [("default", None), ("fail-branch", {"MseThreshold": 0.0})]

    return driver.main(build)


if __name__ == "__main__":
    sys.exit(main())
