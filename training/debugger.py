"""SageMaker Debugger (smdebug 1.0.34) glue for the trainer.

SageMaker writes the hook configuration of a job with a ``DebuggerHookConfig`` to
``/opt/ml/input/config/debughookconfig.json``; smdebug reads that path, or the one in env
``SMDEBUG_CONFIG_FILE_PATH`` (``smdebug.core.config_constants.CONFIG_FILE_PATH_ENV_STR``). Format
(``smdebug/core/json_config.py``)::

    {"LocalPath": "/opt/ml/output/tensors",            # where tensors are written (SageMaker uploads it)
     "S3OutputPath": "s3://bucket/prefix/debug-output",
     "HookParameters": {"save_interval": "1", ...},     # also "train.save_interval", "eval.save_steps", ...
     "CollectionConfigurations": [{"CollectionName": "losses", "CollectionParameters": {"save_interval": "1"}}]}

Without that file there is no hook and smdebug is not even imported (``create_hook`` only stats a path).

Notes on smdebug 1.0.34 with current torch (checked with torch 2.14):

* The hook itself works (forward hooks on every module, loss registered as a module); its version
  gate accepts ``1.5 <= torch < 3``.
* smdebug's logger writes INFO to *stdout* (dozens of ``count_params`` lines per registered module,
  a ``RULE_JOB_STOP_SIGNAL_FILENAME`` and a "profiler config not found" line at import). We set
  ``SMDEBUG_LOG_LEVEL=warning`` unless the caller set it, so stdout stays readable for metric regexes;
  the profiler part of smdebug stays disabled when SageMaker wrote no ``profilerconfig.json``.
* ``Hook.__init__`` refuses an output directory in which a *finished* run already wrote tensors
  (``training_job_end.ts``), and then crashes inside its own error handler with
  ``AttributeError: 'Hook' object has no attribute 'prepared_collections'``. That happens when the
  same job directory is reused after a completed run (never in a fresh SageMaker container). We
  check for that case first and run without a hook (logged warning); any other failure to create
  the hook is logged and training continues without Debugger rather than dying.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_FILE_PATH_ENV = "SMDEBUG_CONFIG_FILE_PATH"
DEFAULT_CONFIG_FILE_PATH = "/opt/ml/input/config/debughookconfig.json"
DEFAULT_LOCAL_PATH = "/opt/ml/output/tensors"  # smdebug's DEFAULT_SAGEMAKER_OUTDIR
TRAINING_END_FILE = "training_job_end.ts"


def config_path() -> Path:
    """The Debugger hook config path smdebug would read (env ``SMDEBUG_CONFIG_FILE_PATH`` or the SageMaker default)."""
    return Path(os.environ.get(CONFIG_FILE_PATH_ENV) or DEFAULT_CONFIG_FILE_PATH)


def _hook_out_dir(path: Path) -> str | None:
    import json

    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"Debugger hook config {path} is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"Debugger hook config {path} must be a JSON object, got {type(config).__name__}")
    return config.get("LocalPath", DEFAULT_LOCAL_PATH)


def create_hook(model: Any, criterion: Any) -> Any | None:
    """An ``smdebug.pytorch.Hook`` built from the job's Debugger config with ``model`` and ``criterion``
    registered, or ``None`` when there is no config (or the hook cannot be created; logged)."""
    path = config_path()
    if not path.is_file():
        logger.info("Debugger: no hook config at %s; running without smdebug", path)
        return None
    try:
        out_dir = _hook_out_dir(path)
    except ValueError as exc:
        logger.warning("Debugger disabled: %s", exc)
        return None
    if out_dir and not out_dir.startswith("s3://") and (Path(out_dir).expanduser() / TRAINING_END_FILE).exists():
        logger.warning("Debugger disabled: %s already holds the tensors of a finished run (%s present); smdebug "
                       "refuses to mix runs. Move it away or point LocalPath elsewhere.", out_dir, TRAINING_END_FILE)
        return None
    os.environ.setdefault("SMDEBUG_LOG_LEVEL", "warning")
    try:
        import smdebug.pytorch as smd

        hook = smd.Hook.create_from_json_file(str(path))
        hook.register_module(model)
        hook.register_loss(criterion)
    except Exception:  # smdebug is optional for training: never lose a job to it
        logger.exception("Debugger disabled: could not create the smdebug hook from %s", path)
        return None
    logger.info("Debugger: smdebug hook writing to %s (config %s)", out_dir, path)
    return hook


def set_mode(hook: Any | None, mode: str) -> None:
    """Switch the hook to ``"train"`` or ``"eval"`` (no-op without a hook)."""
    if hook is None:
        return
    from smdebug import modes

    hook.set_mode({"train": modes.TRAIN, "eval": modes.EVAL}[mode])


def close(hook: Any | None) -> None:
    """Flush and close the hook's writers (marks the run finished for ``smdebug.trials``)."""
    if hook is None:
        return
    try:
        hook.close()
    except Exception:
        logger.exception("Debugger: closing the smdebug hook failed")
