"""The local Studio (``python -m pipelines.run ui``, pipelines/local/ui) in headless Chromium, after a real pipeline
run on a tiny generated dataset (as tests/test_local_engine_e2e.py runs it: 48 px images, resnet18, 2 trials).

The module's MLOPS_HOME holds: execution 1 (``ModelApprovalStatus=Approved``: version 1, deployed), execution 2
(cache hits, version 2 ``PendingManualApproval``), a small pipeline whose condition fails until an S3 object exists
(Retry), and one that sleeps (Stop). The UI runs as a user starts it, in a subprocess on a free port; every page is
loaded with requests outside 127.0.0.1 aborted (the page needs no network) and screenshotted (to a temporary folder;
``make screenshots`` writes them to docs/ui/<page>.png).
"""

from __future__ import annotations

import io
import json
import random
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
from support.local_state import local_state
from ui_support import definitions, studio

from pipelines import sample_data

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not studio.CHROMIUM.exists(),
                                 reason="/usr/bin/chromium is missing (apt-get install chromium, or `make browser`)")]

ENDPOINT = "ui-test-endpoint"
PIPELINE = "ImageClassificationPipeline"
PARAMS = {
    "Arch": "resnet18", "Pretrained": "none", "ImageSize": "48", "ResizeSize": "56", "DataLoaderWorkers": "0",
    "MaxTrainingJobs": "2", "MaxParallelTrainingJobs": "2", "EpochsMin": "2", "EpochsMax": "3",
    "EndpointName": ENDPOINT, "AccuracyThreshold": "0",
}


def _runs(data: str) -> dict[str, str]:
    """Execution 1 through the CLI (``start --wait``), execution 2 with boto3 (not upserted again, so that a source
    edit meanwhile cannot miss the step cache)."""
    from pipelines import run

    argv = ["start", "--wait"] + [x for k, v in {**PARAMS, "InputDataUrl": data, "ModelApprovalStatus": "Approved"
                                                 }.items() for x in ("--param", f"{k}={v}")]
    assert run.main(argv) == 0
    sm = run.local_clients().sagemaker
    first = sm.list_pipeline_executions(PipelineName=PIPELINE)["PipelineExecutionSummaries"][0]
    second = definitions.start(sm, PIPELINE, **PARAMS, InputDataUrl=data, ModelApprovalStatus="PendingManualApproval")
    assert definitions.wait(sm, second, timeout=900)["PipelineExecutionStatus"] == "Succeeded"
    return {"first": first["PipelineExecutionArn"], "second": second}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The module's MLOPS_HOME with the executions above, and the UI serving it."""
    home = tmp_path_factory.mktemp("mlops-ui")
    data = sample_data.make_dataset(tmp_path_factory.mktemp("raw"), per_class=30, size=48, seed=3,
                                    with_bad_files=True)
    ui = None
    with local_state(home, endpoints=(ENDPOINT,), MLOPS_TUNER_SEED="0", MLOPS_MAX_WORKERS="2"):
        try:
            from pipelines import run

            arns = _runs(str(data))
            clients = run.local_clients()
            flag = f"s3://{definitions.BUCKET}/ui-test/{uuid.uuid4().hex}/flag.json"
            definitions.upsert(clients.sagemaker, "UiRetry", definitions.retry_definition(flag))
            retry_arn = definitions.start(clients.sagemaker, "UiRetry", description="<script>window.__xss=1</script>")
            assert definitions.wait(clients.sagemaker, retry_arn)["PipelineExecutionStatus"] == "Failed"
            definitions.upsert(clients.sagemaker, "UiStop", definitions.sleep_definition())
            ui = studio.Studio()
            yield {"home": home, "clients": clients, "url": ui.url, "flag": flag, "retry": retry_arn, **arns}
        finally:
            if ui is not None:
                ui.close()


@pytest.fixture(scope="module")
def browser(env):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = studio.launch(pw)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    external: list[str] = []
    tab = studio.offline_page(browser, external)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    tab.close()
    assert external == [], f"the page asked the network for {external}"
    assert errors == [], errors


def _open(page: Any, env: dict[str, Any], path: str) -> Any:
    answer = page.goto(env["url"] + path)
    assert answer is not None and answer.status == 200, (path, answer and answer.status)
    return answer


