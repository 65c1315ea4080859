"""One Python environment per training job, as each SageMaker training job gets its own container.

The PyTorch training image's toolkit ``pip install``s the code bundle's ``requirements.txt`` into the interpreter
that runs it (``sagemaker_training.modules.install_requirements``: ``sys.executable -m pip install -r
requirements.txt``). Run with the engine's interpreter, that would install into the engine's own virtualenv. So every
training job runs the toolkit with the interpreter of a job environment of its own:

- ``python -m venv --without-pip`` (done in-process with :class:`venv.EnvBuilder`, ~10 ms): the engine's base
  interpreter, an empty ``site-packages``;
- a ``.pth`` file in that ``site-packages`` that adds the engine's site directories *after* it (``site.addsitedir``,
  so their own ``.pth`` files -- editable installs, namespace packages -- work too). Everything the engine has is
  importable (torch, the toolkit, smdebug...), pip sees it as installed ("Requirement already satisfied"), and what
  ``requirements.txt`` adds or upgrades lands in the job environment and shadows the engine's copy;
- ``bin/train``: the toolkit's ``train`` console script (read from ``sagemaker-training``'s entry points), written for
  the job interpreter; ``bin/`` goes first on ``PATH`` (``python``, ``train`` and scripts resolve to the job's).

:func:`environ` also sets ``PIP_DISABLE_PIP_VERSION_CHECK=1`` (pip's self-check is the only index request when
every requirement is already satisfied; measured offline with an unreachable index: no request, ~0.5 s for this
project's requirements) and ``PIP_NO_INPUT=1``; a caller's own ``PIP_*`` values win. New requirements are
downloaded as on SageMaker, from the configured index.

With ``base`` (an image environment from :mod:`pipelines.local.jobs.envs`, e.g. scikit-learn 1.2 for the
``sagemaker-scikit-learn:1.2-1`` image), the ``.pth`` adds *that* environment's site directories instead of the
engine's: the job sees the image's packages (and its ``sagemaker-training``, the engine's version), not the engine's;
``requirements.txt`` still lands in the job environment and shadows them. The base is built from the engine's base
interpreter (:func:`pipelines.local.jobs.envs.base_python`), so its packages fit the job interpreter's version.

The environment lives beside the job directory (``<job_dir>.jobenv``, outside the ``/opt/ml`` stand-in) and is
deleted when the job ends: a fresh one per job, like a fresh container, so nothing a job installs leaks into another.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import sysconfig
import venv
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.local.jobs import zygote

if TYPE_CHECKING:
    from pipelines.local.jobs.envs import ImageEnvironment

TOOLKIT_DISTRIBUTION = "sagemaker-training"
TOOLKIT_SCRIPT = "train"
PTH_NAME = "_mlops_engine_site.pth"
PIP_DEFAULTS = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
#: Warm starts (:mod:`pipelines.local.jobs.zygote`): the client module, copied into every job environment, and the
#: ``.pth`` line that hands a qualifying process over to the engine's zygote once ``sys.path`` is complete.
ZYGOTE_SOURCE = Path(zygote.__file__)
ZYGOTE_HOOK = (f"import os; os.environ.get({zygote.SOCKET_ENV!r}) and "
               f"__import__({zygote.CLIENT_MODULE!r}).hand_over()\n")


@dataclass(frozen=True)
class JobEnvironment:
    root: Path
    python: Path
    bin_dir: Path
    site_packages: Path

    @property
    def train(self) -> Path:
        """The toolkit's ``train`` console script in this environment."""
        return self.bin_dir / TOOLKIT_SCRIPT

    def environ(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` with this environment activated (``PATH``, ``VIRTUAL_ENV``) and pip's offline-safe defaults."""
        out = {**PIP_DEFAULTS, **env}
        out["PATH"] = os.pathsep.join(p for p in (str(self.bin_dir), env.get("PATH", "")) if p)
        out["VIRTUAL_ENV"] = str(self.root)
        out.pop("PYTHONHOME", None)
        return out

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def engine_site_dirs() -> list[str]:
    """The engine interpreter's site directories (its virtualenv's ``site-packages``, user site when enabled)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    seen: list[str] = []
    for d in dirs:
        if d not in seen and Path(d).is_dir():
            seen.append(d)
    return seen


def toolkit_entry_point() -> str:
    """``module:function`` of the toolkit's ``train`` console script (``sagemaker_training.cli.train:main``)."""
    for ep in metadata.entry_points(group="console_scripts", name=TOOLKIT_SCRIPT):
        if ep.dist is not None and re.sub(r"[-_.]+", "-", ep.dist.metadata["Name"]).lower() == TOOLKIT_DISTRIBUTION:
            return ep.value
    raise RuntimeError(f"{TOOLKIT_DISTRIBUTION} is not installed: it provides the '{TOOLKIT_SCRIPT}' command that "
                       "SageMaker's training containers run (pip install sagemaker-training)")


def create(root: Path, *, base: ImageEnvironment | None = None) -> JobEnvironment:
    """Create a fresh job environment at ``root`` (replacing what is there), over the engine's packages or, with
    ``base``, over that image environment's."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt", clear=True).create(root)
    paths = sysconfig.get_paths(scheme="venv", vars={"base": str(root), "platbase": str(root)})
    site_packages = Path(paths["purelib"])
    bin_dir = Path(paths["scripts"])
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    site_packages.mkdir(parents=True, exist_ok=True)
    (site_packages / PTH_NAME).write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in (base.site_dirs if base else engine_site_dirs()))
        + ZYGOTE_HOOK, encoding="utf-8")
    shutil.copyfile(ZYGOTE_SOURCE, site_packages / f"{zygote.CLIENT_MODULE}.py")
    _console_script(bin_dir / TOOLKIT_SCRIPT, python, toolkit_entry_point())
    for name in ("pip", "pip3"):  # a container's pip: installs into this environment (scripts such as runproc.sh)
        _console_script(bin_dir / name, python, "pip._internal.cli.main:main")
    return JobEnvironment(root=root, python=python, bin_dir=bin_dir, site_packages=site_packages)


def _console_script(path: Path, python: Path, entry_point: str) -> None:
    module, _, function = entry_point.partition(":")
    path.write_text(f"#!{python}\nimport sys\nfrom {module} import {function}\n"
                    f"if __name__ == '__main__':\n    sys.exit({function}())\n", encoding="utf-8")
    path.chmod(0o755)


def location(job_dir: Path) -> Path:
    """Where a job's environment lives: beside its ``/opt/ml`` stand-in, never inside it."""
    job_dir = Path(job_dir)
    return job_dir.with_name(job_dir.name + ".jobenv")

