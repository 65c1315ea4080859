"""Warm starts: a job's Python processes fork from an interpreter that has already imported torch.

A training job starts two Python interpreters that each import torch before they do anything -- the training
toolkit (``sagemaker_pytorch_container`` imports it to set ``SM_DLC_TORCH_VERSION``) and the user's script (torch,
torchvision...) -- and a processing job's script does the same: on 2 cores that is ~1.5 s and ~3 s per process, more
than a small job's training. A *zygote* pays it once per job environment: a long-lived interpreter (started by the
engine, one per set of load-time settings, see :data:`LOAD_TIME_PREFIXES`) that imports :data:`PRELOAD` and then
forks a child for each job process that asks.

What a job sees stays a fresh process's view. Every ``python`` of a job environment runs this file's
:func:`hand_over` from the environment's ``.pth`` (:mod:`pipelines.local.jobs.environment`), once ``sys.path`` is
complete; when ``MLOPS_ZYGOTE_SOCKET`` is set and the command is ``python <script> ...`` (``python -m <module>``
only with ``MLOPS_ZYGOTE_MODULES=1``, :data:`MODULES_ENV`; never ``-m pip``, ``-c`` or other options), it sends the
zygote its ``argv``, ``sys.path``, environment, cwd, signal dispositions and its stdin/stdout/stderr
(``SCM_RIGHTS``). The zygote forks a child that

- joins the asking process's user and mount namespaces (``setns``: the job's private ``/opt/ml``,
  :mod:`pipelines.local.jobs.sandbox`), takes its capabilities, ids and ``no_new_privs`` or fails, and leads a
  session of its own (the zygote kills that session if the asking process dies: a stopped job stops);
- takes that process's cwd, environment (``os.environ``, so its own children inherit it), ``sys.argv``,
  ``sys.orig_argv``, ``sys.path`` (plus the script's directory or the cwd as a fresh interpreter puts first),
  ``sys.executable`` and prefixes, stdio and ignored signals; reseeds what a fresh process seeds from the OS
  (``random`` does it itself after a fork; NumPy's global generator here);
- checks that every preloaded package resolves, under that ``sys.path``, to the very files it loaded -- else it is a
  different package (a ``requirements.txt`` that shadows one, a ``PYTHONPATH``) and the process starts cold;
- runs the script as ``__main__`` (``python -m``: :func:`runpy._run_module_as_main`, what the interpreter itself
  calls) and ends as an interpreter does: ``SystemExit`` codes, a traceback and status 1, non-daemon threads
  joined, ``atexit`` handlers, flushed stdio, death by ``SIGINT`` after ``KeyboardInterrupt``.

The asking process forwards the terminating signals to the child, waits, and exits with the child's status (or
dies of the same signal). Whatever does not qualify -- no zygote, other interpreter options, a package installed
into the job environment, different load-time variables (``OMP_NUM_THREADS``, ``PYTHON*``, ``LD_*``... are read
when a library loads), different ``sys.flags``, a namespace that cannot be joined -- starts cold, as before; the
zygote's log (``$MLOPS_HOME/zygotes/``, :mod:`pipelines.local.jobs.warm`) says why.

Differences from a cold start, all known ones: ``os.getppid()`` is the zygote; the process leads its own session;
modules of :data:`PRELOAD` (and what they import) are in ``sys.modules`` before the script imports them; the
string-hash seed (``PYTHONHASHSEED`` unset) is the zygote's, the same for every job; so is
``sys.flags.dont_write_bytecode`` (``sys.dont_write_bytecode``, which imports obey, is the process's); the
interpreter's own start-up files (``sitecustomize``) ran once, in the zygote. ``MLOPS_ZYGOTE_SOCKET`` is in the
job's environment, and ``sys.meta_path[0]`` is a :class:`ShadowWatch`: a process that installs a package over a
preloaded one and then imports it keeps the preloaded one (it cannot be unloaded), where a cold process would get
the new one -- the watcher says so on stderr when it happens.

This file is the zygote (run as a script: ``python zygote.py --socket PATH``) and, copied into each job
environment as ``_mlops_zygote.py``, the client: standard library only.
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time

SOCKET_ENV = "MLOPS_ZYGOTE_SOCKET"
#: ``python -m`` hands over only with this set to 1 (a cautious default: it is the least exercised form).
MODULES_ENV = "MLOPS_ZYGOTE_MODULES"
PRELOAD = ("numpy", "PIL.Image", "torch", "torchvision", "torchvision.transforms.v2")
#: Environment variables read when an interpreter or a native library loads: a zygote serves only processes whose
#: values of these equal its own (``PYTHONPATH`` is applied per process: it is in ``sys.path``).
#: (Read later, at first use, and so not here: ``CUDA_VISIBLE_DEVICES`` and CUDA's, NCCL's -- the zygote never
#: initialises CUDA or a process group.)
LOAD_TIME_PREFIXES = ("PYTHON", "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "LD_", "MALLOC_", "TORCH", "PYTORCH_",
                      "TRITON_")
#: ...but these are applied per process: ``sys.path``, stdio (re-created as the asking process has it) and
#: ``sys.dont_write_bytecode``.
PER_PROCESS = frozenset({"PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONIOENCODING", "PYTHONDONTWRITEBYTECODE", SOCKET_ENV})
#: Signals the asking process passes on to the child.
FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
#: The files a job environment's ``site-packages`` holds before anything is installed into it.
CLIENT_MODULE = "_mlops_zygote"

_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_HEADER = struct.Struct("!I")
#: ``sys.flags.dont_write_bytecode`` (``PYTHONDONTWRITEBYTECODE``) is the one flag applied per process.
_FLAG_DONT_WRITE_BYTECODE = list(sys.flags.__match_args__).index("dont_write_bytecode")


def load_time_env(env: dict[str, str] | os._Environ) -> dict[str, str]:
    """The variables of ``env`` that a zygote must share with the processes it serves."""
    return {k: v for k, v in env.items() if k.startswith(LOAD_TIME_PREFIXES) and k not in PER_PROCESS}


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [_HEADER.pack(len(data)) + data], fds)
    else:
        sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(size - got)
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket, with_fds: int = 0) -> tuple[dict, list[int]]:
    fds: list[int] = []
    if with_fds:
        head, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, with_fds)
        if not head:
            raise EOFError("connection closed")
        head += _recv_exact(sock, _HEADER.size - len(head))
    else:
        head = _recv_exact(sock, _HEADER.size)
    (size,) = _HEADER.unpack(head)
    return json.loads(_recv_exact(sock, size)), fds


# ------------------------------------------------------------------------------------------------ client side


def _command(orig_argv: list[str]) -> tuple[str, str] | None:
    """``("script", path)`` / ``("module", name)`` for ``python <script> ...`` / ``python -m <module> ...``."""
    if len(orig_argv) < 2:
        return None
    first = orig_argv[1]
    if first == "-m" and len(orig_argv) > 2 and os.environ.get(MODULES_ENV) == "1" \
            and orig_argv[2].split(".")[0] != "pip":
        return ("module", orig_argv[2])
    if not first.startswith("-") and os.path.isfile(first):
        return ("script", first)
    return None


def _pristine_site_packages() -> bool:
    """Nothing installed into this job environment (only its ``.pth`` and this module)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return all(name == "__pycache__" or name.startswith(("_mlops_", CLIENT_MODULE)) for name in os.listdir(here))


