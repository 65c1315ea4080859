"""Suite-wide settings for a small shared CPU."""

from __future__ import annotations

import os

import pytest
import torch

# Subprocesses (trainer, evaluation, endpoints) inherit this: on 2 cores OpenMP threads spin against each
# other and make small CPU jobs several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The v2 SDK is what this project targets on purpose (the sagemaker.workflow API); as in the Makefile.
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread in the test process too."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _fresh_boto3_default_session():
    """Each test gets boto3's default session anew, as a fresh process would: botocore caches the credentials it
    resolved first, so a test that set AWS_* variables would otherwise sign later tests' requests with them."""
    import boto3

    boto3.DEFAULT_SESSION = None
    yield
    boto3.DEFAULT_SESSION = None
