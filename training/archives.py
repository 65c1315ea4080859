"""Safe archive extraction (no path traversal, no links out of the tree, no device files).

Used by the preprocessor (user archives), evaluation (``model.tar.gz``), the serving handler and the
local engine. ``tarfile``'s ``data`` filter (PEP 706) does the heavy lifting for tar archives; zip
members are checked by hand because ``zipfile`` has no equivalent.
"""

from __future__ import annotations

import logging
import tarfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)


class UnsafeArchiveError(ValueError):
    """An archive member would escape the destination directory or is not a regular file/dir."""


def safe_extract_tar(archive: str | Path, dest: str | Path) -> Path:
    """Extract a (possibly compressed) tar archive into ``dest`` with the ``data`` filter."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        try:
            tar.extractall(dest, filter="data")
        except tarfile.FilterError as exc:
            raise UnsafeArchiveError(f"refusing to extract {archive}: {exc}") from exc
    return dest


def safe_extract_zip(archive: str | Path, dest: str | Path) -> Path:
    """Extract a zip archive into ``dest``, refusing absolute paths, ``..`` and symlinks."""
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = (dest / info.filename).resolve()
            if info.filename.startswith(("/", "\\")) or not target.is_relative_to(dest):
                raise UnsafeArchiveError(f"refusing to extract {archive}: member {info.filename!r} escapes {dest}")
            mode = (info.external_attr >> 16) & 0o170000
            if mode == 0o120000:
                raise UnsafeArchiveError(f"refusing to extract {archive}: member {info.filename!r} is a symlink")
        zf.extractall(dest)
    return dest


def is_archive(path: str | Path) -> bool:
    name = Path(path).name.lower()
    return name.endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a ``.zip`` or tar archive safely; raise ``UnsafeArchiveError`` on a hostile member."""
    if str(archive).lower().endswith(".zip"):
        return safe_extract_zip(archive, dest)
    return safe_extract_tar(archive, dest)
