"""Local endpoints:

- :mod:`.endpoints`       -- deploy/undeploy/list the local endpoint servers (state under ``endpoints/<name>/``).
- :mod:`.endpoint_server` -- one endpoint's HTTP server, serving through SageMaker's PyTorch inference toolkit
  (``/ping``, ``/invocations``, the runtime's ``/endpoints/{name}/invocations``); run as
  ``python -m pipelines.local.serving.endpoint_server``.
- :mod:`.xgboost_model`   -- the handler for built-in XGBoost models: the image environment's xgboost in a child
  process, behind the same ``invoke`` as the PyTorch toolkit's (endpoints and batch transform).
"""
