"""The local SageMaker: everything that makes the pipeline -- and any SageMaker pipeline -- run on this machine.

- :mod:`.api`      -- the local AWS service (S3, SageMaker + runtime, Lambda, EventBridge, STS on 127.0.0.1): what
  every client, the project's own CLI included, talks to; :mod:`.api.stack` creates infra/template.yaml's resources.
- :mod:`.engine`   -- decides: the definition's graph, expressions, conditions, cache, retry, tuning (Optuna).
- :mod:`.jobs`     -- executes: processing/training jobs as subprocesses under SageMaker's container contract and
  toolkits, each in its own Python environment.
- :mod:`.storage`  -- state on disk: the artifact store (S3's files), SQLite (executions, registry), garbage
  collection.
- :mod:`.serving`  -- endpoints: the local servers behind CreateEndpoint and InvokeEndpoint.
- :mod:`.debugger` -- SageMaker Debugger/Profiler: hook configuration, built-in rules, the profiler report.
- :mod:`.cli`      -- the local target's own commands (``local``, ``models``, ``endpoints``, ``report``, ``gc``).
"""
