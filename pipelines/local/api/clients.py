"""boto3 clients of the local AWS service, for the project's own code (CLI, engine, demo): the same clients a user
gets with ``AWS_ENDPOINT_URL`` set, built with the service's credentials and region."""

from __future__ import annotations

from typing import Any

from pipelines.local.api import server


def session() -> Any:
    """A boto3 Session with the local service's credentials and region."""
    import boto3

    env = server.client_environment("")
    return boto3.Session(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"])


def client(service: str, url: str | None = None, *, config: Any = None) -> Any:
    """A boto3 client of ``service`` at ``url`` (default: this MLOPS_HOME's service, started on demand)."""
    return session().client(service, endpoint_url=url or server.up(), config=config)
