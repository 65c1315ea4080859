"""The one module that builds ARNs (``arn:<partition>:<service>:<region>:<account>:<resource>``).

The partition comes from botocore's own partition data (``endpoints.json``), so ``cn-north-1`` gives ``aws-cn``,
``us-gov-west-1`` gives ``aws-us-gov`` and ``us-east-1`` gives ``aws`` -- nobody writes ``arn:aws:`` by hand.
Building an ARN makes no AWS call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import botocore.exceptions
import botocore.session


class UnknownRegionError(ValueError):
    """botocore knows no partition for this region name."""


class ArnParts(NamedTuple):
    partition: str
    service: str
    region: str
    account: str
    resource: str


@functools.lru_cache(maxsize=1)
def _botocore_session() -> botocore.session.Session:
    return botocore.session.get_session()


@functools.lru_cache(maxsize=64)
def partition(region: str) -> str:
    """The AWS partition of ``region`` (``aws``, ``aws-cn``, ``aws-us-gov``, ``aws-iso``...), per botocore."""
    try:
        return _botocore_session().get_partition_for_region(region)
    except botocore.exceptions.UnknownRegionError:
        raise UnknownRegionError(f"unknown AWS region {region!r}: botocore has no partition for it") from None


def arn(service: str, region: str, account: str, resource: str, *, global_service: bool = False) -> str:
    """``arn:<partition of region>:<service>:<region>:<account>:<resource>``.

    ``global_service`` (IAM...): the ARN's region field stays empty; ``region`` still picks the partition.
    """
    return f"arn:{partition(region)}:{service}:{'' if global_service else region}:{account}:{resource}"


def lambda_function_arn(region: str, account: str, name: str) -> str:
    return arn("lambda", region, account, f"function:{name}")


def sagemaker_arn(region: str, account: str, resource_type: str, name: str) -> str:
    """A SageMaker resource ARN, e.g. ``resource_type`` ``training-job``, ``pipeline``, ``model-package``."""
    return arn("sagemaker", region, account, f"{resource_type}/{name}")


def iam_role_arn(region: str, account: str, name: str) -> str:
    """An IAM role ARN in the partition of ``region`` (IAM ARNs carry no region)."""
    return arn("iam", region, account, f"role/{name}", global_service=True)


def parse(value: str) -> ArnParts:
    """Split an ARN into its parts; ``ValueError`` if it is not one."""
    parts = value.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or not parts[1] or not parts[2]:
        raise ValueError(f"not an ARN: {value!r}")
    return ArnParts(*parts[1:])
