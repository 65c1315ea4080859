"""images.parse: container image URIs as the SageMaker SDK writes them, read back into framework/version/processor.

The URIs are generated here with the installed SDK's own ``sagemaker.image_uris.retrieve`` (no hand-written tags), so
a newer SDK that changes its tag format shows up as a failing test, not as a job in the wrong environment.
"""

from __future__ import annotations

import logging

import pytest

from pipelines.local.jobs import images

pytestmark = pytest.mark.fast

REGION = "us-east-1"


@pytest.fixture(scope="module")
def retrieve():
    from sagemaker import image_uris

    def uri(framework: str, version: str | None = None, **kwargs) -> str:
        return image_uris.retrieve(framework=framework, region=REGION, version=version, **kwargs)

    return uri


@pytest.mark.parametrize(("version", "scope"), [("0.23-1", "training"), ("1.2-1", "training"),
                                                 ("1.2-1", "inference")])
def test_sklearn(retrieve, version, scope):
    uri = retrieve("sklearn", version, image_scope=scope, instance_type="ml.m5.large")
    image = images.parse(uri)
    assert (image.framework, image.version, image.processor, image.py_version) == ("sklearn", version, "cpu", "py3")
    assert image.repository == "sagemaker-scikit-learn"
    assert image.tag.startswith(version)
    assert image.account and image.account.isdigit() and len(image.account) == 12
    assert image.region == REGION
    assert not image.algorithm
    assert image.base_framework is None and image.base_version is None and image.digest is None


@pytest.mark.parametrize("version", ["1.0-1", "1.7-1"])
def test_xgboost_framework_mode(retrieve, version):
    uri = retrieve("xgboost", version, image_scope="training", instance_type="ml.m5.large")
    image = images.parse(uri)
    assert (image.framework, image.version, image.repository) == ("xgboost", version, "sagemaker-xgboost")
    # The XGBoost images are also the built-in algorithm (run without a script): algorithm says "can run as one".
    assert image.algorithm
    assert image.processor in (None, "cpu")  # 1.0-1 tags say cpu-py3, 1.7-1 tags say nothing
    assert image.py_version in (None, "py3")


@pytest.mark.parametrize("version", ["1", "latest"])
def test_xgboost_builtin_algorithm(retrieve, version):
    uri = retrieve("xgboost", version, image_scope="training")
    image = images.parse(uri)
    assert image.repository == "xgboost"
    assert (image.framework, image.version, image.algorithm) == ("xgboost", "1", True)  # latest is an alias of 1
    assert image.processor is None and image.py_version is None


def test_pytorch_training_gpu(retrieve):
    uri = retrieve("pytorch", "2.5", py_version="py311", instance_type="ml.g5.xlarge", image_scope="training")
    image = images.parse(uri)
    assert (image.framework, image.version, image.processor, image.py_version) == ("pytorch", "2.5", "gpu", "py311")
    assert image.repository == "pytorch-training"
    assert not image.algorithm


def test_pytorch_training_cpu_full_version(retrieve):
    uri = retrieve("pytorch", "2.0.1", py_version="py310", instance_type="ml.c5.xlarge", image_scope="training")
    image = images.parse(uri)
    assert (image.framework, image.version, image.processor, image.py_version) == \
        ("pytorch", "2.0.1", "cpu", "py310")


def test_huggingface(retrieve):
    uri = retrieve("huggingface", "4.36", base_framework_version="pytorch2.1", py_version="py310",
                   instance_type="ml.g5.xlarge", image_scope="training")
    image = images.parse(uri)
    assert image.framework == "huggingface"
    assert image.version == "4.36"  # the transformers version, from the tag's transformers4.36 part
    assert (image.base_framework, image.base_version) == ("pytorch", "2.1")
    assert (image.processor, image.py_version) == ("gpu", "py310")
    assert not image.algorithm


@pytest.mark.parametrize("algorithm", ["linear-learner", "kmeans"])
def test_builtin_algorithms(retrieve, algorithm):
    image = images.parse(retrieve(algorithm))
    assert (image.framework, image.version, image.algorithm) == (algorithm, "1", True)
    assert image.repository == algorithm
    assert image.processor is None and image.py_version is None


