"""The local Profiler report (pipelines/local/debugger/profiler_report.py) and the ProfilerReport rule.

The report is rendered in headless Chromium (Playwright) to check that its plots are really there and visible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.local.debugger import hooks as debugger
from pipelines.local.debugger.profiler_report import load_profile, report_path, write_profiler_report

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def _write_side_outputs(job_dir: Path, data_time_s: float, compute_time_s: float, workers: int = 0) -> Path:
    """CONTRACTS §6 side outputs of a 3-epoch CPU run under <job_dir>/output/data."""
    out = job_dir / "output" / "data"
    (out / "profiler").mkdir(parents=True)
    (out / "metrics").mkdir(parents=True)
    t0 = 1_700_000_000.0
    system = [
        {"timestamp": t0 + 0.5 * i, "cpu_percent": 40 + (i % 7) * 5, "memory_percent": 30 + i * 0.1,
         "rss_mb": 500 + i, "gpu_utilization": None, "gpu_memory_mb": None}
        for i in range(40)
    ]
    steps = [
        {"timestamp": t0 + i * 0.2, "epoch": 1 + i // 6, "step": i % 6, "mode": "train" if i % 6 < 4 else "eval",
         "data_time_s": data_time_s, "compute_time_s": compute_time_s, "batch_size": 8}
        for i in range(18)
    ]
    epochs = [
        {"epoch": e, "train_loss": 1.2 / e, "train_accuracy": 0.4 + 0.15 * e, "valid_loss": 1.3 / e,
         "valid_accuracy": 0.35 + 0.15 * e, "lr": 0.001, "epoch_time_s": 2.0}
        for e in (1, 2, 3)
    ]
    (out / "profiler" / "system_metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in system) + "\n{not json\n"  # one torn line, as after a crash
    )
    (out / "profiler" / "step_timings.jsonl").write_text("\n".join(json.dumps(r) for r in steps) + "\n")
    (out / "metrics" / "epochs.jsonl").write_text("\n".join(json.dumps(r) for r in epochs) + "\n")
    (out / "profiler" / "summary.json").write_text(json.dumps(
        {"device": "cpu", "workers": workers, "train": {"samples_per_s": 123.4, "data_time_fraction": 0.5}}
    ))
    return out


def _profiler_request() -> dict:
    return {
        "ProfilerConfig": {"ProfilingIntervalInMilliseconds": 500},
        "ProfilerRuleConfigurations": [
            {"RuleConfigurationName": "ProfilerReport", "RuleParameters": {"rule_to_invoke": "ProfilerReport"}},
            {"RuleConfigurationName": "LowGPUUtilization", "RuleParameters": {"rule_to_invoke": "LowGPUUtilization"}},
        ],
    }


def _render(path: Path) -> dict:
    """Open the report in headless Chromium with the network blocked; measure its plots and headings."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (apt-get install chromium, or `make browser`)")
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.route("http*://**", lambda route: route.abort())  # self-contained: no network needed
            page.goto(path.as_uri())
            sizes = page.eval_on_selector_all(
                "figure.plot svg",
                "els => els.map(e => {const r = e.getBoundingClientRect(); return [r.width, r.height]})",
            )
            headings = page.eval_on_selector_all("h1, h2", "els => els.map(e => e.textContent.trim())")
            advice = page.eval_on_selector_all("li.advice", "els => els.map(e => e.innerText)")
            title = page.title()
        finally:
            browser.close()
    return {"sizes": sizes, "headings": headings, "advice": advice, "title": title,
            "external": [u for u in requests if not u.startswith("file:")]}


