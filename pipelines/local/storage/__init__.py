"""Local state under ``MLOPS_HOME``, with one SQLite access pattern (:func:`.store.connect` / ``transaction``):

- :mod:`.store`      -- ``MLOPS_HOME`` layout, the artifact store (``s3://bucket/key`` = ``artifacts/bucket/key``),
  shared local names (account, region, role, bucket), the SQLite connection and transactions.
- :mod:`.executions` -- executions, steps and tuning trials (``ExecutionStore``).
- :mod:`.registry`   -- model package groups and packages (the model registry).
- :mod:`.gc`         -- removing old executions' job directories.
"""
