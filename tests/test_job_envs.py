"""envs: image URI -> Python environment spec (fast, pure), uv's settings from pip's, uv failures explained, and
real builds with uv (``slow``: the scikit-learn 1.2-1 environment, built once into a persistent cache and reused).

The slow build goes to ``$MLOPS_TEST_ENVS`` (default ``~/.cache/mlops-test-envs``), not to a temporary MLOPS_HOME, so
that later runs reuse it the way an engine reuses ``$MLOPS_HOME/envs``: delete that directory to time a cold build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.local.jobs import envs

REGION = "us-east-1"
SKLEARN_ACCOUNT = "683313688378"
ECR = f"{SKLEARN_ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
SKLEARN_1_2 = f"{ECR}/sagemaker-scikit-learn:1.2-1-cpu-py3"
SKLEARN_0_23 = f"{ECR}/sagemaker-scikit-learn:0.23-1-cpu-py3"
XGBOOST_1_0 = f"{ECR}/sagemaker-xgboost:1.0-1-cpu-py3"
XGBOOST_1_7 = f"{ECR}/sagemaker-xgboost:1.7-1"
XGBOOST_BUILTIN = f"811284229777.dkr.ecr.{REGION}.amazonaws.com/xgboost:1"
PYTORCH = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-training:2.5-gpu-py311"
KMEANS = f"382416733822.dkr.ecr.{REGION}.amazonaws.com/kmeans:1"
PY311 = sys.version_info[:2] == (3, 11)


@pytest.fixture(autouse=True)
def _own_mlops_home(tmp_path, monkeypatch):
    """Nothing here writes into the checkout's .mlops: MLOPS_HOME is this test's (the slow build overrides envs_dir)."""
    monkeypatch.setenv("MLOPS_HOME", str(tmp_path / "mlops"))


# ------------------------------------------------------------------------------------------------------- spec_for

@pytest.mark.fast
@pytest.mark.skipif(not PY311, reason="the nearest-installable floor asserted here is CPython 3.11's")
def test_sklearn_0_23_gets_the_nearest_installable_release_and_says_why():
    spec = envs.spec_for(SKLEARN_0_23)
    assert spec.packages[0] == "scikit-learn==1.1.*"
    assert "numpy<2" in spec.packages and "scipy<1.12" in spec.packages and "pandas<2" in spec.packages
    assert "image 0.23-1" in spec.note
    assert "scikit-learn 0.23 has no wheel for CPython 3.11: nearest installable" in spec.note
    assert spec.label == "sklearn 0.23-1"


@pytest.mark.fast
def test_sklearn_1_2_pins_its_series_and_the_numpy_1_stack():
    spec = envs.spec_for(SKLEARN_1_2)
    assert spec.packages[0] == "scikit-learn==1.2.*"
    for bound in ("numpy<2", "scipy<1.12", "pandas<2", "boto3", "pip"):
        assert bound in spec.packages
    assert spec.packages[-1] == envs.toolkit_requirement()
    assert spec.packages[-1].startswith("sagemaker-training==")  # the engine's own toolkit version
    assert spec.note == "scikit-learn 1.2.* (image 1.2-1)"
    assert spec.key.startswith(f"sklearn-1.2-1-{envs._python_tag()}-")


@pytest.mark.fast
def test_newer_sklearn_has_no_numpy_1_cap():
    spec = envs.spec_for(f"{ECR}/sagemaker-scikit-learn:1.4-2-cpu-py3")
    assert spec.packages[0] == "scikit-learn==1.4.*"
    assert "numpy" in spec.packages and "numpy<2" not in spec.packages


@pytest.mark.fast
@pytest.mark.parametrize(("uri", "requirement", "series"), [(XGBOOST_1_0, "xgboost==1.0.*", "1.0.*"),
                                                            (XGBOOST_1_7, "xgboost==1.7.*", "1.7.*")])
def test_xgboost_script_mode(uri, requirement, series):
    spec = envs.spec_for(uri)
    assert spec.packages[0] == requirement
    assert "scikit-learn<1.3" in spec.packages and "numpy<2" in spec.packages
    assert spec.note.startswith(f"xgboost {series} (image ")


@pytest.mark.fast
def test_builtin_xgboost_1_is_the_nearest_installable_0_90():
    spec = envs.spec_for(XGBOOST_BUILTIN)
    assert spec.packages[0] == "xgboost==0.90.*"
    assert spec.label == "xgboost 1"
    assert "image 1" in spec.note and "0.72" in spec.note and "nearest installable" in spec.note


HF = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/huggingface-pytorch-training"


@pytest.mark.fast
def test_huggingface_gets_transformers_and_its_torch_with_numpy_1_below_torch_2_3():
    spec = envs.spec_for(f"{HF}:2.1-transformers4.36-gpu-py310-cu121-ubuntu20.04")
    assert spec.packages[:3] == ("transformers==4.36.*", "torch==2.1.*", "numpy<2")  # torch 2.1 is a numpy 1 build
    newer = envs.spec_for(f"{HF}:2.5-transformers4.49-gpu-py311-cu124-ubuntu22.04")
    assert newer.packages[:2] == ("transformers==4.49.*", "torch==2.5.*") and "numpy<2" not in newer.packages


@pytest.mark.fast
@pytest.mark.skipif(not PY311, reason="the torch floor asserted here is CPython 3.11's")
def test_huggingface_torch_without_a_wheel_says_so():
    spec = envs.spec_for(f"{HF}:1.10-transformers4.17-gpu-py38-cu113-ubuntu20.04")
    assert "torch==1.13.*" in spec.packages
    assert "torch 1.10 has no wheel for CPython 3.11: nearest installable" in spec.note


@pytest.mark.fast
@pytest.mark.parametrize("uri", [None, "", PYTORCH, "docker.io/library/python:3.11", "garbage ::: uri", KMEANS])
def test_project_environment_images(uri):
    assert envs.spec_for(uri) is None


@pytest.mark.fast
def test_describe_says_why_the_project_environment():
    assert "runs in the project's environment" in envs.describe(PYTORCH)
    assert "PyTorch 2.5" in envs.describe(PYTORCH)
    assert "built-in algorithm" in envs.describe(KMEANS)
    assert "unknown image" in envs.describe("docker.io/library/python:3.11")
    assert envs.describe(None) is None and envs.describe(SKLEARN_1_2) is None


@pytest.mark.fast
def test_known_framework_without_a_package_set_raises_naming_it():
    uri = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/djl-inference:0.29.0-lmi11.0.0-cu124"
    with pytest.raises(envs.EnvironmentUnavailable, match="no local environment for djl"):
        envs.spec_for(uri)


@pytest.mark.fast
def test_keys_are_stable_and_distinct():
    a, b = envs.spec_for(SKLEARN_1_2), envs.spec_for(SKLEARN_1_2)
    assert a == b and a.key == b.key
    # The same image from another region/account: the same environment.
    other_region = "141502667606.dkr.ecr.eu-west-1.amazonaws.com/sagemaker-scikit-learn:1.2-1-cpu-py3"
    assert envs.spec_for(other_region).key == a.key
    keys = {envs.spec_for(uri).key for uri in (SKLEARN_1_2, SKLEARN_0_23, XGBOOST_1_0, XGBOOST_1_7, XGBOOST_BUILTIN)}
    assert len(keys) == 5
    assert all(key.replace("-", "").replace(".", "").isalnum() for key in keys)  # a plain directory name


@pytest.mark.fast
def test_key_changes_with_the_packages(monkeypatch):
    before = envs.spec_for(SKLEARN_1_2).key
    monkeypatch.setattr(envs, "toolkit_requirement", lambda: "sagemaker-training==0.0.1")
    assert envs.spec_for(SKLEARN_1_2).key != before


# ------------------------------------------------------------------------------------------------- uv settings

PIP_CONFIG_LIST = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.disable-pip-version-check='1'
:env:.find-links='{links}'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/somewhere/else'
install.index-url='https://mirror.example/simple'
"""


