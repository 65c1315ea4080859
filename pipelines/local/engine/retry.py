"""A step's ``RetryPolicies``, with SageMaker Pipelines' semantics (the SDK's ``sagemaker.workflow.retry``; AWS
"Retry Policy for Pipeline Steps").

Each policy names the failures it matches (``ExceptionType``), the wait before the first retry (``IntervalSeconds``,
default 1), its growth (``BackoffRate``, default 2.0: the n-th retry of a policy waits ``IntervalSeconds *
BackoffRate**(n-1)``) and its limit: ``MaxAttempts`` retries (1-20) or ``ExpireAfterMin`` minutes after the step's
first failure (0-14400), exactly one of the two. The first policy matching a failure decides; a failure no policy
matches is final. Every retry is a new attempt of the step (``AttemptCount``) with a new job name.

What each exception type means here, where every failure is the job's own or the local service's:

- ``Step.SERVICE_FAULT``: the local AWS service did not answer or answered 5xx (botocore connection errors,
  ``ServiceUnavailable``/``InternalFailure``/...). SageMaker retries these by default even without a policy: so does
  the engine (3 retries, 1 s, x2) unless a policy for it is given;
- ``Step.THROTTLING``: the service throttled the call (``ThrottlingException``, ``TooManyRequestsException``...);
- ``SageMaker.JOB_INTERNAL_ERROR``, ``SageMaker.CAPACITY_ERROR``, ``SageMaker.RESOURCE_LIMIT``: failures of
  SageMaker's fleet (instance capacity, account limits, internal errors) that a job on this machine never has. They
  are accepted and never match. A job's own failure (``AlgorithmError``, a bad request: ``ClientError``) is never
  retried, as on SageMaker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STEP_TYPES = ("Step.SERVICE_FAULT", "Step.THROTTLING")
JOB_TYPES = ("SageMaker.JOB_INTERNAL_ERROR", "SageMaker.CAPACITY_ERROR", "SageMaker.RESOURCE_LIMIT")
MAX_ATTEMPTS_CAP = 20
MAX_EXPIRE_AFTER_MIN = 14400
THROTTLING_CODES = frozenset({"Throttling", "ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded",
                              "SlowDown", "ProvisionedThroughputExceededException"})


class RetryPolicyError(ValueError):
    """A malformed ``RetryPolicies`` entry (refused at CreatePipeline, as the SDK refuses to build it)."""


@dataclass(frozen=True)
class Policy:
    exception_types: tuple[str, ...]
    interval_s: float = 1.0
    backoff_rate: float = 2.0
    max_attempts: int | None = None
    expire_after_min: float | None = None

    def delay(self, retry: int, since_first_failure_s: float) -> float | None:
        """Seconds to wait before retry number ``retry`` (1-based), or None when the policy allows no more."""
        if self.max_attempts is not None and retry > self.max_attempts:
            return None
        wait = self.interval_s * self.backoff_rate ** (retry - 1)
        if self.expire_after_min is not None and since_first_failure_s + wait > self.expire_after_min * 60:
            return None
        return wait


#: SageMaker's default for service faults and throttling when no policy names them.
DEFAULT = Policy(STEP_TYPES, 1.0, 2.0, max_attempts=3)


def parse(spec: Mapping[str, Any]) -> list[Policy]:
    """The step's policies; raises :class:`RetryPolicyError`."""
    policies = []
    for index, item in enumerate(spec.get("RetryPolicies") or []):
        where = f"step {spec.get('Name')!r} RetryPolicies[{index}]"
        types = tuple(item.get("ExceptionType") or ())
        unknown = [t for t in types if t not in STEP_TYPES + JOB_TYPES]
        if not types or unknown:
            raise RetryPolicyError(f"{where}: ExceptionType must list some of {', '.join(STEP_TYPES + JOB_TYPES)}"
                                   f"{f' (unknown: {unknown})' if unknown else ''}")
        attempts, expire = item.get("MaxAttempts"), item.get("ExpireAfterMin")
        if (attempts is None) == (expire is None):
            raise RetryPolicyError(f"{where}: give exactly one of MaxAttempts and ExpireAfterMin")
        if attempts is not None and not 1 <= int(attempts) <= MAX_ATTEMPTS_CAP:
            raise RetryPolicyError(f"{where}: MaxAttempts must be in [1, {MAX_ATTEMPTS_CAP}]")
        if expire is not None and not 0 <= float(expire) <= MAX_EXPIRE_AFTER_MIN:
            raise RetryPolicyError(f"{where}: ExpireAfterMin must be in [0, {MAX_EXPIRE_AFTER_MIN}]")
        interval, rate = float(item.get("IntervalSeconds", 1)), float(item.get("BackoffRate", 2.0))
        if interval < 0 or rate < 0:
            raise RetryPolicyError(f"{where}: IntervalSeconds and BackoffRate must not be negative")
        policies.append(Policy(types, interval, rate, None if attempts is None else int(attempts),
                               None if expire is None else float(expire)))
    return policies


def classify(exc: BaseException) -> str | None:
    """The retry exception type of a step failure (walking its causes), or None for a failure that is final."""
    from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            error = seen.response.get("Error") or {}
            status = int((seen.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            if error.get("Code") in THROTTLING_CODES or status == 429:
                return "Step.THROTTLING"
            return "Step.SERVICE_FAULT" if status >= 500 else None
        if isinstance(seen, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError)):
            return "Step.SERVICE_FAULT"
        seen = seen.__cause__
    return None


def matching(policies: list[Policy], exception_type: str) -> Policy | None:
    """The policy that decides for this failure: the first naming it, else SageMaker's default for service faults
    and throttling."""
    for policy in policies:
        if exception_type in policy.exception_types:
            return policy
    return DEFAULT if exception_type in DEFAULT.exception_types else None
