"""The part of the local engine that decides (the part that executes is :mod:`pipelines.local.jobs`):

- :mod:`.core`     -- ``LocalEngine``: parse the definition into a graph, run steps when their dependencies allow (at
  most ``MLOPS_MAX_WORKERS`` at once: ``ParallelismConfiguration``), conditions and branches, the step cache,
  resume, the retry loop around each step.
- :mod:`.steps`    -- one class per step kind (Processing, Training, Tuning, Transform, Model, RegisterModel,
  Condition, Fail, Lambda, and the kinds that fail at run time with a reason: Callback, EMR, ClarifyCheck,
  QualityCheck, AutoML): how it runs, the properties it exposes (as ``DescribeXxx`` shapes them), how it is shown.
- :mod:`.retry`    -- ``RetryPolicies`` with SageMaker's semantics (``Step.SERVICE_FAULT``/``Step.THROTTLING``
  retried by default, interval and backoff, ``MaxAttempts``/``ExpireAfterMin``).
- :mod:`.resolver` -- the definition's expressions: parameters, ``Get`` property paths, ``Std:Join``, ``JsonGet``
  (of a step's property file or an ``S3Uri``), execution variables, conditions.
- :mod:`.tuner`    -- tuning steps: Optuna studies (Bayesian/TPE, random, grid, Hyperband) over training jobs.
- :mod:`.progress` -- per-step and per-trial progress lines.
"""
