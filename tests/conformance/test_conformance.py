"""Conformance: public SageMaker pipelines written by others (``vendored/``, unmodified; see README.md), each run by
its driver (``run_<name>.py``) as a subprocess against the local AWS service, exactly as a user would run it with
the environment ``python -m pipelines.run local up`` prints. Each test asserts what the pipeline does on SageMaker:
every step's status (each step Succeeded, or, where a parameter takes the else branch, the FailStep Failed) and at
least one output value, read back with boto3.

The drivers print a JSON report as their last line (``conformance_driver.py``); with ``CONFORMANCE_REPORT_DIR`` set,
each test also writes it there as ``<name>.json``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import site
import subprocess
import sys
import uuid
import venv
from pathlib import Path
from typing import Any

import boto3
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conformance_driver as driver  # noqa: E402

HERE = Path(__file__).resolve().parent
WAIT_S = int(os.environ.get("CONFORMANCE_WAIT_S", "1200"))
#: What every pipeline's ConditionStep checks (``regression_metrics.mse.value <= 6.0``).
MSE_THRESHOLD = 6.0


# --- running a driver -----------------------------------------------------------------------------------------------

@pytest.fixture
def user_env(local_aws_env, tmp_path, monkeypatch):
    """``local_aws_env``'s environment with no ``~/.aws`` file of the developer's read (as a user's shell after
    ``local up``)."""
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("CONFORMANCE_WAIT_S", str(WAIT_S))
    return local_aws_env


def run_driver(script: str, *args: str, name: str, executions: int = 1, python: str | Path = sys.executable,
               cwd: Path) -> dict[str, Any]:
    cwd.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([str(python), str(HERE / script), *args], env=dict(os.environ), cwd=cwd,
                            capture_output=True, text=True, timeout=executions * WAIT_S + 600,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{script} exited {result.returncode}\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-6000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["stderr_tail"] = result.stderr[-4000:]
    out = os.environ.get("CONFORMANCE_REPORT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(report, indent=2, default=str))
    assert report["error"] is None, f"{script}: {report['error']}\n{report['extra'].get('traceback', '')}\n" \
                                    f"stderr:\n{report['stderr_tail']}"
    assert len(report["runs"]) == executions
    for run in report["runs"]:
        assert run["error"] is None, f"{script} [{run['label']}]: {run['error']}\n{step_table(run)}"
    return report


def step_table(run: dict[str, Any]) -> str:
    lines = [f"execution {run['label']}: {run['status']} ({run['failure_reason']})"]
    for s in run["steps"]:
        lines.append(f"  {s['StepName']}: {s['StepStatus']}" + (f" -- {s['FailureReason']}"
                                                                 if s.get("FailureReason") else ""))
    return "\n".join(lines)


def assert_steps(run: dict[str, Any], expected: dict[str, str], execution_status: str) -> dict[str, dict]:
    """Every step's status is the expected one (no other step ran) and so is the execution's; the steps by name."""
    steps = {s["StepName"]: s for s in run["steps"]}
    table = step_table(run)
    assert {n: s["StepStatus"] for n, s in steps.items()} == expected, table
    assert run["status"] == execution_status, table
    return steps


# --- reading outputs ------------------------------------------------------------------------------------------------

def job_name(step: dict[str, Any], kind: str) -> str:
    return step["Metadata"][kind]["Arn"].rsplit("/", 1)[1]


def processing_output(step: dict[str, Any], output_name: str) -> str:
    job = boto3.client("sagemaker").describe_processing_job(ProcessingJobName=job_name(step, "ProcessingJob"))
    assert job["ProcessingJobStatus"] == "Completed"
    return next(o["S3Output"]["S3Uri"] for o in job["ProcessingOutputConfig"]["Outputs"]
                if o["OutputName"] == output_name)


def read_object(uri: str) -> bytes:
    bucket, key = driver.split_s3(uri)
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def evaluation_mse(uri: str) -> float:
    """``regression_metrics.mse.value`` of the ``evaluation.json`` under ``uri``, checked to be a real MSE that
    passes the pipelines' threshold: the synthetic data makes rings a near-deterministic function of the features."""
    report = json.loads(read_object(uri.rstrip("/") + "/evaluation.json"))
    mse = report["regression_metrics"]["mse"]["value"]
    assert isinstance(mse, float) and math.isfinite(mse) and 0 <= mse <= MSE_THRESHOLD, report
    assert report["regression_metrics"]["mse"]["standard_deviation"] >= 0
    return mse


def assert_condition(step: dict[str, Any], outcome: bool) -> None:
    assert step["Metadata"]["Condition"]["Outcome"] == str(outcome), step


