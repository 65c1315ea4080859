"""The embedded engine: runs a SageMaker pipeline definition JSON (the very one ``upsert`` sends) on this machine.

The definition is parsed into a step graph (top-level steps plus the steps inside ConditionStep branches; edges from
``DependsOn``, from every ``Steps.X...`` reference in a step's arguments, and from a branch step to its condition).
Steps whose dependencies succeeded run in parallel up to ``max_workers``; a ConditionStep's outcome blocks the other
branch (and everything downstream of it), as SageMaker does. A failed step stops new steps from starting; the
running ones finish; the execution fails with the step's reason (a FailStep's resolved ``ErrorMessage``).

Every step state change is recorded in SQLite (:mod:`pipelines.local.storage.executions`) before and after the step, so
an engine killed at any point can be resumed with :meth:`LocalEngine.resume` (``retry``): finished steps are kept and
stale ``Executing`` ones rerun.

Step statuses are the truth about the job: ``Succeeded`` only when its job exited 0 (:mod:`pipelines.local.jobs.runtime`
reads the job's own exit status); ``Stopped`` when it was stopped (``stop``, or its ``MaxRuntimeInSeconds``:
SageMaker's ``Stopped``/``MaxRuntimeExceeded``; an execution nobody asked to stop then fails); ``Failed``
otherwise, with the reason (``killed by SIGKILL`` for a job killed by a signal). Job processes never outlive the
engine (each job runs under a guard that dies with it, ``kill -9`` included).

Caching follows SageMaker's step signature caching. A step with ``CacheConfig.Enabled`` reuses the properties of an
earlier run of the same step of the same pipeline when that run ``Succeeded`` (stopped and failed runs are never
reused), within ``ExpireAfter`` (ISO 8601), and its cache key matches: the step's type and arguments, with
parameters and upstream properties resolved and execution variables left symbolic (a superset of SageMaker's
per-step-type key attributes). The key is about arguments, never data content: as on SageMaker, new data at the same
S3 URI is a cache hit; code bundles are content-addressed, so a code change changes the arguments. Locally a hit is
also checked to still have every output (each output URI a file, or a directory holding a file), else the step
reruns. ``start(no_cache=True)`` (``start --no-cache``) makes one execution look nothing up.

Several engines (processes) may share one ``MLOPS_HOME``. What is serialized: writes to ``mlops.db`` (SQLite's own
locking: WAL journal, 30 s busy timeout, every state change one autocommit statement; a fresh database's switch to WAL
under an ``fcntl`` lock, :func:`pipelines.local.storage.store.connect`); the opening of Optuna's storage ``optuna.db``
(its tables, version row and alembic stamp, under an ``fcntl`` lock; then WAL and busy timeouts,
:func:`pipelines.local.engine.tuner.optuna_storage`). Nothing else needs to be: each execution has its own
``runs/<execution-id>/`` and job names, and artifact writes go to unique temporary names renamed into place.
"""

from __future__ import annotations

import graphlib
import hashlib
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

from pipelines.local.engine import resolver, retry
from pipelines.local.engine.steps import (
    DefinitionError,
    StepDef,
    StepFailed,
    StepRun,
)
from pipelines.local.jobs import runtime as jobs
from pipelines.local.storage.executions import ExecutionStore, parse_iso_duration
from pipelines.local.storage.store import ArtifactStore, runs_dir

logger = logging.getLogger(__name__)

class Observer(Protocol):
    """What the engine reports to (the progress view implements it)."""

    def execution_started(self, execution_id: str, steps: list[tuple[str, str]]) -> None: ...
    def step_status(self, step_name: str, status: str, detail: str = "") -> None: ...
    def step_message(self, step_name: str, message: str) -> None: ...
    def execution_finished(self, execution: Mapping[str, Any], steps: list[dict[str, Any]]) -> None: ...