def _request(kind: str, target: str) -> dict:
    ignored = [name for name in FORWARDED + ("SIGPIPE", "SIGXFSZ", "SIGCHLD", "SIGTSTP", "SIGTTIN", "SIGTTOU")
               if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) == signal.SIG_IGN]
    return {"kind": kind, "target": target, "argv": list(sys.argv), "orig_argv": list(sys.orig_argv),
            "cwd": os.getcwd(), "env": dict(os.environ), "path": list(sys.path), "executable": sys.executable,
            "prefix": sys.prefix, "exec_prefix": sys.exec_prefix, "base_prefix": sys.base_prefix,
            "flags": list(sys.flags), "pid": os.getpid(), "ignored": ignored, "umask": _umask(),
            "dont_write_bytecode": sys.dont_write_bytecode, "stdio": [_stream_spec(s) for s in _STDIO],
            "site_packages": os.path.dirname(os.path.abspath(__file__))}


_STDIO = ("stdin", "stdout", "stderr")


def _stream_spec(name: str) -> dict | None:
    """How the interpreter made ``sys.<name>`` (encoding, errors, buffering), to make the same one in the child."""
    stream = getattr(sys, name)
    if stream is None or not hasattr(stream, "buffer"):
        return None
    return {"encoding": stream.encoding, "errors": stream.errors, "line_buffering": stream.line_buffering,
            "write_through": stream.write_through, "raw": not hasattr(stream.buffer, "raw")}