def test_algorithms_table_comes_from_the_sdk():
    found = images.algorithms()
    assert {"linear-learner", "kmeans", "pca", "xgboost"} <= found
    assert not found & {"sklearn", "pytorch", "tensorflow", "huggingface"}


def test_reverse_index_covers_the_frameworks():
    index = images.repositories()
    assert index["sagemaker-scikit-learn"] == "sklearn"
    assert index["sagemaker-xgboost"] == "xgboost"
    assert index["xgboost"] == "xgboost"
    assert index["pytorch-training"] == "pytorch"


def test_every_sdk_sklearn_and_xgboost_version_reads_back(retrieve):
    """Each script-mode version the SDK can retrieve reads back as itself (not only the ones named above)."""
    for framework in ("sklearn", "xgboost"):
        versions = images.configs()[framework]["training"]["versions"]
        for version in versions:
            uri = retrieve(framework, version, image_scope="training", instance_type="ml.m5.large")
            image = images.parse(uri)
            assert (image.framework, image.version) == (framework, version), uri


def test_digest():
    digest = "sha256:" + "a" * 64
    image = images.parse(f"683313688378.dkr.ecr.us-east-1.amazonaws.com/sagemaker-scikit-learn@{digest}")
    assert (image.framework, image.version, image.digest, image.tag) == ("sklearn", None, digest, digest)
    tagged = images.parse(f"683313688378.dkr.ecr.us-east-1.amazonaws.com/sagemaker-scikit-learn:1.2-1-cpu-py3@{digest}")
    assert (tagged.framework, tagged.version, tagged.tag) == ("sklearn", "1.2-1", "1.2-1-cpu-py3")
    assert tagged.digest == digest


def test_no_tag_is_latest():
    image = images.parse("683313688378.dkr.ecr.us-east-1.amazonaws.com/sagemaker-scikit-learn")
    assert (image.framework, image.tag, image.version) == ("sklearn", "latest", None)
    builtin = images.parse("382416733822.dkr.ecr.us-east-1.amazonaws.com/kmeans")
    assert (builtin.framework, builtin.version, builtin.algorithm) == ("kmeans", "1", True)  # the only version


def test_non_ecr_registries():
    mirror = images.parse("localhost:5000/sagemaker-xgboost:1.7-1")
    assert (mirror.framework, mirror.version, mirror.account, mirror.region) == ("xgboost", "1.7-1", None, None)
    public = images.parse("public.ecr.aws/myteam/sagemaker-scikit-learn:1.2-1-cpu-py3")
    assert (public.framework, public.version) == ("sklearn", "1.2-1")
    other = images.parse("docker.io/library/python:3.11")
    assert (other.framework, other.repository, other.tag, other.algorithm) == (None, "library/python", "3.11", False)
    china = images.parse("450853457545.dkr.ecr.cn-north-1.amazonaws.com.cn/sagemaker-scikit-learn:1.2-1-cpu-py3")
    assert (china.account, china.region, china.framework) == ("450853457545", "cn-north-1", "sklearn")


@pytest.mark.parametrize("uri", ["", "   ", "::::", "@", ":", "/", "not a uri at all", "a/b/c:", "\x00\x01",
                                 "ü/ß:€", "sha256:" + "f" * 64, "123456789012.dkr.ecr..amazonaws.com/:", None, 42,
                                 "x" * 5000, "1.2-1-cpu-py3"])
def test_odd_inputs_never_raise(uri):
    image = images.parse(uri)
    assert isinstance(image, images.Image)
    assert image.framework is None
    assert image.algorithm is False


def test_parse_never_raises_on_a_broken_sdk_table(monkeypatch, caplog):
    """An SDK table of an unexpected shape does not make parse raise: the URI reads as unknown, with a warning."""
    def broken():
        raise TypeError("unexpected table")

    monkeypatch.setattr(images, "algorithms", broken)
    with caplog.at_level(logging.WARNING, logger=images.__name__):
        image = images.parse("683313688378.dkr.ecr.us-east-1.amazonaws.com/sagemaker-scikit-learn:1.2-1-cpu-py3")
    assert image.framework is None and image.algorithm is False
    assert "cannot read container image URI" in caplog.text
