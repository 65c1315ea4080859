"""One cached Python environment per container image: what a job's image would have given it, without Docker.

A job names an image (``.../sagemaker-scikit-learn:1.2-1-cpu-py3``). Locally the engine builds, once, with ``uv``, a
virtual environment holding that framework at that version -- or the nearest installable one, said in the note --
plus what the real container has that scripts commonly import (pandas, numpy, scipy, boto3) and the training toolkit
``sagemaker-training`` at the engine's own version, so script mode works as in the container. The package sets are
one table, :data:`PACKAGE_SETS`; docs/JOB_ENVIRONMENTS.md has the mapping and the reasons for each bound.

- :func:`spec_for` maps an image URI to an :class:`EnvSpec` (pure and fast: no network). ``None`` means the project's
  own environment (the engine's venv): no image, PyTorch images (the engine has torch 2.14.1, which cannot be
  pip-installed here), unknown images, and built-in algorithms (callers see ``images.parse(uri).algorithm``);
- :func:`ensure` builds an environment once into ``$MLOPS_HOME/envs/<key>`` (``uv venv --relocatable`` from the
  engine's base interpreter, then ``uv pip install``) in ``<key>.tmp-<pid>`` and renames it into place, so an
  environment directory is complete or absent; ``<key>/.complete`` holds the spec and ``uv pip freeze``. A lock file
  (``<key>.lock``, :func:`pipelines.local.storage.store.file_lock`) makes a second engine building the same
  environment wait, then reuse it;
- uv is pointed at the index pip uses on this machine (:func:`uv_settings`): pip's effective configuration (``pip
  config list``: ``/etc/xdg/pip/pip.conf``, ``/etc/pip.conf``, the user's and the venv's ``pip.conf``, ``PIP_*``
  variables) becomes uv's ``--index-url``/``--extra-index-url``/``--find-links``/``--constraint`` and
  ``SSL_CERT_FILE``, each unless the matching ``UV_*`` variable is set (uv's own configuration wins). pip's
  constraint files are the engine's: an image environment gets them without the lines on packages the image bounds
  itself, and without them at all when they still make it unsolvable (:func:`machine_constraints`);
- a failed build raises :class:`EnvironmentUnavailable` naming the package(s) uv could not install and why.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.version import InvalidVersion, Version

from pipelines.local.jobs import images
from pipelines.local.jobs.environment import TOOLKIT_DISTRIBUTION
from pipelines.local.storage.store import file_lock, mlops_home

logger = logging.getLogger(__name__)

Log = Callable[[str], None]

#: Bump when the way environments are built changes: it is part of every key, so old builds are not reused.
SCHEMA = 1
MARKER = ".complete"
#: Seconds one ``uv`` call may take (a cold build downloads ~100 MB; a slow index gets this long).
UV_TIMEOUT_S = 1800


@dataclass(frozen=True)
class PackageSet:
    """The packages of one framework's images, for image versions below ``below`` (first matching row wins)."""

    framework: str  # images.Image.framework
    package: str  # the framework's PyPI distribution; listed first in EnvSpec.packages
    below: str | None  # None: any version
    companions: tuple[str, ...]  # besides the toolkit (added to every set)


