"""buildspec.yml: valid CodeBuild YAML whose commands work: the pipeline commands run in-process against moto
with CodeBuild's environment, and the fast test subset selects tests."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml
from moto import mock_aws

from pipelines import run

ROOT = Path(__file__).resolve().parents[1]
REGION = "eu-central-1"
CODEBUILD_ENV = {"SAGEMAKER_PIPELINE_ROLE_ARN": "arn:aws:iam::123456789012:role/service-role/PipelineRole",
                 "ARTIFACT_BUCKET": "sagemaker-project-p-42", "SAGEMAKER_PROJECT_NAME": "dogs",
                 "SAGEMAKER_PROJECT_ID": "p-42", "AWS_REGION": REGION}

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def buildspec() -> dict:
    return yaml.safe_load((ROOT / "buildspec.yml").read_text())


def commands(buildspec: dict) -> list[str]:
    return [c for phase in ("install", "pre_build", "build", "post_build")
            for c in buildspec["phases"].get(phase, {}).get("commands", [])]


def pipeline_commands(buildspec: dict) -> list[list[str]]:
    """The ``python -m pipelines.run`` invocations, env vars expanded, as argv lists after the module name."""
    found = []
    for command in commands(buildspec):
        argv = shlex.split(os.path.expandvars(command))
        if argv[:3] == ["python", "-m", "pipelines.run"]:
            found.append(argv[3:])
    return found


def test_structure(buildspec):
    assert str(buildspec["version"]) == "0.2"
    assert buildspec["phases"]["install"]["runtime-versions"]["python"] == "3.11"
    all_commands = commands(buildspec)
    assert any("pip install" in c and "-e" in c for c in all_commands)
    assert any(shlex.split(c)[:4] == ["python", "-m", "pytest", "-m"] and "fast" in c for c in all_commands)
    verbs = [argv[argv.index("--target") + 2] for argv in pipeline_commands(buildspec)]
    assert verbs == ["upsert", "start"]


def test_pipeline_commands_run_against_moto(buildspec, monkeypatch, tmp_path, capsys):
    for key, value in {**CODEBUILD_ENV, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                       "MLOPS_HOME": str(tmp_path / "mlops")}.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        boto3.client("s3", region_name=REGION).create_bucket(
            Bucket=CODEBUILD_ENV["ARTIFACT_BUCKET"], CreateBucketConfiguration={"LocationConstraint": REGION})
        for argv in pipeline_commands(buildspec):
            assert run.main(argv) == 0, argv
        sm = boto3.client("sagemaker", region_name=REGION)
        executions = sm.list_pipeline_executions(PipelineName="dogs-p-42")["PipelineExecutionSummaries"]
        assert len(executions) == 1
        definition = json.loads(sm.describe_pipeline(PipelineName="dogs-p-42")["PipelineDefinition"])
        assert definition["Parameters"]
    assert "arn:aws:sagemaker:" in capsys.readouterr().out


def test_fast_marker_selects_tests():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "fast", "-p",
                          "no:cacheprovider", "tests/test_cli_sagemaker.py", "tests/test_buildspec.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    selected = [line for line in out.stdout.splitlines() if "::" in line]
    assert len(selected) > 5
