"""A real ``/opt/ml`` for each job: a private mount namespace with the job directory bind-mounted at ``/opt/ml``.

SageMaker scripts often hard-code ``/opt/ml/...`` (``/opt/ml/processing/input``, ``/opt/ml/model``) instead of reading
their arguments or ``SM_*`` variables. :func:`wrap` turns a job's argv into one that runs it in a mount namespace of
its own where ``/opt/ml`` *is* the job directory, so such scripts run unchanged and never touch the host's
``/opt/ml``. Nothing else changes: the rest of the filesystem is the host's, read-write (venv, project, ``$HOME``,
``$MLOPS_HOME``, ``/tmp``, ``/dev``, GPUs), the network, pids, users and the environment are shared, and the job
directory stays reachable at its real path too (the engine's remapping of ``/opt/ml`` request paths into the job
directory keeps working; both names reach the same files). Cwd and env are the caller's (passed to ``Popen``).

Mechanisms, in the order :func:`detect` tries them (each probed once, by really running a tiny job in it):

- ``unshare`` (util-linux ``unshare --mount``; not root: ``unshare --user --map-root-user --mount``): the namespace
  is set up by an exec chain -- ``unshare`` execs this module as a script (``python -I -S sandbox.py enter ...``),
  which mounts and execs the command -- so the job is the very process the caller started: same pid, same process
  group, every signal delivered as before, and the exit status is exactly the job's (``Popen.returncode`` / the
  guard's: exit 3 -> 3, killed by SIGKILL -> -9). Not root, the job would see uid 0 (``--map-root-user``, needed to
  mount); after mounting it enters a nested user namespace that maps the caller's uid/gid back, so it sees its own
  ids and has no capabilities, as before.
- ``bwrap`` (bubblewrap; the way in where unprivileged user namespaces are only allowed for it, e.g. Ubuntu 24.04's
  AppArmor policy): bwrap always forks and waits in a monitor process that neither forwards signals nor reports a
  signal death, so it is the fallback. Its monitor is made to ignore the terminating signals (HUP, INT, QUIT, TERM,
  USR1, USR2) that the caller may send to the job's process group; inside the sandbox this module gives the job
  the caller's own dispositions back before it execs the command: a SIGTERM to the group reaches the job, which
  handles it as before. Exit codes pass through; a job that *itself* dies of signal N comes back as exit
  status ``128 + N`` (bwrap's own convention: SIGKILL -> 137, SIGTERM -> 143), except that a SIGKILL sent to the
  whole group kills the monitor as well, so the caller sees -9 then. bwrap mounts everything ``nosuid``.

``/opt/ml`` on the host is never written: when it exists it is covered by the bind mount; when it does not (the
usual case), its nearest existing ancestor (``/opt``) is covered by a tmpfs in the namespace and each of that
ancestor's entries is bind-mounted (recursively) or symlinked back into it, so ``/opt/<anything>`` stays the host's
(read-write) and only the mountpoint ``/opt/ml`` is new, created in the tmpfs. Top-level names created in ``/opt``
by the job land in that tmpfs and are lost; entries the host adds to ``/opt`` during the run are not seen. With no
``/opt`` at all only bwrap can do this (its root is a tmpfs anyway); the ``unshare`` probe fails.

Fallback: where neither works (not Linux, no bwrap, unshare refused: containers without ``CAP_SYS_ADMIN``,
user namespaces disabled), :func:`detect` returns ``Sandbox("none", warning)`` and :func:`wrap` returns the command
unchanged: the job runs as before, and scripts that hard-code ``/opt/ml`` paths not passed to them as arguments read
and write the host's ``/opt/ml`` (and fail where it does not exist). ``MLOPS_SANDBOX=none|bwrap|unshare`` forces a
mechanism (unprobed; an unknown value is a :class:`ValueError`).

Failures inside the wrapper: a mount that fails exits 125 (``sandbox: ...`` on stderr); a command that cannot be
executed exits 127 (``cannot start ...``, as the job guard of :mod:`pipelines.local.jobs.runtime` says). With a
sandbox the guard's own "no such executable" check sees ``unshare``/``python``, not the job's command.

This file is also the in-namespace helper (run as a script with the engine's interpreter, ``-I -S``: stdlib only).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

OPT_ML = "/opt/ml"
ENV = "MLOPS_SANDBOX"
KINDS = ("bwrap", "unshare", "none")

#: Signals bwrap's monitor ignores (see the module docstring); restored to their default for the job.
FORWARDED_SIGNALS = ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2")
#: The caller's ignored signals (``SigIgn``, hex), from the chain's first step to its last (the job never sees it).
SIGNALS_ENV = "MLOPS_SANDBOX_SIGIGN"

EXIT_SANDBOX_FAILED = 125
EXIT_CANNOT_START = 127

_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC = 2, 4, 4096, 16384
_CLONE_NEWUSER = 0x10000000
_PROBE_TIMEOUT_S = 30


@dataclass(frozen=True)
class Sandbox:
    """How jobs get their ``/opt/ml``: ``kind`` is ``"bwrap"``, ``"unshare"`` or ``"none"`` (``warning`` set)."""

    kind: str
    warning: str | None = None


def _none_warning(why: str) -> str:
    return (f"no private /opt/ml for jobs ({why}): jobs run without a mount namespace; scripts that hard-code "
            f"{OPT_ML}/... paths not passed to them as arguments (or SM_* variables) use the host's {OPT_ML} "
            f"instead of the job directory, and fail where it does not exist")


def detect() -> Sandbox:
    """The mechanism jobs run under: ``$MLOPS_SANDBOX`` when set, else the first of unshare, bwrap that works
    here (probed once per process and cached), else ``none`` with a warning."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in KINDS:
            raise ValueError(f"{ENV}={forced!r}: expected one of {', '.join(KINDS)}")
        if forced == "none":
            return Sandbox("none", _none_warning(f"{ENV}=none"))
        return Sandbox(forced)
    return _auto()