#: Image -> packages. Bounds follow the real containers (aws/sagemaker-scikit-learn-container and
#: aws/sagemaker-xgboost-container requirements.txt per version branch): images before scikit-learn 1.4 / XGBoost 2.1
#: are numpy 1 builds (numpy<2), their scripts were written against pandas 1 (pandas<2), and scikit-learn < 1.3 calls
#: scipy.sparse.linalg.cg(tol=...) that scipy 1.12 deprecated and later removed (scipy<1.12).
PACKAGE_SETS: tuple[PackageSet, ...] = (
    PackageSet("sklearn", "scikit-learn", "1.4", ("numpy<2", "scipy<1.12", "pandas<2", "boto3")),
    PackageSet("sklearn", "scikit-learn", None, ("numpy", "scipy", "pandas", "boto3")),
    PackageSet("xgboost", "xgboost", "2.1", ("scikit-learn<1.3", "numpy<2", "scipy<1.12", "pandas<2", "boto3")),
    PackageSet("xgboost", "xgboost", None, ("scikit-learn", "numpy", "scipy", "pandas", "boto3")),
    # Best effort: the framework's own metadata bounds numpy; not exercised by the tests.
    PackageSet("tensorflow", "tensorflow", None, ("pandas", "scipy", "boto3")),
    PackageSet("mxnet", "mxnet", None, ("numpy<2", "pandas", "scipy", "boto3")),
    PackageSet("chainer", "chainer", None, ("numpy<2", "pandas", "scipy", "boto3")),
    # Hugging Face: transformers at the image's version, plus its base framework (torch/tensorflow) from the tag.
    PackageSet("huggingface", "transformers", None, ("datasets", "pandas", "scipy", "boto3")),
)

#: In every framework container besides its companions: ``requests`` (scripts download with it: the MLOps
#: template's preprocess.py does), and ``pip`` (the toolkit installs ``requirements.txt`` with ``python -m pip``;
#: FrameworkProcessor's ``runproc.sh`` runs ``pip install``). uv's venvs have no pip of their own.
CONTAINER_BASICS = ("requests", "pip")

#: The first release of a compiled framework with wheels for a CPython version (``uv pip compile --only-binary
#: --resolution lowest-direct`` against PyPI): an older image version gets this release's series instead.
WHEEL_FLOORS: dict[str, dict[tuple[int, int], str]] = {
    "scikit-learn": {(3, 11): "1.1.3", (3, 12): "1.3.1", (3, 13): "1.5.2", (3, 14): "1.7.2"},
    "tensorflow": {(3, 11): "2.12.0", (3, 12): "2.16.1", (3, 13): "2.20.0"},
    "torch": {(3, 11): "1.13.0", (3, 12): "2.2.0", (3, 13): "2.5.0"},
}

#: Base frameworks (Hugging Face images) compiled against numpy 1 whose wheels do not say so (torch declares no numpy
#: bound): below this series the environment also gets ``numpy<2`` (torch supports numpy 2 from 2.3).
NUMPY1_BELOW = {"torch": "2.3"}

#: Installed from wheels only: building these from source takes very long on a small CPU and usually fails; without
#: a wheel for this interpreter the build fails fast, naming the package.
BINARY_ONLY = frozenset({"scikit-learn", "xgboost", "numpy", "scipy", "pandas", "tensorflow", "mxnet", "torch"})

#: Legacy image versions that name no framework release: the built-in ``xgboost:1`` algorithm is XGBoost 0.72 (no
#: wheels on PyPI); the nearest installable is 0.90, the first script-mode image's.
VERSION_ALIASES = {("xgboost", "1"): "0.90"}
#: Why each alias of :data:`VERSION_ALIASES` was chosen (the environment's note says it).
ALIAS_REASONS = {("xgboost", "1"): "the built-in algorithm's image 1 is XGBoost 0.72, which has no wheel on PyPI: "
                                   "nearest installable"}

#: Images whose jobs run in the project's own environment: the engine's venv has torch (2.14.1, from this machine's
#: disk: not pip-installable here).
PROJECT_FRAMEWORKS = frozenset({"pytorch", "pytorch-smp", "pytorch-training-compiler", "pytorch-neuron",
                                "neo-pytorch", "inferentia-pytorch"})


class EnvironmentUnavailable(RuntimeError):
    """An image's environment cannot be built here; the message names the package(s) and why."""


@dataclass(frozen=True)
class EnvSpec:
    key: str  # stable hash of the packages and the Python version, readable prefix: sklearn-1.2-1-py311-<hash>
    label: str  # "sklearn 1.2-1"
    packages: tuple[str, ...]  # the framework's requirement first
    note: str  # "scikit-learn 1.2.* (image 1.2-1)"; an ImageEnvironment's spec says what was installed: 1.2.2