def _q(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def _steps(sm: Any, arn: str) -> dict[str, dict[str, Any]]:
    return {s["StepName"]: s for s in sm.list_pipeline_execution_steps(PipelineExecutionArn=arn)[
        "PipelineExecutionSteps"]}


def _jpeg(class_name: str, seed: int = 99) -> bytes:
    buffer = io.BytesIO()
    sample_data.draw_sample(class_name, 48, random.Random(seed)).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def _serving(sm: Any) -> str | None:
    from steps import deploy

    described = sm.describe_endpoint(EndpointName=ENDPOINT)
    assert described["EndpointStatus"] == "InService", described
    return deploy.package_of_config(sm, described["EndpointConfigName"])


def _invoke(env: dict[str, Any], body: bytes) -> dict[str, Any]:
    from pipelines import run

    answer = run.local_client("sagemaker-runtime").invoke_endpoint(EndpointName=ENDPOINT, Body=body,
                                                                   ContentType="image/jpeg", Accept="application/json")
    return json.loads(answer["Body"].read())


# ---------------------------------------------------------------------------------------------------- tests


def test_executions_list_and_the_dag_show_every_step_with_its_status(env, page):
    sm = env["clients"].sagemaker
    _open(page, env, "/executions")
    listed = page.eval_on_selector_all("#executions tbody tr td:first-child", "els => els.map(e => e.innerText)")
    for arn in (env["first"], env["second"], env["retry"]):
        assert arn.rsplit("/", 1)[-1] in listed
    studio.screenshot(page, "executions")

    _open(page, env, f"/execution?arn={_q(env['first'])}&step=TrainBestModel")
    nodes = dict(page.eval_on_selector_all("svg.dag a.node", "els => els.map(e => [e.dataset.step, "
                                                             "e.dataset.status])"))
    api = {name: s["StepStatus"] for name, s in _steps(sm, env["first"]).items()}
    assert {n: nodes[n] for n in api} == api  # every step that ran, with SageMaker's status
    assert set(nodes) == set(api) | {"AccuracyBelowThreshold"}
    assert nodes["AccuracyBelowThreshold"] == "NotTaken"  # the branch the condition did not take, greyed
    assert "if true" in page.inner_text("#graph") and "else" in page.inner_text("#graph")
    step = page.inner_text("#step")
    assert "DescribeTrainingJob" in step and "valid_accuracy=" in step  # job request and log tail
    studio.screenshot(page, "execution")
    log = urllib.request.urlopen(env["url"] + page.get_attribute("#full-log", "href")).read().decode()
    assert log.count("valid_accuracy=") >= 2

    _open(page, env, f"/execution?arn={_q(env['second'])}&step=TuneHyperparameters")
    assert "Cache hit from" in page.inner_text("#step")
    assert env["first"].rsplit("/", 1)[-1] in page.inner_text("#step")


def test_tuning_table_has_one_row_per_trial_and_marks_the_best(env, page):
    sm = env["clients"].sagemaker
    tuning = _steps(sm, env["first"])["TuneHyperparameters"]["Metadata"]["TuningJob"]["Arn"].rsplit("/", 1)[-1]
    trials = sm.list_training_jobs_for_hyper_parameter_tuning_job(HyperParameterTuningJobName=tuning)[
        "TrainingJobSummaries"]
    best = sm.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=tuning)["BestTrainingJob"]
    _open(page, env, f"/tuning?arn={_q(env['first'])}&step=TuneHyperparameters")
    rows = page.eval_on_selector_all("#trials tbody tr", "els => els.map(e => e.dataset.job)")
    assert sorted(rows) == sorted(t["TrainingJobName"] for t in trials)
    assert page.eval_on_selector_all("#trials tr.best", "els => els.map(e => e.dataset.job)") == [
        best["TrainingJobName"]]
    page.click("#trials th:nth-child(4)")  # sort by objective, twice: descending puts the best first
    page.click("#trials th:nth-child(4)")
    assert page.eval_on_selector("#trials tbody tr", "e => e.dataset.job") == best["TrainingJobName"]
    plots = page.eval_on_selector_all("figure.plot svg", "els => els.length")
    assert plots == 2 and page.locator("circle.mark").count() == 1  # objective vs trial (best marked), curves
    studio.screenshot(page, "tuning")