class NullObserver:
    def execution_started(self, execution_id: str, steps: list[tuple[str, str]]) -> None:
        pass

    def step_status(self, step_name: str, status: str, detail: str = "") -> None:
        pass

    def step_message(self, step_name: str, message: str) -> None:
        pass

    def execution_finished(self, execution: Mapping[str, Any], steps: list[dict[str, Any]]) -> None:
        pass


def parse_definition(definition: Mapping[str, Any]) -> dict[str, StepDef]:
    """All steps of a definition (branches included) with their dependencies; raises :class:`DefinitionError`."""
    steps: dict[str, StepDef] = {}

    def add(items: list[dict[str, Any]], branch: tuple[str, bool] | None) -> None:
        for spec in items:
            name, stype = spec.get("Name"), spec.get("Type")
            if not name or not stype:
                raise DefinitionError(f"step without Name/Type: {json.dumps(spec)[:200]}")
            if name in steps:
                raise DefinitionError(f"duplicate step name {name!r}")
            step = StepDef(name, stype, spec, branch=branch)
            kind = step.kind
            step.deps |= kind.dependencies(spec) | set(spec.get("DependsOn") or [])
            if branch:
                step.deps.add(branch[0])
            try:
                retry.parse(spec)
            except retry.RetryPolicyError as exc:
                raise DefinitionError(str(exc)) from None
            steps[name] = step
            for nested, outcome in kind.branches(spec):
                add(nested, (name, outcome))

    add(list(definition.get("Steps") or []), None)
    for step in steps.values():
        unknown = step.deps - set(steps)
        if unknown:
            raise DefinitionError(f"step {step.name!r} depends on unknown step(s) {', '.join(sorted(unknown))}")
        step.deps.discard(step.name)
    try:
        graphlib.TopologicalSorter({s.name: s.deps for s in steps.values()}).prepare()
    except graphlib.CycleError as exc:
        raise DefinitionError(f"the step graph has a cycle: {exc.args[1]}") from None
    return steps


def topological_order(steps: Mapping[str, StepDef]) -> list[str]:
    return list(graphlib.TopologicalSorter({s.name: s.deps for s in steps.values()}).static_order())


def _json_default(obj: Any) -> Any:
    return str(obj)


