"""Safe archive extraction (no path traversal, no links out of the tree, no device files, no bombs).

Used by the preprocessor (user archives), evaluation (``model.tar.gz``), the serving handler and the
local engine. ``tarfile``'s ``data`` filter (PEP 706) vets every tar member; zip members are checked by
hand because ``zipfile`` has no equivalent.

Every byte is written by this module, chunk by chunk, and counted *before* it is written against
``ExtractionLimits`` (docs/LIMITS.md): total extracted bytes, number of entries and compression ratio
(bytes written / compressed bytes read so far). What is counted is what comes out of the decompressor,
not what the headers say, so lying headers and GNU sparse tar members (counted at their expanded size,
and written densely) cannot get past the limits. On any error, whatever this call extracted is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

ENV_MAX_BYTES = "MLOPS_ARCHIVE_MAX_BYTES"
ENV_MAX_FILES = "MLOPS_ARCHIVE_MAX_FILES"
ENV_MAX_RATIO = "MLOPS_ARCHIVE_MAX_RATIO"
DEFAULT_MAX_BYTES = 20 * 2**30  # 20 GiB: dogImages is ~1.1 GB
DEFAULT_MAX_FILES = 1_000_000  # dogImages has ~8.4k files
DEFAULT_MAX_RATIO = 200.0  # JPEG/PNG datasets compress ~1:1; deflate tops out near 1:1032
RATIO_GRACE_BYTES = 2**20  # the ratio is only enforced once this much has been extracted
CHUNK_BYTES = 2**16  # small reads keep "compressed bytes read" close to what the output really came from
# how a user raises each limit (named in every limit error)
_HOW_TO_RAISE = {
    "max_bytes": f"--archive-max-bytes (steps/preprocess.py) or env {ENV_MAX_BYTES}",
    "max_files": f"--archive-max-files (steps/preprocess.py) or env {ENV_MAX_FILES}",
    "max_ratio": f"--archive-max-ratio (steps/preprocess.py) or env {ENV_MAX_RATIO}",
}
_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


class UnsafeArchiveError(ValueError):
    """An archive member would escape the destination directory or is not a regular file/dir."""


class ArchiveLimitError(UnsafeArchiveError):
    """Extraction stopped: the archive would exceed one of the ``ExtractionLimits``."""

    def __init__(self, archive: str | Path, limit: str, value: float, detail: str) -> None:
        self.limit, self.value = limit, value
        super().__init__(f"refusing to extract {archive}: {detail}, over the {limit} limit of "
                         f"{format_limit(limit, value)}; if the archive is genuine, raise it with "
                         f"{_HOW_TO_RAISE[limit]}")


def parse_byte_size(text: str | int) -> int:
    """``"20GiB"``, ``"500MB"``, ``"1.5G"``, ``"1048576"`` -> bytes (K/M/G/T and KiB.. are binary, KB.. decimal)."""
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise ValueError(f"{text!r} is not a byte size (examples: 1048576, 500MB, 20GiB)")
    return int(float(match.group(1).replace("_", "")) * _UNITS[unit])


def format_limit(limit: str, value: float) -> str:
    """``max_bytes`` as ``"1048576 bytes (1 MiB)"``, the others as plain numbers."""
    if limit != "max_bytes":
        return f"{value:g}"
    unit = next(u for u in ("TiB", "GiB", "MiB", "KiB", "B") if value >= _UNITS[u.lower()] or u == "B")
    return f"{int(value)} bytes ({value / _UNITS[unit.lower()]:.3g} {unit})"


@dataclass(frozen=True)
class ExtractionLimits:
    """Bounds on what one extraction may produce (all must be > 0)."""

    max_bytes: int = DEFAULT_MAX_BYTES  # total bytes of the extracted files (hard links count again)
    max_files: int = DEFAULT_MAX_FILES  # entries: files, folders and links
    max_ratio: float = DEFAULT_MAX_RATIO  # extracted bytes / compressed bytes read, after RATIO_GRACE_BYTES

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_files", "max_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"archive limit {name} must be > 0, got {getattr(self, name)!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ExtractionLimits:
        """Defaults overridden by ``MLOPS_ARCHIVE_MAX_BYTES`` / ``_MAX_FILES`` / ``_MAX_RATIO``."""
        env = os.environ if environ is None else environ
        values: dict[str, float] = {}
        for field, var, parse in (("max_bytes", ENV_MAX_BYTES, parse_byte_size), ("max_files", ENV_MAX_FILES, int),
                                  ("max_ratio", ENV_MAX_RATIO, float)):
            if env.get(var, "").strip():
                try:
                    values[field] = parse(env[var].strip())
                except ValueError as exc:
                    raise ValueError(f"env {var}={env[var]!r} is not valid: {exc}") from exc
        return cls(**values)


class ExtractionBudget:
    """Counts entries and bytes of one extraction; raises ``ArchiveLimitError`` *before* a limit is passed."""

    def __init__(self, archive: str | Path, limits: ExtractionLimits, consumed: Callable[[], int]) -> None:
        self.archive, self.limits, self.consumed = archive, limits, consumed
        self.files = 0
        self.bytes = 0

    def add_entry(self, name: str) -> None:
        if self.files + 1 > self.limits.max_files:
            raise ArchiveLimitError(self.archive, "max_files", self.limits.max_files,
                                    f"it holds more than {self.limits.max_files} entries (at {name!r})")
        self.files += 1

    def charge(self, name: str, nbytes: int) -> None:
        """Account for ``nbytes`` about to be written for member ``name``."""
        total = self.bytes + nbytes
        if total > self.limits.max_bytes:
            raise ArchiveLimitError(self.archive, "max_bytes", self.limits.max_bytes,
                                    f"member {name!r} takes the extracted size past {self.limits.max_bytes} bytes")
        read = max(1, self.consumed())
        if total > RATIO_GRACE_BYTES and total > self.limits.max_ratio * read:
            raise ArchiveLimitError(self.archive, "max_ratio", self.limits.max_ratio,
                                    f"it expands {total / read:.0f}x ({total} bytes out of {read} compressed "
                                    f"bytes read, at member {name!r})")
        self.bytes = total


@contextlib.contextmanager
def _all_or_nothing(dest: Path) -> Iterator[Path]:
    """Create ``dest``; if the body raises, remove what was added to it (all of it if it was new)."""
    existed = dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(dest))
    try:
        yield dest
    except BaseException:
        if not existed:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for name in set(os.listdir(dest)) - before:
                path = dest / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


class _CountingFile:
    """A read-only binary file that counts the bytes read through it: the compressed bytes the decompressor
    actually consumed (re-reads included), whatever the headers say."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.name = fh.name
        self.bytes_read = 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self.bytes_read += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def seekable(self) -> bool:
        return True


