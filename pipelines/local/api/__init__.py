"""The local AWS service: one HTTP server on 127.0.0.1 that speaks the AWS wire protocols.

Any AWS client -- boto3, the SageMaker SDK, the AWS CLI -- pointed at it with ``AWS_ENDPOINT_URL`` drives the local
engine unchanged. Requests are routed by the service name in their SigV4 credential scope (as a single-URL AWS
endpoint must be), and each service module speaks that service's protocol as botocore's service model defines it:

- :mod:`.server`    -- the HTTP server, routing, access-key check, body caps; ``local up/down/status``.
- :mod:`.protocol`  -- ``Request``/``Response`` and the SigV4 scope parser shared by the services.
- :mod:`.s3`        -- S3 (REST-XML) over the artifact store: objects are the files under ``artifacts/<bucket>/``.
- :mod:`.sagemaker` -- SageMaker (JSON 1.1) and the SageMaker runtime (REST-JSON ``InvokeEndpoint``); it emits the
  model package state-change events.
- :mod:`.sagemaker_pipelines` -- its pipelines, executions and the engine's jobs (SQLite); :mod:`.runner` runs an
  execution in a detached process.
- :mod:`.sagemaker_backend` -- its models, endpoint configs, endpoints (real local deploys), registry and tags.
- :mod:`.shapes`    -- botocore-model validation and output shaping shared by the JSON services.
- :mod:`.lambda_`   -- Lambda (REST-JSON): functions stored under ``lambda/``, invoked in a subprocess.
- :mod:`.events`    -- EventBridge (JSON 1.1), default bus: rules, targets, PutEvents delivered to Lambda targets.
- :mod:`.sts`       -- STS ``GetCallerIdentity`` (query protocol): the SDK asks it for the account id.
- :mod:`.clients`   -- boto3 clients of the service for the project's own code (CLI, engine, demo).
"""
