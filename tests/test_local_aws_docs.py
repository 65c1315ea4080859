"""docs/LOCAL_AWS.md lists exactly what the local AWS service serves (taken from the services' own dispatch tables)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines.local.api import events, lambda_, sagemaker, server

pytestmark = pytest.mark.fast

DOC = (Path(__file__).resolve().parents[1] / "docs" / "LOCAL_AWS.md").read_text()


def _row(service: str) -> set[str]:
    line = next(line for line in DOC.splitlines() if line.startswith(f"| {service} ("))
    return set(re.findall(r"\b[A-Z][A-Za-z]+\b", line.split("|")[2]))


@pytest.mark.parametrize(("service", "served"), [
    ("SageMaker", sagemaker.served_operations()),
    ("Lambda", frozenset(lambda_.OPERATIONS)),
    ("EventBridge", frozenset(events.OPERATIONS)),
])
def test_every_served_operation_is_documented(service, served):
    listed = _row(service)
    assert not set(served) - listed, f"served but not in docs/LOCAL_AWS.md: {sorted(set(served) - listed)}"


def test_every_routed_service_is_documented():
    for name in server.SERVICES:
        assert {"s3": "S3 (", "sagemaker": "SageMaker (", "lambda": "Lambda (", "events": "EventBridge (",
                "sts": "STS ("}[name] in DOC
