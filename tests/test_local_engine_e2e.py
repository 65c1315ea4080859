"""End to end: the pipeline definition that ``upsert`` sends to SageMaker, run by the local engine through
``python -m pipelines.run start`` on a tiny generated dataset (CPU-sized: 48 px images, resnet18 from scratch,
2 tuning trials of 2-3 epochs; the tuner's seed is fixed so the sampled hyperparameters are reproducible).

One execution with ``AccuracyThreshold=0`` and ``ModelApprovalStatus=Approved`` goes prepare -> tune -> train best ->
evaluate -> condition (true) -> register -> deploy, and its endpoint answers JPEGs; a second execution with the
threshold at 1.01 reuses the cached job steps and ends at the FailStep with its resolved message.
"""

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest
from support.local_state import local_state

from pipelines import sample_data
from pipelines.local.engine.resolver import decode_hyperparameter
from pipelines.local.storage.store import ArtifactStore

pytestmark = pytest.mark.slow

ENDPOINT = "e2e-endpoint"
PARAMS = {
    "Arch": "resnet18", "Pretrained": "none", "ImageSize": "48", "ResizeSize": "56", "DataLoaderWorkers": "0",
    "MaxTrainingJobs": "2", "MaxParallelTrainingJobs": "2", "EpochsMin": "2", "EpochsMax": "3",
    "ModelApprovalStatus": "Approved", "EndpointName": ENDPOINT,
}


def _start(**params: str) -> int:
    from pipelines import run

    argv = ["start", "--wait"] + [x for k, v in params.items() for x in ("--param", f"{k}={v}")]
    return run.main(argv)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("mlops-home")
    data = sample_data.make_dataset(tmp_path_factory.mktemp("raw"), per_class=30, size=48, seed=3,
                                    with_bad_files=True)
    with local_state(home, endpoints=(ENDPOINT,), MLOPS_TUNER_SEED="0", MLOPS_MAX_WORKERS="2"):
        from pipelines.local.storage.executions import ExecutionStore

        records = ExecutionStore()
        passed = _start(**PARAMS, InputDataUrl=str(data), AccuracyThreshold="0")
        first = records.list_executions(limit=1)[0]
        # The same pipeline again (not upserted again: a source edit meanwhile would rightly change the code bundle
        # and miss the cache), started with boto3 as any client would.
        from pipelines import run

        sm = run.local_clients().sagemaker
        params = {**PARAMS, "InputDataUrl": str(data), "AccuracyThreshold": "1.01"}
        arn = sm.start_pipeline_execution(
            PipelineName=first["pipeline_name"],
            PipelineParameters=[{"Name": k, "Value": v} for k, v in params.items()])["PipelineExecutionArn"]
        summary = run.sagemaker_wait(run.local_clients(), arn, 1.0, 1800)
        failed = 0 if summary["PipelineExecutionStatus"] == "Succeeded" else 1
        second = records.list_executions(limit=1)[0]
        yield {"records": records, "home": home, "passed": passed, "failed": failed, "first": first,
               "second": second}


def _steps(runs, which):
    return {s["step_name"]: s for s in runs["records"].steps(runs[which]["execution_id"])}


def test_every_step_succeeded_and_the_condition_took_the_if_branch(runs):
    assert runs["passed"] == 0, runs["first"].get("failure_reason")
    assert runs["first"]["status"] == "Succeeded"
    steps = _steps(runs, "first")
    expected = {"PrepareData", "TuneHyperparameters", "TrainBestModel", "EvaluateModel", "CheckAccuracy",
                "RegisterModel-RegisterModel", "DeployApprovedModel"}
    assert {n for n, s in steps.items() if s["status"] == "Succeeded"} == expected
    assert steps["AccuracyBelowThreshold"]["status"] == "NotExecuted"
    assert steps["CheckAccuracy"]["properties"]["Outcome"] is True
    for name in expected:
        assert steps[name]["attempt"] == 1
    # logs per step
    assert "valid_accuracy=" in open(steps["TrainBestModel"]["log_path"]).read()


