"""The serving code that travels inside ``model.tar.gz`` (docs/CONTRACTS.md §5).

The SageMaker PyTorch inference containers (``sagemaker-pytorch-inference`` under TorchServe) import the handler
only from ``code/`` inside the model archive: the toolkit puts ``<model_dir>/code`` on ``PYTHONPATH`` and imports
``SAGEMAKER_PROGRAM`` (``inference.py``) from there; ``SAGEMAKER_SUBMIT_DIRECTORY`` is not read. So the trainer
copies the handler and everything it imports into ``SM_MODEL_DIR/code/`` and SageMaker packs it with the weights:

    model.tar.gz
    ├── model.pth, model_config.json
    └── code/
        ├── inference.py                  (inference/inference.py)
        ├── requirements.txt              (timm architectures only: timm==<the trainer's version>)
        └── training/{__init__,model,archives,images}.py

``code/requirements.txt``: at container start the toolkit runs ``sys.executable -m pip install -r
code/requirements.txt`` (``sagemaker_pytorch_serving_container.torchserve._install_requirements``) and fails the
start when pip fails. A torchvision model needs only torch, torchvision, numpy and Pillow, which the PyTorch
inference image ships, so it gets no ``requirements.txt``; a timm model gets ``timm`` pinned to the version it was
trained with. The evaluation job (steps/evaluate.py) and the local endpoints (pipelines/local/serving/endpoints.py)
install it the same way, through :func:`install_requirements`.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

CODE_DIR = "code"
SERVING_PROGRAM = "inference.py"
REQUIREMENTS_FILE = "requirements.txt"
PIP_TIMEOUT_S = 1800.0
#: Source path (relative to the project/code root) -> path inside ``code/``.
SERVING_FILES: dict[str, str] = {
    "inference/inference.py": SERVING_PROGRAM,
    "training/__init__.py": "training/__init__.py",
    "training/model.py": "training/model.py",
    "training/archives.py": "training/archives.py",
    "training/images.py": "training/images.py",
}


def source_root() -> Path:
    """The directory holding ``training/`` and ``inference/`` (the checkout, or the job's extracted code)."""
    return Path(__file__).resolve().parents[1]


def write_serving_code(model_dir: str | Path, root: str | Path | None = None,
                       requirements: Sequence[str] = ()) -> list[str]:
    """Copy the serving files into ``model_dir/code/`` (and ``requirements`` as ``code/requirements.txt`` when there
    are any); return the archive paths written (sorted)."""
    root = Path(root) if root is not None else source_root()
    missing = [src for src in SERVING_FILES if not (root / src).is_file()]
    if missing:
        raise FileNotFoundError(f"serving code missing under {root}: {', '.join(missing)} (the model archive's "
                                "code/ needs them for the SageMaker PyTorch inference container)")
    code_dir = Path(model_dir) / CODE_DIR
    written = []
    for src, dest in SERVING_FILES.items():
        target = code_dir / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / src, target)
        written.append(f"{CODE_DIR}/{dest}")
    if requirements:
        (code_dir / REQUIREMENTS_FILE).write_text("".join(f"{line}\n" for line in requirements), encoding="utf-8")
        written.append(f"{CODE_DIR}/{REQUIREMENTS_FILE}")
    return sorted(written)


def requirements_path(model_dir: str | Path) -> Path | None:
    """``model_dir/code/requirements.txt`` when the model archive has one."""
    path = Path(model_dir) / CODE_DIR / REQUIREMENTS_FILE
    return path if path.is_file() else None


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors packaging
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def unsatisfied_requirements(path: str | Path) -> list[str]:
    """The lines of a requirements file that this interpreter does not already satisfy (installed distribution
    whose version fits the specifier). Lines it cannot judge (pip options, URLs, unparsable) count as unsatisfied,
    so pip gets to see them."""
    requirement = _requirement_class()
    unsatisfied = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        try:
            req = requirement(line)
        except Exception:  # InvalidRequirement, or a pip option such as -r / --index-url
            unsatisfied.append(line)
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            unsatisfied.append(line)
            continue
        if req.url or not req.specifier.contains(installed, prereleases=True):
            unsatisfied.append(line)
    return unsatisfied


def install_requirements(path: str | Path, python: str | Path = sys.executable,
                         env: Mapping[str, str] | None = None, timeout: float = PIP_TIMEOUT_S) -> None:
    """``<python> -m pip install -r <path>``, as the SageMaker PyTorch serving toolkit does at container start.
    Raises ``RuntimeError`` with the tail of pip's output when pip fails."""
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "-r", str(path)]
    logger.info("installing packages from %s: %s", path, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(env) if env is not None else None,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"failed to install the required packages of {path}: {exc}") from exc
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-15:])
        raise RuntimeError(f"failed to install the required packages of {path} (pip exit code {proc.returncode}):\n"
                           f"{tail}")
    importlib.invalidate_caches()  # what pip just installed must be importable by this process too
    logger.info("pip: %s", output.splitlines()[-1] if output else "nothing to do")