@pytest.mark.fast
def test_report_flags_data_loading_bottleneck_and_renders_plots(tmp_path: Path) -> None:
    job = tmp_path / "job"
    _write_side_outputs(job, data_time_s=0.06, compute_time_s=0.04, workers=0)
    by_kind = debugger.evaluate_rules_by_kind(_profiler_request(), job)
    report_status, gpu_status = by_kind["ProfilerRuleEvaluationStatuses"]
    assert report_status["RuleConfigurationName"] == "ProfilerReport"
    assert report_status["RuleEvaluationStatus"] == "IssuesFound", report_status
    assert "raise --workers (currently 0)" in report_status["StatusDetails"]
    assert gpu_status["RuleEvaluationStatus"] == "NoIssuesFound" and "No GPU" in gpu_status["StatusDetails"]

    path = report_path(job)
    assert path.is_file() and str(path) in report_status["StatusDetails"]
    text = path.read_text()
    assert "Data loading takes 60% of step time" in text
    assert "123.4 (samples_per_s)" in text  # throughput from summary.json
    assert "skipped 1 malformed line" in text

    page = _render(path)
    assert page["external"] == []
    assert len(page["sizes"]) == 3, page  # system utilisation, step breakdown, epoch curves
    assert all(w > 100 and h > 100 for w, h in page["sizes"]), page["sizes"]
    for heading in ("Overview", "Recommendations", "Rule findings", "System utilisation",
                    "Step time: data loading vs compute", "Training curves"):
        assert heading in page["headings"], page["headings"]
    assert any("raise --workers" in a for a in page["advice"]), page["advice"]


@pytest.mark.fast
def test_report_without_bottleneck_and_without_data(tmp_path: Path) -> None:
    job = tmp_path / "job"
    _write_side_outputs(job, data_time_s=0.005, compute_time_s=0.05, workers=4)
    rule_results = [{"RuleConfigurationName": "LossNotDecreasing", "RuleEvaluationStatus": "NoIssuesFound",
                     "StatusDetails": "fine", "LastModifiedTime": "2024-01-01T00:00:00+00:00"}]
    statuses = debugger.evaluate_rules(_profiler_request(), job)
    assert statuses[0]["RuleEvaluationStatus"] == "NoIssuesFound", statuses[0]
    out = write_profiler_report(job, rule_results, tmp_path / "custom" / "report.html")
    assert out == tmp_path / "custom" / "report.html"
    assert "LossNotDecreasing" in out.read_text() and "No issues found" in out.read_text()

    empty = tmp_path / "empty-job"
    empty.mkdir()
    assert load_profile(empty).problems  # says why there is nothing
    html = write_profiler_report(empty, []).read_text()
    assert html.count("No data (") == 3


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "training" / "train.py").exists(), reason="training/train.py not present")
def test_report_and_rules_for_a_real_training_job(tmp_path: Path) -> None:
    """training/train.py run like the local engine runs it: hook config + env from write_hook_config."""
    from pipelines.sample_data import make_dataset

    data = make_dataset(tmp_path / "data", per_class=6, size=32, classes=["circle", "square"],
                        splits={"train": 0.67, "validation": 0.33})
    job = tmp_path / "job"
    request = {
        "DebugHookConfig": {
            "HookParameters": {"train.save_interval": "1", "eval.save_interval": "1"},
            "CollectionConfigurations": [{"CollectionName": "losses"}],
        },
        "DebugRuleConfigurations": [
            {"RuleConfigurationName": "LossNotDecreasing",
             "RuleParameters": {"rule_to_invoke": "LossNotDecreasing", "mode": "TRAIN", "num_steps": "1"}},
        ],
        **_profiler_request(),
    }
    env = {**os.environ, **debugger.write_hook_config(request, job), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "training" / "train.py"),
           "--train", str(data / "train"), "--validation", str(data / "validation"),
           "--model-dir", str(job / "model"), "--output-data-dir", str(job / "output" / "data"),
           "--checkpoint-dir", str(job / "checkpoints"), "--num-gpus", "0", "--epochs", "2",
           "--image-size", "32", "--batch-size", "4", "--workers", "0", "--lr", "50", "--optimizer", "sgd",
           "--lr-scheduler", "none", "--system-monitor-interval-ms", "100"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (job / "output" / "tensors" / "index").is_dir()

    statuses = {s["RuleConfigurationName"]: s for s in debugger.evaluate_rules(request, job)}
    # lr=50 with plain SGD blows the loss up: the rule must see it
    assert statuses["LossNotDecreasing"]["RuleEvaluationStatus"] == "IssuesFound", statuses
    assert statuses["LowGPUUtilization"]["RuleEvaluationStatus"] == "NoIssuesFound"
    assert str(report_path(job)) in statuses["ProfilerReport"]["StatusDetails"]
    assert "LossNotDecreasing" in report_path(job).read_text()  # the report lists the Debugger findings too

    page = _render(report_path(job))
    assert len(page["sizes"]) == 3 and all(w > 100 and h > 100 for w, h in page["sizes"]), page
    assert page["external"] == []
