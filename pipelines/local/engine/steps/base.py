"""What every step kind shares: the :class:`StepKind` interface, the registry, and :class:`StepRun`, the one
running step a kind sees (its execution, resolved arguments, log, job name, cache).

A kind owns how its step runs (:meth:`StepKind.run`, returning the Describe-shaped properties that
``Steps.<name>.<path>`` references read), which steps it depends on and holds (:meth:`StepKind.dependencies`,
:meth:`StepKind.branches`), how it is shown (:meth:`StepKind.detail`) and its ``PipelineExecutionStepMetadata``
(:meth:`StepKind.metadata`). The engine (:mod:`pipelines.local.engine.core`) decides when a step runs; it never
switches on the step type.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipelines.local.engine import resolver


class DefinitionError(ValueError):
    """The pipeline definition is malformed (missing names, duplicates, unknown references, cycles)."""


class StepFailed(RuntimeError):
    """A step failed; the message is its ``FailureReason``."""


@dataclass
class StepDef:
    name: str
    type: str
    spec: dict[str, Any]
    deps: set[str] = field(default_factory=set)
    branch: tuple[str, bool] | None = None  # (condition step, True for IfSteps / False for ElseSteps)

    @property
    def arguments(self) -> Any:
        return self.spec.get("Arguments", {})

    @property
    def kind(self) -> StepKind:
        return kind_for(self.type)


@dataclass(frozen=True)
class JobInfo:
    """How the job a step kind starts is named in the SageMaker API (Describe/List keys, ARN resource type)."""

    name_key: str
    arn_key: str
    status_key: str
    arn_type: str
    metadata_key: str
    end_key: str


def function_name(function_arn: str) -> str:
    """The function name of a Lambda ARN (``arn:aws:lambda:region:acct:function:NAME[:qualifier]``) or bare name."""
    match = re.match(r"^arn:aws[\w-]*:lambda:[^:]*:[^:]*:function:([^:]+)", function_arn)
    return match.group(1) if match else function_arn


def local_client(service: str) -> Any:
    """A boto3 client of the local AWS service: ``AWS_ENDPOINT_URL`` when the runner was started by it, else the
    service, started on demand (an engine driven in-process, as tests do)."""
    from botocore.config import Config

    from pipelines.local.api import clients

    # Invoke waits for the function (up to its Timeout, 900 s at most) and is not retried: a retry runs it twice.
    config = Config(read_timeout=910, retries={"max_attempts": 1, "mode": "standard"}) if service == "lambda" else None
    return clients.client(service, os.environ.get("AWS_ENDPOINT_URL"), config=config)


def slug(text: str, n: int) -> str:
    return re.sub(r"[^a-zA-Z0-9-]", "-", text)[:n].strip("-") or "step"


def job_name(execution_id: str, step_name: str, attempt: int, limit: int = 63) -> str:
    """The name the engine gives a step's job (or model): ``pipelines-<execution>-<step>-<hash>``."""
    import hashlib

    suffix = hashlib.sha1(f"{execution_id}/{step_name}/{attempt}".encode()).hexdigest()[:6]
    head = f"pipelines-{execution_id[:12]}-"
    room = limit - len(head) - len(suffix) - 1
    return f"{head}{slug(step_name, room)}-{suffix}"


