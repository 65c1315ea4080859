"""What the CLI refuses before anything runs (bad parameter values, an unusable MLOPS_HOME, a full disk), and
``gc``'s retention policy for old run directories."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from pipelines import run
from pipelines.local.storage import gc
from pipelines.local.storage.executions import ExecutionStore


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "mlops"))
    return tmp_path / "mlops"


@pytest.mark.fast
@pytest.mark.parametrize(("params", "expected"), [
    (["EpochsMin=9", "EpochsMax=3"], "EpochsMin=9 is greater than EpochsMax=3"),
    (["MaxTrainingJobs=0"], "MaxTrainingJobs=0 is out of range (1..750)"),
    (["MaxParallelTrainingJobs=0"], "MaxParallelTrainingJobs=0 is out of range (1..100)"),
    (["Arch=nonexistent"], "Arch='nonexistent' is not a supported architecture"),
    (["ImageSize=224", "ResizeSize=128"], "ResizeSize=128 is smaller than ImageSize=224"),
    (["AccuracyThreshold=1.5"], "AccuracyThreshold=1.5 must be between 0 and 1"),
])
@pytest.mark.parametrize("target", ["local", "sagemaker"])
def test_bad_parameter_values_are_refused_before_anything_runs(home, capsys, monkeypatch, params, expected, target):
    def no_run(*_args, **_kwargs):
        raise AssertionError("nothing may run or be uploaded for invalid parameters")

    monkeypatch.setattr(run, "run_local", no_run)
    monkeypatch.setattr(run, "run_sagemaker", no_run)
    argv = ["--target", target, "start"] + [arg for p in params for arg in ("--param", p)]
    assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: invalid pipeline parameters: ") and expected in err
    assert not (home / "runs").exists()


@pytest.mark.fast
def test_valid_overrides_pass_the_checks():
    run.check_start_parameters(run.parse_parameters(["EpochsMin=2", "EpochsMax=2", "Arch=resnet18",
                                                     "MaxParallelTrainingJobs=1"]))


@pytest.mark.fast
def test_unusable_mlops_home_is_one_line(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MLOPS_HOME", str(blocker / "home"))
    assert run.main(["list-executions"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"MLOPS_HOME={blocker / 'home'} is not a usable directory" in err


@pytest.mark.fast
def test_full_disk_is_one_line(home, monkeypatch, capsys):
    def disk_full(_args):
        raise OSError(errno.ENOSPC, "No space left on device", str(home / "runs" / "x" / "model.pth"))

    monkeypatch.setattr(run, "run_local", disk_full)
    assert run.main(["list-executions"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: no space left on the device writing ")


def _execution(store: ExecutionStore, status: str, age_days: float, now: float, home: Path, size: int = 1000) -> str:
    execution = store.create_execution("P", "{}", {})
    store._x("UPDATE executions SET status=?, created_at=?, ended_at=? WHERE execution_id=?",  # noqa: SLF001
             (status, now - age_days * 86400 - 60, now - age_days * 86400 if status != "Executing" else None,
              execution["execution_id"]))
    job = home / "runs" / execution["execution_id"] / "Step"
    job.mkdir(parents=True)
    (job / "blob").write_bytes(b"x" * size)
    return execution["execution_id"]


@pytest.mark.fast
def test_gc_removes_old_finished_runs_only(home, capsys):
    now = time.time()
    store = ExecutionStore()
    old = [_execution(store, status, 30 + i, now, home) for i, status in enumerate(("Succeeded", "Failed",
                                                                                   "Stopped"))]
    running = _execution(store, "Executing", 40, now, home)
    recent = _execution(store, "Succeeded", 1, now, home)
    orphan = home / "runs" / "no-such-execution"
    orphan.mkdir()
    (orphan / "f").write_bytes(b"y" * 10)
    import os

    os.utime(orphan, (now - 50 * 86400, now - 50 * 86400))

    dry = gc.collect(retention_days=14, keep_last=1, dry_run=True, now=now)
    assert {p.name for p in dry.removed} == {*old, orphan.name} and all(p.exists() for p in dry.removed)
    report = gc.collect(retention_days=14, keep_last=1, now=now)
    assert {p.name for p in report.removed} == {*old, orphan.name}
    assert report.freed_bytes == 3 * 1000 + 10
    assert sorted(p.name for p in (home / "runs").iterdir()) == sorted([running, recent])
    assert store.get_execution(old[0])["status"] == "Succeeded"  # records stay
    # keep_last protects the newest finished executions even when old
    assert gc.collect(retention_days=0, keep_last=5, now=now).removed == []
    assert run.main(["gc", "--retention-days", "0", "--keep-last", "0"]) == 0
    assert "removed 1 run directory" in capsys.readouterr().out  # `recent`; the running one stays
    assert [p.name for p in (home / "runs").iterdir()] == [running]


@pytest.mark.fast
def test_endpoint_server_log_is_rotated_at_restart(tmp_path):
    from pipelines.local.serving.endpoints import rotate_log

    log = tmp_path / "server.log"
    for generation in range(5):
        log.write_bytes(str(generation).encode() * 100)
        rotate_log(log, max_bytes=50, keep=3)
        assert not log.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.log.1", "server.log.2", "server.log.3"]
    assert (tmp_path / "server.log.1").read_bytes()[:1] == b"4" and (tmp_path / "server.log.3").read_bytes()[:1] == b"2"
    log.write_bytes(b"small")
    rotate_log(log, max_bytes=50, keep=3)
    assert log.read_bytes() == b"small"
