"""Warm starts (pipelines/local/jobs/zygote.py): a process forked from the zygote sees what a cold one sees.

Every test runs real interpreters of a real job environment against a real zygote: the same probe script cold
(``MLOPS_ZYGOTE_SOCKET`` unset) and warm, compared field by field, plus exit statuses, signals, kills and the cases
that must start cold.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.local.jobs import environment as job_env
from pipelines.local.jobs import runtime, sandbox, warm, zygote

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="warm starts are Linux only")

PROBE = textwrap.dedent('''
    import atexit, json, os, signal, sys, threading
    warm = "torch" in sys.modules           # preloaded: only a warm start has it before the script imports it
    import torch
    out = {
        "argv": sys.argv, "orig_argv": sys.orig_argv, "path": sys.path, "executable": sys.executable,
        "prefix": sys.prefix, "exec_prefix": sys.exec_prefix, "cwd": os.getcwd(), "name": __name__,
        "file": __file__, "env": {k: v for k, v in os.environ.items() if k != "MLOPS_ZYGOTE_SOCKET"},
        "flags": [v for i, v in enumerate(sys.flags) if i != 4],  # but dont_write_bytecode: the zygote's
        "dont_write_bytecode": sys.dont_write_bytecode, "umask": os.umask(0o22),
        "stdio": [(s.encoding, s.errors, s.line_buffering, s.write_through, s.name, s.mode, type(s.buffer).__name__)
                  for s in (sys.stdin, sys.stdout, sys.stderr)],
        "dunder_stdio": [sys.__stdin__ is sys.stdin, sys.__stdout__ is sys.stdout, sys.__stderr__ is sys.stderr],
        "sigterm": str(signal.getsignal(signal.SIGTERM)), "sigint": str(signal.getsignal(signal.SIGINT)),
        "sigpipe": str(signal.getsignal(signal.SIGPIPE)), "sigusr1": str(signal.getsignal(signal.SIGUSR1)),
        "stdin": sys.stdin.read(), "uid": os.getuid(), "torch_file": torch.__file__,
        "opt_ml": sorted(os.listdir("/opt/ml")) if os.path.isdir("/opt/ml") else None,
        "main_is_module": sys.modules["__main__"].__dict__ is globals(),
        "numpy_seed_differs": None,
    }
    import numpy
    out["numpy_draw"] = float(numpy.random.random())
    print("WARM" if warm else "COLD", file=sys.stderr)
    def late():
        print("thread done", flush=True)
    t = threading.Thread(target=lambda: (__import__("time").sleep(0.2), late()))
    t.start()
    atexit.register(lambda: print("atexit ran", flush=True))
    print(json.dumps(out), flush=True)
    code = os.environ.get("PROBE_EXIT", "")
    if code == "raise":
        raise ValueError("probe failed on purpose")
    if code == "message":
        sys.exit("probe says goodbye")
    if code == "signal":
        t.join()
        os.kill(os.getpid(), signal.SIGUSR2)
    if code:
        sys.exit(int(code))
''')


@pytest.fixture(scope="module")
def zyg():
    """A zygote of this test process (the engine), for the environment the probes run with."""
    zygotes = warm.Zygotes()
    yield zygotes
    zygotes.stop()


@pytest.fixture()
def jenv(tmp_path: Path):
    env = job_env.create(tmp_path / "job.jobenv")
    yield env
    env.remove()


def _env(jenv: job_env.JobEnvironment, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != warm.SOCKET_ENV}
    return jenv.environ({**base, "PYTHONUNBUFFERED": "1", "PYTHONPATH": "/nonexistent/pp", "PROBE_VAR": "x",
                         **extra})


def _run(cmd: list[str], env: dict[str, str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=180)


def _both(jenv, zyg, tmp_path: Path, cmd_tail: list[str], stdin: str = "", **extra: str):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = _env(jenv, **extra)
    cold = _run([str(jenv.python), *cmd_tail], env, work, stdin)
    warm_env = {**env, warm.SOCKET_ENV: zyg.ready(env)}
    hot = _run([str(jenv.python), *cmd_tail], warm_env, work, stdin)
    return cold, hot


def _json(proc: subprocess.CompletedProcess[str]) -> dict:
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


@pytest.mark.parametrize("per_process", [
    {}, {"PYTHONUNBUFFERED": "", "PYTHONIOENCODING": "latin-1:backslashreplace", "PYTHONDONTWRITEBYTECODE": "1"}],
    ids=["unbuffered", "buffered-latin1-nobytecode"])
def test_a_warm_script_sees_what_a_cold_one_sees(jenv, zyg, tmp_path: Path, per_process: dict[str, str]) -> None:
    script = tmp_path / "scripts" / "probe.py"
    script.parent.mkdir()
    script.write_text(PROBE)
    cold, hot = _both(jenv, zyg, tmp_path, [str(script), "--lr", "0.1", "two words"], stdin="from stdin",
                      **per_process)
    assert cold.returncode == hot.returncode == 0, (cold.stderr, hot.stderr)
    assert "COLD" in cold.stderr and "WARM" in hot.stderr, hot.stderr
    assert "[zygote]" not in hot.stderr  # nothing installed during the run: nothing to say
    a, b = _json(cold), _json(hot)
    draw_a, draw_b = a.pop("numpy_draw"), b.pop("numpy_draw")
    assert a == b
    assert a["path"][0] == str(script.parent) and a["path"][1] == "/nonexistent/pp"
    assert a["stdin"] == "from stdin" and a["name"] == "__main__" and a["main_is_module"]
    for proc in (cold, hot):  # the non-daemon thread was joined, then atexit ran, both after the script's end
        assert proc.stdout.splitlines()[-2:] == ["thread done", "atexit ran"], proc.stdout
    second_env = _env(jenv, **per_process)
    second = _run([str(jenv.python), str(script)], {**second_env, warm.SOCKET_ENV: zyg.ready(second_env)},
                  tmp_path / "work")
    assert "WARM" in second.stderr
    assert len({draw_a, draw_b, _json(second)["numpy_draw"]}) == 3  # NumPy reseeded per process, as when fresh


def test_python_dash_m_is_warm_when_asked(jenv, zyg, tmp_path: Path) -> None:
    pkg = tmp_path / "work" / "probepkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "probe.py").write_text(PROBE)
    default = _run([str(jenv.python), "-m", "probepkg.probe"], {**_env(jenv), warm.SOCKET_ENV: zyg.ready(_env(jenv))},
                   tmp_path / "work")
    assert "COLD" in default.stderr  # -m starts cold unless asked (zygote.MODULES_ENV)
    cold, hot = _both(jenv, zyg, tmp_path, ["-m", "probepkg.probe", "x"], MLOPS_ZYGOTE_MODULES="1")
    assert cold.returncode == hot.returncode == 0, hot.stderr
    assert "WARM" in hot.stderr
    a, b = _json(cold), _json(hot)
    a.pop("numpy_draw"), b.pop("numpy_draw")
    assert a == b and a["argv"][0] == str(pkg / "probe.py")


@pytest.mark.parametrize(("how", "code", "in_stderr"), [
    ("3", 3, None), ("raise", 1, "ValueError: probe failed on purpose"), ("message", 1, "probe says goodbye"),
    ("signal", -signal.SIGUSR2, None)])
def test_exit_statuses_are_the_scripts(jenv, zyg, tmp_path: Path, how: str, code: int, in_stderr: str | None) -> None:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    cold, hot = _both(jenv, zyg, tmp_path, [str(script)], PROBE_EXIT=how)
    assert "WARM" in hot.stderr
    assert cold.returncode == hot.returncode == code, (cold.stderr[-800:], hot.stderr[-800:])
    if in_stderr:
        assert in_stderr in cold.stderr and in_stderr in hot.stderr


def _cold_reason(zyg: warm.Zygotes) -> str:
    logs = [r.log.read_text() for r in zyg._running.values()]
    return "\n".join(logs)


@pytest.mark.parametrize("case", ["installed_package", "load_time_variable", "dash_c", "pip"])
def test_what_does_not_qualify_starts_cold(jenv, zyg, tmp_path: Path, case: str) -> None:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = _env(jenv)
    sock = zyg.ready(env)
    cmd = [str(jenv.python), str(script)]
    if case == "installed_package":
        (jenv.site_packages / "shadow.py").write_text("")  # something pip put into the job environment
    elif case == "load_time_variable":
        env = {**env, "OMP_NUM_THREADS": "7"}  # read when libgomp loads: the zygote's value would stick
    elif case == "dash_c":
        cmd = [str(jenv.python), "-c", "import sys; print('COLD' if 'torch' not in sys.modules else 'WARM', "
                                       "file=sys.stderr)"]
    else:
        cmd = [str(jenv.python), "-m", "pip", "--version"]
    proc = _run(cmd, {**env, warm.SOCKET_ENV: sock}, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "WARM" not in proc.stderr
    if case == "load_time_variable":
        assert "load-time variables differ: OMP_NUM_THREADS" in _cold_reason(zyg)


INSTALLS_THEN_IMPORTS = textwrap.dedent('''
    import os, sys
    warm = "torch" in sys.modules
    site_packages = sys.argv[1]
    # what a `pip install` of another numpy, run by the script itself, leaves in the job environment
    os.makedirs(os.path.join(site_packages, "numpy"))
    with open(os.path.join(site_packages, "numpy", "__init__.py"), "w") as fh:
        fh.write("__version__ = 'installed-by-the-script'\\n")
    import freshly_written  # the next import of a module not loaded yet
    import numpy
    print("WARM" if warm else "COLD", numpy.__version__, flush=True)
''')


def test_a_package_installed_over_a_preloaded_one_during_the_run_is_named_on_stderr(jenv, zyg, tmp_path: Path) -> None:
    """A script that installs a package shadowing a preloaded one and then imports (the SDK's ``@step`` bootstrap
    does: its requirements bring numpy 2 and pandas 3 over the engine's numpy 1.26): cold, it imports the new
    package; warm, the preloaded one stays in ``sys.modules``, and the process says so once on stderr, above the
    import that follows, naming both files and MLOPS_WARM_START=0."""
    script = tmp_path / "installs.py"
    script.write_text(INSTALLS_THEN_IMPORTS)
    (tmp_path / "freshly_written.py").write_text("")
    other = job_env.create(tmp_path / "other.jobenv")
    try:
        cold = _run([str(other.python), str(script), str(other.site_packages)], _env(other), tmp_path)
        env = _env(jenv)
        hot = _run([str(jenv.python), str(script), str(jenv.site_packages)], {**env, warm.SOCKET_ENV: zyg.ready(env)},
                   tmp_path)
    finally:
        other.remove()
    assert cold.returncode == hot.returncode == 0, (cold.stderr[-800:], hot.stderr[-800:])
    assert cold.stdout.split() == ["COLD", "installed-by-the-script"] and "[zygote]" not in cold.stderr
    import numpy

    assert hot.stdout.split() == ["WARM", numpy.__version__]
    assert hot.stderr.count("[zygote] warning") == 1, hot.stderr
    assert f"numpy would be imported from {jenv.site_packages / 'numpy' / '__init__.py'}" in hot.stderr
    assert "MLOPS_WARM_START=0" in hot.stderr


def test_no_zygote_listening_starts_cold(jenv, tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = _run([str(jenv.python), str(script)], {**_env(jenv), warm.SOCKET_ENV: str(tmp_path / "nobody.sock")},
                tmp_path)
    assert proc.returncode == 0 and "COLD" in proc.stderr


def test_killing_the_asking_process_kills_the_warm_one_and_its_children(jenv, zyg, tmp_path: Path) -> None:
    marker = tmp_path / "pids"
    script = tmp_path / "sleeper.py"
    script.write_text(textwrap.dedent(f'''
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(marker)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(300)
    '''))
    env = _env(jenv)
    proc = subprocess.Popen([str(jenv.python), str(script)], env={**env, warm.SOCKET_ENV: zyg.ready(env)},
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (marker.is_file() and marker.read_text().count(" ") == 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    script_pid, grandchild = map(int, marker.read_text().split())
    assert script_pid != proc.pid  # the script runs in the zygote's child, not in the process we started
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _alive(p)
                                              for p in (script_pid, grandchild)):
        time.sleep(0.05)
    assert not any(_alive(p) for p in (script_pid, grandchild))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_sigterm_reaches_the_warm_script(jenv, zyg, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = tmp_path / "term.py"
    script.write_text(textwrap.dedent(f'''
        import signal, sys, time
        def bye(signum, frame):
            print("got SIGTERM", flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, bye)
        open({str(ready)!r}, "w").write("ok")
        time.sleep(300)
    '''))
    env = _env(jenv)
    proc = subprocess.Popen([str(jenv.python), str(script)], env={**env, warm.SOCKET_ENV: zyg.ready(env)},
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired as exc:  # say where it stuck (one such hang was seen once, in a full run)
        tree = subprocess.run(["ps", "-eo", "pid,ppid,sid,stat,wchan:24,args"], capture_output=True, text=True).stdout
        proc.kill()
        pytest.fail(f"no exit 30 s after SIGTERM; output so far {exc.output!r}\nzygote log:\n{_cold_reason(zyg)}\n"
                    f"processes:\n{tree}")
    assert proc.returncode == 7 and "got SIGTERM" in out, err


@pytest.mark.skipif(sandbox.detect().kind == "none", reason="no sandbox mechanism on this machine")
def test_a_warm_job_sees_its_own_opt_ml(jenv, tmp_path: Path) -> None:
    """Through the engine's own job path (guard, sandbox, job environment): the forked script is in the job's
    mount namespace, where /opt/ml is the job directory."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    job_dir = tmp_path / "job"
    (job_dir / "input" / "config").mkdir(parents=True)
    zygotes = warm.Zygotes()
    try:
        results = {}
        for mode in ("cold", "warm"):
            env = _env(jenv)
            if mode == "warm":
                env[warm.SOCKET_ENV] = zygotes.ready(env)
            log = tmp_path / f"{mode}.log"
            code = runtime.run_command([str(jenv.python), str(script)], cwd=job_dir, env=env, log_path=log,
                                       opt_ml=job_dir)
            text = log.read_text()
            assert code == 0, text
            assert ("WARM" if mode == "warm" else "COLD") in text
            results[mode] = json.loads(next(line for line in text.splitlines() if line.startswith("{")))
        assert results["warm"]["opt_ml"] == results["cold"]["opt_ml"] == ["input"]
        assert results["warm"]["uid"] == results["cold"]["uid"]
    finally:
        zygotes.stop()


def test_load_time_env_is_what_libraries_read_at_load() -> None:
    env = {"OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", "PYTHONPATH": "/x", "SM_HP_LR": "0.1",
           zygote.SOCKET_ENV: "/s", "LD_PRELOAD": "lib.so", "HOME": "/root", "PYTHONHASHSEED": "0",
           "NCCL_DEBUG": "INFO", "CUDA_VISIBLE_DEVICES": "0"}
    assert zygote.load_time_env(env) == {"OMP_NUM_THREADS": "2", "PYTHONHASHSEED": "0", "LD_PRELOAD": "lib.so"}


def test_warm_starts_can_be_turned_off() -> None:
    zygotes = warm.Zygotes()
    assert zygotes.socket_for({warm.ENABLE_ENV: "0"}) is None
    assert zygotes._running == {}


def test_a_process_that_asks_while_the_zygote_preloads_starts_cold(jenv, tmp_path: Path) -> None:
    """The socket appears only once the zygote has preloaded: nobody waits for imports it may not need."""
    zygotes = warm.Zygotes()
    try:
        env = _env(jenv)
        sock = zygotes.socket_for(env)
        script = tmp_path / "quick.py"
        script.write_text("import sys; print('WARM' if 'torch' in sys.modules else 'COLD', file=sys.stderr)")
        started = time.monotonic()
        proc = _run([str(jenv.python), str(script)], {**env, warm.SOCKET_ENV: sock}, tmp_path)
        took = time.monotonic() - started
        assert "COLD" in proc.stderr
        assert not Path(sock).exists() or took < 5, "it did not wait for the preload"
        zygotes.ready(env)
        proc = _run([str(jenv.python), str(script)], {**env, warm.SOCKET_ENV: sock}, tmp_path)
        assert "WARM" in proc.stderr
    finally:
        zygotes.stop()


def test_a_runner_prestarts_a_zygote_only_for_jobs_over_the_project_environment() -> None:
    sklearn = "683313688378.dkr.ecr.us-east-1.amazonaws.com/sagemaker-scikit-learn:1.2-1-cpu-py3"
    pytorch = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.6-gpu-py312"
    processing = {"Type": "Processing", "Arguments": {"AppSpecification": {"ImageUri": sklearn}}}
    assert not warm.uses_project_environment({"Steps": [processing]})
    assert not warm.uses_project_environment(json.dumps({"Steps": [{"Type": "Lambda", "Arguments": {}}]}))
    nested = {"Type": "Condition", "Arguments": {"IfSteps": [
        {"Type": "Training", "Arguments": {"AlgorithmSpecification": {"TrainingImage": pytorch}}}]}}
    assert warm.uses_project_environment({"Steps": [processing, nested]})
    by_parameter = {"Type": "Training", "Arguments": {"AlgorithmSpecification": {
        "TrainingImage": {"Get": "Parameters.Image"}}}}
    assert warm.uses_project_environment({"Steps": [by_parameter]})