def _make_stream(name: str, fd: int, spec: dict | None):
    import io

    if spec is None:
        return None
    mode = "rb" if name == "stdin" else "wb"
    raw = io.FileIO(fd, mode, closefd=False)
    binary = raw if spec["raw"] else (io.BufferedReader(raw) if name == "stdin" else io.BufferedWriter(raw))
    text = io.TextIOWrapper(binary, encoding=spec["encoding"], errors=spec["errors"], newline="\n",
                            line_buffering=spec["line_buffering"], write_through=spec["write_through"])
    text.mode = mode[0]
    raw.name = f"<{name}>"
    return text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exit_like(status: int) -> None:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if not os.WIFSIGNALED(status) else 128 + os.WTERMSIG(status))


_tried = False


def hand_over() -> None:
    """Run this process's command in a child of the zygote and exit with its status; return (start cold) when the
    command or the environment does not qualify, or no zygote answers."""
    global _tried
    if _tried:  # the .pth may be read twice (lib and lib64 of a venv): one attempt
        return
    _tried = True
    path = os.environ.get(SOCKET_ENV)
    command = _command(list(getattr(sys, "orig_argv", [])))
    if not path or command is None or sys.platform != "linux" or not _pristine_site_packages():
        return
    child: list[int] = []  # the child's pid, once known
    pending: list[int] = []  # signals that came before it was

    def forward(signum: int, _frame: object) -> None:
        if not child:
            pending.append(signum)
            return
        try:
            os.kill(child[0], signum)
        except OSError:
            pass

    previous = {name: signal.getsignal(getattr(signal, name)) for name in FORWARDED}
    for name, handler in previous.items():
        if handler != signal.SIG_IGN:
            signal.signal(getattr(signal, name), forward)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        _send(sock, _request(*command), [0, 1, 2])
        reply, _ = _recv(sock)
    except (OSError, EOFError, ValueError):
        reply = {}
    if "pid" not in reply:  # start cold, as if nothing happened (a signal meanwhile is delivered now)
        sock.close()
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
        for signum in pending:
            os.kill(os.getpid(), signum)
        return
    child.append(int(reply["pid"]))
    for signum in pending:
        forward(signum, None)
    while True:
        try:
            message, _ = _recv(sock)
        except InterruptedError:
            continue
        except (OSError, EOFError, ValueError):
            os._exit(1)  # the zygote is gone (it kills its children when it goes)
        if "status" in message:
            _exit_like(int(message["status"]))


# ------------------------------------------------------------------------------------------------ child side


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _status_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _set_caps(libc: ctypes.CDLL, status: dict[str, str]) -> None:
    """This process's effective/permitted/inheritable capabilities set to those in ``status`` (``/proc/<pid>``)."""
    eff, prm, inh = (int(status[k], 16) for k in ("CapEff", "CapPrm", "CapInh"))
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (eff >> shift) & 0xFFFFFFFF
        data[i].permitted = (prm >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inh >> shift) & 0xFFFFFFFF
    header = _CapHeader(0x20080522, 0)
    _check(libc.capset(ctypes.byref(header), data), "capset")


