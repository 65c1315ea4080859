"""Local endpoints:

- :mod:`.endpoints`       -- deploy/undeploy/list the local endpoint servers (state under ``endpoints/<name>/``).
- :mod:`.endpoint_server` -- one endpoint's HTTP server, serving through SageMaker's PyTorch inference toolkit
  (``/ping``, ``/invocations``, the runtime's ``/endpoints/{name}/invocations``); run as
  ``python -m pipelines.local.serving.endpoint_server``.
"""
