"""Kill the local engine (SIGKILL to the engine process alone) while the best-model training job runs: the job's
processes (the training toolkit, the user script) die with it; then ``retry`` the execution: the finished steps are
kept (attempt 1, no new tuning trials) and the run completes."""

from __future__ import annotations

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


def _processes_of(home: Path) -> list[int]:
    """Processes (not zombies) whose environment names this ``MLOPS_HOME``, other than this one."""
    pids = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE and \
                    proc.environ().get("MLOPS_HOME") == str(home):
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


def test_sigkill_mid_training_then_retry_keeps_finished_steps(tmp_path):
    home = tmp_path / "home"
    data = sample_data.make_dataset(tmp_path / "raw", per_class=16, size=40, seed=5)
    env = dict(os.environ, MLOPS_HOME=str(home), MLOPS_TUNER_SEED="8", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "pipelines.run", "start", "--param", f"InputDataUrl={data}"]
    argv += [x for k, v in PARAMS.items() for x in ("--param", f"{k}={v}")]
    log = open(tmp_path / "engine.log", "w")
    engine = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    db = home / "mlops.db"
    deadline = time.time() + 420
    killed_during = None
    try:
        while time.time() < deadline and engine.poll() is None:
            rows = _query(db, "SELECT log_path FROM steps WHERE step_name='TrainBestModel' AND status='Executing'")
            if rows and Path(rows[0][0]).is_file() and "epoch=1 " in Path(rows[0][0]).read_text():
                killed_during = "TrainBestModel"
                break
            time.sleep(0.5)
        assert killed_during, f"training never started; engine log:\n{(tmp_path / 'engine.log').read_text()[-3000:]}"
        jobs = [pid for pid in _processes_of(home) if pid != engine.pid]
        assert len(jobs) >= 3, jobs  # the job guard, the training toolkit, the user script (at least)
        os.kill(engine.pid, signal.SIGKILL)  # the engine alone: its jobs are in sessions of their own
        engine.wait(30)
        deadline = time.time() + 10
        while _processes_of(home) and time.time() < deadline:
            time.sleep(0.2)
        assert _processes_of(home) == [], "job processes outlived the engine"
    finally:
        if engine.poll() is None:
            os.killpg(engine.pid, signal.SIGKILL)
        for pid in _processes_of(home):  # nothing, unless the assertion above failed
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        log.close()

    (execution_id, status), = _query(db, "SELECT execution_id, status FROM executions")
    assert status == "Executing"  # nobody recorded an end: the engine died
    before = dict(_query(db, "SELECT step_name, status FROM steps WHERE execution_id=?", execution_id))
    assert before["PrepareData"] == "Succeeded" and before["TuneHyperparameters"] == "Succeeded"
    assert before["TrainBestModel"] == "Executing"
    trials_before = _query(db, "SELECT job_name FROM trials WHERE execution_id=?", execution_id)
    assert len(trials_before) == 1

    retry = subprocess.run([sys.executable, "-m", "pipelines.run", "retry", execution_id], cwd=ROOT, env=env,
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