def registered_packages(group: str) -> list[dict[str, Any]]:
    sm = boto3.client("sagemaker")
    summaries = sm.list_model_packages(ModelPackageGroupName=group)["ModelPackageSummaryList"]
    return [sm.describe_model_package(ModelPackageName=s["ModelPackageArn"]) for s in summaries]


def assert_model(step: dict[str, Any], model_data_prefix: str | None = None) -> dict[str, Any]:
    model = boto3.client("sagemaker").describe_model(ModelName=step["Metadata"]["Model"]["Arn"].rsplit("/", 1)[1])
    data = model["PrimaryContainer"]["ModelDataUrl"]
    if model_data_prefix:
        assert data.startswith(model_data_prefix), model
    bucket, key = driver.split_s3(data)
    assert boto3.client("s3").head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
    return model


# --- the pipelines --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(WAIT_S + 900)
def test_abalone_seed_code(user_env, tmp_path):
    """SageMaker Projects' MLOps template seed code: SKLearnProcessor preprocessing, built-in XGBoost training, a
    ScriptProcessor evaluation (PropertyFile), ConditionStep, RegisterModel; all with the pipeline's defaults."""
    name = f"conformance-abalone-seed-{uuid.uuid4().hex[:6]}"
    report = run_driver("run_abalone_seed.py", "--pipeline-name", name, name="abalone_seed", cwd=tmp_path)
    steps = assert_steps(report["runs"][0], {
        "PreprocessAbaloneData": "Succeeded", "TrainAbaloneModel": "Succeeded", "EvaluateAbaloneModel": "Succeeded",
        "CheckMSEAbaloneEvaluation": "Succeeded", "RegisterAbaloneModel-RegisterModel": "Succeeded"}, "Succeeded")

    for output in ("train", "validation", "test"):  # the 70/15/15 split of the uploaded rows
        rows = list(csv.reader(io.StringIO(read_object(
            processing_output(steps["PreprocessAbaloneData"], output).rstrip("/") + f"/{output}.csv").decode())))
        assert rows and all(len(r) == 1 + 7 + 3 for r in rows)  # rings, 7 scaled numerics, one-hot sex
    evaluation_mse(processing_output(steps["EvaluateAbaloneModel"], "evaluation"))
    assert_condition(steps["CheckMSEAbaloneEvaluation"], True)
    training = boto3.client("sagemaker").describe_training_job(
        TrainingJobName=job_name(steps["TrainAbaloneModel"], "TrainingJob"))
    assert training["TrainingJobStatus"] == "Completed"
    [package] = registered_packages(report["extra"]["model_package_group"])
    assert package["ModelApprovalStatus"] == "PendingManualApproval"
    assert package["InferenceSpecification"]["Containers"][0]["ModelDataUrl"] == \
        training["ModelArtifacts"]["S3ModelArtifacts"]
    assert package["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"].endswith("/evaluation.json")


@pytest.mark.slow
@pytest.mark.timeout(WAIT_S + 900)
def test_hpo_step(user_env, tmp_path):
    """TuningStep (3 built-in XGBoost trials, ``validation:rmse``), two CreateModelSteps from
    ``get_top_model_s3_uri`` (top 1 and 2), evaluation of the top model, ConditionStep, RegisterModel."""
    name = f"conformance-hpo-step-{uuid.uuid4().hex[:6]}"
    report = run_driver("run_hpo_step.py", "--pipeline-name", name, name="hpo_step", cwd=tmp_path)
    steps = assert_steps(report["runs"][0], {
        "PreprocessAbaloneDataForHPO": "Succeeded", "HPTuning": "Succeeded", "CreateTopModel": "Succeeded",
        "CreateSecondBestModel": "Succeeded", "EvaluateTopModel": "Succeeded",
        "CheckMSEAbaloneEvaluation": "Succeeded", "RegisterBestAbaloneModel-RegisterModel": "Succeeded"},
        "Succeeded")

    sm = boto3.client("sagemaker")
    tuning_name = job_name(steps["HPTuning"], "TuningJob")
    tuning = sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=tuning_name)
    assert tuning["HyperParameterTuningJobStatus"] == "Completed"
    assert tuning["TrainingJobStatusCounters"]["Completed"] == 3
    trials = sm.list_training_jobs_for_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=tuning_name, SortBy="FinalObjectiveMetricValue", SortOrder="Ascending",
    )["TrainingJobSummaries"]
    assert len(trials) == 3 and all(t["TrainingJobStatus"] == "Completed" for t in trials)
    assert tuning["BestTrainingJob"]["TrainingJobName"] == trials[0]["TrainingJobName"]
    model_path = report["extra"]["model_path"]
    top = assert_model(steps["CreateTopModel"], f"{model_path}/{trials[0]['TrainingJobName']}/")
    second = assert_model(steps["CreateSecondBestModel"], f"{model_path}/{trials[1]['TrainingJobName']}/")
    assert top["PrimaryContainer"]["ModelDataUrl"] != second["PrimaryContainer"]["ModelDataUrl"]
    evaluation_mse(processing_output(steps["EvaluateTopModel"], "evaluation"))
    assert_condition(steps["CheckMSEAbaloneEvaluation"], True)
    [package] = registered_packages(report["extra"]["model_package_group"])
    assert package["InferenceSpecification"]["Containers"][0]["ModelDataUrl"] == \
        top["PrimaryContainer"]["ModelDataUrl"]


