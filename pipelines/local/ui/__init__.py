"""The local Studio: ``python -m pipelines.run ui [--port P] [--open]`` (docs/UI.md).

A small web UI on 127.0.0.1 over the local AWS service, built like the CLI: it reads state through boto3 clients of
that service (``pipelines.run.local_clients()``), plus the local files that stand in for what SageMaker exposes as
CloudWatch logs (step, trial, endpoint and Lambda logs), and changes state only through the operations the CLI uses
(``StopPipelineExecution``, ``RetryPipelineExecution``, ``UpdateModelPackage``, ``InvokeEndpoint``).

Modules:

- :mod:`.server` -- the HTTP server (stdlib ``ThreadingHTTPServer``), routing, the request guards (Host header,
  per-server token on every POST), 4xx answers with a reason;
- :mod:`.reader` -- every read: SageMaker/S3 API calls (with a cache of what cannot change any more) and log files;
- :mod:`.actions` -- the four state changes, each one API call as on AWS;
- :mod:`.pages_runs` (executions, the DAG, step details), :mod:`.pages_jobs` (tuning, training, evaluation),
  :mod:`.pages_models` (registry, compare, lineage, approve/reject), :mod:`.pages_endpoints` (endpoints, try it);
- :mod:`.html` (escaping, layout), :mod:`.svg` (DAG and plots as inline SVG), :mod:`.assets` (the CSS and the
  vanilla JavaScript, served from the package: the page needs no network).
"""
