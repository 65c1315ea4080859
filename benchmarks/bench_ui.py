"""Local Studio page load times on a big store: 100 pipeline executions and a registry group of 200 versions.

In a fresh ``MLOPS_HOME`` (a temporary directory unless ``--home``), through the local AWS service as users fill it:
``--executions`` executions of a one-condition pipeline (``tests/ui_support/definitions.trivial_definition``; every
third one fails, with its reason) and ``--versions`` ``CreateModelPackage`` calls, each with its own
``evaluation.json`` in S3 (``ModelMetrics``), as the pipeline's RegisterModel step makes them. Then the UI
(``pipelines.local.ui.server``, in this process on a free port) is asked for each page:

- ``cold``: the first request (the reader's cache of finished executions/evaluations empty);
- ``warm``: the median of ``--repeat`` more;
- ``browser`` (when /usr/bin/chromium and Playwright are there): headless Chromium, navigation to the ``load``
  event, median of ``--repeat``.

Baseline in the same run: the SageMaker API calls each list page needs at least (all executions of the pipeline,
paginated; all versions of the group), timed through the same boto3 clients; ``ratios`` = warm page / that floor.

    .venv/bin/python benchmarks/bench_ui.py [--executions 100] [--versions 200] [--repeat 5] \
        [--out benchmarks/results/ui.json]

About 2 minutes on 2 CPUs (filling the store is most of it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import report_file

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

logger = logging.getLogger("bench_ui")
PIPELINE = "UiBenchPipeline"
GROUP = "UiBenchModels"


def _fill_executions(sm: Any, count: int) -> list[str]:
    from ui_support import definitions

    definitions.upsert(sm, PIPELINE, definitions.trivial_definition())
    arns = [definitions.start(sm, PIPELINE, Score=0.2 if i % 3 == 0 else 0.9) for i in range(count)]
    for arn in arns:
        definitions.wait(sm, arn, timeout=600)
    return arns


def _fill_registry(clients: Any, count: int) -> list[str]:
    sm, s3 = clients.sagemaker, clients.s3
    try:
        s3.create_bucket(Bucket="mlops-local")
    except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        pass
    sm.create_model_package_group(ModelPackageGroupName=GROUP, ModelPackageGroupDescription="bench_ui")
    arns = []
    for i in range(count):
        key = f"bench-ui/evaluation/{i}/evaluation.json"
        accuracy = 0.5 + 0.4 * i / max(1, count - 1)
        s3.put_object(Bucket="mlops-local", Key=key, Body=json.dumps({"multiclass_classification_metrics": {
            "accuracy": {"value": accuracy, "standard_deviation": 0.01},
            "top_5_accuracy": {"value": 1.0, "standard_deviation": 0.0},
            "macro_f1": {"value": accuracy - 0.03, "standard_deviation": 0.02}}}).encode())
        arns.append(sm.create_model_package(
            ModelPackageGroupName=GROUP, ModelPackageDescription=f"bench version {i + 1}",
            ModelApprovalStatus="Approved" if i % 10 == 0 else "PendingManualApproval",
            InferenceSpecification={"Containers": [{
                "Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-inference:2.5-cpu-py311",
                "ModelDataUrl": f"s3://mlops-local/bench-ui/model/{i}/model.tar.gz",
                "Environment": {"SAGEMAKER_PROGRAM": "inference.py"}}],
                "SupportedContentTypes": ["image/jpeg"], "SupportedResponseMIMETypes": ["application/json"]},
            ModelMetrics={"ModelQuality": {"Statistics": {
                "ContentType": "application/json", "S3Uri": f"s3://mlops-local/{key}"}}},
        )["ModelPackageArn"])
    return arns


def _timed(call: Callable[[], Any], repeat: int) -> dict[str, float]:
    start = time.perf_counter()
    call()
    cold = time.perf_counter() - start
    warm = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        warm.append(time.perf_counter() - start)
    return {"cold_ms": round(cold * 1000, 1), "warm_ms": round(statistics.median(warm) * 1000, 1)}


def _get(url: str) -> Callable[[], int]:
    def fetch() -> int:
        with urllib.request.urlopen(url, timeout=120) as answer:
            body = answer.read()
            if answer.status != 200:
                raise RuntimeError(f"{url}: {answer.status}")
            return len(body)

    return fetch


def _floors(clients: Any, repeat: int) -> dict[str, dict[str, float]]:
    sm = clients.sagemaker

    def executions() -> int:
        pages = sm.get_paginator("list_pipeline_executions").paginate(PipelineName=PIPELINE)
        return sum(len(p["PipelineExecutionSummaries"]) for p in pages)

    def versions() -> int:
        pages = sm.get_paginator("list_model_packages").paginate(ModelPackageGroupName=GROUP)
        return sum(len(p["ModelPackageSummaryList"]) for p in pages)

    return {"executions": _timed(executions, repeat), "models": _timed(versions, repeat)}


def _pages(base: str, executions: list[str], versions: list[str]) -> dict[str, str]:
    return {"executions": f"{base}/executions?pipeline={PIPELINE}",
            "executions_page_4": f"{base}/executions?pipeline={PIPELINE}&page=4",
            "execution_failed": f"{base}/execution?arn={quote(executions[0], safe='')}",
            "models": f"{base}/models", "models_page_8": f"{base}/models?page=8",
            "model_version": f"{base}/models/version?arn={quote(versions[-1], safe='')}",
            "compare": f"{base}/models/compare?v={quote(versions[0], safe='')}&v={quote(versions[-1], safe='')}",
            "endpoints": f"{base}/endpoints"}


def _browser(pages: dict[str, str], repeat: int) -> dict[str, float] | str:
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "playwright is not installed"
    if not chromium.exists():
        return "/usr/bin/chromium is missing"
    out = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for name in ("executions", "models", "model_version"):
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                page.goto(pages[name], wait_until="load")
                times.append(time.perf_counter() - start)
            out[f"{name}_load_ms"] = round(statistics.median(times) * 1000, 1)
        browser.close()
    return out


def _serve() -> tuple[Any, str]:
    from pipelines.local.ui import server as ui_server
    from pipelines.local.ui.reader import Reader
    from pipelines.run import local_clients

    server = ui_server.make_server(0, Reader(local_clients()))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    return server, server.url


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.local.api import server as api_server
    from pipelines.run import local_clients

    clients = local_clients()
    start = time.perf_counter()
    executions = _fill_executions(clients.sagemaker, args.executions)
    versions = _fill_registry(clients, args.versions)
    fill_s = time.perf_counter() - start
    logger.info("store filled in %.1f s: %d executions, %d versions", fill_s, len(executions), len(versions))
    ui, base = _serve()
    try:
        pages = _pages(base, executions, versions)
        results = {name: _timed(_get(url), args.repeat) for name, url in pages.items()}
        for name, figures in results.items():
            logger.info("%-18s cold %7.1f ms  warm %7.1f ms", name, figures["cold_ms"], figures["warm_ms"])
        floors = _floors(clients, args.repeat)
        browser = _browser(pages, args.repeat) if not args.no_browser else "--no-browser"
    finally:
        ui.shutdown()
        ui.server_close()
        api_server.down()
    ratios = {f"{name}_warm_vs_api_floor": round(results[name]["warm_ms"] / max(0.1, floors[name]["warm_ms"]), 2)
              for name in ("executions", "models")}
    return {"executions": len(executions), "versions": len(versions), "fill_s": round(fill_s, 1),
            "pages": results, "api_floor": floors, "browser": browser, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--executions", type=int, default=100)
    parser.add_argument("--versions", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--home", help="MLOPS_HOME to fill (default: a new temporary directory)")
    parser.add_argument("--no-browser", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ui.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="bench-ui-") as tmp:
        os.environ["MLOPS_HOME"] = args.home or tmp
        result = measure(args)
    result.update({"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                   "command": " ".join(["benchmarks/bench_ui.py", *(argv or sys.argv[1:])])})
    print(json.dumps(result, indent=2))
    report_file.write(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