@dataclass(frozen=True)
class ImageEnvironment:
    root: Path
    python: Path
    bin_dir: Path
    site_dirs: tuple[str, ...]
    spec: EnvSpec


def envs_dir() -> Path:
    """``$MLOPS_HOME/envs``, created on first use."""
    path = mlops_home() / "envs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _say(log: Log | None, message: str) -> None:
    logger.info("%s", message)
    if log is not None:
        log(message)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _python_tag() -> str:
    return f"py{sys.version_info[0]}{sys.version_info[1]}"


def _series(version: str) -> str:
    """``1.2-1`` -> ``1.2``; ``2.13.0`` -> ``2.13``; ``0.90`` -> ``0.90``."""
    release = version.split("-", 1)[0]
    return ".".join(release.split(".")[:2])


def _older(version: str, than: str) -> bool:
    try:
        return Version(version) < Version(than)
    except InvalidVersion:
        return False


def toolkit_requirement() -> str:
    """``sagemaker-training==<the engine's installed version>`` (unpinned when the engine has none)."""
    try:
        return f"{TOOLKIT_DISTRIBUTION}=={metadata.version(TOOLKIT_DISTRIBUTION)}"
    except metadata.PackageNotFoundError:
        logger.warning("%s is not installed in the engine: image environments get the newest", TOOLKIT_DISTRIBUTION)
        return TOOLKIT_DISTRIBUTION


def _pinned(package: str, version: str | None) -> tuple[str, str, str]:
    """``(requirement, shown, why)``: ``scikit-learn==1.2.*``, ``1.2.*``, and why another series was chosen."""
    if not version:
        return package, "newest", "the tag names no version"
    series = _series(version)
    floor = WHEEL_FLOORS.get(package, {}).get(sys.version_info[:2])
    why = ""
    if floor and _older(series, _series(floor)):
        py = f"CPython {sys.version_info[0]}.{sys.version_info[1]}"
        why = f"{package} {series} has no wheel for {py}: nearest installable"
        series = _series(floor)
    return f"{package}=={series}.*", f"{series}.*", why


def _key(label: str, packages: tuple[str, ...]) -> str:
    identity = {"schema": SCHEMA, "packages": list(packages), "python": sys.implementation.cache_tag,
                "machine": platform.machine().lower(), "platform": sys.platform}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")
    return f"{readable}-{_python_tag()}-{digest}"


def _row(image: images.Image) -> PackageSet:
    rows = [row for row in PACKAGE_SETS if row.framework == image.framework]
    if not rows:
        raise EnvironmentUnavailable(
            f"no local environment for {image.framework} images ({image.uri}): its container is not a "
            f"pip-installable framework; known here: {', '.join(sorted({r.framework for r in PACKAGE_SETS}))}, "
            "and PyTorch images (the project's environment)")
    version = VERSION_ALIASES.get((image.framework, image.version or ""), image.version)
    for row in rows:
        if row.below is None or (version and _older(_series(version), row.below)):
            return row
    return rows[-1]