@pytest.mark.fast
def test_pip_settings_reads_pip_config_list(monkeypatch, tmp_path):
    out = PIP_CONFIG_LIST.format(links=tmp_path)
    monkeypatch.setattr(envs.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=out, returncode=0))
    assert envs.pip_settings() == {
        "cert": "/etc/ssl/certs/ca-certificates.crt", "default-timeout": "180", "find-links": str(tmp_path),
        "constraint": "/etc/xdg/pip/constraints.txt", "index-url": "https://mirror.example/simple",
        "extra-index-url": "file:///opt/pypi/simple file:///opt/pypi-more/simple"}


@pytest.mark.fast
def test_uv_settings_maps_pip_config(monkeypatch, tmp_path):
    links = tmp_path / "wheels"
    links.mkdir()
    monkeypatch.setattr(envs, "pip_settings", lambda: {
        "index-url": "https://mirror.example/simple",
        "extra-index-url": "file:///opt/pypi/simple file:///opt/pypi-more/simple",
        "find-links": f"{links} {tmp_path / 'gone'} https://example.com/links/",
        "constraint": "/etc/xdg/pip/constraints.txt", "trusted-host": "mirror.example",
        "cert": "/etc/ssl/certs/ca-certificates.crt", "default-timeout": "180"})
    args, extra = envs.uv_settings({})
    assert args == ["--index-url", "https://mirror.example/simple",
                    "--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/pypi-more/simple",
                    # a find-links directory that is not there is dropped (pip ignores it; uv would refuse to run)
                    "--find-links", str(links), "--find-links", "https://example.com/links/",
                    "--constraint", "/etc/xdg/pip/constraints.txt",
                    "--allow-insecure-host", "mirror.example",
                    "--index-strategy", "unsafe-best-match"]
    assert extra == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt", "UV_HTTP_TIMEOUT": "180"}