def test_training_page_shows_rules_profiler_report_and_curves(env, page):
    sm = env["clients"].sagemaker
    job = _steps(sm, env["first"])["TrainBestModel"]["Metadata"]["TrainingJob"]["Arn"].rsplit("/", 1)[-1]
    described = sm.describe_training_job(TrainingJobName=job)
    rules = described["DebugRuleEvaluationStatuses"] + described["ProfilerRuleEvaluationStatuses"]
    _open(page, env, f"/training?arn={_q(env['first'])}&step=TrainBestModel")
    shown = page.eval_on_selector_all("#rules tbody tr", "els => els.map(e => [e.children[1].innerText, "
                                                         "e.children[2].innerText])")
    assert sorted(shown) == sorted([r["RuleConfigurationName"], r["RuleEvaluationStatus"]] for r in rules)
    assert page.locator("figure.plot polyline").count() >= 2  # train/valid loss and accuracy per epoch
    frame = page.frame_locator("#profiler-report")
    assert "Profiler report" in frame.locator("h1").inner_text()
    studio.screenshot(page, "training", settle_ms=800)


def test_evaluation_page_shows_metrics_confusion_matrix_and_per_class(env, page):
    sm = env["clients"].sagemaker
    job = _steps(sm, env["first"])["EvaluateModel"]["Metadata"]["ProcessingJob"]["Arn"].rsplit("/", 1)[-1]
    output = sm.describe_processing_job(ProcessingJobName=job)["ProcessingOutputConfig"]["Outputs"][0]
    bucket, key = output["S3Output"]["S3Uri"][len("s3://"):].split("/", 1)
    report = json.loads(env["clients"].s3.get_object(Bucket=bucket, Key=f"{key}/evaluation.json")["Body"].read())
    metrics = report["multiclass_classification_metrics"]
    _open(page, env, f"/evaluation?arn={_q(env['first'])}&step=EvaluateModel")
    table = dict(page.eval_on_selector_all("#metrics tbody tr", "els => els.map(e => [e.children[0].innerText, "
                                                                "e.children[1].innerText])"))
    assert table["accuracy"] == f"{metrics['accuracy']['value']:.4f}"
    classes = list(metrics["confusion_matrix"])
    assert page.locator("svg.heatmap rect.cell").count() == len(classes) ** 2
    assert page.locator("#per-class tbody tr").count() == len(classes)
    wrong = report["dataset"]["misclassified"]
    assert f"{len(wrong)} misclassified test image(s)" in page.inner_text("#misclassified")
    assert page.locator("#misclassified img").count() == min(60, len(wrong))
    studio.screenshot(page, "evaluation")


def _decide(page: Any, verb: str, comment: str) -> str:
    page.fill("#comment", comment)
    with page.expect_navigation():
        page.click(f"#{verb}")
    page.wait_for_function("() => ['ok', 'failed', 'timeout'].includes("
                           "(document.querySelector('#deploy') || {dataset: {}}).dataset.state)", timeout=240_000)
    text = page.inner_text("#deploy")
    assert page.get_attribute("#deploy", "data-state") == "ok", text
    return text


def test_approve_deploys_the_version_and_reject_rolls_back(env, page):
    sm = env["clients"].sagemaker
    versions = sm.list_model_packages(ModelPackageGroupName="ImageClassifierModels", SortBy="CreationTime",
                                      SortOrder="Ascending")["ModelPackageSummaryList"]
    v1, v2 = (v["ModelPackageArn"] for v in versions)
    assert [v["ModelApprovalStatus"] for v in versions] == ["Approved", "PendingManualApproval"]
    assert _serving(sm) == v1
    _open(page, env, "/models")
    assert page.locator("table.versions tbody tr").count() == 2
    studio.screenshot(page, "models")
    page.check(f"input[value='{v1}']")
    page.check(f"input[value='{v2}']")
    page.click("#compare")
    assert "accuracy" in page.inner_text("#compare-table")
    studio.screenshot(page, "compare")

    _open(page, env, f"/models/version?arn={_q(v2)}")
    text = _decide(page, "approve", "approved from the UI test")
    assert "ImageClassifierModels/2" in text
    described = sm.describe_model_package(ModelPackageName=v2)
    assert (described["ModelApprovalStatus"], described["ApprovalDescription"]) == ("Approved",
                                                                                    "approved from the UI test")
    assert _serving(sm) == v2
    assert _invoke(env, _jpeg("circle"))["class_name"] in sample_data.CLASSES
    studio.screenshot(page, "model-version")

    page.reload()
    assert page.is_disabled("#approve")
    text = _decide(page, "reject", "regression <b>found</b>")
    assert "ImageClassifierModels/1" in text  # rolled back to the newest still-Approved version
    assert sm.describe_model_package(ModelPackageName=v2)["ModelApprovalStatus"] == "Rejected"
    assert _serving(sm) == v1
    assert _invoke(env, _jpeg("square"))["class_name"] in sample_data.CLASSES
    page.reload()
    assert "regression <b>found</b>" in page.inner_text("table.kv")  # shown as text, not markup