class LocalEngine:
    """Runs (and resumes) executions of one pipeline definition."""

    def __init__(self, definition: str | Mapping[str, Any], *, pipeline_name: str,
                 max_workers: int | None = None, observer: Observer | None = None,
                 artifacts: ArtifactStore | None = None, records: ExecutionStore | None = None) -> None:
        self.definition_json = definition if isinstance(definition, str) else json.dumps(definition)
        self.definition = json.loads(self.definition_json)
        self.pipeline_name = pipeline_name
        self.steps = parse_definition(self.definition)
        self.order = topological_order(self.steps)
        self.max_workers = max(1, int(max_workers or os.environ.get("MLOPS_MAX_WORKERS", 2)))
        self.observer: Observer = observer or NullObserver()
        self.artifacts = artifacts or ArtifactStore()
        self.records = records or ExecutionStore()
        self.control = jobs.JobControl()
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------------------
    def start(self, overrides: Mapping[str, Any] | None = None, execution_id: str | None = None, *,
              no_cache: bool = False) -> dict[str, Any]:
        """Create an execution with the parameters (defaults + ``overrides``) and run it to the end.

        ``no_cache``: this execution looks nothing up in the step cache (``start --no-cache``; also when resumed);
        its steps still record their cache keys, so later executions can reuse them.
        """
        parameters = resolver.resolve_parameters(self.definition, overrides)
        execution = self.records.create_execution(self.pipeline_name, self.definition_json, parameters, execution_id,
                                                  no_cache=no_cache)
        logger.info("execution %s of %s started", execution["execution_id"], self.pipeline_name)
        return self._run(execution["execution_id"], resumed=False)

    def resume(self, execution_id: str) -> dict[str, Any]:
        """Retry an execution: keep succeeded steps, rerun failed/stopped/stale ones and those not run yet."""
        execution = self.records.find_execution(execution_id)
        if execution["status"] == "Succeeded":
            raise ValueError(f"execution {execution['execution_id']} already succeeded; nothing to retry")
        if execution["status"] == "Executing" and _pid_alive(execution.get("pid")) and execution["pid"] != os.getpid():
            raise ValueError(f"execution {execution['execution_id']} is still running (pid {execution['pid']}); "
                             "stop it first")
        stale = self.records.mark_stale_steps(execution["execution_id"], "the engine stopped while the step ran")
        if stale:
            logger.info("marked stale steps as failed: %s", ", ".join(stale))
        return self._run(execution["execution_id"], resumed=True)

    # ---------------------------------------------------------------------------------------------------------
    def _context(self, execution: Mapping[str, Any], symbolic: bool = False) -> resolver.ResolverContext:
        execution_id = execution["execution_id"]

        def props(name: str) -> Mapping[str, Any]:
            record = self.records.step(execution_id, name)
            if record is None or record["status"] != "Succeeded" or record["properties"] is None:
                raise KeyError(name)
            return record["properties"]

        def read_property_file(step_name: str, file_name: str) -> Any:
            step = self.steps.get(step_name)
            if step is None:
                raise resolver.ResolutionError(f"property file {file_name}: no step {step_name!r}")
            spec = next((f for f in step.spec.get("PropertyFiles") or [] if f.get("PropertyFileName") == file_name),
                        None)
            if spec is None:
                raise resolver.ResolutionError(f"step {step_name} declares no property file {file_name!r}")
            try:
                outputs = props(step_name)["ProcessingOutputConfig"]["Outputs"]
                base = outputs[spec["OutputName"]]["S3Output"]["S3Uri"]
            except KeyError:
                raise resolver.ResolutionError(
                    f"property file {file_name}: step {step_name} has no output {spec.get('OutputName')!r}") from None
            uri = f"{str(base).rstrip('/')}/{spec['FilePath']}"
            path = self.artifacts.path(uri)
            try:
                return json.loads(path.read_text())
            except FileNotFoundError:
                raise resolver.ResolutionError(f"property file {file_name}: {uri} does not exist") from None
            except json.JSONDecodeError as exc:
                raise resolver.ResolutionError(f"property file {file_name}: {uri} is not valid JSON: {exc}") from None

        def read_json_uri(uri: str) -> Any:
            try:
                return json.loads(self.artifacts.path(uri).read_text())
            except (FileNotFoundError, IsADirectoryError, ValueError) as exc:
                raise resolver.ResolutionError(f"JsonGet {uri}: {exc}") from None

        started = execution.get("started_at") or execution["created_at"]
        return resolver.ResolverContext(
            parameters=execution["parameters"],
            execution={
                "PipelineExecutionId": execution_id,
                "PipelineExecutionArn": execution["arn"],
                "StartDateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "PipelineName": self.pipeline_name,
                "PipelineArn": execution["arn"].split("/execution/")[0],
            },
            step_properties=props,
            read_property_file=read_property_file,
            read_json_uri=read_json_uri,
            symbolic_execution=symbolic,
        )

    def _blocked(self, execution_id: str) -> set[str]:
        """Steps that will not run: the branch a condition did not take, and everything downstream of it."""
        blocked: set[str] = set()
        for name in self.order:
            step = self.steps[name]
            if step.branch:
                cond = self.records.step(execution_id, step.branch[0])
                if cond and cond["status"] == "Succeeded" and cond["properties"] is not None:
                    if bool(cond["properties"].get("Outcome")) != step.branch[1]:
                        blocked.add(name)
                        continue
            if step.deps & blocked:
                blocked.add(name)
        return blocked

    def _run(self, execution_id: str, resumed: bool) -> dict[str, Any]:
        self.records.begin_run(execution_id, resumed)
        execution = self.records.get_execution(execution_id)
        assert execution is not None
        self.control = jobs.JobControl()
        self.observer.execution_started(execution_id, [(n, self.steps[n].type) for n in self.order])
        done: set[str] = set()
        for record in self.records.steps(execution_id):
            if record["step_name"] in self.steps and record["status"] == "Succeeded":
                done.add(record["step_name"])
                self.observer.step_status(record["step_name"], "Succeeded",
                                          "kept from the previous attempt" if resumed else "")
        failures, stopped = self._schedule(execution, done)
        return self._finish(execution_id, done, failures, stopped)

    def _schedule(self, execution: Mapping[str, Any], done: set[str]) -> tuple[list[tuple[str, str, str]], bool]:
        """Run the steps as their dependencies succeed; returns ([(step, "failed"|"stopped", reason)], stopped).

        Adds finished steps to ``done``. An exception in this loop (Ctrl-C: KeyboardInterrupt) stops every running
        job before the pool waits for its threads: jobs run in sessions of their own and get no terminal signal.
        """
        execution_id = execution["execution_id"]
        running: dict[Future[None], str] = {}
        failures: list[tuple[str, str, str]] = []
        stopped = False
        with ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="step") as pool:
            try:
                while True:
                    if not stopped and self.records.stop_requested(execution_id):
                        stopped = True
                        logger.warning("stop requested: stopping running jobs")
                        self.control.stop()
                    if not failures and not stopped:
                        self._submit_ready(pool, execution, done, running)
                    if not running:
                        break
                    finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in finished:
                        name = running.pop(future)
                        outcome = _step_outcome(future)
                        if outcome is None:
                            done.add(name)
                        else:
                            failures.append((name, *outcome))
            except BaseException:
                logger.warning("engine interrupted: stopping running jobs")
                self.control.stop()
                raise
        return failures, stopped

    def _submit_ready(self, pool: ThreadPoolExecutor, execution: Mapping[str, Any], done: set[str],
                      running: dict[Future[None], str]) -> None:
        blocked = self._blocked(execution["execution_id"])
        for name in self.order:
            if name in done or name in blocked or name in running.values():
                continue
            if self.steps[name].deps <= done and len(running) < self.max_workers:
                running[pool.submit(self._execute_step, execution, name)] = name

    def _finish(self, execution_id: str, done: set[str], failures: list[tuple[str, str, str]],
                stopped: bool) -> dict[str, Any]:
        """Record the untaken branches as NotExecuted and the execution's end."""
        blocked = self._blocked(execution_id)
        for name in self.order:
            if name in blocked:
                self.records.mark_not_executed(execution_id, name, self.steps[name].type)
                self.observer.step_status(name, "NotExecuted", "branch not taken")
        if stopped:
            status, reason = "Stopped", "stopped on request"
        elif failures:  # a step stopped by its MaxRuntimeInSeconds fails the execution: nobody asked to stop it
            status = "Failed"
            reason = "; ".join(f"Step {n} {verb}: {r}" if self.steps[n].kind.failed_properties(r) is None else r
                               for n, verb, r in failures)
        else:
            pending = [n for n in self.order if n not in done and n not in blocked]
            status, reason = ("Succeeded", None) if not pending else ("Failed", f"steps not run: {pending}")
        self.records.mark_execution(execution_id, status, reason)
        final = self.records.get_execution(execution_id)
        assert final is not None
        logger.info("execution %s %s%s", execution_id, status, f": {reason}" if reason else "")
        self.observer.execution_finished(final, self.records.steps(execution_id))
        return final

    # ---------------------------------------------------------------------------------------------------------
    def _execute_step(self, execution: Mapping[str, Any], name: str) -> None:
        """Run one step, retried as its ``RetryPolicies`` say (:mod:`.retry`); raises on its final failure."""
        policies = retry.parse(self.steps[name].spec)
        first_failure: float | None = None
        retries: dict[retry.Policy, int] = {}
        while True:
            try:
                return self._attempt(execution, name)
            except StepFailed as exc:
                exception_type = retry.classify(exc)
                policy = retry.matching(policies, exception_type) if exception_type else None
                if policy is None:
                    raise
                now = time.monotonic()
                first_failure = first_failure if first_failure is not None else now
                count = retries.get(policy, 0) + 1
                delay = policy.delay(count, now - first_failure)
                if delay is None:
                    raise
                retries[policy] = count
                self._log(execution, name, f"{exception_type}: retry {count} in {delay:g} s ({exc})")
                if self._sleep_unless_stopped(delay):
                    raise

    def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Wait ``seconds``; True if the execution was asked to stop meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.control.stopped:
                return True
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return self.control.stopped

    @staticmethod
    def _log_path(execution_id: str, name: str) -> Path:
        return runs_dir() / execution_id / "logs" / f"{name}.log"

    def _log(self, execution: Mapping[str, Any], name: str, text: str) -> None:
        with open(self._log_path(execution["execution_id"], name), "a", encoding="utf-8") as fh:
            fh.write(f"[engine] {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def _attempt(self, execution: Mapping[str, Any], name: str) -> None:
        """Run one attempt of a step and record its outcome (raises on failure, after recording it)."""
        execution_id = execution["execution_id"]
        step = self.steps[name]
        run_dir = runs_dir() / execution_id
        log_path = self._log_path(execution_id, name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        attempt = self.records.start_step(execution_id, name, step.type, str(log_path))
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"[engine] {time.strftime('%Y-%m-%d %H:%M:%S')} step {name} ({step.type}) attempt {attempt}\n")
        self.observer.step_status(name, "Executing", f"attempt {attempt}" if attempt > 1 else "")
        rule_statuses: list[dict[str, Any]] | None = None
        try:
            result = step.kind.run(StepRun(self, execution, step, run_dir / name, log_path, attempt))
            properties, cached_from = result if isinstance(result, tuple) else (result, None)
            rule_statuses = (properties.get("DebugRuleEvaluationStatuses") or []) + \
                (properties.get("ProfilerRuleEvaluationStatuses") or []) if isinstance(properties, dict) else None
            self.records.finish_step(execution_id, name, "Succeeded", properties=properties, cached_from=cached_from,
                                     rule_statuses=rule_statuses or None)
            self.observer.step_status(name, "Succeeded", f"cache hit ({cached_from})" if cached_from else
                                      self._detail(step, properties))
        except jobs.JobStopped as exc:
            self.records.finish_step(execution_id, name, "Stopped", failure_reason=str(exc))
            self.observer.step_status(name, "Stopped", str(exc))
            raise
        except Exception as exc:
            reason = str(exc) if isinstance(exc, (StepFailed, jobs.JobError, resolver.ResolutionError)) \
                else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, (StepFailed, jobs.JobError, resolver.ResolutionError)):
                with open(log_path, "a", encoding="utf-8") as fh:
                    fh.write(traceback.format_exc())
            properties = step.kind.failed_properties(reason)
            self.records.finish_step(execution_id, name, "Failed", failure_reason=reason, properties=properties)
            self.observer.step_status(name, "Failed", reason)
            raise StepFailed(reason) from exc

    @staticmethod
    def _detail(step: StepDef, properties: Any) -> str:
        return step.kind.detail(properties) if isinstance(properties, dict) else ""

    def _message(self, execution_id: str, name: str) -> Callable[[str], None]:
        def say(message: str) -> None:
            self.records.set_step_message(execution_id, name, message)
            self.observer.step_message(name, message)
        return say

    def _line_observer(self, execution_id: str, name: str) -> Callable[[str], bool]:
        say = self._message(execution_id, name)

        def on_line(line: str) -> bool:
            if line.startswith("epoch=") or "accuracy" in line or line.startswith("[tuner]"):
                say(line.strip())
            else:
                self.observer.step_message(name, line.strip()[:160])
            return False
        return on_line

    def _cache_lookup(self, execution: Mapping[str, Any], step: StepDef) -> tuple[str | None, dict[str, Any] | None]:
        """(cache key, cached record) for a step with CacheConfig.Enabled; (None, None) without caching.

        The key: the step's type, its arguments with parameters and upstream properties resolved and execution
        variables left symbolic, and its PropertyFiles -- never the content of the data they point to (module
        docstring, "Caching"). The record: the latest ``Succeeded`` run of the step with that key in this pipeline
        within ``ExpireAfter``, from another execution, whose outputs are all still there.
        """
        cache = step.spec.get("CacheConfig") or {}
        if not cache.get("Enabled"):
            return None, None
        symbolic = resolver.resolve(step.arguments, self._context(execution, symbolic=True))
        payload = json.dumps({"type": step.type, "arguments": symbolic,
                              "property_files": step.spec.get("PropertyFiles")}, sort_keys=True, default=_json_default)
        key = hashlib.sha256(payload.encode()).hexdigest()
        if execution.get("no_cache"):
            logger.info("step %s: no cache lookup (the execution was started with --no-cache)", step.name)
            return key, None
        expire = cache.get("ExpireAfter")
        try:
            window = parse_iso_duration(expire) if expire else float("inf")
        except ValueError as exc:
            raise StepFailed(f"CacheConfig.ExpireAfter: {exc}") from None
        newer_than = time.time() - window if window != float("inf") else 0.0
        hit = self.records.find_cached(self.pipeline_name, step.name, key, newer_than)
        if hit and hit["execution_id"] == execution["execution_id"]:
            hit = None
        if hit and not self._outputs_exist(hit.get("properties") or {}):
            logger.info("cache entry of %s from %s has lost (or never had) its outputs; rerunning", step.name,
                        hit["execution_id"])
            hit = None
        return key, hit

    def _outputs_exist(self, properties: Mapping[str, Any]) -> bool:
        """Every output URI of a step's properties is in the artifact store: a file, or a directory with a file."""
        return all(self._present(uri) for uri in output_uris(properties))

    def _present(self, uri: str) -> bool:
        try:
            path = self.artifacts.path(uri)
        except ValueError:
            return False
        if path.is_file():
            return True
        return path.is_dir() and any(p.is_file() for p in path.rglob("*"))

    def _run_cached(self, execution: Mapping[str, Any], step: StepDef, run: Callable[[dict[str, Any]], dict]
                    ) -> tuple[dict[str, Any], str | None]:
        execution_id = execution["execution_id"]
        key, hit = self._cache_lookup(execution, step)
        arguments = resolver.resolve(step.arguments, self._context(execution))
        self.records.set_step_arguments(execution_id, step.name, arguments, key)
        if hit:
            logger.info("step %s: cache hit from execution %s", step.name, hit["execution_id"])
            return hit["properties"], hit["execution_id"]
        return run(arguments), None