def _join_namespaces(pid: int) -> None:
    """Enter ``pid``'s user and mount namespaces (where they differ from ours) and take its ids and capabilities."""
    libc = _libc()
    theirs = _status_of(pid)
    joined_user = False
    for name, flag in (("user", _CLONE_NEWUSER), ("mnt", _CLONE_NEWNS)):
        target = f"/proc/{pid}/ns/{name}"
        if os.stat(target).st_ino == os.stat(f"/proc/self/ns/{name}").st_ino:
            continue
        fd = os.open(target, os.O_RDONLY)
        try:
            _check(libc.setns(fd, flag), f"setns({name})")
        finally:
            os.close(fd)
        joined_user = joined_user or name == "user"
    if joined_user:
        gid, uid = int(theirs["Gid"].split()[0]), int(theirs["Uid"].split()[0])
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    if theirs.get("NoNewPrivs", "0").strip() == "1":
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    mine = _status_of(os.getpid())
    if any(mine[k] != theirs[k] for k in ("CapEff", "CapPrm", "CapInh")):
        _set_caps(libc, theirs)
        mine = _status_of(os.getpid())
    for key in ("Uid", "Gid", "CapEff", "CapPrm", "CapInh"):
        if mine[key].split() != theirs[key].split():
            raise OSError(f"{key} would be {mine[key]!r}, the job's is {theirs[key]!r}")


def _path0(request: dict) -> str:
    if request["kind"] == "module":
        return os.getcwd()
    return os.path.dirname(os.path.realpath(request["target"]))


def _same_packages(preloaded: dict[str, str]) -> str | None:
    """Why the preloaded packages are not what this ``sys.path`` would import, or None."""
    from importlib.machinery import PathFinder

    for name, origin in preloaded.items():
        spec = PathFinder.find_spec(name, sys.path)
        found = spec.origin if spec is not None else None
        if found is None or os.path.realpath(found) != origin:
            return f"{name} would be imported from {found}, not {origin}"
    return None


class ShadowWatch:
    """A meta-path finder that finds nothing and watches: once something is installed into the job environment after
    the fork (a script's own ``pip install``; the SDK's ``@step`` bootstrap does it and then imports in the same
    process), the next import of a module not yet loaded checks whether a preloaded package would now come from other
    files, and says so once on stderr. The process keeps the preloaded module (it cannot be unloaded); a cold process
    would have imported the new one, so an import that then fails has its cause written just above it."""

    def __init__(self, preloaded: dict[str, str], site_packages: str) -> None:
        self.preloaded = preloaded
        self.site_packages = site_packages
        self.seen = self._mtime()
        self.warned = False

    def _mtime(self) -> int | None:
        try:
            return os.stat(self.site_packages).st_mtime_ns
        except OSError:
            return None

    def find_spec(self, _name: str, _path: object = None, _target: object = None) -> None:
        if self.warned or (mtime := self._mtime()) == self.seen:
            return None
        self.seen = mtime
        why = _same_packages(self.preloaded)
        if why:
            self.warned = True
            sys.stderr.write(f"[zygote] warning: {why}: something was installed into {self.site_packages} after "
                             f"this warm-started process began, and it keeps the preloaded module (a cold process "
                             f"would import the new one). If an import fails below, run with MLOPS_WARM_START=0 "
                             f"(docs/JOB_ENVIRONMENTS.md, Warm starts).\n")
            sys.stderr.flush()
        return None


