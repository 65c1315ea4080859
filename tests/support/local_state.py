"""A module fixture's own local state: ``MLOPS_HOME`` (and other variables) set for a block, and afterwards what the
block left running -- endpoints it deployed, the local AWS service its commands started -- stopped, and the
variables restored. One place for what conftest's ``local_aws``, test_local_engine_e2e, test_ui and test_own_data
each did by hand."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def local_state(home: Path, *, endpoints: tuple[str, ...] = (), **env: str) -> Iterator[Path]:
    """``MLOPS_HOME=home`` and ``env`` for the block; on the way out, ``endpoints`` deleted (when deployed), the local
    AWS service stopped, every variable back to what it was."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLOPS_HOME", str(home))
        for key, value in env.items():
            patch.setenv(key, value)
        try:
            yield home
        finally:
            from pipelines.local.api import server
            from pipelines.local.serving import endpoints as local_endpoints

            for name in endpoints:
                try:
                    local_endpoints.delete(name)
                except Exception:  # noqa: BLE001 -- not deployed (the block failed before): nothing to stop
                    pass
            server.down()
