"""The serving code that travels inside ``model.tar.gz`` (docs/CONTRACTS.md §5).

The SageMaker PyTorch inference containers (``sagemaker-pytorch-inference`` under TorchServe) import the handler
only from ``code/`` inside the model archive: the toolkit puts ``<model_dir>/code`` on ``PYTHONPATH`` and imports
``SAGEMAKER_PROGRAM`` (``inference.py``) from there; ``SAGEMAKER_SUBMIT_DIRECTORY`` is not read. So the trainer
copies the handler and everything it imports into ``SM_MODEL_DIR/code/`` and SageMaker packs it with the weights:

    model.tar.gz
    ├── model.pth, model_config.json
    └── code/
        ├── inference.py                  (inference/inference.py)
        └── training/{__init__,model,archives,images}.py

No ``code/requirements.txt``: the handler needs only torch, torchvision, numpy and Pillow, which the PyTorch
inference image ships.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CODE_DIR = "code"
SERVING_PROGRAM = "inference.py"
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


def write_serving_code(model_dir: str | Path, root: str | Path | None = None) -> list[str]:
    """Copy the serving files into ``model_dir/code/``; return the archive paths written (sorted)."""
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
    return sorted(written)