def _take_over(request: dict, fds: list[int], preloaded: dict[str, str]) -> None:
    """In the forked child: become the asking process (module docstring); raises on what it cannot take."""
    os.setsid()
    _check(_libc().prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0), "prctl(PDEATHSIG)")
    _join_namespaces(int(request["pid"]))
    os.chdir(request["cwd"])
    os.umask(int(request["umask"]))
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    for name in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGTSTP", "SIGTTIN", "SIGTTOU"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in ("SIGPIPE", "SIGXFSZ"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    for name in request["ignored"]:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv, sys.orig_argv = list(request["argv"]), list(request["orig_argv"])
    sys.executable, sys._base_executable = request["executable"], request["executable"]
    sys.prefix, sys.exec_prefix = request["prefix"], request["exec_prefix"]
    sys.path[:] = [_path0(request), *request["path"]]
    sys.dont_write_bytecode = bool(request["dont_write_bytecode"])
    for name, fd, spec in zip(_STDIO, (0, 1, 2), request["stdio"], strict=True):
        stream = _make_stream(name, fd, spec)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    import importlib

    importlib.invalidate_caches()
    why = _same_packages(preloaded)
    if why:
        raise OSError(why)
    sys.meta_path.insert(0, ShadowWatch(preloaded, request["site_packages"]))
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()