def spec_for(image_uri: str | None) -> EnvSpec | None:
    """The environment ``image_uri`` needs; ``None``: the project's own (engine's) environment.

    ``None`` for no image, PyTorch images, unknown images and built-in algorithms other than xgboost (callers tell
    those apart with :func:`images.parse`). Raises :class:`EnvironmentUnavailable` for a known framework that has no
    package set here (Triton, DJL, Spark...)."""
    if not image_uri:
        return None
    image = images.parse(image_uri)
    if image.framework is None or image.framework in PROJECT_FRAMEWORKS:
        return None
    if image.algorithm and image.framework not in images.ALGORITHM_FRAMEWORKS:
        return None
    row = _row(image)
    version = VERSION_ALIASES.get((image.framework, image.version or ""), image.version)
    requirement, shown, why = _pinned(row.package, version)
    if version != image.version and not why:
        why = ALIAS_REASONS.get((image.framework, image.version or ""),
                                f"legacy image version {image.version}: nearest installable")
    extra: tuple[str, ...] = ()
    if image.base_framework and image.base_version:
        base_package = "torch" if image.base_framework == "pytorch" else image.base_framework
        base_requirement, _, base_why = _pinned(base_package, image.base_version)
        extra = (base_requirement,)
        below = NUMPY1_BELOW.get(base_package)
        if below and _older(_series(base_requirement.split("==", 1)[-1].rstrip(".*")), below) and \
                not any(c.startswith("numpy") for c in row.companions):
            extra += ("numpy<2",)
        if base_why:
            why = f"{why}; {base_why}" if why else base_why
    packages = (requirement, *extra, *row.companions, *CONTAINER_BASICS, toolkit_requirement())
    label = f"{image.framework} {image.version or 'latest'}"
    note = f"{row.package} {shown} (image {image.version or image.tag}{'; ' + why if why else ''})"
    return EnvSpec(key=_key(label, packages), label=label, packages=packages, note=note)


def describe(image_uri: str | None) -> str | None:
    """Why ``image_uri`` runs in the project's environment (``None`` for no image or one with its own)."""
    if not image_uri:
        return None
    image = images.parse(image_uri)
    if image.framework in PROJECT_FRAMEWORKS:
        try:
            torch = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch = "not installed"
        has = f"PyTorch {image.version}" if image.version else f"the PyTorch of tag {image.tag!r}"
        return (f"{image.repository} {image.version or image.tag} image: runs in the project's environment "
                f"(torch {torch}; the image has {has})")
    if image.algorithm and image.framework not in images.ALGORITHM_FRAMEWORKS:
        return f"{image.repository}:{image.tag} is a built-in algorithm image ({image.framework}): no framework env"
    if image.framework is None:
        return f"unknown image {image.uri!r}: runs in the project's environment"
    return None


# ---------------------------------------------------------------------------------------------------- uv settings

_PIP_LINE = re.compile(r"^(?P<section>[^.=]+)\.(?P<key>[^=]+)=(?P<value>.*)$")
_SECTION_RANK = {"global": 0, "install": 1, ":env:": 2}
_PIP_KEYS = ("index-url", "extra-index-url", "find-links", "constraint", "no-index", "trusted-host", "cert",
             "client-cert", "timeout", "default-timeout")