@pytest.mark.fast
def test_uv_settings_leaves_what_uv_is_configured_for_to_uv(monkeypatch):
    monkeypatch.setattr(envs, "pip_settings", lambda: {
        "index-url": "https://mirror.example/simple", "constraint": "/c.txt", "no-index": "true",
        "cert": "/ca.pem", "timeout": "30.5"})
    args, extra = envs.uv_settings({"UV_DEFAULT_INDEX": "https://uv.example/simple", "SSL_CERT_FILE": "/mine.pem",
                                    "UV_CONSTRAINT": "/uv-c.txt"})
    assert args == ["--no-index"]  # no index, no constraint of pip's: uv's own UV_DEFAULT_INDEX/UV_CONSTRAINT win
    assert extra == {"UV_HTTP_TIMEOUT": "30"}


@pytest.mark.fast
def test_uv_settings_without_pip_config(monkeypatch):
    monkeypatch.setattr(envs, "pip_settings", lambda: {})
    assert envs.uv_settings({}) == ([], {})


# ------------------------------------------------------------------------------------- the machine's constraints

@pytest.mark.fast
def test_machine_constraints_drop_what_the_image_bounds(tmp_path):
    (tmp_path / "more.txt").write_text("protobuf<4\n")
    machine = tmp_path / "constraints.txt"
    machine.write_text("# These releases lie on this machine's disk\ntorch<=2.14.1\ntorchvision<=0.29.1\n"
                       "numpy>=2  # a machine-wide numpy 2\nboto3<9\n\n-c more.txt\n")
    kept, dropped = envs.machine_constraints(envs.spec_for(SKLEARN_1_2), [str(machine)])
    assert dropped == ["numpy>=2"]  # the image says numpy<2
    # boto3 is named without a bound: a machine cap on it still applies; the include keeps working from elsewhere
    assert kept == ["torch<=2.14.1", "torchvision<=0.29.1", "boto3<9", f"-c {tmp_path / 'more.txt'}"]


