"""Local state of the embedded engine: one directory (``MLOPS_HOME``, default ``./.mlops``).

Layout::

    $MLOPS_HOME/
      artifacts/<bucket>/<key>     the local stand-in for s3://<bucket>/<key>
      mlops.db                     SQLite: executions, steps, trials, model registry, endpoints
      runs/<execution-id>/<step>/  job working dirs (remapped /opt/ml), logs per step

Every module owns its own tables (``CREATE TABLE IF NOT EXISTS`` in its ``SCHEMA``) and gets its
connection from :func:`connect`, so there is exactly one database and one way to open it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipelines import arns

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock (one engine per MLOPS_HOME there)
    fcntl = None  # type: ignore[assignment]

LOCAL_BUCKET = "mlops-local"
LOCAL_REGION = "us-east-1"
LOCAL_ACCOUNT = "000000000000"
LOCAL_ROLE_ARN = arns.iam_role_arn(LOCAL_REGION, LOCAL_ACCOUNT, "MLOpsLocalExecutionRole")
DEPLOY_FUNCTION_NAME = "imgclf-deploy-approved-model"
DEPLOY_FUNCTION_ARN = arns.lambda_function_arn(LOCAL_REGION, LOCAL_ACCOUNT, DEPLOY_FUNCTION_NAME)


def mlops_home() -> Path:
    """The local state directory (env ``MLOPS_HOME``, default ``./.mlops``), created on first use."""
    home = Path(os.environ.get("MLOPS_HOME") or Path.cwd() / ".mlops").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def runs_dir() -> Path:
    path = mlops_home() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


#: SQLite's busy timeout everywhere we open a database (seconds): a writer waits that long for another's lock.
SQLITE_TIMEOUT_S = 30.0


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing): serializes processes of this host.
    ``on_wait`` is called once when another process holds it (before waiting for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def connect(schema: Iterable[str] = ()) -> sqlite3.Connection:
    """Open the engine's SQLite database (WAL, busy timeout, ``Row`` rows) and apply ``schema`` statements.

    A fresh database is switched to WAL under a file lock (``mlops.db.lock``): that switch does not wait for other
    connections' locks, so engines starting together on a fresh ``MLOPS_HOME`` would race there. Everything else
    (the schema's ``CREATE ... IF NOT EXISTS`` included) waits up to the busy timeout for SQLite's own locks. The file
    lock is never taken once the database is in WAL mode, so no process waits for it while holding a transaction.
    """
    home = mlops_home()
    conn = sqlite3.connect(home / "mlops.db", timeout=SQLITE_TIMEOUT_S, isolation_level=None,
                           check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={int(SQLITE_TIMEOUT_S * 1000)}")
    conn.execute("PRAGMA foreign_keys=ON")
    if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
        with file_lock(home / "mlops.db.lock"):
            conn.execute("PRAGMA journal_mode=WAL")
    for statement in schema:
        conn.execute(statement)
    return conn


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """An immediate (write-locking) transaction on ``conn``: committed at the end, rolled back on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def transaction(schema: Iterable[str] = (), write: bool = False) -> Iterator[sqlite3.Connection]:
    """A connection for one unit of work; with ``write`` an immediate transaction, rolled back on error."""
    conn = connect(schema)
    try:
        if write:
            with immediate(conn):
                yield conn
        else:
            yield conn
    finally:
        conn.close()


class ArtifactStore:
    """Maps ``s3://bucket/key`` to files under ``$MLOPS_HOME/artifacts``; local paths and ``file://`` pass through."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or mlops_home() / "artifacts").resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, uri: str) -> Path:
        """Local path of an ``s3://``, ``file://`` or plain-path URI (no existence check)."""
        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ValueError(f"S3 URI without a bucket: {uri!r}")
            target = (self.root / parsed.netloc / unquote(parsed.path.lstrip("/"))).resolve()
            if not target.is_relative_to(self.root):
                raise ValueError(f"S3 URI escapes the artifact store: {uri!r}")
            return target
        if parsed.scheme == "file":
            return Path(unquote(parsed.path))
        if parsed.scheme in ("", None) or len(parsed.scheme) == 1:  # plain path (or a Windows drive letter)
            return Path(uri).expanduser().resolve()
        raise ValueError(f"unsupported URI scheme {parsed.scheme!r} in {uri!r} (use s3://, file:// or a local path)")

    def uri(self, path: Path) -> str:
        """The ``s3://`` URI of a path inside the store (``file://`` for paths outside it)."""
        path = Path(path).resolve()
        if path.is_relative_to(self.root):
            bucket, *key = path.relative_to(self.root).parts
            return f"s3://{bucket}/{'/'.join(key)}"
        return path.as_uri()

    def put_bytes(self, uri: str, data: bytes) -> Path:
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # writers never collide
        tmp.write_bytes(data)
        tmp.replace(target)
        return target

    def exists(self, uri: str) -> bool:
        return self.path(uri).exists()

    def copy_in(self, src: Path, uri: str) -> Path:
        """Copy a file or directory tree to ``uri`` (replacing what is there)."""
        target = self.path(uri)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, target)
        else:
            shutil.copy2(src, target)
        return target

    def copy_out(self, uri: str, dest: Path) -> Path:
        """Copy what ``uri`` names (a file, or every object under a prefix) into ``dest``."""
        src = self.path(uri)
        if not src.exists():
            raise FileNotFoundError(f"{uri} does not exist in the local artifact store ({src})")
        dest = Path(dest)
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / src.name)
        return dest