def pip_settings() -> dict[str, str]:
    """pip's effective settings that matter to an index (``pip config list`` of the engine's pip: files and
    ``PIP_*``; ``:env:`` > ``[install]`` > ``[global]``). Without pip: the ``PIP_*`` variables alone."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("pip config list failed (%s): using PIP_* variables only", exc)
        out = "".join(f":env:.{k}={os.environ[v]!r}\n" for k in _PIP_KEYS
                      if (v := "PIP_" + k.upper().replace("-", "_")) in os.environ)
    found: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        match = _PIP_LINE.match(line.strip())
        if not match or match["key"] not in _PIP_KEYS or match["section"] not in _SECTION_RANK:
            continue
        try:
            value = str(ast.literal_eval(match["value"]))
        except (ValueError, SyntaxError):
            value = match["value"]
        rank = _SECTION_RANK[match["section"]]
        if match["key"] not in found or rank >= found[match["key"]][0]:
            found[match["key"]] = (rank, value)
    return {key: value for key, (_, value) in found.items()}


def uv_settings(env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """``(uv pip install options, environment additions)`` that make uv use the index pip uses here; an option whose
    ``UV_*`` variable is set in ``env`` is left to uv (uv's own configuration wins)."""
    env = dict(os.environ if env is None else env)
    pip = pip_settings()
    args: list[str] = []
    extra: dict[str, str] = {}
    flags = (("index-url", "--index-url", ("UV_INDEX_URL", "UV_DEFAULT_INDEX")),
             ("extra-index-url", "--extra-index-url", ("UV_EXTRA_INDEX_URL", "UV_INDEX")),
             ("find-links", "--find-links", ("UV_FIND_LINKS",)),
             ("constraint", "--constraint", ("UV_CONSTRAINT",)),
             ("trusted-host", "--allow-insecure-host", ("UV_INSECURE_HOST",)))
    indexes = False
    for key, flag, uv_vars in flags:
        if key in pip and not any(env.get(v) for v in uv_vars):
            values = pip[key].split()
            if key == "find-links":
                values = [value for value in values if _location_exists(value)]
            for value in values:
                args += [flag, value]
            indexes = indexes or (bool(values) and key in ("index-url", "extra-index-url", "find-links"))
    if pip.get("no-index", "").lower() in ("1", "true", "yes", "on") and not env.get("UV_NO_INDEX"):
        args.append("--no-index")
    if indexes and not env.get("UV_INDEX_STRATEGY"):
        args += ["--index-strategy", "unsafe-best-match"]  # pip's rule: the best version across all indexes
    for key, var in (("cert", "SSL_CERT_FILE"), ("client-cert", "SSL_CLIENT_CERT")):
        if pip.get(key) and not env.get(var):
            extra[var] = pip[key]
    timeout = pip.get("timeout") or pip.get("default-timeout")
    if timeout and not env.get("UV_HTTP_TIMEOUT"):
        extra["UV_HTTP_TIMEOUT"] = str(int(float(timeout)))
    return args, extra


def _location_exists(value: str) -> bool:
    """Whether a ``find-links`` location can be read: URLs are left to uv; a local directory or ``file://`` path that
    is not there is dropped, as pip drops it (with a warning) where uv would refuse to run at all."""
    if "://" in value and not value.startswith("file://"):
        return True
    path = Path(value[len("file://"):] if value.startswith("file://") else value)
    if path.exists():
        return True
    logger.warning("pip's find-links location %s does not exist: not passed to uv (pip ignores it too)", value)
    return False


# ------------------------------------------------------------------------------------------------------ constraints

#: Where a build keeps the machine constraints it applied (inside the environment, beside the marker).
CONSTRAINTS_NAME = ".machine-constraints.txt"
_INCLUDE = re.compile(r"^(?P<flag>-c|-r|--constraint|--requirement)(?:\s+|=)(?P<path>\S+)\s*$")


def _split_constraints(options: list[str]) -> tuple[list[str], list[str]]:
    """``(options without --constraint, the constraint files)`` of :func:`uv_settings`' options."""
    rest: list[str] = []
    files: list[str] = []
    pairs = iter(options)
    for option in pairs:
        if option == "--constraint":
            files.append(next(pairs, ""))
        else:
            rest.append(option)
    return rest, [f for f in files if f]


def _bounded_names(packages: tuple[str, ...]) -> set[str]:
    """The packages that ``packages`` give a version bound (``numpy<2``, ``scikit-learn==1.2.*``; not ``boto3``)."""
    names = set()
    for package in packages:
        requirement = package.split(";", 1)[0]
        if re.search(r"[<>=!~]", requirement):
            names.add(_normalize(re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0]))
    return names


