"""SageMaker Debugger / Profiler for the local engine: hook config before a training job, rules after it.

Before a training job whose request carries ``DebugHookConfig``, :func:`write_hook_config` writes the
``debughookconfig.json`` SageMaker would write into the container's ``/opt/ml/input/config/`` (here: the job
directory, which is the remapped ``/opt/ml``), with ``LocalPath`` pointing at ``<job_dir>/output/tensors``, and
returns the environment the training subprocess needs (``SMDEBUG_CONFIG_FILE_PATH``; ``SMPROFILER_CONFIG_PATH`` at
a config that keeps smdebug's own framework profiler off: system metrics come from the trainer, CONTRACTS §6).

After the job, :func:`evaluate_rules` evaluates every ``DebugRuleConfigurations`` and ``ProfilerRuleConfigurations``
entry on the saved tensors and profiler files and returns SageMaker's ``DebugRuleEvaluationStatuses`` shape.
The rule implementations live in :mod:`pipelines.local.debugger.rules`; the report in
:mod:`pipelines.local.debugger.profiler_report`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: The rules (smdebug) and the report (matplotlib) are needed only after the job: ~2 s of imports that
#: :func:`preload_in_background` does while the job runs, off the step's critical path.
_RULES = "pipelines.local.debugger.rules"
_REPORT = "pipelines.local.debugger.profiler_report"


def _rules() -> Any:
    return importlib.import_module(_RULES)


def _report() -> Any:
    return importlib.import_module(_REPORT)


def preload_in_background() -> threading.Thread:
    """Import the rule implementations and the report on a daemon thread (a later import waits for it)."""
    def load() -> None:
        for name in (_RULES, _REPORT):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 -- the import after the job raises it where it is handled
                log.debug("background import of %s failed", name, exc_info=True)

    thread = threading.Thread(target=load, name="debugger-preload", daemon=True)
    thread.start()
    return thread


def report_path(job_dir: Path) -> Path:
    """Where the ProfilerReport's HTML goes (:func:`pipelines.local.debugger.profiler_report.report_path`)."""
    return _report().report_path(job_dir)


def write_profiler_report(*args: Any, **kwargs: Any) -> Path:
    """:func:`pipelines.local.debugger.profiler_report.write_profiler_report`."""
    return _report().write_profiler_report(*args, **kwargs)

log = logging.getLogger(__name__)

# smdebug's own names (smdebug/core/config_constants.py, smdebug/profiler/profiler_config_parser.py).
SMDEBUG_CONFIG_ENV = "SMDEBUG_CONFIG_FILE_PATH"
SMPROFILER_CONFIG_ENV = "SMPROFILER_CONFIG_PATH"
END_OF_JOB_FILENAME = "training_job_end.ts"
_END_DELAY_ENV = "SMDEBUG_TRAINING_END_DELAY_REFRESH"

HOOK_CONFIG_FILENAME = "debughookconfig.json"
PROFILER_CONFIG_FILENAME = "profilerconfig.json"

NO_ISSUES = "NoIssuesFound"
ISSUES = "IssuesFound"
ERROR = "Error"

PROFILER_RULES = ("LowGPUUtilization", "ProfilerReport")


def config_dir(job_dir: Path) -> Path:
    """``/opt/ml/input/config`` of a job directory (the remapped ``/opt/ml``)."""
    return Path(job_dir) / "input" / "config"


def tensors_dir(job_dir: Path) -> Path:
    """Where the hook writes tensors (SageMaker's default ``LocalPath``, ``/opt/ml/output/tensors``)."""
    return Path(job_dir) / "output" / "tensors"