def test_tuner_ran_the_requested_trials_and_the_best_reached_training(runs):
    steps = _steps(runs, "first")
    trials = runs["records"].trials(runs["first"]["execution_id"], "TuneHyperparameters")
    assert len(trials) == 2
    assert all(t["status"] in ("Completed", "Stopped") for t in trials)
    tune = steps["TuneHyperparameters"]["properties"]
    best = tune["BestTrainingJob"]
    assert len(tune["TrainingJobSummaries"]) == 2
    values = [t["objective"] for t in trials if t["status"] == "Completed"]
    assert best["FinalHyperParameterTuningJobObjectiveMetric"]["Value"] == max(values)
    assert best["FinalHyperParameterTuningJobObjectiveMetric"]["MetricName"] == "valid_accuracy"
    trained = steps["TrainBestModel"]["properties"]["HyperParameters"]
    for name in ("lr", "batch_size", "epochs", "dropout", "hidden_units", "optimizer"):
        assert decode_hyperparameter(trained[name]) == decode_hyperparameter(best["TunedHyperParameters"][name])
    # the model artifact is packaged like SageMaker's, and carries the tuned configuration
    home = runs["home"]
    uri = steps["TrainBestModel"]["properties"]["ModelArtifacts"]["S3ModelArtifacts"]
    assert uri.startswith("s3://mlops-local/") and uri.endswith("/output/model.tar.gz")
    with tarfile.open(home / "artifacts" / uri[len("s3://"):]) as tar:
        names = tar.getnames()
        config = json.load(tar.extractfile("model_config.json"))
    assert {"model.pth", "code/inference.py", "code/training/model.py"} <= set(names)  # the handler travels along
    assert config["hyperparameters"]["optimizer"] == decode_hyperparameter(best["TunedHyperParameters"]["optimizer"])


def test_debugger_and_profiler_outputs_reach_the_definitions_s3_paths(runs):
    properties = _steps(runs, "first")["TrainBestModel"]["properties"]
    store = ArtifactStore(runs["home"] / "artifacts")
    job = properties["TrainingJobName"]
    debug_root = properties["DebugHookConfig"]["S3OutputPath"].rstrip("/")
    assert properties["DebugOutputS3Uri"] == f"{debug_root}/{job}/debug-output"
    tensors = store.path(properties["DebugOutputS3Uri"])
    assert any(tensors.rglob("*.tfevents")), sorted(p.name for p in tensors.rglob("*"))[:20]
    profiler_root = properties["ProfilerConfig"]["S3OutputPath"].rstrip("/")
    report = store.path(f"{profiler_root}/{job}/rule-output/ProfilerReport/profiler-output/profiler-report.html")
    assert report.is_file() and report.stat().st_size > 0
    assert (store.path(properties["ProfilerOutputS3Uri"]) / "system_metrics.jsonl").is_file()


def test_model_registered_with_metrics_and_deployed_endpoint_answers(runs):
    from pipelines.local.serving import endpoints
    from pipelines.local.storage import registry

    steps = _steps(runs, "first")
    register = steps["RegisterModel-RegisterModel"]["properties"]
    assert register["ModelApprovalStatus"] == "Approved"
    package = registry.get_package(register["ModelPackageArn"])
    accuracy = steps["CheckAccuracy"]["properties"]["EvaluatedConditions"][0]["LeftValue"]
    assert package.accuracy == pytest.approx(accuracy)
    assert steps["DeployApprovedModel"]["properties"]["OutputParameters"]["model_package_arn"] == \
        register["ModelPackageArn"]
    # The deploy step may find the endpoint already Creating (the approval event's deploy of the same version won the
    # race) and return at once, as on AWS: wait for InService with boto3's waiter, as `make run` does.
    from pipelines import run

    run.local_clients().sagemaker.get_waiter("endpoint_in_service").wait(
        EndpointName=ENDPOINT, WaiterConfig={"Delay": 1, "MaxAttempts": 300})
    # the endpoint answers a JPEG of every class; its answers are the model's own predictions
    endpoint = endpoints.get(ENDPOINT)
    assert endpoint.alive and endpoint.url
    right = 0
    for class_name in sample_data.CLASSES:
        image = sample_data.draw_sample(class_name, 48, random.Random(99))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=92)
        status, body = endpoints.invoke(ENDPOINT, buf.getvalue(), content_type="image/jpeg")
        assert status == 200, body
        prediction = json.loads(body)
        prediction = prediction[0] if isinstance(prediction, list) else prediction
        assert prediction["class_name"] in sample_data.CLASSES
        right += prediction["class_name"] == class_name
    assert right >= 2, f"endpoint got {right}/4 synthetic images right (test accuracy {accuracy:.2f})"