@functools.cache
def _auto() -> Sandbox:
    if not sys.platform.startswith("linux"):
        return Sandbox("none", _none_warning(f"mount namespaces need Linux, this is {sys.platform}"))
    reasons = []
    for kind in ("unshare", "bwrap"):
        error = _probe(kind)
        if error is None:
            return Sandbox(kind)
        reasons.append(f"{kind}: {error}")
    return Sandbox("none", _none_warning("; ".join(reasons)))


def wrap(cmd: list[str], job_dir: Path, *, sandbox: Sandbox | None = None) -> list[str]:
    """The argv that runs ``cmd`` with ``job_dir`` mounted at ``/opt/ml`` (``cmd`` itself for ``none``).

    ``job_dir`` must exist and not lie under the host's ``/opt/ml`` (it would be hidden by the mount).
    """
    return _wrap(cmd, Path(job_dir), sandbox or detect(), OPT_ML)


def _wrap(cmd: list[str], job_dir: Path, sandbox: Sandbox, target: str) -> list[str]:
    if not cmd:
        raise ValueError("empty command")
    if sandbox.kind == "none":
        return list(cmd)
    if sandbox.kind not in KINDS:
        raise ValueError(f"unknown sandbox kind {sandbox.kind!r}")
    job = Path(os.path.abspath(job_dir))
    if not job.is_dir():
        raise ValueError(f"job directory {job} does not exist")
    real = job.resolve()
    if real == Path(target) or real.is_relative_to(target):
        raise ValueError(f"job directory {job} is under {target}, which the sandbox mounts over")
    if sandbox.kind == "unshare":
        prefix, user_ns = _unshare_prefix()
        return _unshare_argv(prefix, user_ns, cmd, job, target)
    bwrap = shutil.which("bwrap") or "bwrap"
    return [*_RECORD_SIGNALS, *_HELPER, "monitor", "--", bwrap, *_bwrap_mounts(job, target), "--",
            *_HELPER, "exec", "--", *cmd]


#: The helper: this file as a script, with the engine's interpreter (isolated, no site: stdlib only).
_HELPER = (sys.executable, "-I", "-S", str(Path(__file__).resolve()))

#: First in every chain: ``sh`` records the signals the caller left ignored (its own ``SigIgn``, inherited at exec)
#: in :data:`SIGNALS_ENV`, so the helper that execs the job can restore them exactly (Python's start-up ignores
#: SIGPIPE and SIGXFSZ, and exec keeps that), then execs the rest.
_RECORD_SIGNALS = ("/bin/sh", "-c", f'while read -r k v; do if [ "$k" = SigIgn: ]; then {SIGNALS_ENV}=$v; '
                   f'export {SIGNALS_ENV}; break; fi; done </proc/self/status; exec "$@"', "sh")


def _unshare_argv(prefix: tuple[str, ...], user_ns: bool, cmd: list[str], job: Path, target: str) -> list[str]:
    ids = ["--ids", f"{os.getuid()}:{os.getgid()}"] if user_ns and os.getuid() != 0 else []
    return [*_RECORD_SIGNALS, *prefix, "--", *_HELPER, "enter", "--target", target, *ids, str(job), "--", *cmd]


