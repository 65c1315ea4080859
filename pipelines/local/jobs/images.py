"""What a job's container image URI says: registry, framework, version, Python, processor.

A SageMaker job names an image such as ``683313688378.dkr.ecr.us-east-1.amazonaws.com/sagemaker-scikit-learn:
1.2-1-cpu-py3``. :func:`parse` splits it into an :class:`Image` and recognises the framework from the installed
SageMaker SDK's own tables (``sagemaker/image_uri_config/*.json``: framework -> scope -> versions -> ``repository``
and ``registries``), read once (:func:`repositories`): a reverse index repository -> framework, so every repository the
SDK can ``image_uris.retrieve`` (sklearn, xgboost, pytorch, tensorflow, huggingface, the built-in algorithms...) is
known without a hand-written table, and a newer SDK brings its new images with it.

Tags are read best-effort: ``1.2-1-cpu-py3`` (version ``1.2-1``, ``cpu``, ``py3``), ``1.7-1``, ``2.6.0-gpu-py312-
cu124-ubuntu22.04-sagemaker``, ``2.1-transformers4.36-gpu-py310-...`` (Hugging Face: version ``4.36``, base
framework ``pytorch`` ``2.1``), and the built-in algorithms' ``:1`` / ``:latest`` (the SDK's ``version_aliases``,
else the algorithm's only version). :func:`parse` never raises: an unknown or malformed URI gives ``framework=None``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Processor names that appear as a tag component (the SDK's ``processors`` plus the Neuron/Inferentia ones).
PROCESSORS = frozenset({"cpu", "gpu", "inf", "inf1", "inf2", "trn", "trn1", "neuron", "neuronx"})
#: Frameworks that are built-in algorithms *and* script-mode frameworks: algorithm when run without a script.
ALGORITHM_FRAMEWORKS = frozenset({"xgboost"})

_ECR_HOST = re.compile(r"^(?P<account>\d{12})\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z0-9-]+)\.")
_VERSION = re.compile(r"^[a-z]*?(?P<version>\d+(?:\.\d+)*(?:-\d+)?)(?=-|$)", re.IGNORECASE)
_PY = re.compile(r"^py\d+$")


@dataclass(frozen=True)
class Image:
    uri: str
    account: str | None
    region: str | None
    repository: str
    tag: str
    framework: str | None
    version: str | None
    py_version: str | None
    processor: str | None
    algorithm: bool
    #: Hugging Face images: the framework underneath (``pytorch``/``tensorflow``) and its version from the tag.
    base_framework: str | None = None
    base_version: str | None = None
    #: ``sha256:...`` of ``repository[:tag]@sha256:...``; a URI with a digest and no tag has it as its ``tag`` too.
    digest: str | None = None


def config_dir() -> Path | None:
    """``sagemaker/image_uri_config`` of the installed SDK, located without importing the SDK (slow)."""
    try:
        spec = importlib.util.find_spec("sagemaker")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "image_uri_config"
        if path.is_dir():
            return path
    return None


@functools.cache
def configs() -> dict[str, dict[str, Any]]:
    """The SDK's image tables, by framework name (the file name: ``sklearn``, ``linear-learner``...)."""
    out: dict[str, dict[str, Any]] = {}
    directory = config_dir()
    if directory is None:
        log.warning("the sagemaker SDK is not installed: container images cannot be recognised")
        return out
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("skipping unreadable image table %s: %s", path, exc)
            continue
        if isinstance(data, dict):
            out[path.stem] = data
    return out


def _repositories_of(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["repository"]} if isinstance(node.get("repository"), str) else set()
        for value in node.values():
            found |= _repositories_of(value)
        return found
    if isinstance(node, list):
        return set().union(*map(_repositories_of, node)) if node else set()
    return set()


@functools.cache
def repositories() -> dict[str, str]:
    """Reverse index of the SDK's tables: ECR repository -> framework name.

    A repository several tables name (``djl-inference``: djl-deepspeed, djl-lmi...) goes to the shortest name, then
    the first alphabetically, so the answer is stable."""
    claims: dict[str, list[str]] = {}
    for framework, data in configs().items():
        for repository in _repositories_of(data):
            claims.setdefault(repository, []).append(framework)
    return {repo: min(names, key=lambda n: (len(n), n)) for repo, names in claims.items()}


