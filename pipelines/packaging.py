"""Deterministic, content-addressed code bundles for the pipeline's jobs (docs/CONTRACTS.md §2).

The CLI builds the bundles from the project sources and uploads them itself *before* the pipeline definition
is built, so the SageMaker SDK never uploads anything and the definition only holds ``s3://`` URIs:

- ``s3://{bucket}/{prefix}/code/{sha}/sourcedir.tar.gz`` -- ``training/``, ``steps/``, ``inference/`` with their
  paths kept, plus ``training/requirements.txt`` copied to the root as ``requirements.txt`` (the SageMaker
  training toolkit pip-installs it). The estimators' ``sagemaker_submit_directory``.
- ``s3://{bucket}/{prefix}/code/{sha}/src/...`` -- the same files unpacked; processing jobs mount the prefix at
  ``/opt/ml/processing/input/code``.

There is no serving bundle: the trainer copies the handler into ``model.tar.gz`` under ``code/``
(:mod:`training.serving_code`), the only place the SageMaker PyTorch inference containers look for it.

Tarballs are byte-for-byte reproducible (sorted members, mtime 0, uid/gid 0, fixed modes, gzip header without
name or time), and ``sha`` is a sha256 over every bundled path and its content, so the same sources always give
the same keys and the same pipeline definition.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from training.serving_code import SERVING_FILES

logger = logging.getLogger(__name__)

#: Top-level packages shipped to the processing and training jobs.
SOURCE_PACKAGES = ("training", "steps", "inference")
REQUIREMENTS = "training/requirements.txt"
#: Bump when the layout of the bundles changes, so the content address changes with it.
BUNDLE_LAYOUT_VERSION = "2"

#: The training channel of the tuning trials and the best-model job that carries ``PretrainedWeights``.
PRETRAINED_CHANNEL = "pretrained"
#: Key (under the base job prefix) of the placeholder ``PretrainedWeights`` points at by default: SageMaker fails a
#: job whose S3 channel matches no object, so the channel always holds this file, which holds no weights.
NO_PRETRAINED_WEIGHTS_KEY = "pretrained/NO_PRETRAINED_WEIGHTS.txt"
NO_PRETRAINED_WEIGHTS_TEXT = (
    b"No pretrained weights were given (pipeline parameter PretrainedWeights). Give an s3:// URI of a state dict file\n"
    b"(torch.save(model.state_dict())) to fine-tune from it; see README.md, 'Pretrained weights from a file'.\n")

_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
_SKIP_SUFFIXES = {".pyc", ".pyo", ".tmp", ".swp"}


@dataclass(frozen=True)
class CodeBundles:
    """The project code as the jobs receive it. ``files`` maps relative POSIX paths to content."""

    sha: str
    files: Mapping[str, bytes] = field(repr=False)
    sourcedir: bytes = field(repr=False)


@dataclass(frozen=True)
class CodeLocations:
    """Where the bundles live in S3 (or in the local engine's ``s3://`` store)."""

    sha: str
    root: str  # s3://bucket/prefix/code/{sha}
    sourcedir: str  # .../sourcedir.tar.gz   (training: sagemaker_submit_directory)
    src_prefix: str  # .../src/              (processing: ProcessingInput at /opt/ml/processing/input/code)

    def src_file(self, relpath: str) -> str:
        return f"{self.src_prefix}{relpath}"


def _included(path: Path, root: Path) -> bool:
    rel = path.relative_to(root)
    if any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts):
        return False
    return path.suffix not in _SKIP_SUFFIXES and not path.name.endswith("~")


def collect_files(project_root: str | Path) -> dict[str, bytes]:
    """Every file of :data:`SOURCE_PACKAGES` under ``project_root`` (no caches, no dotfiles), sorted by path."""
    root = Path(project_root).resolve()
    files: dict[str, bytes] = {}
    for package in SOURCE_PACKAGES:
        base = root / package
        if not base.is_dir():
            raise FileNotFoundError(f"package directory {base} is missing: cannot build the code bundles")
        for path in sorted(base.rglob("*")):
            if path.is_file() and _included(path, root):
                files[path.relative_to(root).as_posix()] = path.read_bytes()
    for required in SERVING_FILES:
        if required not in files:
            raise FileNotFoundError(f"{root / required} is missing: the model archive's code/ needs it")
    return dict(sorted(files.items()))


