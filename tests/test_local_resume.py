"""Kill the local engine (SIGKILL to the execution's runner process alone, which the local AWS service started) while
the best-model training job runs: the job's processes (the training toolkit, the user script) die with it; then
``retry`` the execution: the finished steps are kept (attempt 1, no new tuning trials) and the run completes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipelines import sample_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {
    "Arch": "resnet18", "Pretrained": "none", "ImageSize": "32", "ResizeSize": "36", "DataLoaderWorkers": "0",
    "MaxTrainingJobs": "1", "MaxParallelTrainingJobs": "1", "EpochsMin": "2", "EpochsMax": "2",
    "AccuracyThreshold": "0", "ModelApprovalStatus": "PendingManualApproval", "EndpointName": "resume-endpoint",
}


def _query(db: Path, sql: str, *args):
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        conn.close()


def _service_pid(home: Path) -> int | None:
    state = home / "api" / "server.json"
    return json.loads(state.read_text())["pid"] if state.is_file() else None


def _processes_of(home: Path) -> list[int]:
    """Processes (not zombies) whose environment names this ``MLOPS_HOME``, other than this one and the local AWS
    service."""
    pids = []
    for proc in psutil.process_iter():
        try:
            if proc.pid not in (os.getpid(), _service_pid(home)) and proc.status() != psutil.STATUS_ZOMBIE and \
                    proc.environ().get("MLOPS_HOME") == str(home):
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


def _runner_pid(db: Path) -> int | None:
    rows = _query(db, "SELECT pid FROM executions WHERE status='Executing'")
    return rows[0][0] if rows else None


def _kill_runner_mid_training(db: Path, home: Path, log_text) -> None:
    deadline = time.time() + 420
    while time.time() < deadline:
        rows = _query(db, "SELECT log_path FROM steps WHERE step_name='TrainBestModel' AND status='Executing'")
        if rows and Path(rows[0][0]).is_file() and "epoch=1 " in Path(rows[0][0]).read_text():
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"training never started; log:\n{log_text()[-3000:]}")
    runner = _runner_pid(db)
    assert runner is not None
    jobs = [pid for pid in _processes_of(home) if pid != runner]
    assert len(jobs) >= 3, jobs  # the job guard, the training toolkit, the user script (at least)
    os.kill(runner, signal.SIGKILL)  # the runner alone: its jobs are in sessions of their own
    deadline = time.time() + 10
    while _processes_of(home) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_of(home) == [], "job processes outlived the engine"


def test_sigkill_mid_training_then_retry_keeps_finished_steps(tmp_path):
    home = tmp_path / "home"
    data = sample_data.make_dataset(tmp_path / "raw", per_class=16, size=40, seed=5)
    env = dict(os.environ, MLOPS_HOME=str(home), MLOPS_TUNER_SEED="8", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "pipelines.run", "start", "--param", f"InputDataUrl={data}"]
    argv += [x for k, v in PARAMS.items() for x in ("--param", f"{k}={v}")]
    db = home / "mlops.db"
    try:
        started = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]

        def log_text() -> str:
            logs = sorted((home / "runs").glob("*/engine.log"))
            return logs[0].read_text() if logs else started.stderr
        _kill_runner_mid_training(db, home, log_text)
        _check_and_retry(db, env)
    finally:
        for pid in _processes_of(home):  # nothing, unless an assertion failed
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        subprocess.run([sys.executable, "-m", "pipelines.run", "local", "down"], cwd=ROOT, env=env,
                       capture_output=True, timeout=60)


def _check_and_retry(db: Path, env: dict[str, str]) -> None:
    (execution_id, status), = _query(db, "SELECT execution_id, status FROM executions")
    assert status in ("Executing", "Failed")  # the engine died; the service settles it Failed once it looks
    before = dict(_query(db, "SELECT step_name, status FROM steps WHERE execution_id=?", execution_id))
    assert before["PrepareData"] == "Succeeded" and before["TuneHyperparameters"] == "Succeeded"
    assert before["TrainBestModel"] in ("Executing", "Failed")
    trials_before = _query(db, "SELECT job_name FROM trials WHERE execution_id=?", execution_id)
    assert len(trials_before) == 1

    retry = subprocess.run([sys.executable, "-m", "pipelines.run", "retry", execution_id, "--wait"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=420)
    assert retry.returncode == 0, retry.stdout[-3000:] + retry.stderr[-3000:]
    (status,), = _query(db, "SELECT status FROM executions WHERE execution_id=?", execution_id)
    assert status == "Succeeded"
    after = {name: (st, attempt) for name, st, attempt in
             _query(db, "SELECT step_name, status, attempt FROM steps WHERE execution_id=?", execution_id)}
    assert after["PrepareData"] == ("Succeeded", 1)
    assert after["TuneHyperparameters"] == ("Succeeded", 1)
    assert after["TrainBestModel"] == ("Succeeded", 2)
    for name in ("EvaluateModel", "CheckAccuracy", "RegisterModel-RegisterModel", "DeployApprovedModel"):
        assert after[name] == ("Succeeded", 1), name
    assert _query(db, "SELECT job_name FROM trials WHERE execution_id=?", execution_id) == trials_before
    train_log = Path(_query(db, "SELECT log_path FROM steps WHERE execution_id=? AND step_name='TrainBestModel'",
                            execution_id)[0][0]).read_text()
    assert "attempt 1" in train_log and "attempt 2" in train_log
