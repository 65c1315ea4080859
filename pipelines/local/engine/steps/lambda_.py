"""The Lambda step: a Lambda ``Invoke`` (RequestResponse) on the local AWS service, as SageMaker Pipelines does;
its ``OutputParameters`` typed as declared."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.local.engine.steps.base import StepFailed, StepKind, StepRun, function_name, local_client

_CASTS = {"Integer": int, "Float": float, "Boolean": bool}


class Lambda(StepKind):
    type_name = "Lambda"

    def run(self, run: StepRun) -> dict[str, Any]:
        function_arn = str(run.step.spec.get("FunctionArn", ""))
        event = run.resolve()
        run.record_arguments(event)
        run.log(f"invoking {function_arn} with {json.dumps(event, default=str)}")
        result = _invoke_function(function_arn, event, run.log_path)
        if not isinstance(result, dict):
            raise StepFailed(f"Lambda function {function_name(function_arn)} returned {type(result).__name__}, "
                             "expected a JSON object")
        return {"OutputParameters": _outputs(run.step.spec, function_name(function_arn), result), "Output": result}

    def detail(self, properties: Mapping[str, Any]) -> str:
        return json.dumps(properties.get("OutputParameters"), default=str)[:200]

    def metadata(self, properties: Mapping[str, Any], spec: Mapping[str, Any], status: str,
                 failure_reason: str | None, job_arn: str | None) -> dict[str, Any]:
        outputs = [{"Name": k, "Value": v} for k, v in (properties.get("OutputParameters") or {}).items()]
        return {"Lambda": {"Arn": spec.get("FunctionArn"), "OutputParameters": outputs}}


def _outputs(spec: Mapping[str, Any], fn_name: str, result: Mapping[str, Any]) -> dict[str, Any]:
    outputs: dict[str, Any] = {}
    for item in spec.get("OutputParameters") or []:
        out_name, out_type = item["OutputName"], item.get("OutputType", "String")
        if out_name not in result:
            raise StepFailed(f"Lambda function {fn_name} output has no {out_name!r} "
                             f"(declared in OutputParameters; got {sorted(result)})")
        value = result[out_name]
        if value is None:
            outputs[out_name] = ""
        elif out_type in _CASTS:
            outputs[out_name] = _CASTS[out_type](value)
        else:
            outputs[out_name] = value if isinstance(value, str) else json.dumps(value, default=str)
    return outputs


def _invoke_function(function_arn: str, event: Any, log_path: Path) -> Any:
    """The function's JSON answer; its error (``FunctionError``), or a Lambda API error, is :class:`StepFailed`."""
    import base64

    from botocore.exceptions import BotoCoreError, ClientError

    fn_name = function_name(function_arn)
    try:
        answer = local_client("lambda").invoke(FunctionName=function_arn, InvocationType="RequestResponse",
                                               LogType="Tail", Payload=json.dumps(event, default=str).encode())
    except ClientError as exc:
        raise StepFailed(f"Lambda Invoke {fn_name} failed: {exc}") from exc
    except BotoCoreError as exc:
        raise StepFailed(f"Lambda Invoke {fn_name}: the local Lambda service did not answer: {exc}") from exc
    payload = answer["Payload"].read()
    log_tail = base64.b64decode(answer.get("LogResult") or b"").decode("utf-8", "replace")
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"[engine] {fn_name} log (tail):\n{log_tail}\n[engine] {fn_name} returned {payload[:4000]!r}\n")
    try:
        result = json.loads(payload) if payload.strip() else None
    except ValueError as exc:
        raise StepFailed(f"Lambda function {fn_name} returned a payload that is not JSON: {payload[:200]!r}") from exc
    if answer.get("FunctionError"):
        message = result.get("errorMessage") if isinstance(result, dict) else payload[:500]
        kind = result.get("errorType") if isinstance(result, dict) else answer["FunctionError"]
        raise StepFailed(f"Lambda function {fn_name} failed: {kind}: {message}")
    return result
