"""Driver: aws/amazon-sagemaker-examples' "SageMaker Pipelines Lambda Step" notebook
(``sagemaker-pipelines/tabular/lambda-step/sagemaker-pipelines-lambda-step.ipynb``, vendored in
``vendored/lambda_step``): its code cells run in order up to ``pipeline.upsert``, then upsert, start, wait; then, as
the notebook's cell 37 does, wait for the endpoint its Lambda function created to be ``InService`` (bounded here),
and delete that endpoint (the notebook's clean-up, cell 39, deletes it too).

The driver's changes to the notebook, each checked against the cell it changes:

- cell 7 (``!{sys.executable} -m pip install "sagemaker>=2.99.0"``) is skipped: the SDK is installed;
- cell 10: ``sagemaker_session.account_id()`` -> ``boto3.client("sts").get_caller_identity()["Account"]``: the
  SDK's ``account_id`` sends GetCallerIdentity to STS's public regional URL (an explicit ``endpoint_url``, which
  wins over ``AWS_ENDPOINT_URL``), so it cannot reach the local STS; the value is not used by the pipeline;
- cell 11: ``sagemaker.get_execution_role()`` -> the local execution role;
- cell 28: ``create_lambda_role("lambda-deployment-role")`` (IAM CreateRole/AttachRolePolicy, which the local
  service does not serve: roles are accepted as given) -> the local execution role.

The pipeline's ``InputDataUrl`` defaults to ``s3://sagemaker-example-files-prod-<region>/datasets/tabular/
uci_abalone/abalone.csv``; a small synthetic abalone CSV (the real columns, no header) is uploaded there.

    python run_lambda_step.py --workdir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conformance_driver as driver  # noqa: E402

NOTEBOOK = driver.VENDORED / "lambda_step" / "sagemaker-pipelines-lambda-step.ipynb"
ENDPOINT_WAIT_S = 240


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    ns: dict = {"__name__": "__main__", "LOCAL_ROLE_ARN": driver.local_role()}

    def build(extra):
        region = boto3.Session().region_name
        driver.put_object(f"s3://sagemaker-example-files-prod-{region}/datasets/tabular/uci_abalone/abalone.csv",
                          driver.csv_bytes(driver.abalone_rows()))
        notebook = driver.Notebook(
            NOTEBOOK, args.workdir,
            skip={7: "pip install"},
            substitute={
                10: [("sagemaker_session.account_id()", 'boto3.client("sts").get_caller_identity()["Account"]')],
                11: [("sagemaker.get_execution_role()", "LOCAL_ROLE_ARN")],
                28: [('from iam_helper import create_lambda_role\n\nlambda_role = create_lambda_role('
                      '"lambda-deployment-role")', "lambda_role = LOCAL_ROLE_ARN")],
            },
            stop_before="pipeline.upsert(role_arn=role)")
        notebook.run(ns)
        extra.update(notebook_changes=notebook.changes, default_bucket=ns["default_bucket"],
                     endpoint_name=ns["endpoint_name"], endpoint_config_name=ns["endpoint_config_name"],
                     function_name=ns["function_name"],
                     evaluation_report=f"s3://{ns['default_bucket']}/{ns['s3_prefix']}/evaluation_report")
        return ns["pipeline"], [("default", None)]

    def after(extra, executions):
        if executions[0] is None:
            return
        sm = boto3.client("sagemaker")
        name = ns["endpoint_name"]
        try:
            sm.get_waiter("endpoint_in_service").wait(
                EndpointName=name, WaiterConfig={"Delay": 3, "MaxAttempts": ENDPOINT_WAIT_S // 3})
        except Exception as exc:  # noqa: BLE001 - recorded; the test asserts InService
            extra["endpoint_wait_error"] = f"{type(exc).__name__}: {exc}"
        try:
            described = sm.describe_endpoint(EndpointName=name)
            extra["endpoint_status"] = described["EndpointStatus"]
            extra["endpoint_failure_reason"] = described.get("FailureReason")
        except Exception as exc:  # noqa: BLE001
            extra["endpoint_status"] = None
            extra["endpoint_failure_reason"] = f"DescribeEndpoint: {type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            sm.delete_endpoint(EndpointName=name)

    return driver.main(build, after=after)


if __name__ == "__main__":
    sys.exit(main())
