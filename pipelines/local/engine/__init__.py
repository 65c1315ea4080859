"""The part of the local engine that decides (the part that executes is :mod:`pipelines.local.jobs`):

- :mod:`.core`     -- ``LocalEngine``: parse the definition into a graph, run steps when their dependencies allow,
  conditions and branches, the step cache, resume/retry, one method per step kind.
- :mod:`.resolver` -- the definition's expressions: parameters, ``Get`` property paths, ``Std:Join``, ``JsonGet``,
  execution variables, conditions.
- :mod:`.tuner`    -- tuning steps: Optuna studies (Bayesian/TPE, random, grid, Hyperband) over training jobs.
- :mod:`.progress` -- per-step and per-trial progress lines.
"""