@pytest.mark.fast
def test_machine_constraints_keep_an_unreadable_file_for_uv_to_report(tmp_path):
    kept, dropped = envs.machine_constraints(envs.spec_for(SKLEARN_1_2), [str(tmp_path / "missing.txt")])
    assert (kept, dropped) == ([f"-c {tmp_path / 'missing.txt'}"], [])


@pytest.mark.fast
def test_split_constraints():
    options = ["--extra-index-url", "file:///x", "--constraint", "/a.txt", "--constraint", "/b.txt", "--no-index"]
    assert envs._split_constraints(options) == (["--extra-index-url", "file:///x", "--no-index"], ["/a.txt", "/b.txt"])


# uv 0.13's own words (captured from real runs: `uv pip install --dry-run ...`)
UV_CONSTRAINT_CONFLICT = """\
Using Python 3.11.7 environment at: v
error: No solution found when resolving dependencies
  cause: Because sagemaker-training==4.8.3 depends on protobuf>=3.9.2,<=3.20.3 and protobuf>=4, we can conclude that \
sagemaker-training==4.8.3 cannot be used.
         And because you require sagemaker-training==4.8.3, we can conclude that your requirements are unsatisfiable.
"""
UV_NO_WHEEL = """\
Using Python 3.11.7 environment at: v
error: No solution found when resolving dependencies
  cause: Because scikit-learn>=0.23.0,<=0.23.2 has no usable wheels and only the following versions of scikit-learn \
are available:
             scikit-learn<0.23.dev0
             scikit-learn>=0.23.0,<=0.23.2
             scikit-learn>0.24.dev0
         we can conclude that scikit-learn==0.23.* cannot be used.
         And because you require scikit-learn==0.23.*, we can conclude that your requirements are unsatisfiable.

hint: Wheels are required for `scikit-learn` because building from source is disabled for `scikit-learn` (i.e., \
with `--no-build-package scikit-learn`)
"""
UV_NOT_FOUND = """\
Using Python 3.11.7 environment at: v
error: No solution found when resolving dependencies
  cause: Because no-such-package-mlops-xyz was not found in the package registry and you require \
no-such-package-mlops-xyz==1.0, we can conclude that your requirements are unsatisfiable.
"""
UV_UNREACHABLE = """\
Using Python 3.11.7 environment at: v
error: Request failed after 3 retries in 8.8s
  cause: Failed to fetch: http://127.0.0.1:9/simple/numpy/
  cause: error sending request for url (http://127.0.0.1:9/simple/numpy/)
  cause: client error (Connect)
  cause: tcp connect error
  cause: Connection refused (os error 111)
"""
UV_CONFLICT = """\
Using Python 3.11.7 environment at: v
error: No solution found when resolving dependencies
  cause: Because you require numpy<2 and numpy>=2, we can conclude that your requirements are unsatisfiable.
"""


@pytest.mark.fast
def test_constraint_conflict_detection():
    assert envs._constraint_conflict(UV_CONSTRAINT_CONFLICT, ["protobuf>=4", "torch<=2.14.1"])
    assert not envs._constraint_conflict(UV_CONSTRAINT_CONFLICT, ["torch<=2.14.1"])
    assert not envs._constraint_conflict(UV_UNREACHABLE, ["numpy>=2"])
    offline = UV_NOT_FOUND + "\nhint: Packages were unavailable because the network was disabled.\n"
    assert not envs._constraint_conflict(offline, ["no-such-package-mlops-xyz<2"])


# ---------------------------------------------------------------------------------------------------- explain()

def _install_command(spec: envs.EnvSpec) -> list[str]:
    return ["uv", "pip", "install", "--python", "/x/bin/python", *spec.packages]


