"""Data preparation (SageMaker ProcessingStep): validate, convert, split and pre-resize an image dataset.

Input (``--input-dir``, default ``/opt/ml/processing/input/data``) is an image-classification dataset in one of
the layouts people actually have, or a single ``.zip`` / ``.tar.gz`` / ``.tgz`` of one (optionally with one
wrapping top-level folder):

* class folders: ``<root>/<class>/<image>``;
* split folders: ``<root>/{train,valid|validation|val,test}/<class>/<image>`` (the Udacity ``dogImages`` layout;
  class folder names such as ``001.Affenpinscher`` are kept verbatim). Given splits are kept; a missing
  validation or test split is carved out of ``train`` (stratified).

Every file is fully decoded (content decides, not the extension). Good images are converted to RGB (alpha
composited on white, 16-bit scaled to 8-bit), resized so the shorter side is ``--resize-shorter-side`` (never
upscaled) and written as JPEG to ``<output-dir>/{train,validation,test}/<class>/`` (ImageFolder layout). Bad files
are listed with a reason in the manifest and copied unchanged to ``<output-dir>/quarantine/`` so nothing is lost,
except where a copy would be unsafe or unbounded (the reason then says it was not copied; docs/LIMITS.md):

* only regular files are ever opened: FIFOs, sockets and devices are listed, never opened nor copied;
* symlinks are followed only to a regular file inside the dataset root; a link that leads outside the input
  ("symlink outside the input"), to a folder (could loop), or nowhere is listed, not followed;
* files over ``--max-file-bytes`` are listed, not read nor copied; ``quarantine/`` holds at most
  ``--max-quarantine-bytes`` in total;
* archives are extracted within ``--archive-max-bytes`` / ``--archive-max-files`` / ``--archive-max-ratio``
  (env ``MLOPS_ARCHIVE_MAX_BYTES`` / ``_MAX_FILES`` / ``_MAX_RATIO``), counted while extracting.

``<output-dir>/manifest/manifest.json`` follows docs/CONTRACTS.md section 3.

Exit status: 0 on success, 1 when the data cannot be used (one-line reason on stderr; the manifest is still
written with ``"status": "failed"``), 2 on bad flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import hashlib
import json
import logging
import lzma
import math
import os
import random
import shutil
import stat
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from training.archives import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_RATIO,
    ENV_MAX_BYTES,
    ENV_MAX_FILES,
    ENV_MAX_RATIO,
    ExtractionLimits,
    UnsafeArchiveError,
    is_archive,
    parse_byte_size,
    safe_extract,
)
from training.images import to_rgb

logger = logging.getLogger("steps.preprocess")

SPLITS = ("train", "validation", "test")
# Folder names accepted for each split (case-insensitive).
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "valid": "validation",
    "validation": "validation",
    "val": "validation",
    "test": "test",
    "testing": "test",
}
# Operating-system clutter that is neither data nor a bad file.
IGNORED_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "__pycache__"})
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
DEFAULT_MAX_FILE_BYTES = "256MiB"  # larger files are not read (an 89-Mpixel JPEG is ~30 MB)
DEFAULT_MAX_QUARANTINE_BYTES = "1GiB"  # total copied into quarantine/
MANIFEST_VERSION = 1
NOT_IN_CLASS_FOLDER = "not inside a class folder"
NOT_IN_SPLIT_FOLDER = "not inside a train/validation/test split folder"


class PreprocessError(RuntimeError):
    """The dataset cannot be used (unsafe archive, too few valid images, ...). The message is user-facing."""


@dataclass(frozen=True)
class Candidate:
    """A file found in the dataset. ``label`` is ``None`` for files outside any class folder."""

    rel: str
    label: str | None
    split: str | None = None
    problem: str | None = None  # a reason known from the layout alone (the file is then not decoded)
    openable: bool = True  # False: a special file or a refused symlink, never opened (``problem`` says why)


@dataclass
class Discovery:
    root: Path
    layout: str  # "class_folders" | "splits"
    candidates: list[Candidate]
    ignored: list[str] = field(default_factory=list)
    split_dirs: dict[str, str] = field(default_factory=dict)  # canonical split -> folder name in the input


@dataclass(frozen=True)
class FileResult:
    rel: str
    ok: bool
    reason: str
    sha256: str
    staged: str | None = None  # path of the converted JPEG in the work dir
    original_size: tuple[int, int] | None = None
    original_mode: str | None = None
    output_size: tuple[int, int] | None = None


# --------------------------------------------------------------------------------------------------------------
# Arguments


def _fraction(value: str) -> float:
    f = float(value)
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a fraction between 0 and 1")
    return f


def _non_negative_int(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return n


def _positive(parse: Callable[[str], float], env: str | None = None) -> Callable[[str], float]:
    """An argparse ``type``: ``parse`` then require > 0; errors name ``env`` (where the default may come from)."""
    source = f" (the flag, or env {env} when the flag is not given)" if env else ""

    def check(value: str) -> float:
        try:
            n = parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}{source}") from exc
        if not n > 0:
            raise argparse.ArgumentTypeError(f"{value} must be > 0{source}")
        return n
    check.__name__ = parse.__name__
    return check


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits", "bounds against hostile or broken input (docs/LIMITS.md)")
    g.add_argument("--archive-max-bytes", type=_positive(parse_byte_size, ENV_MAX_BYTES),
                   default=os.environ.get(ENV_MAX_BYTES) or f"{DEFAULT_MAX_BYTES // 2**30}GiB",
                   help=f"an input archive may extract to at most this many bytes (e.g. 20GiB; env {ENV_MAX_BYTES})")
    g.add_argument("--archive-max-files", type=_positive(int, ENV_MAX_FILES),
                   default=os.environ.get(ENV_MAX_FILES) or str(DEFAULT_MAX_FILES),
                   help=f"an input archive may hold at most this many entries (env {ENV_MAX_FILES})")
    g.add_argument("--archive-max-ratio", type=_positive(float, ENV_MAX_RATIO),
                   default=os.environ.get(ENV_MAX_RATIO) or f"{DEFAULT_MAX_RATIO:g}",
                   help="extracted bytes / compressed bytes read may not exceed this once 1 MiB is out "
                        f"(zip/tar bomb guard; env {ENV_MAX_RATIO})")
    g.add_argument("--max-file-bytes", type=_positive(parse_byte_size), default=DEFAULT_MAX_FILE_BYTES,
                   help="dataset files larger than this are quarantined without being read or copied")
    g.add_argument("--max-quarantine-bytes", type=_positive(parse_byte_size), default=DEFAULT_MAX_QUARANTINE_BYTES,
                   help="at most this many bytes are copied into quarantine/; later bad files are only listed")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input-dir", default="/opt/ml/processing/input/data",
                   help="dataset folder, a folder holding one archive, or an archive file")
    p.add_argument("--output-dir", default="/opt/ml/processing",
                   help="base folder: train/, validation/, test/, manifest/ and quarantine/ are written under it")
    p.add_argument("--train-fraction", type=_fraction, default=0.7)
    p.add_argument("--validation-fraction", type=_fraction, default=0.15)
    p.add_argument("--test-fraction", type=_fraction, default=0.15)
    p.add_argument("--seed", type=int, default=42, help="seed of the stratified split")
    p.add_argument("--resize-shorter-side", type=_non_negative_int, default=256,
                   help="resize so the shorter side is this many pixels (never upscales; 0 keeps the size)")
    p.add_argument("--jpeg-quality", type=int, default=95, choices=range(1, 96), metavar="{1..95}")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images with more pixels than this are quarantined (decompression-bomb guard)")
    p.add_argument("--min-valid-fraction", type=_fraction, default=0.5,
                   help="fail when fewer than this fraction of the files are valid images")
    p.add_argument("--workers", type=_non_negative_int, default=os.cpu_count() or 1,
                   help="processes used to decode images (0 or 1: in-process); results do not depend on it")
    p.add_argument("--overwrite", action="store_true",
                   help="empty existing train/validation/test/manifest/quarantine output folders first")
    _add_limit_args(p)
    return p


def _check_args(args: argparse.Namespace) -> None:
    total = args.train_fraction + args.validation_fraction + args.test_fraction
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise PreprocessError(
            f"--train-fraction + --validation-fraction + --test-fraction must sum to 1, got {total:g}")
    if args.train_fraction <= 0:
        raise PreprocessError("--train-fraction must be > 0")
    if args.max_pixels <= 0:
        raise PreprocessError("--max-pixels must be > 0")


# --------------------------------------------------------------------------------------------------------------
# Input: archives and layout discovery


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _visible(directory: Path) -> tuple[list[Path], list[Path]]:
    """Sorted visible sub-directories (real ones, not symlinks) and other entries (files, links, specials)."""
    dirs, files = [], []
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if _is_ignored(entry.name):
            continue
        (dirs if entry.is_dir(follow_symlinks=False) else files).append(directory / entry.name)
    return dirs, files


_SPECIAL_KINDS = ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"),
                  (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"))


def _kind(mode: int) -> str:
    return next((name for test, name in _SPECIAL_KINDS if test(mode)), "special file")


def _symlink_problem(path: Path, root: Path) -> str | None:
    """``None`` when the link resolves to a regular file inside ``root`` (then it is followed)."""
    link = os.readlink(path)
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(root):
        return f"symlink outside the input (-> {link}); not followed"
    try:
        mode = target.stat().st_mode
    except OSError:
        return f"broken or looping symlink (-> {link}); not followed"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"symlink to a folder (-> {link}); folder links are not followed"
    return f"symlink to a {_kind(mode)} (-> {link}); not followed"


def entry_problem(path: Path, root: Path) -> str | None:
    """Why ``path`` must never be opened, or ``None`` for a regular file (possibly through a symlink that stays
    inside ``root``, which must be resolved). Only ``lstat``/``readlink``/``stat`` are used: nothing is opened."""
    try:
        mode = path.lstat().st_mode
    except OSError as exc:
        return f"unreadable entry: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return _symlink_problem(path, root)
    return f"{_kind(mode)}, not a regular file; never opened"


def resolve_input(input_dir: str | Path, work_dir: str | Path,
                  limits: ExtractionLimits | None = None) -> tuple[Path, str | None]:
    """Return the dataset root and the archive name it came from (``None`` for a plain folder).

    ``input_dir`` may be the dataset folder, a folder whose only visible content is one archive, or an archive
    file. Archives are extracted with ``training.archives.safe_extract`` into ``work_dir`` within ``limits``
    (default: ``ExtractionLimits.from_env()``). Single wrapping folders (``dogImages/``, ``data/``) are descended
    into.
    """
    src = Path(input_dir)
    if not src.exists():
        raise PreprocessError(f"input {src} does not exist")
    if not src.is_dir() and not src.is_file():
        raise PreprocessError(f"input {src} is neither a folder nor a regular file ({_kind(src.stat().st_mode)})")
    archive: Path | None = None
    if src.is_file():
        if not is_archive(src):
            raise PreprocessError(f"input {src} is a file but not a .zip/.tar.gz/.tgz archive")
        archive = src
    else:
        dirs, files = _visible(src)
        archives = [f for f in files if is_archive(f) and stat.S_ISREG(f.lstat().st_mode)]
        if not dirs and len(archives) > 1:
            raise PreprocessError(f"input {src} holds {len(archives)} archives "
                                  f"({', '.join(a.name for a in archives)}); expected one archive or a folder")
        if not dirs and len(archives) == 1:
            archive = archives[0]
            others = [f.name for f in files if f != archive]
            if others:
                logger.warning("ignoring %d file(s) next to archive %s: %s", len(others), archive.name, others)
    root = src
    if archive is not None:
        dest = Path(work_dir) / "extracted"
        logger.info("extracting %s", archive)
        try:
            safe_extract(archive, dest, limits)
        except UnsafeArchiveError as exc:
            raise PreprocessError(str(exc)) from exc
        except (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error,
                lzma.LZMAError, RuntimeError, NotImplementedError) as exc:  # RuntimeError: encrypted zip member
            raise PreprocessError(f"cannot read archive {archive.name}: {exc}") from exc
        root = dest
    # descend through single wrapping folders (but not into a split folder or a class folder of images)
    while True:
        dirs, files = _visible(root)
        if files or len(dirs) != 1 or dirs[0].name.lower() in SPLIT_ALIASES:
            break
        inner_dirs, _ = _visible(dirs[0])
        if not inner_dirs:
            break
        root = dirs[0]
    return root, archive.name if archive is not None else None


def _walk_files(directory: Path, root: Path, ignored: list[str]) -> Iterator[str]:
    """Sorted relative (posix) paths of every visible non-folder entry under ``directory`` (files, symlinks, also
    to folders, which are not descended into, and special files); hidden ones go to ``ignored``."""
    for dirpath, dirnames, filenames in os.walk(directory):  # followlinks=False: linked folders are not entered
        base = Path(dirpath)
        links = [d for d in dirnames if (base / d).is_symlink()]
        for d in sorted(dirnames):
            if _is_ignored(d) and d not in links:
                ignored.append((base / d).relative_to(root).as_posix() + "/")
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored(d) and d not in links)
        for name in sorted(filenames + links):
            rel = (base / name).relative_to(root).as_posix()
            if _is_ignored(name):
                ignored.append(rel)
            else:
                yield rel


def _candidate(root: Path, real_root: Path, rel: str, label: str | None, split: str | None,
               problem: str | None = None) -> Candidate:
    """A candidate; an entry that must never be opened gets that reason (it wins over a layout ``problem``)."""
    refused = entry_problem(root / rel, real_root)
    if refused:
        return Candidate(rel, label, split, refused, openable=False)
    return Candidate(rel, label, split, problem)


def _class_candidates(directory: Path, root: Path, real_root: Path, split: str | None,
                      ignored: list[str]) -> list[Candidate]:
    dirs, files = _visible(directory)
    out = [_candidate(root, real_root, f.relative_to(root).as_posix(), None, split, NOT_IN_CLASS_FOLDER)
           for f in files]
    for class_dir in dirs:
        found = [_candidate(root, real_root, rel, class_dir.name, split)
                 for rel in _walk_files(class_dir, root, ignored)]
        if not found:
            logger.warning("class folder %s is empty; skipped", class_dir.relative_to(root).as_posix())
        out.extend(found)
    return out


def discover(root: str | Path) -> Discovery:
    """Find the layout, classes and files of the dataset at ``root`` (already unwrapped by ``resolve_input``)."""
    root = Path(root)
    real_root = Path(os.path.realpath(root))
    ignored: list[str] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if _is_ignored(entry.name):
            ignored.append(entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
    dirs, files = _visible(root)
    split_dirs: dict[str, str] = {}
    for d in dirs:
        canonical = SPLIT_ALIASES.get(d.name.lower())
        if canonical is None:
            continue
        if canonical in split_dirs:
            raise PreprocessError(f"both {split_dirs[canonical]!r} and {d.name!r} look like the {canonical} split")
        split_dirs[canonical] = d.name
    if not split_dirs:
        candidates = sorted(_class_candidates(root, root, real_root, None, ignored), key=lambda c: c.rel)
        return Discovery(root, "class_folders", candidates, ignored)
    if "train" not in split_dirs:
        raise PreprocessError(f"found split folders {sorted(split_dirs.values())} but no train split "
                              f"(expected one of: train, training)")
    candidates = []
    for d in dirs:
        canonical = SPLIT_ALIASES.get(d.name.lower())
        if canonical is None:
            logger.warning("folder %s is not a split folder; its files are quarantined", d.name)
            candidates.extend(_candidate(root, real_root, rel, None, None, NOT_IN_SPLIT_FOLDER)
                              for rel in _walk_files(d, root, ignored))
        else:
            candidates.extend(_class_candidates(d, root, real_root, canonical, ignored))
    candidates.extend(_candidate(root, real_root, f.name, None, None, NOT_IN_SPLIT_FOLDER) for f in files)
    candidates.sort(key=lambda c: c.rel)
    return Discovery(root, "splits", candidates, ignored, split_dirs)


# --------------------------------------------------------------------------------------------------------------
# Validation and conversion


@contextlib.contextmanager
def _pillow_limits() -> Iterator[None]:
    """Disable Pillow's own bomb check (we apply ``--max-pixels`` ourselves) and refuse truncated data."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _target_size(size: tuple[int, int], shorter_side: int) -> tuple[int, int]:
    w, h = size
    if shorter_side <= 0 or min(w, h) <= shorter_side:
        return w, h
    if w <= h:
        return shorter_side, max(1, round(h * shorter_side / w))
    return max(1, round(w * shorter_side / h)), shorter_side


