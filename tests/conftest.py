"""Suite-wide settings for a small shared CPU."""

from __future__ import annotations

import os

import pytest
import torch
from support.local_state import local_state

# Subprocesses (trainer, evaluation, endpoints) inherit this: on 2 cores OpenMP threads spin against each
# other and make small CPU jobs several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The v2 SDK is what this project targets on purpose (the sagemaker.workflow API); as in the Makefile.
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")


#: Test files whose tests are independent of each other and long. Under ``--dist loadfile`` (``make test``) every
#: other file stays whole on one worker, in order, so that its module fixtures (some run whole pipelines) run once;
#: the tests of these are handed out one by one, each worker starting the file's module fixtures once (here the
#: cheap ``local_aws`` service, and a venv that one test uses). (``--dist loadgroup`` with ``xdist_group`` marks would
#: say the same, but pytest-xdist 3.8 marks the group by assigning ``item._nodeid``, which pytest 9 no longer reads.)
SPREAD_TESTS_OF = {"tests/conformance/test_conformance.py"}


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own, which answers for every --dist
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, but the tests of :data:`SPREAD_TESTS_OF` are work units of their own."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesButSpread(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if path in SPREAD_TESTS_OF else path

    return FilesButSpread(config, log)


@pytest.fixture(autouse=True, scope="session")
def _own_default_mlops_home(tmp_path_factory):
    """A default MLOPS_HOME of this session's own (per xdist worker: its base temp is the worker's), so that a test
    or a subprocess that names none writes neither into the checkout's ``.mlops`` nor into another worker's state.
    Tests and module fixtures that need a fresh one still set their own on top of it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLOPS_HOME", str(tmp_path_factory.mktemp("mlops-default")))
        yield


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread in the test process too."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True, scope="session")
def _stop_local_services_left_running(tmp_path_factory):
    """After the session, stop every local AWS service (and the runners/Lambda processes it started) whose
    MLOPS_HOME is one of this session's temporary directories: commands such as ``models approve`` or ``start``
    start the service on demand, as they do for a user, and it outlives them by design."""
    yield
    import signal

    import psutil

    base = str(tmp_path_factory.getbasetemp())
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "pipelines.local.api.server" in " ".join(proc.info["cmdline"] or []) and \
                    proc.environ().get("MLOPS_HOME", "").startswith(base):
                proc.send_signal(signal.SIGTERM)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


@pytest.fixture(autouse=True)
def _fresh_boto3_default_session():
    """Each test gets boto3's default session anew, as a fresh process would: botocore caches the credentials it
    resolved first, so a test that set AWS_* variables would otherwise sign later tests' requests with them."""
    import boto3

    boto3.DEFAULT_SESSION = None
    yield
    boto3.DEFAULT_SESSION = None


@pytest.fixture(scope="module")
def local_aws(tmp_path_factory):
    """``(url, MLOPS_HOME)`` of a local AWS service (pipelines/local/api) started for the requesting module in a
    fresh MLOPS_HOME, stopped after it."""
    from pipelines.local.api import server

    home = tmp_path_factory.mktemp("mlops")
    with local_state(home):
        yield server.up(), home


@pytest.fixture
def local_aws_env(local_aws, monkeypatch):
    """``(url, MLOPS_HOME)`` of the module's local service, with MLOPS_HOME and the clients' environment
    (``AWS_ENDPOINT_URL``, the local credentials and region) set in ``os.environ`` for this test: boto3, the
    SageMaker SDK and an ``aws`` subprocess started with ``os.environ`` all talk to it."""
    from pipelines.local.api import server

    url, home = local_aws
    monkeypatch.setenv("MLOPS_HOME", str(home))
    for name, value in server.client_environment(url).items():
        monkeypatch.setenv(name, value)
    return url, home