def test_try_it_shows_the_predicted_class(env, page):
    body = _jpeg("triangle", seed=5)
    expected = _invoke(env, body)["class_name"]
    _open(page, env, "/endpoints")
    box = f"#tryit-{ENDPOINT}"
    page.set_input_files(f"{box} input[type=file]", {"name": "triangle.jpg", "mimeType": "image/jpeg",
                                                      "buffer": body})
    page.wait_for_function(f"() => document.querySelector('{box}').dataset.predicted", timeout=60_000)
    assert page.get_attribute(box, "data-predicted") == expected
    assert f"Predicted class: {expected}" in page.inner_text(f"{box} .prediction")
    page.reload()
    assert "/invocations" in page.inner_text(f"#endpoint-{ENDPOINT}")  # recent invocations, from its log
    page.set_input_files(f"{box} input[type=file]", {"name": "triangle.jpg", "mimeType": "image/jpeg",
                                                      "buffer": body})
    page.wait_for_function(f"() => document.querySelector('{box}').dataset.predicted", timeout=60_000)
    studio.screenshot(page, "endpoints")


def test_a_failed_execution_shows_its_reason_and_retry_runs_it_again(env, page):
    sm, s3 = env["clients"].sagemaker, env["clients"].s3
    _open(page, env, f"/execution?arn={_q(env['retry'])}")
    assert "flag.json" in page.inner_text("#failure")
    assert page.evaluate("() => window.__xss") is None  # the description was escaped, not run
    assert "<script>" in page.inner_text("main")
    studio.screenshot(page, "failed-execution")
    bucket, key = env["flag"][len("s3://"):].split("/", 1)
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps({"ready": 1}).encode())
    with page.expect_navigation():
        page.click("#retry")
    assert "RetryPipelineExecution" in page.inner_text(".flash")
    page.wait_for_selector("svg.dag a.node[data-step='Done'][data-status='Succeeded']", timeout=120_000)
    assert page.get_attribute("svg.dag a.node[data-step='NotReady']", "data-status") == "NotTaken"
    assert definitions.wait(sm, env["retry"])["PipelineExecutionStatus"] == "Succeeded"
    assert _steps(sm, env["retry"])["Ready"]["AttemptCount"] == 2


def test_stop_stops_a_running_execution(env, page):
    sm = env["clients"].sagemaker
    arn = definitions.start(sm, "UiStop")
    _open(page, env, f"/execution?arn={_q(arn)}")
    page.wait_for_selector("svg.dag a.node[data-step='Sleep'][data-status='Executing']", timeout=120_000)
    with page.expect_navigation():
        page.click("#stop")
    assert "StopPipelineExecution" in page.inner_text(".flash")
    assert definitions.wait(sm, arn, timeout=120)["PipelineExecutionStatus"] == "Stopped"
    page.wait_for_selector("svg.dag a.node[data-step='Sleep'][data-status='Stopped']", timeout=30_000)


def _status(env: dict[str, Any], path: str, *, data: bytes | None = None, headers: dict[str, str] | None = None
            ) -> tuple[int, str]:
    request = urllib.request.Request(env["url"] + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_bad_requests_get_a_4xx_with_a_reason_and_the_server_keeps_serving(env):
    missing = env["first"].rsplit("/", 1)[0] + "/doesnotexist"
    cases = [("/execution", None, {}, 400, "missing parameter"),
             ("/nope", None, {}, 404, "no page"),
             (f"/execution?arn={_q(missing)}", None, {}, 404, "does not exist"),
             ("/models/compare?v=one", None, {}, 400, "exactly two"),
             ("/artifact?uri=http://example.com/x", None, {}, 400, "s3://"),
             ("/executions?page=zero", None, {}, 400, "integer"),
             ("/actions/stop", b"arn=x", {"Content-Type": "application/x-www-form-urlencoded"}, 403, "token"),
             ("/executions", None, {"Host": "evil.example:80"}, 403, "not this server"),
             ("/api/invoke?endpoint=nope", b"x", {}, 403, "token")]
    for path, data, headers, status, reason in cases:
        got, text = _status(env, path, data=data, headers=headers)
        assert (got, reason in text) == (status, True), (path, got, text[:300])
    assert _status(env, "/executions")[0] == 200