@dataclass
class StepRun:
    """One attempt of one step, as its kind sees it. ``engine`` is the :class:`~pipelines.local.engine.core.
    LocalEngine` (artifacts, records, job control, cache)."""

    engine: Any
    execution: Mapping[str, Any]
    step: StepDef
    job_dir: Path
    log_path: Path
    attempt: int

    @property
    def execution_id(self) -> str:
        return str(self.execution["execution_id"])

    @property
    def ctx(self) -> resolver.ResolverContext:
        return self.engine._context(self.execution)  # noqa: SLF001 -- the engine lends its context to its steps

    @property
    def artifacts(self) -> Any:
        return self.engine.artifacts

    @property
    def control(self) -> Any:
        return self.engine.control

    def resolve(self, obj: Any = None) -> Any:
        """``obj`` (the step's ``Arguments`` by default) with every expression evaluated."""
        return resolver.resolve(self.step.arguments if obj is None else obj, self.ctx)

    def log(self, text: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(f"[engine] {text}\n")

    def record_arguments(self, arguments: Any, cache_key: str | None = None) -> None:
        self.engine.records.set_step_arguments(self.execution_id, self.step.name, arguments, cache_key)

    def job_name(self, limit: int = 63) -> str:
        return job_name(self.execution_id, self.step.name, self.attempt, limit)

    def message(self) -> Callable[[str], None]:
        return self.engine._message(self.execution_id, self.step.name)  # noqa: SLF001

    def on_line(self) -> Callable[[str], bool]:
        return self.engine._line_observer(self.execution_id, self.step.name)  # noqa: SLF001

    def cached(self, run: Callable[[dict[str, Any]], dict[str, Any]]) -> tuple[dict[str, Any], str | None]:
        """Step signature caching around ``run(resolved arguments)``: (properties, execution it was reused from)."""
        return self.engine._run_cached(self.execution, self.step, run)  # noqa: SLF001


class StepKind:
    """One kind of pipeline step (the definition's ``Type``). Subclasses set ``type_name`` and register."""

    type_name: ClassVar[str] = ""
    #: The API naming of the job this kind starts (Processing, Training, Tuning, Transform), else None.
    job: ClassVar[JobInfo | None] = None
    #: Whether the kind honours ``CacheConfig`` (SageMaker caches job steps only).
    cacheable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.type_name:
            STEP_KINDS[cls.type_name] = cls

    def dependencies(self, spec: Mapping[str, Any]) -> set[str]:
        """Steps this one reads (``Steps.X...`` anywhere in its arguments); ``DependsOn`` is added by the caller."""
        return resolver.referenced_steps(spec.get("Arguments", {}))

    def branches(self, spec: Mapping[str, Any]) -> list[tuple[list[dict[str, Any]], bool]]:
        """Steps nested in this one ((specs, outcome that runs them)): a ConditionStep's If/Else steps."""
        return []

    def run(self, run: StepRun) -> dict[str, Any] | tuple[dict[str, Any], str | None]:
        raise NotImplementedError

    def detail(self, properties: Mapping[str, Any]) -> str:
        """One line for the progress display of a succeeded step."""
        return ""

    def failed_properties(self, reason: str) -> dict[str, Any] | None:
        """Properties recorded for a failed step (a FailStep's ``ErrorMessage``)."""
        return None

    def metadata(self, properties: Mapping[str, Any], spec: Mapping[str, Any], status: str,
                 failure_reason: str | None, job_arn: str | None) -> dict[str, Any]:
        """``PipelineExecutionStepMetadata`` as SageMaker fills it for this kind."""
        if self.job is not None and job_arn:
            return {self.job.metadata_key: {"Arn": job_arn}}
        return {}


STEP_KINDS: dict[str, type[StepKind]] = {}


class Unsupported(StepKind):
    """A step type the engine does not know: the definition is accepted (SageMaker's own validation decides what is
    valid) and the step fails when it is reached, saying so; as on SageMaker, the execution then starts no new step
    and the steps already running finish."""

    reason: ClassVar[str] = ""

    def __init__(self, type_name: str = "") -> None:
        self.unknown = type_name

    def run(self, run: StepRun) -> dict[str, Any]:
        stype = self.type_name or self.unknown
        why = self.reason or "this step type is not one the local engine knows"
        raise StepFailed(f"step type {stype!r} cannot run locally: {why}")


def kind_for(type_name: str) -> StepKind:
    cls = STEP_KINDS.get(type_name)
    return cls() if cls is not None else Unsupported(type_name)