def _open_decoded(path: Path, max_pixels: int, draft_size: int = 0) -> Image.Image:
    """Open and fully decode ``path``; raise ``ValueError`` with a user-facing reason if it is not usable."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ValueError(f"unreadable file: {exc.strerror or exc}") from exc
    if size == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        img = Image.open(path)
    except UnidentifiedImageError as exc:
        raise ValueError("not a recognised image format (content is not an image)") from exc
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"corrupt image header: {exc}") from exc
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ValueError(f"image too large: {w}x{h} = {w * h} pixels exceeds --max-pixels {max_pixels}")
    if w == 0 or h == 0:
        img.close()
        raise ValueError(f"image has zero size ({w}x{h})")
    if draft_size and img.format == "JPEG":
        # DCT-domain downscaling: still decodes the whole entropy-coded stream, so truncation is still detected.
        img.draft(None, _target_size(img.size, draft_size))
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        img.close()
        msg = str(exc) or type(exc).__name__
        raise ValueError(f"truncated or corrupt image data ({img.format}: {msg})") from exc
    return img


def validate_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bool, str]:
    """Fully decode ``path`` and convert it to RGB; return ``(True, "ok")`` or ``(False, reason)``."""
    with _pillow_limits():
        try:
            with _open_decoded(Path(path), max_pixels) as img:
                to_rgb(img)
        except ValueError as exc:
            return False, str(exc)
    return True, "ok"


def _open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (``O_NONBLOCK``: a FIFO swapped in cannot hang us)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with _open_regular(path) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return ""
    return h.hexdigest()


def process_file(task: tuple[str, str, str | None, int, int, int]) -> FileResult:
    """Hash, validate, convert and resize one file (runs in a worker process).

    ``task`` = (absolute path, relative path, staging JPEG path or ``None`` to only hash, max pixels,
    shorter side, JPEG quality). A bad file yields ``ok=False`` with the reason; nothing raises.
    """
    src, rel, staged, max_pixels, shorter_side, quality = task
    path = Path(src)
    digest = _sha256(path)
    if staged is None:
        return FileResult(rel, False, "", digest)
    with _pillow_limits():
        try:
            with _open_decoded(path, max_pixels, draft_size=shorter_side) as img:
                original = (img.size, img.mode)
                try:
                    oriented = ImageOps.exif_transpose(img)
                except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
                    oriented = img
                rgb = to_rgb(oriented)
                target = _target_size(rgb.size, shorter_side)
                if target != rgb.size:
                    rgb = rgb.resize(target, Image.Resampling.LANCZOS)
                rgb.save(staged, "JPEG", quality=quality)
        except ValueError as exc:
            return FileResult(rel, False, str(exc), digest)
        except Exception as exc:  # noqa: BLE001 - a bad file must never crash the job
            return FileResult(rel, False, f"could not convert image: {type(exc).__name__}: {exc}", digest)
    return FileResult(rel, True, "ok", digest, staged, original[0], original[1], rgb.size)


def _run_tasks(tasks: list[tuple[str, str, str | None, int, int, int]], workers: int) -> list[FileResult]:
    """Process ``tasks`` in order (results are in task order whatever the number of workers)."""
    results: list[FileResult] = []
    every = max(500, len(tasks) // 10)
    started = time.monotonic()
    workers = min(workers, len(tasks))
    if workers <= 1:
        iterator: Iterator[FileResult] = map(process_file, tasks)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        iterator = pool.map(process_file, tasks, chunksize=max(1, min(64, len(tasks) // (workers * 4))))
    try:
        for i, result in enumerate(iterator, start=1):
            results.append(result)
            if i % every == 0 or i == len(tasks):
                logger.info("validated %d/%d files (%.1fs)", i, len(tasks), time.monotonic() - started)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return results


# --------------------------------------------------------------------------------------------------------------
# Split


def split_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """How many of ``n`` items go to each split: every split with a positive fraction gets at least one,
    train gets the rest. Raises ``PreprocessError`` when ``n`` is too small for that."""
    needed = sum(1 for f in fractions.values() if f > 0)
    if n < needed:
        raise PreprocessError(f"{n} image(s), need at least {needed}")
    counts = {s: 0 for s in fractions}
    for s, f in fractions.items():
        if s != "train" and f > 0:
            counts[s] = max(1, math.floor(n * f + 0.5))
    counts["train"] = n - sum(counts.values())
    while counts["train"] < 1:  # rounding took too much: give back from the largest other split
        largest = max((s for s in counts if s != "train"), key=lambda s: counts[s])
        counts[largest] -= 1
        counts["train"] += 1
    return counts


def split(items_by_class: dict[str, list[str]], fractions: dict[str, float],
          seed: int) -> dict[str, dict[str, list[str]]]:
    """Stratified split: ``{split: {class: [items]}}``. Each class is sorted then shuffled with a generator seeded
    by ``(seed, class)``, so the result depends only on the items, fractions and seed."""
    out: dict[str, dict[str, list[str]]] = {s: {} for s in fractions}
    for cls in sorted(items_by_class):
        items = sorted(items_by_class[cls])
        try:
            counts = split_counts(len(items), fractions)
        except PreprocessError as exc:
            raise PreprocessError(f"class {cls!r} has too few valid images to split: {exc} "
                                  f"(train/validation/test fractions {list(fractions.values())})") from exc
        random.Random(f"{seed}:{cls}").shuffle(items)
        start = 0
        for s in fractions:
            out[s][cls] = sorted(items[start:start + counts[s]])
            start += counts[s]
    return out


# --------------------------------------------------------------------------------------------------------------
# Outputs


def _output_dirs(base: Path) -> dict[str, Path]:
    return {name: base / name for name in (*SPLITS, "manifest", "quarantine")}


def _prepare_outputs(base: Path, input_dir: Path, overwrite: bool) -> None:
    source = input_dir.resolve()
    for d in (base / name for name in (*SPLITS, "manifest", "quarantine")):
        target = d.resolve()
        if source.is_relative_to(target) or target.is_relative_to(source):
            raise PreprocessError(f"input {input_dir} and output folder {d} overlap; use separate folders")
    for name, d in _output_dirs(base).items():
        if d.exists() and any(d.iterdir()):
            if not overwrite:
                raise PreprocessError(f"output folder {d} is not empty; pass --overwrite to replace its contents")
            logger.info("emptying %s (%s)", d, name)
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)


def _fingerprint(results: Sequence[FileResult]) -> str:
    """sha256 over the sorted (relative path, sha256 of the file's bytes) pairs of every dataset file."""
    h = hashlib.sha256()
    for r in sorted(results, key=lambda r: r.rel):
        h.update(r.rel.encode("utf-8") + b"\0" + r.sha256.encode("ascii") + b"\n")
    return h.hexdigest()


def _unique_name(rel: str, class_depth: int, used: set[str]) -> str:
    """Output file name for ``rel``: its path inside the class folder joined by ``__``, ``.jpg``, made unique."""
    inside = Path(rel).parts[class_depth + 1:]
    stem = "__".join((*inside[:-1], Path(inside[-1]).stem)) or "image"
    name, n = f"{stem}.jpg", 1
    while name in used:
        name, n = f"{stem}-{n}.jpg", n + 1
    used.add(name)
    return name


def _write_manifest(base: Path, manifest: dict[str, Any]) -> Path:
    path = base / "manifest" / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Do the whole preparation; returns the manifest. Raises ``PreprocessError`` (after writing the manifest
    when the data was read) when the dataset is unusable."""
    _check_args(args)
    base = Path(args.output_dir)
    _prepare_outputs(base, Path(args.input_dir), args.overwrite)
    fractions = {"train": args.train_fraction, "validation": args.validation_fraction, "test": args.test_fraction}
    params = {k: v for k, v in sorted(vars(args).items())}
    manifest: dict[str, Any] = {"manifest_version": MANIFEST_VERSION, "status": "failed", "error": None,
                                "parameters": params}
    work = Path(tempfile.mkdtemp(prefix=".preprocess-work-", dir=base))
    try:
        try:
            limits = ExtractionLimits(args.archive_max_bytes, args.archive_max_files, args.archive_max_ratio)
            root, archive = resolve_input(args.input_dir, work, limits)
            found = discover(root)
        except PreprocessError as exc:
            manifest["error"] = str(exc)
            _write_manifest(base, manifest)
            raise
        _process(args, base, work, root, archive, found, fractions, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _process(args: argparse.Namespace, base: Path, work: Path, root: Path, archive: str | None, found: Discovery,
             fractions: dict[str, float], manifest: dict[str, Any]) -> None:
    staging = work / "staging"
    staging.mkdir()
    unread = _unread_reasons(found, args.max_file_bytes)
    tasks = [(str(root / c.rel), c.rel, None if c.problem else str(staging / f"{i:08d}.jpg"),
              args.max_pixels, args.resize_shorter_side, args.jpeg_quality)
             for i, c in enumerate(found.candidates) if c.rel not in unread]
    logger.info("found %d files (%s layout) under %s (%d not opened); %d hidden/system entries ignored; "
                "%d worker(s)", len(found.candidates), found.layout, root, len(unread), len(found.ignored),
                max(1, min(args.workers, len(tasks))))
    done = iter(_run_tasks(tasks, args.workers))
    results = [FileResult(c.rel, False, unread[c.rel], "") if c.rel in unread else next(done)
               for c in found.candidates]
    by_rel = {c.rel: c for c in found.candidates}
    quarantined = _quarantine(base, root, results, by_rel, unread, args.max_quarantine_bytes)
    good = [r for r in results if r.ok]

    # the given splits (possibly without validation/test) -> the files each split gets
    valid_by_split: dict[str | None, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in good:
        c = by_rel[r.rel]
        valid_by_split[c.split][c.label].append(r.rel)  # type: ignore[index]
    classes = sorted({by_rel[r.rel].label for r in good} | {c.label for c in found.candidates if c.label})  # type: ignore[misc]
    per_class = Counter(by_rel[r.rel].label for r in good)
    duplicates = _duplicates(good)

    manifest.update({
        "classes": classes,
        "class_to_idx": {c: i for i, c in enumerate(classes)},
        "counts": {s: {c: 0 for c in classes} for s in SPLITS},
        "class_counts": {c: per_class.get(c, 0) for c in classes},
        "quarantined": quarantined,
        "imbalance_ratio": None,
        "input_fingerprint": _fingerprint(results),
        "input": {"path": str(args.input_dir), "archive": archive, "layout": found.layout,
                  "split_folders": found.split_dirs or None},
        "ignored": sorted(found.ignored),
        "duplicates": duplicates,
        "totals": {"files": len(results), "valid": len(good), "quarantined": len(quarantined),
                   "ignored": len(found.ignored), **{s: 0 for s in SPLITS}},
    })
    try:
        assignment = _check_and_split(results, good, classes, per_class, valid_by_split, found, fractions, args)
    except PreprocessError as exc:
        manifest["error"] = str(exc)
        _write_manifest(base, manifest)
        raise

    staged = {r.rel: r.staged for r in good}
    class_depth = 1 if found.layout == "splits" else 0
    for s in SPLITS:
        for cls, rels in assignment[s].items():
            used: set[str] = set()
            out_dir = base / s / cls
            out_dir.mkdir(parents=True, exist_ok=True)
            for rel in sorted(rels):
                shutil.move(staged[rel], out_dir / _unique_name(rel, class_depth, used))
            manifest["counts"][s][cls] = len(rels)
        manifest["totals"][s] = sum(manifest["counts"][s].values())
    counts = [per_class[c] for c in classes]
    manifest["imbalance_ratio"] = round(max(counts) / min(counts), 4)
    manifest["split"] = {"source": "given" if found.layout == "splits" else "generated", "fractions": fractions,
                         "seed": args.seed}
    manifest["status"] = "succeeded"
    _write_manifest(base, manifest)


def _unread_reasons(found: Discovery, max_file_bytes: int) -> dict[str, str]:
    """Candidates that are never opened, with the reason: special files, refused symlinks, oversize files."""
    out: dict[str, str] = {}
    for c in found.candidates:
        if not c.openable:
            out[c.rel] = c.problem or "not a regular file"
            continue
        try:
            size = (found.root / c.rel).stat().st_size
        except OSError as exc:
            out[c.rel] = f"unreadable file: {exc.strerror or exc}"
            continue
        if size > max_file_bytes:
            out[c.rel] = (f"file of {size} bytes exceeds --max-file-bytes {max_file_bytes}; "
                          "not read, not copied to quarantine/")
    return out


def _copy_capped(src: Path, dest: Path, room: int) -> int | None:
    """Copy regular file ``src`` to ``dest`` if it fits in ``room`` bytes; the bytes copied, ``None`` if it does
    not fit. Never copies more than the size the file had when opened."""
    with _open_regular(src) as fin:
        size = os.fstat(fin.fileno()).st_size
        if size > room:
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        left = size
        with dest.open("wb") as fout:
            while left > 0 and (block := fin.read(min(1 << 20, left))):
                fout.write(block)
                left -= len(block)
    shutil.copystat(src, dest)
    return size - left


def _quarantine(base: Path, root: Path, results: Sequence[FileResult], by_rel: dict[str, Candidate],
                unread: dict[str, str], max_bytes: int) -> list[dict[str, str]]:
    """List every bad file with its reason; copy the ones that were read into ``quarantine/``, at most
    ``max_bytes`` in all (the reason of a file left out says so)."""
    quarantined: list[dict[str, str]] = []
    copied = 0
    for r in results:
        if r.ok:
            continue
        reason = unread.get(r.rel) or by_rel[r.rel].problem or r.reason
        if r.rel not in unread:
            try:
                n = _copy_capped(root / r.rel, base / "quarantine" / r.rel, max_bytes - copied)
            except OSError as exc:
                reason += f"; not copied to quarantine/: {exc.strerror or exc}"
            else:
                if n is None:
                    reason += f"; not copied: quarantine/ would hold more than --max-quarantine-bytes {max_bytes}"
                copied += n or 0
        quarantined.append({"path": r.rel, "reason": reason})
        logger.warning("quarantined %s: %s", r.rel, reason)
    return quarantined


def _duplicates(good: Sequence[FileResult]) -> list[list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for r in good:
        groups[r.sha256].append(r.rel)
    dups = sorted(sorted(g) for g in groups.values() if len(g) > 1)
    if dups:
        logger.warning("%d group(s) of byte-identical images (possible leakage between splits), e.g. %s",
                       len(dups), dups[0])
    return dups


def _check_and_split(results: Sequence[FileResult], good: Sequence[FileResult], classes: list[str],
                     per_class: Counter, valid_by_split: dict, found: Discovery, fractions: dict[str, float],
                     args: argparse.Namespace) -> dict[str, dict[str, list[str]]]:
    if not results:
        raise PreprocessError(f"no files found under {found.root}")
    valid_fraction = len(good) / len(results)
    if valid_fraction < args.min_valid_fraction:
        raise PreprocessError(f"only {len(good)} of {len(results)} files ({valid_fraction:.1%}) are valid images, "
                              f"below --min-valid-fraction {args.min_valid_fraction:g}; see manifest 'quarantined'")
    if len(classes) < 2:
        raise PreprocessError(f"found {len(classes)} class(es) {classes} under {found.root}; need at least 2 "
                              f"class folders (<class>/<image> or train/<class>/<image>)")
    empty = [c for c in classes if per_class.get(c, 0) == 0]
    if empty:
        raise PreprocessError(f"class(es) {empty} have no valid images")
    if found.layout == "class_folders":
        return split(valid_by_split[None], fractions, args.seed)
    # given splits: keep them; carve the missing ones out of train
    train = valid_by_split["train"]
    no_train = [c for c in classes if not train.get(c)]
    if no_train:
        raise PreprocessError(f"class(es) {no_train} have no valid images in the train split")
    missing = [s for s in ("validation", "test") if s not in found.split_dirs]
    assignment: dict[str, dict[str, list[str]]] = {s: dict(valid_by_split[s]) for s in SPLITS}
    if missing:
        sub = {s: fractions[s] for s in ("train", *missing)}
        total = sum(sub.values())
        sub = {s: f / total for s, f in sub.items()}
        logger.info("input has no %s split; carving it out of train (fractions %s)", "/".join(missing), sub)
        carved = split(train, sub, args.seed)
        for s in carved:
            assignment[s] = carved[s]
    for s in ("validation", "test"):
        absent = [c for c in classes if not assignment[s].get(c)]
        if absent:
            logger.warning("%s split has no images of class(es) %s", s, absent)
    return assignment


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args(argv)
    started = time.monotonic()
    try:
        manifest = run(args)
    except PreprocessError as exc:
        sys.stderr.write(f"preprocess: error: {exc}\n")
        return 1
    t = manifest["totals"]
    sys.stdout.write(f"preprocess: {t['valid']} valid / {t['files']} files, {t['quarantined']} quarantined, "
                     f"{len(manifest['classes'])} classes; train={t['train']} validation={t['validation']} "
                     f"test={t['test']}; {time.monotonic() - started:.1f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