@pytest.mark.fast
@pytest.mark.parametrize(("output", "packages", "culprit", "reason"), [
    (UV_NO_WHEEL, ("scikit-learn==0.23.*", "numpy<2"), "scikit-learn==0.23.*", "no wheel for this Python"),
    (UV_NOT_FOUND, ("no-such-package-mlops-xyz==1.0", "boto3"), "no-such-package-mlops-xyz==1.0",
     "not found on the package index"),
    (UV_UNREACHABLE, ("numpy<2", "boto3"), "numpy<2", "the package index is unreachable"),
    (UV_CONFLICT, ("numpy<2", "pandas<2"), "numpy<2", "no set of versions satisfies"),
    (UV_CONSTRAINT_CONFLICT, ("scikit-learn==1.2.*", "sagemaker-training==4.8.3"), "sagemaker-training==4.8.3",
     "no set of versions satisfies"),
])
def test_explain_names_the_package_and_why(output, packages, culprit, reason):
    spec = envs.EnvSpec(key="k", label="sklearn 1.2-1", packages=packages, note="scikit-learn 1.2.* (image 1.2-1)")
    message = envs.explain(spec, _install_command(spec), output)
    assert message.startswith("cannot build the sklearn 1.2-1 environment (scikit-learn 1.2.* (image 1.2-1))")
    assert f"could not install {culprit}" in message
    assert reason in message
    assert "uv said:" in message


def _clean_uv_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_") and k != "VIRTUAL_ENV"}
    cache = tmp_path / "empty-uv-cache"
    cache.mkdir(exist_ok=True)
    return {**env, "UV_OFFLINE": "1", "UV_CACHE_DIR": str(cache), "UV_PYTHON_DOWNLOADS": "never"}


@pytest.mark.fast
def test_explain_on_a_real_offline_uv_failure(tmp_path):
    """uv run for real, offline with an empty cache: its message, explained, names the package."""
    env = _clean_uv_env(tmp_path)
    uv = envs.uv_bin()
    venv = tmp_path / "v"
    subprocess.run([uv, "venv", "--quiet", "--python", str(envs.base_python()), str(venv)], env=env, check=True,
                   capture_output=True, timeout=120)
    spec = envs.EnvSpec(key="k", label="xgboost 1.7-1", packages=("xgboost==1.7.*", "numpy<2"),
                        note="xgboost 1.7.* (image 1.7-1)")
    command = [uv, "pip", "install", "--dry-run", "--python", str(venv / "bin" / "python"), *spec.packages]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    message = envs.explain(spec, [uv, "pip", "install", *spec.packages], done.stdout + done.stderr)
    assert "could not install xgboost==1.7.*" in message or "could not install numpy<2" in message, message
    assert "offline" in message


# ------------------------------------------------------------------------------------------------- real builds

@pytest.mark.fast
def test_offline_build_of_an_uncached_spec_names_the_package(tmp_path, monkeypatch):
    """A build with uv offline and nothing in its cache fails fast, naming what it could not install, and leaves no
    half-built environment behind."""
    for name in [n for n in os.environ if n.startswith("UV_")]:
        monkeypatch.delenv(name)
    for name, value in _clean_uv_env(tmp_path).items():
        if name.startswith("UV_"):
            monkeypatch.setenv(name, value)
    root = tmp_path / "envs"
    root.mkdir()
    monkeypatch.setattr(envs, "envs_dir", lambda: root)
    spec = envs.spec_for(SKLEARN_1_2)
    with pytest.raises(envs.EnvironmentUnavailable) as caught:
        envs.ensure(spec)
    message = str(caught.value)
    assert message.startswith("cannot build the sklearn 1.2-1 environment")
    assert "offline" in message
    named = message.split("could not install ", 1)[1].split(":", 1)[0]
    requested = {p.split("==")[0].split("<")[0] for p in spec.packages}
    assert named and {p.split("==")[0].split("<")[0] for p in named.split(", ")} <= requested, message
    assert not (root / spec.key).exists()
    assert not list(root.glob("*.tmp-*"))


@pytest.fixture
def persistent_envs(monkeypatch) -> Path:
    """A build cache kept across test runs (``$MLOPS_TEST_ENVS``, default ``~/.cache/mlops-test-envs``)."""
    root = Path(os.environ.get("MLOPS_TEST_ENVS") or Path.home() / ".cache" / "mlops-test-envs").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(envs, "envs_dir", lambda: root)
    return root


