"""Evaluation of a SageMaker pipeline definition's expressions: Parameters, ``Get``, ``Std:Join``, ``Std:JsonGet``,
execution variables and conditions.

The definition JSON is the one ``Pipeline.definition()`` produces (and SageMaker runs). Its expression forms are:

- ``{"Get": "Parameters.Name"}`` -- a pipeline parameter;
- ``{"Get": "Execution.PipelineExecutionId"}`` -- an execution variable;
- ``{"Get": "Steps.StepName.Some.Path['key'][0]"}`` -- a property of a finished step (its describe response,
  with ``ProcessingOutputConfig.Outputs`` / ``ProcessingInputs`` keyed by name, as the SDK's local executor does);
- ``{"Get": "Steps.StepName.PropertyFiles.FileName"}`` -- a property file (only inside ``Std:JsonGet``);
- ``{"Std:Join": {"On": sep, "Values": [...]}}`` and ``{"Std:JsonGet": {"PropertyFile": ..., "Path": ...}}`` (or
  ``{"S3Uri": <Join>, "Path": ...}``: the JSON object at a URI, ``JsonGet(s3_uri=...)``).

Path lookups reuse the SDK's own ``sagemaker.local.utils.get_using_dot_notation`` (what ``sagemaker/local/pipeline.py``
uses for property references and JsonGet paths); the condition types are the SDK's ``ConditionTypeEnum`` values.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sagemaker.local.utils import get_using_dot_notation
from sagemaker.workflow.conditions import ConditionTypeEnum

# Execution variables the definition may reference (``Execution.<name>``).
EXECUTION_VARIABLES = (
    "PipelineExecutionId",
    "PipelineExecutionArn",
    "StartDateTime",
    "CurrentDateTime",
    "PipelineName",
    "PipelineArn",
)


class ResolutionError(ValueError):
    """An expression of the definition cannot be evaluated (unknown name, missing property, bad JSON path...)."""


class ParameterError(ValueError):
    """A ``--param`` override is unknown or does not match the parameter's type."""


@dataclass
class ResolverContext:
    """What expressions are evaluated against.

    ``step_properties(name)`` returns a finished step's properties (raise ``KeyError`` if it has none);
    ``read_property_file(step_name, property_file_name)`` returns the parsed JSON of a step's property file.
    ``symbolic_execution`` leaves execution variables as ``{Execution.X}`` placeholders (used for cache keys, so
    that the same step with the same inputs hits the cache across executions).
    """

    parameters: Mapping[str, Any] = field(default_factory=dict)
    execution: Mapping[str, Any] = field(default_factory=dict)
    step_properties: Callable[[str], Mapping[str, Any]] = lambda name: {}
    read_property_file: Callable[[str, str], Any] | None = None
    read_json_uri: Callable[[str], Any] | None = None
    symbolic_execution: bool = False


