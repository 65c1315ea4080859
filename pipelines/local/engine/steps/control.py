"""The control steps: Condition (evaluates its conditions; its outcome decides which branch runs) and Fail."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pipelines.local.engine import resolver
from pipelines.local.engine.steps.base import StepFailed, StepKind, StepRun


class Condition(StepKind):
    type_name = "Condition"

    def dependencies(self, spec: Mapping[str, Any]) -> set[str]:
        return resolver.referenced_steps((spec.get("Arguments") or {}).get("Conditions", []))

    def branches(self, spec: Mapping[str, Any]) -> list[tuple[list[dict[str, Any]], bool]]:
        args = spec.get("Arguments") or {}
        return [(list(args.get("IfSteps") or []), True), (list(args.get("ElseSteps") or []), False)]

    def run(self, run: StepRun) -> dict[str, Any]:
        ctx = run.ctx
        evaluations = []
        for condition in run.step.arguments.get("Conditions") or []:
            outcome = resolver.evaluate_condition(condition, ctx)
            entry: dict[str, Any] = {"Type": condition.get("Type"), "Outcome": outcome}
            for key in ("LeftValue", "RightValue", "QueryValue"):
                if key in condition:
                    try:
                        entry[key] = resolver.resolve(condition[key], ctx)
                    except resolver.ResolutionError:
                        pass
            evaluations.append(entry)
        outcome = all(e["Outcome"] for e in evaluations)
        run.log(f"conditions {json.dumps(evaluations, default=str)} -> {outcome}")
        return {"Outcome": outcome, "EvaluatedConditions": evaluations}

    def detail(self, properties: Mapping[str, Any]) -> str:
        return f"outcome {properties.get('Outcome')}"

    def metadata(self, properties: Mapping[str, Any], spec: Mapping[str, Any], status: str,
                 failure_reason: str | None, job_arn: str | None) -> dict[str, Any]:
        if "Outcome" not in properties:
            return {}
        return {"Condition": {"Outcome": "True" if properties["Outcome"] else "False"}}


class Fail(StepKind):
    type_name = "Fail"

    def run(self, run: StepRun) -> dict[str, Any]:
        message = run.resolve(run.step.arguments.get("ErrorMessage", ""))
        raise StepFailed(str(message) if message not in (None, "") else f"FailStep {run.step.name} reached")

    def failed_properties(self, reason: str) -> dict[str, Any] | None:
        return {"ErrorMessage": reason}

    def metadata(self, properties: Mapping[str, Any], spec: Mapping[str, Any], status: str,
                 failure_reason: str | None, job_arn: str | None) -> dict[str, Any]:
        if status != "Failed":
            return {}
        return {"Fail": {"ErrorMessage": properties.get("ErrorMessage") or failure_reason}}
