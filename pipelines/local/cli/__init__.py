"""The local target's own commands of ``python -m pipelines.run`` (the pipeline commands are boto3 code shared with
the SageMaker target, in :mod:`pipelines.run`):

- :mod:`.commands` -- ``local up|down|status``, ``report``, ``gc``, and dispatch.
- :mod:`.models`   -- ``models list|describe|approve|reject`` and ``endpoints list|invoke|delete|restart``.
"""