def _version_tables(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``{versions, version_aliases}`` blocks of a table: the top level, or one per scope."""
    if "versions" in data:
        return [data]
    return [block for block in data.values() if isinstance(block, dict) and "versions" in block]


@functools.cache
def algorithms() -> frozenset[str]:
    """Built-in algorithms: tables scoped for training whose only version is ``1`` and that name no Python versions
    or processors (linear-learner, kmeans, pca, blazingtext...), plus xgboost (:data:`ALGORITHM_FRAMEWORKS`)."""
    found = set(ALGORITHM_FRAMEWORKS)
    for framework, data in configs().items():
        versions = data.get("versions")
        if "training" in (data.get("scope") or ()) and isinstance(versions, dict) and set(versions) == {"1"} and \
                not any(not isinstance(entry, dict) or k in entry
                        for entry in versions.values() for k in ("py_versions", "processors")):
            found.add(framework)
    return frozenset(found)


def _known_versions(framework: str) -> tuple[set[str], dict[str, str]]:
    versions: set[str] = set()
    aliases: dict[str, str] = {}
    for block in _version_tables(configs().get(framework, {})):
        versions.update(block.get("versions") or {})
        aliases.update(block.get("version_aliases") or {})
    return versions, aliases


def _split(uri: str) -> tuple[str | None, str | None, str, str, str | None]:
    """``(account, region, repository, tag, digest)`` of ``[registry/]repository[:tag][@digest]``."""
    rest = uri.strip()
    rest, _, digest = rest.partition("@")
    host = ""
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, rest = first, remainder
    repository, _, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not tag:
        tag = digest if digest else "latest"
    match = _ECR_HOST.match(host)
    account, region = (match["account"], match["region"]) if match else (None, None)
    return account, region, repository.strip("/"), tag, digest or None


def _framework_of(repository: str) -> str | None:
    index = repositories()
    if repository in index:
        return index[repository]
    last = repository.rsplit("/", 1)[-1]  # public.ecr.aws/<namespace>/<repo>, mirrors with a path prefix
    return index.get(last)


def _parse_tag(framework: str | None, tag: str) -> dict[str, str | None]:
    parts = tag.split("-")
    out: dict[str, str | None] = {"version": None, "py_version": None, "processor": None,
                                  "base_framework": None, "base_version": None}
    out["py_version"] = next((p for p in parts if _PY.match(p)), None)
    out["processor"] = next((p for p in parts if p in PROCESSORS), None)
    match = _VERSION.match(tag)
    version = match["version"] if match else None
    transformers = next((p[len("transformers"):] for p in parts if re.fullmatch(r"transformers\d[\d.]*", p)), None)
    if transformers:
        out["base_version"], version = version, transformers
    if framework:
        known, aliases = _known_versions(framework)
        if tag in aliases:
            version = aliases[tag]
        elif version is None and tag == "latest" and len(known) == 1:
            version = next(iter(known))
    out["version"] = version
    return out


def parse(uri: str) -> Image:
    """What ``uri`` names; never raises (``framework=None`` when the repository is unknown or ``uri`` is odd)."""
    try:
        text = uri if isinstance(uri, str) else str(uri or "")
    except Exception:  # an object whose str() raises
        text = ""
    try:
        account, region, repository, tag, digest = _split(text)
        framework = _framework_of(repository) if repository else None
        fields = _parse_tag(framework, tag)
        base = None
        if framework and framework.startswith("huggingface"):
            base = next((name for name in ("pytorch", "tensorflow") if name in repository), None)
        return Image(uri=text, account=account, region=region, repository=repository, tag=tag, framework=framework,
                     version=fields["version"], py_version=fields["py_version"], processor=fields["processor"],
                     algorithm=framework in algorithms() if framework else False,
                     base_framework=base, base_version=fields["base_version"] if base else None, digest=digest)
    except Exception:  # by contract parse never raises (an SDK table of an unexpected shape): say what was unread
        log.warning("cannot read container image URI %r", text, exc_info=True)
        return Image(uri=text, account=None, region=None, repository=text, tag="", framework=None, version=None,
                     py_version=None, processor=None, algorithm=False)
