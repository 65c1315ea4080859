"""The local AWS service with one change for crash tests: a deploy (``endpoints.deploy``) writes
``$MLOPS_HOME/deploy-started`` and then hangs, so a test can ``kill -9`` the service -- the process that deploys --
at that point. Run as ``python tests/support/hanging_deploy_service.py pipelines.local.api.server``: the last
argument names the service on the command line, where ``server.up`` looks for it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipelines.local.api import server  # noqa: E402
from pipelines.local.serving import endpoints  # noqa: E402


def _hang(*args: object, **kwargs: object) -> None:
    (Path(os.environ["MLOPS_HOME"]) / "deploy-started").write_text(str(os.getpid()))
    time.sleep(600)


endpoints.deploy = _hang
sys.exit(server.main([]))