@pytest.mark.slow
@pytest.mark.timeout(2 * WAIT_S + 900)
def test_batch_transform_notebook(user_env, tmp_path):
    """The preprocess-train-evaluate-batch-transform notebook: ModelStep (``model.create``), TransformStep,
    ModelStep (``model.register``), FailStep; first with the defaults (MseThreshold 6.0: register, create,
    transform), then with ``MseThreshold=0.0`` (the FailStep fails the execution with its Join message)."""
    report = run_driver("run_batch_transform.py", "--workdir", str(tmp_path / "notebook"), name="batch_transform",
                        executions=2, cwd=tmp_path)
    default, failing = report["runs"]
    steps = assert_steps(default, {
        "AbaloneProcess": "Succeeded", "AbaloneTrain": "Succeeded", "AbaloneEval": "Succeeded",
        "AbaloneMSECond": "Succeeded", "AbaloneRegisterModel-RegisterModel": "Succeeded",
        "AbaloneCreateModel-CreateModel": "Succeeded", "AbaloneTransform": "Succeeded"}, "Succeeded")
    evaluation_mse(processing_output(steps["AbaloneEval"], "evaluation"))
    assert_condition(steps["AbaloneMSECond"], True)
    assert_model(steps["AbaloneCreateModel-CreateModel"])
    # The transform job writes <output path>/<input object name>.out: one prediction per input record (the
    # TransformInput has no SplitType, so the container answers the whole file at once, comma- or line-separated).
    text = read_object(report["extra"]["transform_output"] + "/abalone-dataset-batch.out").decode()
    out = [v for v in re.split(r"[\s,]+", text) if v]
    assert len(out) == driver.BATCH_ROWS and all(math.isfinite(float(v)) for v in out), text[:300]
    [package] = registered_packages(report["extra"]["model_package_group"])
    assert package["ModelApprovalStatus"] == "PendingManualApproval"

    steps = assert_steps(failing, {
        "AbaloneProcess": "Succeeded", "AbaloneTrain": "Succeeded", "AbaloneEval": "Succeeded",
        "AbaloneMSECond": "Succeeded", "AbaloneMSEFail": "Failed"}, "Failed")
    assert_condition(steps["AbaloneMSECond"], False)
    message = steps["AbaloneMSEFail"].get("FailureReason") or ""
    assert message.startswith("Execution failed due to MSE > 0"), steps["AbaloneMSEFail"]
    assert steps["AbaloneMSEFail"]["Metadata"]["Fail"]["ErrorMessage"] == message
    assert len(registered_packages(report["extra"]["model_package_group"])) == 1  # nothing more registered


@pytest.mark.slow
@pytest.mark.timeout(WAIT_S + 900)
def test_lambda_step_notebook(user_env, tmp_path):
    """The Lambda step notebook: ModelStep (``model.create``), then a LambdaStep whose function the SDK's
    ``sagemaker.lambda_helper.Lambda`` creates from the notebook's own script, deploying the model to an endpoint;
    the LambdaStep's outputs, and the endpoint InService (what the notebook waits for next)."""
    report = run_driver("run_lambda_step.py", "--workdir", str(tmp_path / "notebook"), name="lambda_step",
                        cwd=tmp_path)
    steps = assert_steps(report["runs"][0], {
        "PreprocessAbaloneData": "Succeeded", "TrainAbaloneModel": "Succeeded", "EvaluateAbaloneModel": "Succeeded",
        "CheckMSEAbaloneEvaluation": "Succeeded", "CreateModel-CreateModel": "Succeeded", "LambdaStep": "Succeeded"},
        "Succeeded")
    extra = report["extra"]
    evaluation_mse(extra["evaluation_report"])
    assert_condition(steps["CheckMSEAbaloneEvaluation"], True)
    model = assert_model(steps["CreateModel-CreateModel"])
    outputs = {o["Name"]: o["Value"] for o in steps["LambdaStep"]["Metadata"]["Lambda"]["OutputParameters"]}
    assert outputs == {"statusCode": "200", "body": json.dumps("Created Endpoint!"), "other_key": "example_value"}
    function = boto3.client("lambda").get_function(FunctionName=extra["function_name"])["Configuration"]
    assert function["Handler"] == "lambda_helper.lambda_handler"
    config = boto3.client("sagemaker").describe_endpoint_config(EndpointConfigName=extra["endpoint_config_name"])
    assert config["ProductionVariants"][0]["ModelName"] == model["ModelName"]
    assert extra.get("endpoint_status") == "InService", (extra.get("endpoint_failure_reason"),
                                                         extra.get("endpoint_wait_error"))