def machine_constraints(spec: EnvSpec, files: list[str]) -> tuple[list[str], list[str]]:
    """``(kept lines, dropped lines)`` of the machine's pip constraint ``files`` for ``spec``'s environment.

    The machine's constraints (``/etc/xdg/pip/constraints.txt`` here: torch/torchvision capped at the releases on
    this machine's disk) are written for the engine's own environment. An image environment is held to the image's
    bounds instead: a constraint line on a package the spec bounds itself (``numpy<2`` for scikit-learn 1.2) is
    dropped, so a machine-wide ``numpy>=2`` cannot make an old image's environment unsolvable; the other lines are
    kept (a cap on what this machine can download still applies). Includes (``-c other.txt``) are kept with their
    path made absolute; a file that cannot be read is kept as an include (uv then reports it, as pip would)."""
    bounded = _bounded_names(spec.packages)
    kept: list[str] = []
    dropped: list[str] = []
    for name in files:
        path = Path(name)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            kept.append(f"-c {name}")
            continue
        for raw in lines:
            line = re.sub(r"(?:^|\s)#.*$", "", raw).strip()
            if not line:
                continue
            include = _INCLUDE.match(line)
            if include:
                target = include["path"]
                if "://" not in target and not Path(target).is_absolute():
                    target = str((path.parent / target).resolve())
                kept.append(f"{include['flag']} {target}")
                continue
            package = _normalize(re.split(r"[<>=!~;\[ @]", line, maxsplit=1)[0])
            (dropped if package in bounded else kept).append(line)
    return kept, dropped


def _constraint_conflict(output: str, kept: list[str]) -> bool:
    """Whether a failed resolution may be the machine constraints' doing: unsolvable (not offline) and naming a
    package a kept constraint line names, or the kept lines include another file (whose names are not read)."""
    if not re.search(r"No solution found|unsatisfiable", output) or re.search(r"network (?:was|is) disabled", output):
        return False
    names = {_normalize(re.split(r"[<>=!~;\[ @]", line, maxsplit=1)[0]) for line in kept if not line.startswith("-")}
    mentioned = {_normalize(n) for n in re.findall(r"[A-Za-z0-9][\w.-]*", output)}
    return bool(names & mentioned) or any(line.startswith("-") for line in kept)


# ------------------------------------------------------------------------------------------------------ building