def _scalar_param(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ValueError(
        f"DebugHookConfig parameter {key!r} has the unresolved value {value!r}; resolve pipeline expressions "
        "(Get/Std:Join/...) before writing the hook config"
    )


def write_hook_config(training_request: dict, job_dir: Path) -> dict[str, str]:
    """Write ``<job_dir>/input/config/debughookconfig.json`` from the request's ``DebugHookConfig`` and return the
    env vars for the training subprocess; ``{}`` when the request has no ``DebugHookConfig``."""
    hook = training_request.get("DebugHookConfig")
    if not hook:
        return {}
    if not isinstance(hook, Mapping):
        raise ValueError(f"DebugHookConfig must be an object, got {type(hook).__name__}")
    job_dir = Path(job_dir)
    cfg_dir = config_dir(job_dir)
    cfg_dir.mkdir(parents=True, exist_ok=True)
    out = tensors_dir(job_dir)
    if out.exists() and any(out.iterdir()):
        moved = out.with_name(f"tensors.previous-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("tensors dir %s is not empty (a retried job?); moving it to %s", out, moved)
        out.rename(moved)
    out.mkdir(parents=True, exist_ok=True)

    hook_params = {str(k): _scalar_param(str(k), v) for k, v in (hook.get("HookParameters") or {}).items()}
    collections = []
    seen: dict[str, dict] = {}
    for entry in hook.get("CollectionConfigurations") or []:
        name = entry.get("CollectionName") if isinstance(entry, Mapping) else None
        if not name:
            raise ValueError(f"CollectionConfigurations entry without CollectionName: {entry!r}")
        params = {str(k): _scalar_param(f"{name}.{k}", v) for k, v in (entry.get("CollectionParameters") or {}).items()}
        if name in seen and seen[name] != params:
            log.warning(
                "collection %r is configured twice (%s, then %s): smdebug applies the later one, as on SageMaker; "
                "a rule's default collections_to_save (save_interval 500) can override the hook's save intervals",
                name,
                seen[name],
                params,
            )
        seen[name] = params
        collections.append({"CollectionName": name, **({"CollectionParameters": params} if params else {})})

    config: dict[str, Any] = {
        "LocalPath": str(out),
        "HookParameters": hook_params,
        "CollectionConfigurations": collections,
    }
    if hook.get("S3OutputPath"):
        config["S3OutputPath"] = str(hook["S3OutputPath"])
    hook_path = cfg_dir / HOOK_CONFIG_FILENAME
    hook_path.write_text(json.dumps(config, indent=2) + "\n")

    # smdebug's framework profiler stays off locally: a config with DisableProfiler makes smdebug skip it. The
    # ProfilerConfig's system monitoring is done by the trainer itself (profiler/system_metrics.jsonl).
    profiler_path = cfg_dir / PROFILER_CONFIG_FILENAME
    profiler_path.write_text(json.dumps({"DisableProfiler": True}) + "\n")
    log.info("wrote Debugger hook config %s (tensors -> %s)", hook_path, out)
    return {SMDEBUG_CONFIG_ENV: str(hook_path), SMPROFILER_CONFIG_ENV: str(profiler_path)}


# ----------------------------------------------------------------------------------------------------------------
# rule evaluation


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _status(name: str, status: str, details: str) -> dict[str, str]:
    return {
        "RuleConfigurationName": name,
        "RuleEvaluationStatus": status,
        "StatusDetails": details[:4000],
        "LastModifiedTime": _now(),
    }


def _rule_params(config: Mapping[str, Any]) -> dict[str, str]:
    params = config.get("RuleParameters") or {}
    if not isinstance(params, Mapping):
        raise _rules().RuleParameterError(f"RuleParameters must be an object, got {type(params).__name__}")
    return {str(k): str(v) for k, v in params.items()}


def _tensor_location(job_dir: Path) -> Path:
    """LocalPath from the written hook config (falls back to the default tensors dir)."""
    cfg = config_dir(job_dir) / HOOK_CONFIG_FILENAME
    if cfg.is_file():
        try:
            local = json.loads(cfg.read_text()).get("LocalPath")
            if local:
                return Path(local)
        except (OSError, ValueError) as exc:
            log.warning("could not read %s: %s", cfg, exc)
    return tensors_dir(job_dir)


class _TrialCache:
    """Opens the smdebug trial once per evaluation, lazily (profiler-only jobs never import the trial API)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._trial: Any = None
        self._error: str | None = None

    def get(self) -> Any:
        if self._trial is None and self._error is None:
            if not (self.path / "index").is_dir():
                self._error = (
                    f"no Debugger tensors were saved under {self.path} (did the training script create the hook?)"
                )
            else:
                end_marker = self.path / END_OF_JOB_FILENAME
                if not end_marker.exists():
                    # smdebug skips this marker when TRAINING_JOB_NAME is set (is_sagemaker_job(): on SageMaker the
                    # rule containers learn the end from the job status). The job has exited, so the engine marks it;
                    # without the marker smdebug would wait for more steps forever.
                    log.info("training job ended: writing %s under %s", END_OF_JOB_FILENAME, self.path)
                    end_marker.write_text(str(time.time()))
                from smdebug.trials import create_trial

                # The job is over: no need for smdebug's 1 s grace period before its final refresh.
                previous = os.environ.get(_END_DELAY_ENV)
                os.environ[_END_DELAY_ENV] = "0"
                try:
                    self._trial = create_trial(str(self.path))
                finally:
                    if previous is None:
                        os.environ.pop(_END_DELAY_ENV, None)
                    else:
                        os.environ[_END_DELAY_ENV] = previous
        if self._error:
            raise FileNotFoundError(self._error)
        return self._trial


def _run_tensor_rule(name: str, rule_name: str, params: dict[str, str], trials: _TrialCache) -> dict[str, str]:
    from smdebug.exceptions import RuleEvaluationConditionMet
    from smdebug.rules import invoke_rule

    rule_impl = _rules()
    trial = trials.get()
    steps = trial.steps()
    if not steps:
        return _status(name, NO_ISSUES, f"{rule_name}: no steps were saved; nothing to evaluate.")
    rule = rule_impl.TENSOR_RULES[rule_name](trial, params)
    try:
        invoke_rule(rule, start_step=0, end_step=steps[-1] + 1, raise_eval_cond=True)
    except RuleEvaluationConditionMet as met:
        detail = rule.findings[-1] if rule.findings else str(met)
        advice = rule_impl.TENSOR_RULE_ADVICE.get(rule_name, "")
        return _status(name, ISSUES, f"{rule_name}: {detail}." + (f" Advice: {advice}" if advice else ""))
    notes = "; ".join(rule.notes)
    return _status(
        name,
        NO_ISSUES,
        f"{rule_name}: no issues in {rule.evaluations} evaluation(s) over saved steps {steps[0]}-{steps[-1]} "
        f"({notes}).",
    )


def _evaluate_one(
    config: Mapping[str, Any], job_dir: Path, trials: _TrialCache, previous: list[dict[str, str]]
) -> dict[str, str]:
    name = str(config.get("RuleConfigurationName") or "unnamed-rule")
    rule_impl, report = _rules(), _report()
    try:
        params = _rule_params(config)
        rule_name = params.pop("rule_to_invoke", "") or ""
        params.pop("action_json", None)  # actions (StopTraining, email) are not executed locally
        if not rule_name:
            return _status(
                name,
                ERROR,
                "RuleParameters has no rule_to_invoke: only built-in rules run locally (no custom rule images).",
            )
        if rule_name in rule_impl.TENSOR_RULES:
            return _run_tensor_rule(name, rule_name, params, trials)
        if rule_name == "LowGPUUtilization":
            finding = rule_impl.low_gpu_utilization(report.load_profile(job_dir).system_metrics, params)
            detail = finding.detail + (f" Advice: {finding.advice}" if finding.triggered and finding.advice else "")
            return _status(name, ISSUES if finding.triggered else NO_ISSUES, f"LowGPUUtilization: {detail}")
        if rule_name == "ProfilerReport":
            path, findings = report.build_profiler_report(job_dir, previous, profiler_params=params)
            issues = [f for f in findings if f.triggered]
            summary = "; ".join(f"{f.rule}: {f.advice or f.detail}" for f in issues)
            detail = f"Report: {path}. " + (f"{len(issues)} issue(s): {summary}" if issues else "No profiling issues.")
            return _status(name, ISSUES if issues else NO_ISSUES, detail)
        known = sorted([*rule_impl.TENSOR_RULES, *PROFILER_RULES])
        return _status(name, ERROR, f"Unknown rule {rule_name!r}: the local engine implements {', '.join(known)}.")
    except rule_impl.RuleParameterError as exc:
        return _status(name, ERROR, f"Invalid rule parameters: {exc}")
    except FileNotFoundError as exc:
        return _status(name, ERROR, str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken rule must not break the others or the execution
        log.exception("rule %s failed", name)
        return _status(name, ERROR, f"Rule evaluation failed: {type(exc).__name__}: {exc}")


RULES_LOG = "rule-output/rules.log"


@contextlib.contextmanager
def _smdebug_log_to(path: Path) -> Iterator[None]:
    """Send smdebug's own log lines (trial loading, rule invocations) to ``path`` instead of stdout, the way a
    SageMaker rule job's output goes to its CloudWatch log stream rather than the training job's."""
    # smdebug logs at import time through a stdout handler it creates then; keep that quiet unless asked for.
    os.environ.setdefault("SMDEBUG_LOG_LEVEL", "warning")
    from smdebug.core.logger import get_logger

    smdebug_logger = get_logger()
    saved_handlers, saved_level = list(smdebug_logger.handlers), smdebug_logger.level
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    smdebug_logger.handlers = [handler]
    smdebug_logger.setLevel(min(saved_level or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        smdebug_logger.handlers = saved_handlers
        smdebug_logger.setLevel(saved_level)
        handler.close()


def evaluate_rules_by_kind(training_request: dict, job_dir: Path) -> dict[str, list[dict[str, str]]]:
    """Like :func:`evaluate_rules`, split as DescribeTrainingJob shows them: ``DebugRuleEvaluationStatuses`` and
    ``ProfilerRuleEvaluationStatuses``. ProfilerReport runs last so its report includes every other finding.
    smdebug's log lines go to ``<job_dir>/rule-output/rules.log``."""
    job_dir = Path(job_dir)
    with _smdebug_log_to(job_dir / RULES_LOG):
        return _evaluate_rules_by_kind(training_request, job_dir)


def _evaluate_rules_by_kind(training_request: dict, job_dir: Path) -> dict[str, list[dict[str, str]]]:
    trials = _TrialCache(_tensor_location(job_dir))
    debug = [
        _evaluate_one(c, job_dir, trials, [])
        for c in training_request.get("DebugRuleConfigurations") or []
    ]
    profiler_configs = list(training_request.get("ProfilerRuleConfigurations") or [])
    is_report = [(_rule_params(c).get("rule_to_invoke") == "ProfilerReport") if isinstance(c, Mapping) else False
                 for c in profiler_configs]
    profiler: list[dict[str, str] | None] = [None] * len(profiler_configs)
    for i, config in enumerate(profiler_configs):
        if not is_report[i]:
            profiler[i] = _evaluate_one(config, job_dir, trials, [])
    for i, config in enumerate(profiler_configs):
        if is_report[i]:
            done = debug + [s for s in profiler if s is not None]
            profiler[i] = _evaluate_one(config, job_dir, trials, done)
    return {"DebugRuleEvaluationStatuses": debug, "ProfilerRuleEvaluationStatuses": [s for s in profiler if s]}


def evaluate_rules(training_request: dict, job_dir: Path) -> list[dict]:
    """Evaluate the request's Debugger and Profiler rules after the job; one status per rule configuration
    (``RuleConfigurationName``, ``RuleEvaluationStatus`` NoIssuesFound|IssuesFound|Error, ``StatusDetails``,
    ``LastModifiedTime``), Debugger rules first, then Profiler rules, each in definition order."""
    by_kind = evaluate_rules_by_kind(training_request, job_dir)
    return by_kind["DebugRuleEvaluationStatuses"] + by_kind["ProfilerRuleEvaluationStatuses"]


__all__ = [
    "SMDEBUG_CONFIG_ENV",
    "SMPROFILER_CONFIG_ENV",
    "config_dir",
    "evaluate_rules",
    "evaluate_rules_by_kind",
    "report_path",
    "tensors_dir",
    "write_hook_config",
    "write_profiler_report",
]