def _ensure_or_skip(spec: envs.EnvSpec, log: list[str]) -> envs.ImageEnvironment:
    try:
        return envs.ensure(spec, log=log.append)
    except envs.EnvironmentUnavailable as exc:  # no index here: not this code's failure
        pytest.skip(f"cannot build the {spec.label} environment on this machine: {exc}")


@pytest.mark.slow
def test_builds_the_sklearn_1_2_environment(persistent_envs):
    spec = envs.spec_for(SKLEARN_1_2)
    log: list[str] = []
    started = time.monotonic()
    env = _ensure_or_skip(spec, log)
    print(f"sklearn 1.2-1 environment ready in {time.monotonic() - started:.1f} s: {log}")
    assert env.root == persistent_envs / spec.key
    assert env.spec.note.startswith("scikit-learn 1.2.") and "(image 1.2-1)" in env.spec.note
    code = "import sklearn, pandas, numpy, sagemaker_training, sys; print(sklearn.__version__, numpy.__version__, " \
           "pandas.__version__, sys.prefix)"
    done = subprocess.run([str(env.python), "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sklearn, numpy, pandas, prefix = done.stdout.split()
    assert sklearn.startswith("1.2.") and numpy.startswith("1.") and pandas.startswith("1.")
    assert Path(prefix) == env.root  # built at <key>.tmp-<pid>, renamed: still its own prefix
    # Console scripts of the renamed environment still start (--relocatable: no absolute tmp path in them).
    pip = subprocess.run([str(env.bin_dir / "pip"), "--version"], capture_output=True, text=True, timeout=120)
    assert pip.returncode == 0 and str(env.root) in pip.stdout, pip.stderr
    assert ".tmp-" not in (env.bin_dir / "train").read_text()
    assert "relocatable = true" in (env.root / "pyvenv.cfg").read_text()
    marker = json.loads((env.root / envs.MARKER).read_text())
    assert marker["spec"]["key"] == spec.key
    assert any(line.startswith("scikit-learn==1.2.") for line in marker["freeze"])
    assert "numpy<2" not in marker["constraints"]["applied"]


@pytest.mark.slow
def test_second_ensure_reuses_the_environment(persistent_envs):
    spec = envs.spec_for(SKLEARN_1_2)
    first = _ensure_or_skip(spec, [])
    marker = first.root / envs.MARKER
    stamp = marker.stat().st_mtime_ns
    log: list[str] = []
    started = time.monotonic()
    again = envs.ensure(spec, log=log.append)
    elapsed = time.monotonic() - started
    assert again.root == first.root and again.python == first.python
    assert marker.stat().st_mtime_ns == stamp  # not rebuilt
    assert not any("building" in line for line in log)
    assert elapsed < 2, f"reusing took {elapsed:.1f} s"


@pytest.mark.slow
def test_job_environment_over_the_image_environment(persistent_envs, tmp_path):
    """A job venv layered over the image env (environment.create(base=...)): the image's scikit-learn and a
    working ``python -m pip`` for requirements.txt, in the job's own prefix."""
    from pipelines.local.jobs import environment

    image_env = _ensure_or_skip(envs.spec_for(SKLEARN_1_2), [])
    job = environment.create(tmp_path / "job.jobenv", base=image_env)
    try:
        code = "import sklearn, sys, pip; print(sklearn.__version__, sys.prefix, pip.__file__)"
        done = subprocess.run([str(job.python), "-c", code], capture_output=True, text=True, timeout=300,
                              env=job.environ(os.environ))
        assert done.returncode == 0, done.stderr
        sklearn, prefix, pip = done.stdout.split()
        assert sklearn.startswith("1.2.")
        assert Path(prefix) == job.root
        assert Path(pip).is_relative_to(image_env.root)
    finally:
        job.remove()