# --- where /opt/ml goes -----------------------------------------------------------------------------------

def _missing_from(target: str) -> tuple[str, list[str]]:
    """The nearest existing ancestor of ``target`` (``target`` itself when it exists) and the names below it."""
    path, missing = os.path.abspath(target), []
    while not os.path.lexists(path):
        path, name = os.path.split(path)
        missing.insert(0, name)
    return path, missing


def _bwrap_mounts(job: Path, target: str) -> list[str]:
    anchor, missing = _missing_from(target)
    if not missing:
        return ["--dev-bind", "/", "/", "--bind", str(job), target]
    mode = f"{os.stat(anchor).st_mode & 0o7777:04o}"
    args = [] if anchor == "/" else ["--dev-bind", "/", "/", "--perms", mode, "--tmpfs", anchor]
    for name in sorted(os.listdir(anchor)):  # bwrap's root (or the tmpfs on the anchor): the host's entries back
        path = os.path.join(anchor, name)
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        else:
            args += ["--dev-bind", path, path]
    made = anchor
    for name in missing:  # the new mountpoint, 0755 (as unshare's helper makes it)
        made = os.path.join(made, name)
        args += ["--perms", "0755", "--dir", made]
    return [*args, "--bind", str(job), target]


# --- probes -----------------------------------------------------------------------------------------------

_PROBE_SOURCE = "open({path!r}, 'w').write('ok')"


def _run_probe(kind: str, unshare_prefix: tuple[str, ...] = ()) -> str | None:
    """Run a job writing ``/opt/ml/probe`` in the sandbox; None when the file landed in the job dir."""
    with tempfile.TemporaryDirectory(prefix="mlops-sandbox-probe-") as tmp:
        cmd = [sys.executable, "-I", "-S", "-c", _PROBE_SOURCE.format(path=f"{OPT_ML}/probe")]
        if unshare_prefix:
            argv = _unshare_argv(unshare_prefix, "--user" in unshare_prefix, cmd, Path(tmp), OPT_ML)
        else:
            argv = _wrap(cmd, Path(tmp), Sandbox(kind), OPT_ML)
        try:
            done = subprocess.run(argv, cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace", timeout=_PROBE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            return str(exc)
        if done.returncode == 0 and Path(tmp, "probe").is_file():
            return None
        lines = (done.stderr or done.stdout).strip().splitlines()
        return f"exit status {done.returncode}" + (f": {lines[-1]}" if lines else "")


def _unshare_candidates() -> list[tuple[str, ...]]:
    exe = shutil.which("unshare") or "unshare"
    base = (exe, "--mount", "--propagation", "slave")
    user = (exe, "--user", "--map-root-user", "--mount", "--propagation", "slave")
    return [base, user] if os.geteuid() == 0 else [user]


@functools.cache
def _unshare_probe() -> tuple[tuple[str, ...] | None, str | None]:
    """The first unshare invocation that works here (root: plain ``--mount``, else in a user namespace)."""
    if shutil.which("unshare") is None:
        return None, "no unshare executable (util-linux)"
    errors = []
    for prefix in _unshare_candidates():
        error = _run_probe("unshare", prefix)
        if error is None:
            return prefix, None
        errors.append(f"{' '.join(prefix[1:])}: {error}")
    return None, "; ".join(errors)


def _unshare_prefix() -> tuple[tuple[str, ...], bool]:
    """The unshare prefix to use (the probed one; unprobed default when forced) and whether it has a user ns."""
    prefix = _unshare_probe()[0] or _unshare_candidates()[0]
    return prefix, "--user" in prefix


@functools.cache
def _probe(kind: str) -> str | None:
    """None when ``kind`` works on this machine, else why not."""
    if kind == "unshare":
        return _unshare_probe()[1]
    if shutil.which("bwrap") is None:
        return "no bwrap executable (apt-get install bubblewrap)"
    return _run_probe("bwrap")


# --- the helper, inside the namespace (``python -I -S sandbox.py MODE ...``) ---------------------------------

class _Failed(Exception):
    pass


def _errno_call(what: str, result: int) -> None:
    import ctypes

    if result != 0:
        raise _Failed(f"{what}: {os.strerror(ctypes.get_errno())}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    _errno_call(f"mount {source} on {target}", libc.mount(source.encode(), target.encode(),
                                                         fstype.encode() if fstype else None, flags,
                                                         data.encode() if data else None))


