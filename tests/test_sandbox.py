"""Jobs see their job directory at a real ``/opt/ml`` (:mod:`pipelines.local.jobs.sandbox`), and nothing else
changes: the host's ``/opt`` and ``/opt/ml`` are untouched, the rest of the filesystem stays visible read-write,
exit statuses and signals pass through."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipelines.local.jobs import sandbox as sb

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]


def _host_state(path: str) -> object:
    """What the host has at ``path``: absent, or its listing (names, modes, sizes)."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        return os.lstat(path).st_mode
    out = []
    for name in sorted(os.listdir(path)):
        st = os.lstat(os.path.join(path, name))
        out.append((name, st.st_mode, st.st_size if not os.path.isdir(os.path.join(path, name)) else 0))
    return out


def _alive_in_group(pgid: int) -> list[int]:
    alive = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            data = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        if fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            alive.append(int(name))
    return alive


@pytest.fixture(params=["unshare", "bwrap"])
def kind(request: pytest.FixtureRequest) -> str:
    if not sys.platform.startswith("linux"):
        pytest.skip("mount namespaces are Linux-only")
    error = sb._probe(request.param)
    if error is not None:
        pytest.skip(f"{request.param} unavailable here: {error}")
    return request.param


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    path = tmp_path / "job"
    path.mkdir()
    return path


def _run(cmd: list[str], job_dir: Path, kind: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(sb.wrap(cmd, job_dir, sandbox=sb.Sandbox(kind)), cwd=job_dir, capture_output=True,
                          text=True, timeout=60, **kw)  # type: ignore[call-overload]


def test_detect_returns_a_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sb.ENV, raising=False)
    found = sb.detect()
    assert found.kind in sb.KINDS
    assert (found.warning is not None) == (found.kind == "none")
    assert sb.detect() is found  # probed once
    if found.kind == "none":
        pytest.skip(f"no sandbox on this machine: {found.warning}")
    assert sb._probe(found.kind) is None


def test_forced_none_returns_the_command_unchanged_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                                   job_dir: Path) -> None:
    monkeypatch.setenv(sb.ENV, "none")
    found = sb.detect()
    assert found.kind == "none"
    assert found.warning and "/opt/ml" in found.warning and "hard-code" in found.warning
    cmd = ["python", "train.py", "--model-dir", "/opt/ml/model"]
    wrapped = sb.wrap(cmd, job_dir)
    assert wrapped == cmd and wrapped is not cmd


def test_forced_kinds_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for forced in ("bwrap", "unshare", " Unshare "):
        monkeypatch.setenv(sb.ENV, forced)
        assert sb.detect() == sb.Sandbox(forced.strip().lower())
    monkeypatch.setenv(sb.ENV, "docker")
    with pytest.raises(ValueError, match="MLOPS_SANDBOX"):
        sb.detect()


def test_job_dir_under_opt_ml_is_refused(tmp_path: Path) -> None:
    inner = tmp_path / "ml" / "runs" / "job"
    inner.mkdir(parents=True)
    with pytest.raises(ValueError, match="under"):
        sb._wrap(["true"], inner, sb.Sandbox("unshare"), str(tmp_path / "ml"))


def test_writes_to_opt_ml_land_in_the_job_dir_and_never_on_the_host(kind: str, job_dir: Path) -> None:
    before = (_host_state("/opt"), _host_state(sb.OPT_ML))
    script = f"mkdir -p /opt/ml/output && echo hello > /opt/ml/output/x && cat {job_dir}/output/x && ls /opt/ml"
    done = _run(["sh", "-c", script], job_dir, kind)
    assert done.returncode == 0, done.stderr
    assert (job_dir / "output" / "x").read_text() == "hello\n"
    assert done.stdout.split() == ["hello", "output"]  # the real path is the same directory
    assert (_host_state("/opt"), _host_state(sb.OPT_ML)) == before


def test_rest_of_filesystem_stays_visible_read_write(kind: str, job_dir: Path, tmp_path: Path) -> None:
    with tempfile.NamedTemporaryFile("w", dir=Path.home(), prefix=".mlops-sandbox-test-", delete=False) as fh:
        fh.write("home")
    home_file = Path(fh.name)
    outside = tmp_path / "outside.txt"
    opt_entries = sorted(os.listdir("/opt")) if os.path.isdir("/opt") else []
    try:
        script = "\n".join([
            f"head -c 0 {ROOT / 'setup.py'} && echo project",
            f"cat {home_file} && echo",
            f"echo tmp > {outside}",
            f"echo more >> {home_file}",
            f"ls {sys.executable} >/dev/null && echo venv",
            "echo null > /dev/null && echo dev",
            "ls -A /opt | grep -vx ml | tr '\\n' ' '; echo",
        ])
        done = _run(["sh", "-c", script], job_dir, kind)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[:4] == ["project", "home", "venv", "dev"]
        assert lines[4].split() == opt_entries  # the host's /opt entries, all still there
        assert outside.read_text() == "tmp\n"
        assert home_file.read_text() == "homemore\n"
    finally:
        home_file.unlink()