# --- parameters -------------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _coerce(name: str, ptype: str, value: Any) -> Any:
    """Convert a (string) override to a parameter type; raise :class:`ParameterError` when it does not fit."""
    if ptype == "String":
        return value if isinstance(value, str) else str(value)
    if ptype == "Integer":
        if isinstance(value, bool):
            raise ParameterError(f"parameter {name} is an Integer, got boolean {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ParameterError(f"parameter {name} is an Integer, got {value!r}") from None
    if ptype == "Float":
        if isinstance(value, bool):
            raise ParameterError(f"parameter {name} is a Float, got boolean {value!r}")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ParameterError(f"parameter {name} is a Float, got {value!r}") from None
        if not math.isfinite(result):
            raise ParameterError(f"parameter {name} must be a finite number, got {value!r}")
        return result
    if ptype == "Boolean":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ParameterError(f"parameter {name} is a Boolean (true/false), got {value!r}")
    raise ParameterError(f"parameter {name} has unsupported type {ptype!r}")


def resolve_parameters(definition: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The parameters' values: definition defaults overridden by ``overrides`` (type-checked and converted)."""
    declared = {p["Name"]: p for p in definition.get("Parameters", [])}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        raise ParameterError(f"unknown parameter(s) {', '.join(unknown)}; the pipeline declares: "
                             f"{', '.join(sorted(declared)) or '(none)'}")
    values: dict[str, Any] = {}
    for name, spec in declared.items():
        ptype = spec.get("Type", "String")
        if name in overrides:
            value = _coerce(name, ptype, overrides[name])
        elif "DefaultValue" in spec:
            value = _coerce(name, ptype, spec["DefaultValue"])
        else:
            raise ParameterError(f"parameter {name} has no default value: pass --param {name}=VALUE")
        enum = spec.get("EnumValues")
        if enum and value not in enum:
            raise ParameterError(f"parameter {name} must be one of {enum}, got {value!r}")
        values[name] = value
    return values


def parse_param_overrides(pairs: list[str] | None) -> dict[str, str]:
    """``["Name=value", ...]`` (the CLI's ``--param``) -> ``{"Name": "value"}``."""
    result: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ParameterError(f"--param expects NAME=VALUE, got {pair!r}")
        result[name.strip()] = value
    return result


# --- expressions ------------------------------------------------------------------------------------------------

def _is_expr(obj: Any, key: str) -> bool:
    return isinstance(obj, dict) and len(obj) == 1 and key in obj


def lookup_path(data: Any, path: str, what: str) -> Any:
    """``data`` at a dotted path with ``['key']``/``[0]`` accessors (the SDK's own notation)."""
    try:
        return get_using_dot_notation(data, path)
    except ValueError:
        raise ResolutionError(f"{what}: path {path!r} does not exist") from None


def to_join_string(value: Any) -> str:
    """How ``Std:Join`` renders a value: booleans as ``true``/``false``, numbers and strings as they are."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _split_step_ref(expr: str) -> tuple[str, str]:
    rest = expr[len("Steps."):]
    name, _, path = rest.partition(".")
    if not name or not path:
        raise ResolutionError(f"malformed step reference {expr!r}")
    return name, path


def resolve_get(expr: str, ctx: ResolverContext) -> Any:
    if not isinstance(expr, str):
        raise ResolutionError(f"Get expects a string, got {expr!r}")
    if expr.startswith("Parameters."):
        name = expr[len("Parameters."):]
        if name not in ctx.parameters:
            raise ResolutionError(f"{expr}: no such parameter (declared: {', '.join(sorted(ctx.parameters))})")
        return ctx.parameters[name]
    if expr.startswith("Execution."):
        name = expr[len("Execution."):]
        if name not in EXECUTION_VARIABLES:
            raise ResolutionError(f"{expr}: unknown execution variable (known: {', '.join(EXECUTION_VARIABLES)})")
        if ctx.symbolic_execution:
            return "{" + expr + "}"
        if name == "CurrentDateTime":
            return datetime.now(UTC).isoformat()
        if name not in ctx.execution:
            raise ResolutionError(f"{expr} is not set for this execution")
        return ctx.execution[name]
    if expr.startswith("Steps."):
        step, path = _split_step_ref(expr)
        if path.startswith("PropertyFiles."):
            raise ResolutionError(f"{expr}: a property file can only be read through Std:JsonGet")
        try:
            props = ctx.step_properties(step)
        except KeyError:
            raise ResolutionError(f"{expr}: step {step!r} has not produced properties (not run yet?)") from None
        return lookup_path(props, path, expr)
    raise ResolutionError(f"unsupported Get expression {expr!r} (expected Parameters., Execution. or Steps.)")


def resolve_join(spec: Mapping[str, Any], ctx: ResolverContext) -> str:
    if not isinstance(spec, dict) or "Values" not in spec:
        raise ResolutionError(f"malformed Std:Join {spec!r}")
    on = spec.get("On", "")
    return str(on).join(to_join_string(resolve(v, ctx)) for v in spec["Values"])


def resolve_json_get(spec: Mapping[str, Any], ctx: ResolverContext) -> Any:
    if not isinstance(spec, dict) or "Path" not in spec:
        raise ResolutionError(f"malformed Std:JsonGet {spec!r}")
    path = spec["Path"]
    if "PropertyFile" in spec:
        ref = spec["PropertyFile"]
        if not _is_expr(ref, "Get") or not str(ref["Get"]).startswith("Steps."):
            raise ResolutionError(f"Std:JsonGet PropertyFile must be a Steps.<name>.PropertyFiles.<file> Get: {ref!r}")
        step, rest = _split_step_ref(ref["Get"])
        if not rest.startswith("PropertyFiles."):
            raise ResolutionError(f"Std:JsonGet PropertyFile must reference PropertyFiles: {ref['Get']!r}")
        file_name = rest[len("PropertyFiles."):]
        if ctx.symbolic_execution:
            return "{JsonGet " + step + "." + file_name + ":" + path + "}"
        if ctx.read_property_file is None:
            raise ResolutionError("no property file reader configured")
        data = ctx.read_property_file(step, file_name)
        return lookup_path(data, path, f"property file {file_name} of step {step}")
    if "S3Uri" in spec:  # JsonGet(s3_uri=Join(...)): the JSON object at that URI
        uri = to_join_string(resolve(spec["S3Uri"], ctx))
        if ctx.symbolic_execution:
            return "{JsonGet " + uri + ":" + path + "}"
        if ctx.read_json_uri is None:
            raise ResolutionError("no S3 JSON reader configured")
        return lookup_path(ctx.read_json_uri(uri), path, f"JSON object {uri}")
    raise ResolutionError(f"malformed Std:JsonGet (neither PropertyFile nor S3Uri): {spec!r}")


def resolve(obj: Any, ctx: ResolverContext) -> Any:
    """Evaluate every expression inside ``obj`` (dicts and lists walked recursively)."""
    if isinstance(obj, dict):
        if _is_expr(obj, "Get"):
            return resolve_get(obj["Get"], ctx)
        if _is_expr(obj, "Std:Join"):
            return resolve_join(obj["Std:Join"], ctx)
        if _is_expr(obj, "Std:JsonGet"):
            return resolve_json_get(obj["Std:JsonGet"], ctx)
        return {k: resolve(v, ctx) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve(v, ctx) for v in obj]
    return obj


# --- references (for the dependency graph) -----------------------------------------------------------------------

_STEP_REF = re.compile(r"^Steps\.([^.\[]+)")


def referenced_steps(obj: Any) -> set[str]:
    """Names of the steps whose properties (or property files) an expression tree reads."""
    found: set[str] = set()
    if isinstance(obj, dict):
        if _is_expr(obj, "Get") and isinstance(obj["Get"], str):
            match = _STEP_REF.match(obj["Get"])
            if match:
                found.add(match.group(1))
            return found
        for value in obj.values():
            found |= referenced_steps(value)
    elif isinstance(obj, list):
        for value in obj:
            found |= referenced_steps(value)
    return found


# --- conditions ---------------------------------------------------------------------------------------------------

_BINARY = {
    ConditionTypeEnum.EQ.value: lambda a, b: a == b,
    ConditionTypeEnum.GT.value: lambda a, b: a > b,
    ConditionTypeEnum.GTE.value: lambda a, b: a >= b,
    ConditionTypeEnum.LT.value: lambda a, b: a < b,
    ConditionTypeEnum.LTE.value: lambda a, b: a <= b,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _comparable(left: Any, right: Any, ctype: str) -> tuple[Any, Any]:
    if _is_number(left) and _is_number(right):
        return left, right
    if _is_number(left) and isinstance(right, str) or isinstance(left, str) and _is_number(right):
        # A JsonGet/Join may yield the number as a string; compare numerically if it parses.
        try:
            return float(left), float(right)
        except ValueError:
            pass
    if type(left) is type(right):
        return left, right
    raise ResolutionError(f"condition {ctype}: cannot compare {left!r} ({type(left).__name__}) "
                          f"with {right!r} ({type(right).__name__})")


def evaluate_condition(condition: Mapping[str, Any], ctx: ResolverContext) -> bool:
    """Evaluate one condition of a ConditionStep (``Type`` + operands, as in the definition)."""
    ctype = condition.get("Type")
    if ctype in _BINARY:
        left, right = _comparable(resolve(condition["LeftValue"], ctx), resolve(condition["RightValue"], ctx), ctype)
        try:
            return bool(_BINARY[ctype](left, right))
        except TypeError as exc:
            raise ResolutionError(f"condition {ctype}: {exc}") from None
    if ctype == ConditionTypeEnum.NOT.value:
        return not evaluate_condition(condition["Condition"], ctx)
    if ctype == ConditionTypeEnum.OR.value:
        return any(evaluate_condition(c, ctx) for c in condition["Conditions"])
    if ctype == ConditionTypeEnum.IN.value:
        query = resolve(condition["QueryValue"], ctx)
        values = [resolve(v, ctx) for v in condition["Values"]]
        for value in values:
            try:
                a, b = _comparable(query, value, ctype)
            except ResolutionError:
                continue
            if a == b:
                return True
        return False
    raise ResolutionError(f"unsupported condition type {ctype!r} "
                          f"(supported: {', '.join(e.value for e in ConditionTypeEnum)})")


def evaluate_conditions(conditions: list[Mapping[str, Any]], ctx: ResolverContext) -> bool:
    """A ConditionStep's outcome: the conjunction of its conditions."""
    return all(evaluate_condition(c, ctx) for c in conditions)


# --- hyperparameters ----------------------------------------------------------------------------------------------

def decode_hyperparameter(value: Any) -> Any:
    """A hyperparameter value as the SageMaker training toolkit sees it (JSON-decoded when it is JSON)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def hyperparameter_arg(value: Any) -> str:
    """The command-line form of a decoded hyperparameter (``--name value``)."""
    decoded = decode_hyperparameter(value)
    if isinstance(decoded, (dict, list)):
        return json.dumps(decoded)
    return str(decoded)
