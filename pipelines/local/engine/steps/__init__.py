"""One class per pipeline step kind: how the step runs, what properties it exposes (as the matching ``Describe*``
call shapes them), how it is displayed and what ``PipelineExecutionStepMetadata`` it has.

- ``base``: :class:`StepKind`, the registry (:func:`kind_for`), :class:`StepRun` (what a running step sees), the
  engine's errors, the names it gives jobs;
- ``jobs``: Processing, Training (with Debugger/Profiler), Tuning, Transform;
- ``models``: Model (CreateModel), RegisterModel (CreateModelPackage);
- ``control``: Condition, Fail;
- ``lambda_``: Lambda;
- ``unsupported``: Callback, EMR, ClarifyCheck, QualityCheck, AutoML: known, not runnable here; each fails when
  reached, saying why. A type nobody registered does the same (:class:`base.Unsupported`).
"""

from pipelines.local.engine.steps import control, jobs, lambda_, models, unsupported  # noqa: F401 -- registers
from pipelines.local.engine.steps.base import (
    STEP_KINDS,
    DefinitionError,
    JobInfo,
    StepDef,
    StepFailed,
    StepKind,
    StepRun,
    function_name,
    job_name,
    kind_for,
    local_client,
    slug,
)

__all__ = ["STEP_KINDS", "DefinitionError", "JobInfo", "StepDef", "StepFailed", "StepKind", "StepRun",
           "function_name", "job_name", "kind_for", "local_client", "slug"]
