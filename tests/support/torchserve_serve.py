"""The SageMaker PyTorch inference container's entry point (``serve``), run outside a container.

``sagemaker_pytorch_serving_container.serving.main()`` is what the container runs: it writes TorchServe's config and
starts real TorchServe (Java frontend + Python workers) on ``$SAGEMAKER_BASE_DIR/model``. Two container paths are
moved for a test on a shared machine, nothing else: the config file (``/etc/sagemaker-ts.properties`` -> the working
directory) and the bind address (``0.0.0.0`` -> ``127.0.0.1``). Run with ``SAGEMAKER_BASE_DIR``,
``SAGEMAKER_BIND_TO_PORT`` and ``SAGEMAKER_PROGRAM`` set, ``torchserve`` and ``java`` on ``PATH``.
"""

from __future__ import annotations

import os

import sagemaker_pytorch_serving_container.torchserve as ts
from sagemaker_pytorch_serving_container import serving

ts.TS_CONFIG_FILE = os.path.join(os.getcwd(), "sagemaker-ts.properties")
_generate = ts._generate_ts_config_properties  # noqa: SLF001 -- the toolkit's own config, bind address moved


def _loopback_config(handler_service: str) -> str:
    return _generate(handler_service).replace("http://0.0.0.0:", "http://127.0.0.1:")


ts._generate_ts_config_properties = _loopback_config  # noqa: SLF001

if __name__ == "__main__":
    serving.main()
