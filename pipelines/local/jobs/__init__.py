"""The part of the local engine that executes jobs (the part that decides is :mod:`pipelines.local.engine`):

- :mod:`.runtime`     -- processing and training jobs as subprocesses under SageMaker's container contract
  (``/opt/ml`` layout, ``SM_*`` variables, the training toolkit, ``ContainerEntrypoint``, built-in XGBoost), a guard
  process per job so jobs die with the engine, outputs packed and uploaded as SageMaker does.
- :mod:`.images`      -- what a container image URI names (framework, version, processor), from the SDK's tables.
- :mod:`.envs`        -- one cached Python environment per image (scikit-learn 1.2, XGBoost 1.7...), built with uv.
- :mod:`.environment` -- the per-job Python environment a job's installs (``requirements.txt``) land in, layered
  over the image's environment or the engine's.
- :mod:`.sandbox`     -- a private mount namespace per job where the job directory is ``/opt/ml``.
- :mod:`.zygote`      -- warm starts: job processes fork from an interpreter that has imported torch (stdlib only;
  also the client copied into each job environment); :mod:`.warm` starts and ends the engine's zygotes.
- :mod:`.transform`   -- batch transform jobs, through the local endpoint's serving path.
- :mod:`.xgboost_algorithm` -- the built-in XGBoost algorithm (training and serving) on the open-source package.
"""
