"""The part of the local engine that executes jobs (the part that decides is :mod:`pipelines.local.engine`):

- :mod:`.runtime`     -- processing and training jobs as subprocesses under SageMaker's container contract
  (``/opt/ml`` layout, ``SM_*`` variables, the training toolkit), a guard process per job so jobs die with the
  engine, outputs packed and uploaded as SageMaker does.
- :mod:`.environment` -- the per-job Python environment a job's installs (``requirements.txt``) land in.
"""