def deterministic_tar_gz(members: Mapping[str, bytes]) -> bytes:
    """A gzip'd tarball of ``members`` (path -> bytes) that depends on nothing but the members."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(members):
            data = members[name]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def content_sha(files: Mapping[str, bytes]) -> str:
    """sha256 over the layout version and every (path, content sha256) pair, in path order."""
    digest = hashlib.sha256(f"imgclf-code-bundle-v{BUNDLE_LAYOUT_VERSION}\n".encode())
    for name in sorted(files):
        digest.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return digest.hexdigest()


def build_code_bundles(project_root: str | Path) -> CodeBundles:
    """Build the bundles of CONTRACTS §2 from the sources under ``project_root``."""
    files = collect_files(project_root)
    sourcedir_members = dict(files)
    if REQUIREMENTS in files:
        sourcedir_members["requirements.txt"] = files[REQUIREMENTS]
    else:
        logger.warning("%s not found: training containers will not install extra requirements", REQUIREMENTS)
    bundles = CodeBundles(
        sha=content_sha(files),
        files=files,
        sourcedir=deterministic_tar_gz(sourcedir_members),
    )
    logger.info("code bundles %s: %d files, sourcedir %d B", bundles.sha[:12], len(files), len(bundles.sourcedir))
    return bundles


def code_locations(bucket: str, prefix: str, bundles: CodeBundles | str) -> CodeLocations:
    """The S3 URIs of the bundles under ``s3://{bucket}/{prefix}/code/{sha}/`` (``bundles`` or its sha)."""
    if not bucket or "/" in bucket or bucket.startswith("s3:"):
        raise ValueError(f"expected a bare S3 bucket name, got {bucket!r}")
    sha = bundles if isinstance(bundles, str) else bundles.sha
    key_prefix = "/".join(part for part in (prefix.strip("/"), "code", sha) if part)
    root = f"s3://{bucket}/{key_prefix}"
    return CodeLocations(sha=sha, root=root, sourcedir=f"{root}/sourcedir.tar.gz", src_prefix=f"{root}/src/")


def upload_code_bundles(bundles: CodeBundles, locations: CodeLocations,
                        put: Callable[[str, bytes], None]) -> CodeLocations:
    """Write every bundle through ``put(s3_uri, data)``; ``sourcedir.tar.gz`` goes last (it marks completeness)."""
    if bundles.sha != locations.sha:
        raise ValueError(f"locations are for code {locations.sha[:12]}, bundles are {bundles.sha[:12]}")
    for name, data in bundles.files.items():
        put(locations.src_file(name), data)
    put(locations.sourcedir, bundles.sourcedir)
    return locations


def no_pretrained_weights_uri(bucket: str, base_job_prefix: str) -> str:
    """The default of the ``PretrainedWeights`` Parameter: the placeholder :func:`upload_placeholder` writes."""
    return f"s3://{bucket}/{base_job_prefix}/{NO_PRETRAINED_WEIGHTS_KEY}"


def upload_placeholder(bucket: str, base_job_prefix: str, put: Callable[[str, bytes], None]) -> str:
    """Write the ``PretrainedWeights`` default's placeholder object through ``put``; return its URI."""
    uri = no_pretrained_weights_uri(bucket, base_job_prefix)
    put(uri, NO_PRETRAINED_WEIGHTS_TEXT)
    return uri


def project_root() -> Path:
    """The checkout this module belongs to (the directory holding ``training/``, ``steps/``, ``inference/``)."""
    return Path(__file__).resolve().parents[1]


def deterministic_zip(members: Mapping[str, bytes]) -> bytes:
    """A zip of ``members`` (path -> bytes) that depends on nothing but the members: sorted, fixed timestamps and
    modes (so a Lambda's ``CodeSha256`` changes only when its code does)."""
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, members[name])
    return out.getvalue()