def test_missing_target_made_in_a_tmpfs_on_its_parent(kind: str, tmp_path: Path) -> None:
    """The /opt case, at a scratch place: the parent's entries (the job dir's own path among them, a file, a
    symlink) are still the host's, writable, and the host parent gets nothing new."""
    job = tmp_path / "runs" / "job"
    job.mkdir(parents=True)
    (tmp_path / "sibling").write_text("s")
    (tmp_path / "link").symlink_to("runs")
    target = tmp_path / "opt" / "ml"
    before = _host_state(str(tmp_path))
    script = f"echo in > {target}/f && cat {tmp_path}/link/job/f {tmp_path}/sibling && echo w >> {tmp_path}/sibling"
    done = subprocess.run(sb._wrap(["sh", "-c", script], job, sb.Sandbox(kind), str(target)), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "in\ns"
    assert (job / "f").read_text() == "in\n"
    assert (tmp_path / "sibling").read_text() == "sw\n"
    after = _host_state(str(tmp_path))
    assert [e[0] for e in after] == [e[0] for e in before] == ["link", "runs", "sibling"]  # type: ignore[union-attr]


def test_no_parent_at_all(kind: str, job_dir: Path) -> None:
    """A target whose top-level directory is missing: bwrap makes it in its own root; unshare says why not."""
    top = f"/mlops-sandbox-test-{os.getpid()}"
    assert not os.path.lexists(top)
    done = subprocess.run(sb._wrap(["sh", "-c", f"echo x > {top}/ml/f && ls -A /"], job_dir, sb.Sandbox(kind),
                                   f"{top}/ml"), capture_output=True, text=True, timeout=60)
    assert not os.path.lexists(top)
    if kind == "bwrap":
        assert done.returncode == 0, done.stderr
        assert (job_dir / "f").read_text() == "x\n"
        assert set(os.listdir("/")) <= set(done.stdout.split())
    else:
        assert done.returncode == sb.EXIT_SANDBOX_FAILED
        assert "cannot create" in done.stderr


@pytest.mark.parametrize("code", [0, 3, 255])
def test_exit_codes_pass_through(kind: str, job_dir: Path, code: int) -> None:
    assert _run(["sh", "-c", f"exit {code}"], job_dir, kind).returncode == code


def test_death_by_signal(kind: str, job_dir: Path) -> None:
    """unshare: the job is the process the caller started (-9). bwrap: its monitor exits 128 + N."""
    code = _run(["sh", "-c", "kill -9 $$"], job_dir, kind).returncode
    assert code == (-9 if kind == "unshare" else 137)


def test_missing_executable(kind: str, job_dir: Path) -> None:
    done = _run(["no-such-program-xyz"], job_dir, kind)
    assert done.returncode == sb.EXIT_CANNOT_START
    assert "cannot start no-such-program-xyz" in done.stderr


def test_sigterm_to_the_group_reaches_the_job(kind: str, job_dir: Path) -> None:
    ready, got = job_dir / "ready", job_dir / "got-term"
    script = f"trap 'echo term > /opt/ml/got-term; exit 7' TERM; touch {ready}; while :; do sleep 0.05; done"
    proc = subprocess.Popen(sb.wrap(["sh", "-c", script], job_dir, sandbox=sb.Sandbox(kind)), cwd=job_dir,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 7
        assert got.read_text() == "term\n"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()


def test_sigkill_to_the_group_kills_everything(kind: str, job_dir: Path) -> None:
    ready = job_dir / "ready"
    proc = subprocess.Popen(sb.wrap(["sh", "-c", f"touch {ready}; sleep 60"], job_dir, sandbox=sb.Sandbox(kind)),
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -9
    deadline = time.monotonic() + 10
    while _alive_in_group(proc.pid):  # nothing of the group is left (zombies aside: init reaps them)
        assert time.monotonic() < deadline, _alive_in_group(proc.pid)
        time.sleep(0.05)


def test_signal_dispositions_are_the_callers(kind: str, job_dir: Path) -> None:
    """The job inherits what it would without the sandbox (the helpers' own Python start-up leaves no trace)."""
    def ignore_usr1() -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    cmd = ["sh", "-c", f"grep SigIgn /proc/self/status; env | grep -c {sb.SIGNALS_ENV} || true"]
    bare = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=ignore_usr1)
    wrapped = subprocess.run(sb.wrap(cmd, job_dir, sandbox=sb.Sandbox(kind)), capture_output=True, text=True,
                             preexec_fn=ignore_usr1)
    assert wrapped.stdout == bare.stdout and bare.stdout.endswith("\n0\n")
    assert int(bare.stdout.split()[1], 16) & (1 << (signal.SIGUSR1 - 1))


def test_under_the_job_guard(kind: str, job_dir: Path) -> None:
    """Through :func:`runtime.run_command` (the per-job guard): the status the engine records."""
    from pipelines.local.jobs import runtime

    env = dict(os.environ)
    log = job_dir.parent / "job.log"

    def run(script: str) -> int:
        return runtime.run_command(sb.wrap(["sh", "-c", script], job_dir, sandbox=sb.Sandbox(kind)), cwd=job_dir,
                                   env=env, log_path=log)

    assert run("echo guarded > /opt/ml/g; exit 3") == 3
    assert (job_dir / "g").read_text() == "guarded\n"
    assert run("kill -9 $$") == (-9 if kind == "unshare" else 137)