def _write_counted(src: BinaryIO, target: Path, name: str, budget: ExtractionBudget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink():
        target.unlink()
    with target.open("wb") as out:
        while chunk := src.read(CHUNK_BYTES):
            budget.charge(name, len(chunk))
            out.write(chunk)


def _extract_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, budget: ExtractionBudget,
                        archive: str | Path) -> None:
    try:
        safe = tarfile.data_filter(member, str(dest))
    except tarfile.FilterError as exc:
        raise UnsafeArchiveError(f"refusing to extract {archive}: {exc}") from exc
    budget.add_entry(safe.name)
    if safe.isreg():
        if budget.bytes + safe.size > budget.limits.max_bytes:
            budget.charge(safe.name, safe.size)  # raises: the header alone is enough to refuse (never to accept)
        src = tar.extractfile(member)
        target = dest / safe.name
        _write_counted(src, target, safe.name, budget)  # type: ignore[arg-type]
        if safe.mode is not None:
            os.chmod(target, safe.mode)
        if safe.mtime is not None:
            os.utime(target, (safe.mtime, safe.mtime))
        return
    if safe.islnk():  # a second name for a file: it will be read again downstream, so it counts again
        linked = dest / safe.linkname
        if not linked.is_file() or linked.is_symlink():
            raise UnsafeArchiveError(f"refusing to extract {archive}: hard link {safe.name!r} points to "
                                     f"{safe.linkname!r}, which is not a file extracted before it")
        budget.charge(safe.name, linked.stat().st_size)
    tar.extract(member, dest, filter="data")  # folders, links the data filter accepted


def safe_extract_tar(archive: str | Path, dest: str | Path, limits: ExtractionLimits | None = None) -> Path:
    """Extract a (possibly compressed) tar archive into ``dest`` with the ``data`` filter and ``limits``."""
    limits = limits or ExtractionLimits.from_env()
    dest = Path(dest)
    with _all_or_nothing(dest), open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
        budget = ExtractionBudget(archive, limits, raw.tell)  # raw.tell(): compressed bytes read so far
        real_dest = dest.resolve()
        for member in tar:
            _extract_tar_member(tar, member, real_dest, budget, archive)
    return dest


def _check_zip_members(archive: str | Path, dest: Path, infos: list[zipfile.ZipInfo],
                       limits: ExtractionLimits) -> None:
    """Refuse before writing anything: escaping names, symlinks, too many entries, sizes the headers admit."""
    for info in infos:
        target = (dest / info.filename).resolve()
        if info.filename.startswith(("/", "\\")) or not target.is_relative_to(dest):
            raise UnsafeArchiveError(f"refusing to extract {archive}: member {info.filename!r} escapes {dest}")
        mode = (info.external_attr >> 16) & 0o170000
        if mode == 0o120000:
            raise UnsafeArchiveError(f"refusing to extract {archive}: member {info.filename!r} is a symlink")
    if len(infos) > limits.max_files:
        raise ArchiveLimitError(archive, "max_files", limits.max_files, f"it holds {len(infos)} entries")
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_bytes:
        raise ArchiveLimitError(archive, "max_bytes", limits.max_bytes,
                                f"its members declare {declared} bytes in total")


def safe_extract_zip(archive: str | Path, dest: str | Path, limits: ExtractionLimits | None = None) -> Path:
    """Extract a zip archive into ``dest``, refusing absolute paths, ``..``, symlinks and ``limits`` overruns."""
    limits = limits or ExtractionLimits.from_env()
    dest = Path(dest).resolve()
    archive_size = os.path.getsize(archive)
    with _all_or_nothing(dest), open(archive, "rb") as fh, zipfile.ZipFile(_CountingFile(fh)) as zf:
        infos = zf.infolist()
        _check_zip_members(archive, dest, infos, limits)
        # compressed bytes read so far, capped at the archive's size (members overlapping in a zip bomb re-read it)
        budget = ExtractionBudget(archive, limits, lambda: min(archive_size, zf.fp.bytes_read))
        for info in infos:
            budget.add_entry(info.filename)
            target = (dest / info.filename).resolve()
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as src:
                _write_counted(src, target, info.filename, budget)
    return dest


def is_archive(path: str | Path) -> bool:
    name = Path(path).name.lower()
    return name.endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


def safe_extract(archive: str | Path, dest: str | Path, limits: ExtractionLimits | None = None) -> Path:
    """Extract a ``.zip`` or tar archive safely; raise ``UnsafeArchiveError`` (``ArchiveLimitError`` for a
    limit) on a hostile member. ``limits`` default to ``ExtractionLimits.from_env()``."""
    if str(archive).lower().endswith(".zip"):
        return safe_extract_zip(archive, dest, limits)
    return safe_extract_tar(archive, dest, limits)