def output_uris(properties: Mapping[str, Any]) -> list[str]:
    """The output URIs of a job step's (Describe-shaped) properties: processing outputs; a training job's model,
    ``output.tar.gz`` and Debugger/Profiler outputs; a tuning job's best training job's model."""
    uris: list[str] = []
    outputs = (properties.get("ProcessingOutputConfig") or {}).get("Outputs") or {}
    for output in outputs.values() if isinstance(outputs, Mapping) else outputs:
        uri = (output.get("S3Output") or {}).get("S3Uri")
        if uri:
            uris.append(str(uri))
    best = properties.get("BestTrainingJob") or {}
    for source in (properties, best):
        model = (source.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
        if model:
            uris.append(str(model))
    uris += [str(properties[k]) for k in ("OutputDataUri", "DebugOutputS3Uri", "ProfilerOutputS3Uri")
             if properties.get(k)]
    return uris


def _step_outcome(future: Future[None]) -> tuple[str, str] | None:
    """None for a step that succeeded, else ("failed" or "stopped", reason); the step has recorded it already."""
    try:
        future.result()
    except jobs.JobStopped as exc:
        return "stopped", str(exc)
    except StepFailed as exc:
        return "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 -- recorded as the step's failure
        return "failed", f"{type(exc).__name__}: {exc}"
    return None


def _pid_alive(pid: Any) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    try:
        import psutil

        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001
        return True