def base_python() -> Path:
    """The engine's base interpreter (not its venv's ``python``): what image environments and job venvs are made of."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return Path(base)


def uv_bin() -> str:
    try:
        from uv import find_uv_bin
    except ImportError as exc:
        raise EnvironmentUnavailable("uv is not installed in the engine's environment (pip install 'uv>=0.4'): "
                                     "image environments are built with it") from exc
    return find_uv_bin()


def _paths(root: Path) -> tuple[Path, Path, tuple[str, ...]]:
    paths = sysconfig.get_paths(scheme="venv", vars={"base": str(root), "platbase": str(root)})
    bin_dir = Path(paths["scripts"])
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    site_dirs = tuple(dict.fromkeys(paths[k] for k in ("purelib", "platlib")))
    return python, bin_dir, site_dirs


def _existing(target: Path, spec: EnvSpec) -> ImageEnvironment | None:
    """The complete environment at ``target``, or ``None``."""
    try:
        data = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    python, bin_dir, site_dirs = _paths(target)
    if data.get("spec", {}).get("key") != spec.key or not python.exists():
        return None
    return ImageEnvironment(root=target, python=python, bin_dir=bin_dir, site_dirs=site_dirs,
                            spec=dataclasses.replace(spec, note=data.get("note") or spec.note))


def ensure(spec: EnvSpec, *, log: Log | None = None) -> ImageEnvironment:
    """The environment of ``spec``, built once (later calls, from any engine on this ``MLOPS_HOME``, reuse it)."""
    root = envs_dir()
    target = root / spec.key
    found = _existing(target, spec)
    if found is not None:
        return found
    waiting = f"waiting for another engine building the {spec.label} environment ({root})"
    with file_lock(root / f"{spec.key}.lock", on_wait=lambda: _say(log, waiting)):
        found = _existing(target, spec)
        if found is not None:
            _say(log, f"{spec.label} environment: built by another engine ({found.spec.note})")
            return found
        _build(spec, target, log)
    found = _existing(target, spec)
    if found is None:  # pragma: no cover -- _build renames a complete directory into place or raises
        raise EnvironmentUnavailable(f"the {spec.label} environment at {target} is incomplete after its build")
    return found


def _build(spec: EnvSpec, target: Path, log: Log | None) -> None:
    for stale in target.parent.glob(f"{spec.key}.tmp-*"):  # left by a build that died (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.with_name(f"{spec.key}.tmp-{os.getpid()}")
    _say(log, f"building the {spec.label} environment with uv: {' '.join(spec.packages)}")
    started = time.monotonic()
    try:
        freeze, constraints = _install(spec, tmp, log)
        note = _resolved_note(spec, freeze)
        seconds = round(time.monotonic() - started, 1)
        marker = {"spec": dataclasses.asdict(spec), "note": note, "python": str(base_python()),
                  "python_version": platform.python_version(), "built_s": seconds, "constraints": constraints,
                  "freeze": freeze}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # an incomplete leftover (no marker): replaced
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(log, f"built the {spec.label} environment in {seconds:.1f} s: {note}")


def _install(spec: EnvSpec, tmp: Path, log: Log | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """Create the venv at ``tmp`` and install ``spec.packages``: ``(uv pip freeze of the result, the machine
    constraints applied and dropped)``.

    The machine's pip constraints go through :func:`machine_constraints` (lines on packages the image bounds are
    dropped), written to ``<env>/.machine-constraints.txt``. Should the install still be unsolvable over a package
    a kept line names, it is retried once without the machine's constraints: the image's own pins win."""
    uv = uv_bin()
    options, extra_env = uv_settings()
    options, constraint_files = _split_constraints(options)
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": os.environ.get("UV_PYTHON_DOWNLOADS", "never"), **extra_env}
    env.pop("VIRTUAL_ENV", None)
    python = _paths(tmp)[0]
    names = {_normalize(re.split(r"[<>=!~;\[ ]", p, maxsplit=1)[0]) for p in spec.packages}
    binary = [arg for name in sorted(names & BINARY_ONLY) for arg in ("--only-binary", name)]
    _run_uv(spec, [uv, "venv", "--relocatable", "--quiet", "--python", str(base_python()), str(tmp)], env)
    kept, dropped = machine_constraints(spec, constraint_files)
    if dropped:
        _say(log, f"{spec.label} environment: the machine's pip constraints {', '.join(dropped)} are not applied "
                  "(the image's own bounds win)")
    install = [uv, "pip", "install", "--python", str(python), *binary, *options]
    constraint: list[str] = []
    if kept:
        path = tmp / CONSTRAINTS_NAME
        path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        constraint = ["--constraint", str(path)]
    done = _uv(spec, [*install, *constraint, *spec.packages], env)
    if done.returncode != 0 and kept and _constraint_conflict(done.stdout + done.stderr, kept):
        _say(log, f"{spec.label} environment: unsolvable with the machine's pip constraints ({', '.join(kept)}): "
                  "retrying without them")
        dropped, kept = dropped + kept, []
        (tmp / CONSTRAINTS_NAME).unlink(missing_ok=True)
        done = _uv(spec, [*install, *spec.packages], env)
    if done.returncode != 0:
        raise EnvironmentUnavailable(explain(spec, [*install, *spec.packages], done.stdout + done.stderr))
    freeze = _run_uv(spec, [uv, "pip", "freeze", "--python", str(python)], env).splitlines()
    return freeze, {"applied": kept, "dropped": dropped}


def _uv(spec: EnvSpec, command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    logger.debug("running %s", " ".join(command))
    try:
        return subprocess.run(command, env=env, cwd=envs_dir(), capture_output=True, text=True, timeout=UV_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise EnvironmentUnavailable(f"cannot build the {spec.label} environment: uv took over {UV_TIMEOUT_S} s "
                                     f"({' '.join(command[1:3])})") from exc
    except OSError as exc:
        raise EnvironmentUnavailable(f"cannot build the {spec.label} environment: cannot run uv: {exc}") from exc


def _run_uv(spec: EnvSpec, command: list[str], env: dict[str, str]) -> str:
    done = _uv(spec, command, env)
    if done.returncode != 0:
        raise EnvironmentUnavailable(explain(spec, command, done.stdout + done.stderr))
    return done.stdout


# ------------------------------------------------------------------------------------------------------ failures

_REASONS = (
    (r"network (?:was|is) disabled|--offline", "offline: uv's network access is disabled and its cache has no copy"),
    (r"tcp connect error|Connection refused|dns error|failed to lookup address|error sending request|timed out"
     r"|Failed to fetch", "the package index is unreachable (offline?)"),
    (r"no wheels with a matching Python|has no usable wheels|no wheels (?:with a matching|are available)",
     f"no wheel for this Python (CPython {sys.version_info[0]}.{sys.version_info[1]}, {platform.machine()})"),
    (r"not found in the package registry|not found in the provided package locations|was not found",
     "not found on the package index"),
    (r"Failed to build|Failed to prepare", "building it from source failed"),
    (r"No solution found|unsatisfiable", "no set of versions satisfies the requirements"),
)


def _culprits(output: str, requested: tuple[str, ...]) -> list[str]:
    """The packages uv's ``output`` blames, those of ``requested`` first."""
    found: list[str] = []
    patterns = (r"/simple/([A-Za-z0-9][\w.-]*)/", r"[Bb]ecause (?:all versions of |only )?([A-Za-z0-9][\w.-]*)",
                r"you require ([A-Za-z0-9][\w.-]*)",
                r"(?:Failed to (?:build|download|prepare \w+ for)|required for) "
                r"`([A-Za-z0-9][\w.-]*?)(?:[=<>!~@ ].*?)?`",
                r"for `([A-Za-z0-9][\w.-]*?)`")
    for pattern in patterns:
        for name in re.findall(pattern, output):
            name = name.rstrip(".-_")
            if name and _normalize(name) not in found and name.lower() not in ("you", "the", "there", "no"):
                found.append(_normalize(name))
    wanted = {_normalize(re.split(r"[<>=!~;\[ ]", p, maxsplit=1)[0]): p for p in requested}
    ours = [wanted[name] for name in found if name in wanted]
    return ours or found


