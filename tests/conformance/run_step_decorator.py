"""Driver: aws/amazon-sagemaker-examples' modular ``@step`` quick start
(``sagemaker-pipelines/step-decorator/quick-start/modular``, vendored in ``vendored/step_decorator/modular``): three
function steps (``steps/preprocess.py``, ``steps/train.py``, ``steps/evaluation.py``) chained by ``pipeline.py``'s
``steps(input_data_path)``. The driver does what that file's ``__main__`` does, from the ``modular`` folder as its
README says (``IncludeLocalWorkDir`` ships the working directory to the jobs): ``steps(input_path)``,
``Pipeline(name, steps)``, ``upsert``, ``start``; then it reads the evaluation step's return value with
``execution.result(step_name="AbaloneEval")``.

Configuration, as the README asks the user to provide it ("update your configurations, e.g. RoleArn, in the
config.yaml"): ``__main__`` points ``SAGEMAKER_USER_CONFIG_OVERRIDE`` at the folder's ``config.yaml``; the driver
points it at a copy of that file with ``RoleArn`` (the local execution role) and ``ImageUri`` added, and passes
the local service's SDK defaults file (default bucket, telemetry off) as ``SAGEMAKER_ADMIN_CONFIG_OVERRIDE``.
``ImageUri`` is needed because this interpreter is Python 3.11: the SDK's default image exists only for 3.8 and
3.10 ("you must provide a compatible image_uri", as the README notes); the driver names the SageMaker base Python
3.10 image, the one the SDK picks on 3.10.

The input path is ``__main__``'s ``s3://sagemaker-example-files-prod-<region>/datasets/tabular/uci_abalone/
abalone.csv``; a small synthetic abalone CSV (the real columns, no header) is uploaded there.

    python run_step_decorator.py --pipeline-name NAME --workdir DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conformance_driver as driver  # noqa: E402

MODULAR = driver.VENDORED / "step_decorator" / "modular"


def write_user_config(workdir: Path, role: str, image_uri: str) -> Path:
    import yaml

    config = yaml.safe_load((MODULAR / "config.yaml").read_text())
    remote = config["SageMaker"]["PythonSDK"]["Modules"]["RemoteFunction"]
    remote["RoleArn"] = role
    remote["ImageUri"] = image_uri
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pipeline-name", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()

    def build(extra):
        import boto3
        from sagemaker import image_uris

        region = boto3.Session().region_name
        image_uri = image_uris.get_base_python_image_uri(region, py_version="310")
        os.environ["SAGEMAKER_ADMIN_CONFIG_OVERRIDE"] = os.environ["SAGEMAKER_USER_CONFIG_OVERRIDE"]
        os.environ["SAGEMAKER_USER_CONFIG_OVERRIDE"] = str(write_user_config(args.workdir, driver.local_role(),
                                                                             image_uri))
        import sagemaker
        from sagemaker.workflow.pipeline import Pipeline

        input_path = (f"s3://sagemaker-example-files-prod-{region}/datasets/tabular"
                      f"/uci_abalone/abalone.csv")
        driver.put_object(input_path, driver.csv_bytes(driver.abalone_rows()))

        os.chdir(MODULAR)  # README: "run the commands below under the `modular` folder"
        sys.path.insert(0, str(MODULAR))  # ahead of this project's own top-level ``steps`` package
        spec = importlib.util.spec_from_file_location("step_decorator_pipeline", MODULAR / "pipeline.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        steps = module.steps(input_data_path=input_path)
        extra.update(input_data=input_path, image_uri=image_uri,
                     default_bucket=sagemaker.session.Session().default_bucket())
        return Pipeline(name=args.pipeline_name, steps=steps), [("default", None)]

    def after(extra, executions):
        execution = executions[0]
        if execution is None:
            return
        try:
            extra["evaluation_result"] = json.loads(json.dumps(execution.result(step_name="AbaloneEval"),
                                                               default=float))
        except Exception as exc:  # noqa: BLE001 - recorded; the test asserts the result
            extra["evaluation_result_error"] = f"{type(exc).__name__}: {exc}"

    return driver.main(build, after=after)


if __name__ == "__main__":
    sys.exit(main())