def test_threshold_not_met_ends_at_the_fail_step_with_cached_jobs(runs):
    assert runs["failed"] == 1
    second = runs["second"]
    assert second["status"] == "Failed"
    steps = _steps(runs, "second")
    assert steps["AccuracyBelowThreshold"]["status"] == "Failed"
    message = steps["AccuracyBelowThreshold"]["failure_reason"]
    assert message.startswith("Model accuracy ") and "is below the threshold 1.01" in message
    assert message in second["failure_reason"]
    assert steps["CheckAccuracy"]["properties"]["Outcome"] is False
    assert steps["RegisterModel-RegisterModel"]["status"] == "NotExecuted"
    assert steps["DeployApprovedModel"]["status"] == "NotExecuted"
    # CacheConfig: the job steps reused the first execution's results
    for name in ("PrepareData", "TuneHyperparameters", "TrainBestModel", "EvaluateModel"):
        assert steps[name]["status"] == "Succeeded"
        assert steps[name]["cached_from"] == runs["first"]["execution_id"], name
    assert runs["records"].trials(second["execution_id"]) == []


def test_describe_shows_steps_rule_results_and_trials(runs, capsys):
    """``describe`` (the same view as on SageMaker) shows what DescribeTrainingJob and
    ListTrainingJobsForHyperParameterTuningJob answer; piped, its cells are never folded."""
    from pipelines import run

    assert run.main(["describe", runs["first"]["execution_id"]]) == 0
    out = capsys.readouterr().out
    assert f"{runs['first']['execution_id']}" in out and "status=Succeeded" in out
    steps = _steps(runs, "first")
    statuses = {r["RuleConfigurationName"]: r["RuleEvaluationStatus"] for r in steps["TrainBestModel"]["rule_statuses"]}
    assert {"LossNotDecreasing", "Overfit", "ProfilerReport"} <= set(statuses)
    assert "Debugger and Profiler rules" in out
    for rule, status in statuses.items():
        assert any(rule in line and status in line for line in out.splitlines()), (rule, status)
    assert "Tuning trials" in out
    for trial in runs["records"].trials(runs["first"]["execution_id"]):
        assert trial["job_name"] in out


def test_every_read_command_prints_json_with_stable_keys(runs, capsys):
    """``--output json`` of every list/describe/status command parses, with the documented keys
    (docs/CONTRACTS.md §10)."""
    from pipelines import run

    run.local_clients().sagemaker.get_waiter("endpoint_in_service").wait(
        EndpointName=ENDPOINT, WaiterConfig={"Delay": 1, "MaxAttempts": 300})
    first = runs["first"]["execution_id"]
    commands = {
        "list-executions": (["list-executions"], {"PipelineExecutionArn", "PipelineExecutionStatus"}),
        "status": (["status", first], {"PipelineExecutionArn", "PipelineExecutionStatus", "FailureReason", "Steps",
                                       "Progress"}),
        "describe": (["describe", first], None),
        "models list": (["models", "list"], {"ModelPackageGroupName", "ModelPackageVersion", "ModelPackageArn",
                                             "ModelApprovalStatus", "Accuracy", "CreationTime"}),
        "models describe": (["models", "describe", "1"], {"ModelPackageArn", "ModelApprovalStatus"}),
        "endpoints list": (["endpoints", "list"], {"EndpointName", "EndpointStatus", "Url", "ModelPackageArn"}),
        "local status": (["local", "status"], None),
        "report": (["report", first], None),
    }
    for name, (argv, keys) in commands.items():
        capsys.readouterr()
        assert run.main([*argv, "--output", "json"]) == 0, name
        value = json.loads(capsys.readouterr().out)
        item = value[0] if isinstance(value, list) else value
        assert value, name
        if keys:
            assert keys <= set(item), (name, sorted(item))
    capsys.readouterr()
    assert run.main(["endpoints", "list", "--output", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["EndpointName"] for e in listed] == [ENDPOINT] and listed[0]["Url"].startswith("http://127.0.0.1:")