def explain(spec: EnvSpec, command: list[str], output: str) -> str:
    """The :class:`EnvironmentUnavailable` message for a failed uv ``command``: the package(s) and why."""
    reason = next((text for pattern, text in _REASONS if re.search(pattern, output, re.IGNORECASE)), "uv failed")
    step = command[2] if command[1:2] == ["pip"] and len(command) > 2 else command[1] if len(command) > 1 else "uv"
    culprits = _culprits(output, spec.packages) if step == "install" else []
    what = f"could not install {', '.join(culprits)}" if culprits else f"uv {step} failed"
    tail = "\n".join(output.strip().splitlines()[-12:])
    return f"cannot build the {spec.label} environment ({spec.note}): {what}: {reason}\nuv said:\n{tail}"


def _resolved_note(spec: EnvSpec, freeze: list[str]) -> str:
    """``spec.note`` with the installed version of the framework: ``scikit-learn 1.2.2 (image 1.2-1)``."""
    name = _normalize(re.split(r"[<>=!~;\[ ]", spec.packages[0], maxsplit=1)[0])
    installed = next((line.split("==", 1)[1] for line in freeze
                      if "==" in line and _normalize(line.split("==", 1)[0]) == name), None)
    match = re.match(r"^(\S+) (\S+)(.*)$", spec.note)
    if installed is None or match is None:
        return spec.note
    return f"{match[1]} {installed}{match[3]}"


def for_image(image_uri: str | None, *, log: Log | None = None) -> ImageEnvironment | None:
    """The built environment for ``image_uri``; ``None``: the job runs in the project's environment (said in the
    log, with the nearest-version note, when an image was named)."""
    spec = spec_for(image_uri)
    if spec is None:
        note = describe(image_uri)
        if note:
            _say(log, note)
        return None
    return ensure(spec, log=log)