def _exit_code(exc: SystemExit) -> int:
    """What the interpreter makes of ``SystemExit``: None -> 0, an int, anything else printed -> 1."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        sys.stderr.write(f"{code}\n")
    except Exception:  # noqa: BLE001 -- as the interpreter: exit 1 anyway
        pass
    return 1


def _run(request: dict) -> None:
    """Run the command as ``__main__`` and end like an interpreter; never returns."""
    import atexit
    import threading

    code, interrupted = 0, False
    try:
        if request["kind"] == "module":
            import runpy

            runpy._run_module_as_main(request["target"], alter_argv=True)
        else:
            _run_script(request["target"])
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException as exc:  # noqa: BLE001 -- reported as the interpreter reports it
        interrupted = isinstance(exc, KeyboardInterrupt)
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code = 1
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001,S110 -- a closed stream, or a signal handler's exit: go on
                pass
        if interrupted:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


def _run_script(path: str) -> None:
    import types
    from importlib.machinery import SourceFileLoader

    with open(path, "rb") as fh:
        source = fh.read()
    main = types.ModuleType("__main__")
    main.__dict__.update({"__file__": path, "__cached__": None, "__builtins__": __builtins__,
                          "__loader__": SourceFileLoader("__main__", path), "__spec__": None, "__package__": None})
    sys.modules["__main__"] = main
    exec(compile(source, path, "exec"), main.__dict__)  # noqa: S102 -- running the job's script is the point


# ------------------------------------------------------------------------------------------------ zygote


class Zygote:
    """The server: preloads, then forks a child per request and reports each child's exit status."""

    def __init__(self, socket_path: str, parent: int, log: object) -> None:
        self.parent = parent
        self.log = log
        self.env = load_time_env(os.environ)
        self.flags = list(sys.flags)
        self.socket_path = socket_path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, socket.socket] = {}  # child pid -> the asking process's connection
        self.preloaded: dict[str, str] = {}

    def say(self, message: str) -> None:
        self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} zygote {os.getpid()}: {message}\n")
        self.log.flush()

    def preload(self, names: list[str]) -> None:
        import importlib

        started = time.perf_counter()
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 -- what does not import is simply not preloaded
                self.say(f"not preloaded: {name}: {exc}")
        for name, module in list(sys.modules.items()):
            origin = getattr(module, "__file__", None)
            if "." not in name and origin and name in {n.split(".")[0] for n in names}:
                self.preloaded[name] = os.path.realpath(origin)
        self.say(f"preloaded {', '.join(sorted(self.preloaded))} in {time.perf_counter() - started:.2f} s")

    def refusal(self, request: dict) -> str | None:
        env = load_time_env(request["env"])
        if env != self.env:
            keys = sorted(k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k))
            return f"load-time variables differ: {', '.join(keys)}"
        flags = list(request["flags"])
        flags[_FLAG_DONT_WRITE_BYTECODE] = self.flags[_FLAG_DONT_WRITE_BYTECODE]
        if flags != self.flags or request["base_prefix"] != sys.base_prefix:
            return "interpreter flags or base interpreter differ"
        return None

    def serve(self) -> None:
        """Listen (only now: a process that asks while the zygote preloads finds no socket and starts cold, instead
        of waiting for imports it may not need) and serve until the engine is gone."""
        self.listener.bind(self.socket_path)
        self.listener.listen(64)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.say(f"listening on {self.socket_path}")
        while True:
            for key, _events in self.selector.select(timeout=0.2):
                if key.fileobj is self.listener:
                    self.accept()
                else:
                    self.peer_event(key.fileobj)  # type: ignore[arg-type]
            self.reap()
            if os.getppid() != self.parent:
                self.say("engine gone: stopping")
                self.stop()

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            request, fds = _recv(conn, with_fds=3)
        except (OSError, EOFError, ValueError) as exc:
            self.say(f"bad request: {exc}")
            conn.close()
            return
        try:
            why = self.refusal(request)
            pid = None if why else self.fork(request, fds)
        finally:
            for fd in fds:
                os.close(fd)
        if pid is None:
            self.say(f"cold start for {request['orig_argv'][:3]}: {why}")
            _send(conn, {"cold": why})
            conn.close()
            return
        self.children[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ)
        _send(conn, {"pid": pid})

    def fork(self, request: dict, fds: list[int]) -> int | None:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(ready_r)
                self.listener.close()
                for conn in self.children.values():
                    conn.close()
                self.selector.close()
                _take_over(request, fds, self.preloaded)
                os.write(ready_w, b"ok")
                os.close(ready_w)
            except BaseException as exc:  # noqa: BLE001 -- reported to the zygote, the process starts cold
                try:
                    os.write(ready_w, f"fail {exc}".encode()[:4000])
                finally:
                    os._exit(70)
            try:
                _run(request)  # ends in os._exit
            finally:
                os._exit(1)  # whatever escaped it (a signal handler's exception at the very end) must not fall
                #              through into the zygote's own code in this child
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as fh:
            answer = fh.read().decode(errors="replace")
        if answer != "ok":
            os.waitpid(pid, 0)
            self.say(f"cold start for {request['orig_argv'][:3]}: {answer.removeprefix('fail ')}")
            return None
        self.say(f"forked {pid} for {request['orig_argv'][:3]} (asked by {request['pid']})")
        return pid

    def peer_event(self, conn: socket.socket) -> None:
        """The asking process never writes after its request: readable means it is gone; so goes its child."""
        for pid, c in list(self.children.items()):
            if c is conn:
                self.say(f"asking process of {pid} gone: killing its session")
                kill_session(pid)
                self.selector.unregister(conn)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            self.say(f"{pid} ended: {_describe(status)}")
            kill_session(pid)  # what the child left behind, as at the end of a process's container
            try:
                _send(conn, {"status": status})
            except OSError:
                pass
            try:
                self.selector.unregister(conn)
            except (KeyError, ValueError):
                pass
            conn.close()

    def stop(self, *_args: object) -> None:
        for pid in list(self.children):
            kill_session(pid)
        os._exit(0)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (a child of the zygote leads one)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        if int(data[data.rindex(b")") + 2:].split()[3]) == sid:
            try:
                os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="a zygote for job processes (pipelines.local.jobs.zygote)")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--parent", type=int, required=True, help="the engine's pid: the zygote ends with it")
    parser.add_argument("--preload", default=",".join(PRELOAD))
    args = parser.parse_args(argv)
    log = sys.stderr
    zygote = Zygote(args.socket, args.parent, log)
    signal.signal(signal.SIGTERM, zygote.stop)
    signal.signal(signal.SIGHUP, zygote.stop)
    zygote.preload([n for n in args.preload.split(",") if n])
    zygote.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