def _mount_opt_ml(job: str, target: str) -> None:
    """In a fresh mount namespace: ``job`` at ``target``; a missing ``target`` is made in a tmpfs on its nearest
    existing ancestor, whose entries are bound (or symlinked) back from the covered directory."""
    job_fd = os.open(job, os.O_PATH | os.O_DIRECTORY)
    anchor, missing = _missing_from(target)
    if missing:
        if anchor == "/":
            raise _Failed(f"cannot create {target}: no {os.path.join('/', missing[0])} on this machine, and "
                          "unshare cannot put a tmpfs on / (bwrap can)")
        anchor_fd = os.open(anchor, os.O_PATH | os.O_DIRECTORY)
        names = sorted(os.listdir(anchor))
        mode = os.stat(anchor).st_mode & 0o7777
        _mount("tmpfs", anchor, "tmpfs", _MS_NOSUID | _MS_NODEV, f"mode={mode:o}")
        for name in names:
            src, dest = f"/proc/self/fd/{anchor_fd}/{name}", os.path.join(anchor, name)
            try:
                st = os.lstat(src)
            except FileNotFoundError:  # gone since the listing
                continue
            if os.path.islink(src):
                os.symlink(os.readlink(src), dest)
                continue
            if os.path.isdir(src):
                os.mkdir(dest, st.st_mode & 0o7777)
            else:
                open(dest, "w").close()
            _mount(src, dest, None, _MS_BIND | _MS_REC)
        os.makedirs(target, mode=0o755, exist_ok=True)
        os.close(anchor_fd)
    _mount(f"/proc/self/fd/{job_fd}", target, None, _MS_BIND | _MS_REC)
    os.close(job_fd)


def _restore_ids(uid: int, gid: int) -> None:
    """Leave ``--map-root-user``'s uid 0: a nested user namespace mapping the caller's ids to it (no capabilities
    left after exec)."""
    import ctypes

    _errno_call("unshare(CLONE_NEWUSER)", ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWUSER))
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} 0 1\n"), ("gid_map", f"{gid} 0 1\n")):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)


def _restore_signals() -> None:
    """Give every signal the disposition the caller's process had (ignored or default; handlers do not survive
    exec), as recorded by :data:`_RECORD_SIGNALS`."""
    recorded = os.environ.pop(SIGNALS_ENV, None)
    if recorded is None:  # no /proc to read: leave them
        return
    ignored = int(recorded, 16)
    for num in range(1, signal.NSIG):
        if num in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(num, signal.SIG_IGN if ignored >> (num - 1) & 1 else signal.SIG_DFL)
        except (OSError, ValueError):  # reserved by the C library
            pass


def _exec(cmd: list[str]) -> int:
    _restore_signals()
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        sys.stderr.write(f"cannot start {cmd[0]}: {exc.strerror}\n")
    return EXIT_CANNOT_START


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        raise _Failed("usage: sandbox.py enter|monitor|exec [OPTIONS] -- COMMAND...")
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def _enter(options: list[str]) -> None:
    """unshare's step: mount (in the namespace unshare made), then leave ``--map-root-user``'s uid 0."""
    target, ids = OPT_ML, None
    while len(options) > 1 and options[0] in ("--target", "--ids"):
        if options[0] == "--target":
            target = options[1]
        else:
            uid, gid = options[1].split(":")
            ids = (int(uid), int(gid))
        options = options[2:]
    if len(options) != 1:
        raise _Failed("usage: sandbox.py enter [--target DIR] [--ids UID:GID] JOB_DIR -- COMMAND...")
    _mount_opt_ml(options[0], target)
    if ids is not None:
        _restore_ids(*ids)


def _main(argv: list[str]) -> int:
    """``enter`` (unshare: mount, then exec the job), ``monitor`` (exec bwrap ignoring the signals the caller may
    send to the job's group) or ``exec`` (inside bwrap: restore the caller's signal dispositions, exec the job)."""
    try:
        mode, (options, cmd) = (argv[0] if argv else ""), _split(argv[1:])
        if mode == "enter":
            _enter(options)
        elif mode == "monitor":
            for name in FORWARDED_SIGNALS:
                signal.signal(getattr(signal, name), signal.SIG_IGN)
            os.execvp(cmd[0], cmd)  # bwrap; the job's own dispositions travel in SIGNALS_ENV
        elif mode != "exec":
            raise _Failed(f"unknown mode {mode!r}")
    except (_Failed, OSError, ValueError) as exc:
        sys.stderr.write(f"sandbox: {exc}\n")
        return EXIT_SANDBOX_FAILED
    return _exec(cmd)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