@pytest.fixture(scope="module")
def step_decorator_python(tmp_path_factory) -> Path:
    """The interpreter a user runs the @step example with, after the README's ``pip install -r requirements.txt``:
    a virtual environment over this one's packages (a ``.pth`` adding its site directories, so the SDK and this
    project are there) with the example's requirements installed into it (scikit-learn, xgboost==1.7.1,
    s3fs==0.4.2), from the package index."""
    root = tmp_path_factory.mktemp("step-decorator-venv")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    site_packages = next(root.glob("lib/python*/site-packages"))
    (site_packages / "_conformance_parent_site.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in site.getsitepackages()) + "\n")
    python = root / "bin" / "python"
    requirements = driver.VENDORED / "step_decorator" / "modular" / "requirements.txt"
    result = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r",
                             str(requirements)], capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"pip install -r {requirements}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return python


@pytest.mark.slow
@pytest.mark.timeout(WAIT_S + 1500)
def test_step_decorator_modular(user_env, tmp_path, step_decorator_python):
    """The modular ``@step`` quick start: three function steps (preprocess -> train -> evaluate) passing pandas
    DataFrames and an XGBoost Booster between them; the evaluation step's return value, read back with
    ``execution.result``."""
    name = f"conformance-step-decorator-{uuid.uuid4().hex[:6]}"
    report = run_driver("run_step_decorator.py", "--pipeline-name", name, "--workdir", str(tmp_path / "config"),
                        name="step_decorator", python=step_decorator_python, cwd=tmp_path)
    assert_steps(report["runs"][0], {"AbaloneProcess": "Succeeded", "AbaloneTrain": "Succeeded",
                                     "AbaloneEval": "Succeeded"}, "Succeeded")
    extra = report["extra"]
    assert "evaluation_result_error" not in extra, extra["evaluation_result_error"]
    mse = extra["evaluation_result"]["regression_metrics"]["mse"]
    assert math.isfinite(mse["value"]) and 0 <= mse["value"] <= MSE_THRESHOLD, mse
    assert mse["standard_deviation"] >= 0


# --- the vendored files and the data (fast) -------------------------------------------------------------------------

def test_vendored_files_are_unmodified():
    """Every vendored file is byte-identical to its origin (``MANIFEST.json``: repository, commit, path, git blob
    id), and nothing else is vendored."""
    manifest = json.loads((driver.VENDORED / "MANIFEST.json").read_text())
    present = {str(p.relative_to(driver.VENDORED)) for p in driver.VENDORED.rglob("*")
               if p.is_file() and not any(part.startswith((".", "__pycache__"))
                                   for part in p.relative_to(driver.VENDORED).parts)
               and p.name not in ("MANIFEST.json", "ruff.toml")}
    assert present == set(manifest)
    for rel, origin in manifest.items():
        data = (driver.VENDORED / rel).read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == origin["git_blob"], rel
        assert origin["repository"].startswith("https://github.com/") and len(origin["commit"]) == 40


def test_every_vendored_pipeline_keeps_its_licence():
    manifest = json.loads((driver.VENDORED / "MANIFEST.json").read_text())
    for top in {rel.split("/", 1)[0] for rel in manifest}:
        licences = [rel for rel in manifest if rel.split("/", 1)[0] == top and
                    rel.rsplit("/", 1)[-1] in ("LICENSE", "LICENSE.txt")]
        assert licences, f"{top} has no licence file"
        text = (driver.VENDORED / licences[0]).read_text()
        assert "Apache License" in text or "Permission is hereby granted, free of charge" in text, top
        if "Apache License" in text:  # Apache-2.0 section 4(d): the NOTICE travels with the work
            assert f"{top}/NOTICE" in manifest, top


def test_synthetic_abalone_data_has_the_real_columns():
    rows = driver.abalone_rows()
    assert len(rows) == driver.ABALONE_ROWS and all(len(r) == len(driver.ABALONE_COLUMNS) for r in rows)
    assert {r[0] for r in rows} == {"M", "F", "I"}
    assert all(0 < x < 3 for r in rows for x in r[1:8]) and all(isinstance(r[8], int) and r[8] >= 1 for r in rows)
    assert not driver.csv_bytes(rows).startswith(b"sex")  # headerless, as the UCI file
    assert driver.abalone_rows() == rows  # deterministic
    batch = driver.batch_features()
    assert len(batch) == driver.BATCH_ROWS and all(len(r) == 10 and sum(r[7:]) == 1.0 for r in batch)
