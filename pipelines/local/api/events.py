"""EventBridge for the local AWS service: JSON 1.1, ``POST /`` with ``X-Amz-Target: AWSEvents.<Operation>``.

Served, on the default event bus only (``EventBusName`` absent, ``default`` or the default bus's ARN; any other bus
is ``ResourceNotFoundException``): ``PutRule``, ``DescribeRule``, ``ListRules`` (``NamePrefix``, ``Limit``/``NextToken``
paging), ``DeleteRule`` (refused with ``ValidationException`` while the rule has targets, as on AWS; deleting a rule
that does not exist succeeds), ``EnableRule``, ``DisableRule``, ``PutTargets``, ``ListTargetsByRule``,
``RemoveTargets``, ``PutEvents`` and ``TestEventPattern``. Any other operation is ``UnknownOperationException``.
Requests are validated against botocore's model and responses cut to the output shape (:mod:`.shapes`), errors are
``{"__type": code, "message": ...}`` -- the house way of :mod:`.sagemaker`. Rules and targets live in the engine's
SQLite database (tables ``eb_rules``/``eb_targets``, through :func:`pipelines.local.storage.store.transaction`).

Event patterns: :func:`matches` implements EventBridge's content filtering -- exact values (any of an array, numbers
compared as numbers, event arrays matching when any element does), nested objects, ``prefix``, ``suffix`` (both also
with ``equals-ignore-case``), ``anything-but`` (a value, a list, ``prefix``/``suffix``/``equals-ignore-case``/
``wildcard``), ``numeric`` ranges, ``exists`` true/false (leaf fields only), ``equals-ignore-case``, ``wildcard``,
``cidr`` and ``$or``. A pattern that is no JSON object, or uses an unknown or malformed operator, is
``InvalidEventPatternException``.

Delivery: :func:`emit` matches an event against every ENABLED rule with an event pattern and invokes each Lambda
target asynchronously (:func:`pipelines.local.api.lambda_.invoke`, ``InvocationType=Event``) with the event, the
target's constant ``Input``, its ``InputPath`` (``$``, ``$.a.b``, ``$.a[0]``, ``$['a-b']``) or its
``InputTransformer`` (``InputPathsMap`` + ``InputTemplate``, with the predefined ``aws.events.*`` variables).
``PutEvents`` entries go through :func:`emit` before the call answers. :func:`model_package_state_change_event`
builds the event SageMaker sends when a model package's approval status changes.

Left out: schedules (``ScheduleExpression`` is checked and stored, but never fired), custom and partner event buses,
archives/replays, API destinations, connections, endpoints, tags (``PutRule``'s ``Tags`` are accepted and dropped),
delivery to anything but Lambda functions (other targets are stored and listed, not invoked), retry policies and
dead-letter queues (a failed delivery is logged, never retried). Unlike AWS, ``PutEvents`` accepts ``aws.*`` sources,
so that the local services' own events (SageMaker's) can be injected.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import ipaddress
import json
import logging
import math
import operator
import re
import sqlite3
import uuid
from collections.abc import Callable
from typing import Any

from pipelines import arns
from pipelines.local.api import shapes
from pipelines.local.api.protocol import Request, Response
from pipelines.local.api.shapes import ApiError, validation_error
from pipelines.local.storage import store
from pipelines.local.storage.store import LOCAL_ACCOUNT, LOCAL_REGION

logger = logging.getLogger(__name__)

SERVICE = "events"
TARGET_PREFIX = "AWSEvents"
DEFAULT_BUS = "default"
MAX_TARGETS_PER_RULE = 5  # the AWS quota
LIST_PAGE_SIZE = 100
MODEL_PACKAGE_DETAIL_TYPE = "SageMaker Model Package State Change"
#: The fields TestEventPattern requires of its event (AWS's list).
REQUIRED_EVENT_FIELDS = ("id", "account", "source", "time", "region", "resources", "detail-type")
_SCHEDULE = re.compile(r"rate\(\d+ (minute|minutes|hour|hours|day|days)\)|cron\(\S+( \S+){5}\)")

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS eb_rules (
        name TEXT PRIMARY KEY, event_pattern TEXT, schedule_expression TEXT, state TEXT NOT NULL,
        description TEXT, role_arn TEXT, created REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS eb_targets (
        rule TEXT NOT NULL REFERENCES eb_rules(name) ON DELETE CASCADE, id TEXT NOT NULL,
        target TEXT NOT NULL, PRIMARY KEY (rule, id))""",
)


# ------------------------------------------------------------------------------------------------ event patterns


class InvalidPattern(ValueError):
    """An event pattern EventBridge would refuse (``InvalidEventPatternException``)."""


def parse_pattern(text: str) -> dict[str, Any]:
    """The pattern in ``text``, checked; :class:`InvalidPattern` for bad JSON or a malformed pattern."""
    try:
        pattern = json.loads(text)
    except ValueError as exc:
        raise InvalidPattern(f"Filter is not valid JSON: {exc}") from exc
    check_pattern(pattern)
    return pattern


def check_pattern(pattern: Any, where: str = "") -> None:
    """Raise :class:`InvalidPattern` unless ``pattern`` is a well-formed EventBridge pattern (object)."""
    if not isinstance(pattern, dict):
        raise InvalidPattern(f"Filter{' for ' + where if where else ''} is not an object")
    if not pattern:
        raise InvalidPattern(f"Empty objects are not allowed{' (' + where + ')' if where else ''}")
    for key, value in pattern.items():
        field = f"{where}.{key}" if where else key
        if key == "$or":
            if not isinstance(value, list) or not value:
                raise InvalidPattern(f"{field} must be a non-empty array of objects")
            for alternative in value:
                check_pattern(alternative, field)
        elif isinstance(value, dict):
            check_pattern(value, field)
        elif isinstance(value, list):
            for matcher in value:
                _check_matcher(matcher, field)
        else:
            raise InvalidPattern(f"Match value for {field} must be an array or an object")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_string_or_ignore_case(arg: Any, where: str, op: str) -> None:
    if isinstance(arg, dict) and list(arg) == ["equals-ignore-case"]:
        arg = arg["equals-ignore-case"]
    if not isinstance(arg, str):
        raise InvalidPattern(f"{op} match pattern for {where} must be a string")


def _check_string(arg: Any, where: str, op: str) -> None:
    if not isinstance(arg, str):
        raise InvalidPattern(f"{op} match pattern for {where} must be a string")
    if op == "wildcard" and "**" in arg:
        raise InvalidPattern(f"Consecutive wildcard characters at pos {arg.index('**') + 1} in {where}")


def _check_numeric(arg: Any, where: str, op: str) -> None:
    if not isinstance(arg, list) or len(arg) not in (2, 4):
        raise InvalidPattern(f"Value of numeric for {where} must be an array of one or two (operator, number) pairs")
    for symbol, bound in zip(arg[::2], arg[1::2], strict=True):
        if symbol not in _NUMERIC_OPS or not _is_number(bound) or not math.isfinite(bound):
            raise InvalidPattern(f"Invalid numeric condition {symbol!r} {bound!r} for {where}")
    if len(arg) == 4 and "=" in arg[::2]:
        raise InvalidPattern(f"numeric '=' for {where} takes no second condition")


def _check_exists(arg: Any, where: str, op: str) -> None:
    if not isinstance(arg, bool):
        raise InvalidPattern(f"exists match pattern for {where} must be true or false")


def _check_cidr(arg: Any, where: str, op: str) -> None:
    try:
        ipaddress.ip_network(str(arg), strict=False)
    except ValueError as exc:
        raise InvalidPattern(f"Malformed CIDR {arg!r} for {where}") from exc


def _check_anything_but(arg: Any, where: str, op: str) -> None:
    if isinstance(arg, dict):
        if len(arg) != 1 or next(iter(arg)) not in ("prefix", "suffix", "equals-ignore-case", "wildcard"):
            raise InvalidPattern(f"Unsupported anything-but pattern for {where}: {json.dumps(arg)}")
        (inner, values), = arg.items()
        for value in values if isinstance(values, list) else [values]:
            _check_string(value, where, f"anything-but {inner}")
    elif isinstance(arg, list):
        if not arg or not all(isinstance(v, str) or _is_number(v) for v in arg):
            raise InvalidPattern(f"anything-but list for {where} must hold strings or numbers")
    elif not (isinstance(arg, str) or _is_number(arg)):
        raise InvalidPattern(f"anything-but value for {where} must be a string, a number, a list or an object")


_CHECKS: dict[str, Callable[[Any, str, str], None]] = {
    "prefix": _check_string_or_ignore_case, "suffix": _check_string_or_ignore_case,
    "equals-ignore-case": _check_string, "wildcard": _check_string, "numeric": _check_numeric,
    "exists": _check_exists, "cidr": _check_cidr, "anything-but": _check_anything_but,
}


def _check_matcher(matcher: Any, where: str) -> None:
    if matcher is None or isinstance(matcher, str | bool) or (_is_number(matcher) and math.isfinite(matcher)):
        return
    if not isinstance(matcher, dict) or len(matcher) != 1:
        raise InvalidPattern(f"Match value for {where} must be a string, number, true, false, null or an object "
                             "with one operator")
    (op, arg), = matcher.items()
    if op not in _CHECKS:
        raise InvalidPattern(f"Unrecognized match type {op} for {where}")
    _CHECKS[op](arg, where, op)


def matches(pattern: dict[str, Any], event: dict[str, Any]) -> bool:
    """Whether ``event`` matches the EventBridge ``pattern`` (checked with :func:`check_pattern` beforehand).

    Every field of the pattern must match; a leaf field matches when any of its matchers matches any of the event's
    values there (arrays in the event are flattened, as EventBridge does)."""
    return _match_fields(pattern, [event])


def _match_fields(pattern: dict[str, Any], nodes: list[Any]) -> bool:
    for key, sub in pattern.items():
        if key == "$or":
            if not any(_match_fields(alternative, nodes) for alternative in sub):
                return False
        elif isinstance(sub, dict):
            if not _match_fields(sub, _values_at(nodes, key)):
                return False
        else:
            leaves = [value for value in _values_at(nodes, key) if not isinstance(value, dict)]
            if not any(_match_one(matcher, leaves) for matcher in sub):
                return False
    return True


def _values_at(nodes: list[Any], key: str) -> list[Any]:
    values: list[Any] = []
    for node in nodes:
        if isinstance(node, dict) and key in node:
            values.extend(_flatten(node[key]))
    return values


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def _match_one(matcher: Any, values: list[Any]) -> bool:
    if isinstance(matcher, dict):
        (op, arg), = matcher.items()
        if op == "exists":
            return bool(values) == arg
        test = _OPERATORS[op]
        return any(test(arg, value) for value in values)
    return any(_equal(matcher, value) for value in values)


def _equal(expected: Any, value: Any) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool) or expected is None or value is None:
        return type(expected) is type(value) and expected == value
    if _is_number(expected) and _is_number(value):
        return float(expected) == float(value)
    return type(expected) is type(value) and expected == value


def _affix(arg: Any, value: Any, test: Callable[[str, str], bool]) -> bool:
    if not isinstance(value, str):
        return False
    if isinstance(arg, dict):
        return test(value.casefold(), arg["equals-ignore-case"].casefold())
    return test(value, arg)


@functools.lru_cache(maxsize=512)
def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    parts, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            parts.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        parts.append(".*" if char == "*" else re.escape(char))
        i += 1
    return re.compile("".join(parts), re.DOTALL)


def _wildcard(arg: str, value: Any) -> bool:
    return isinstance(value, str) and _wildcard_regex(arg).fullmatch(value) is not None


def _ignore_case(arg: str, value: Any) -> bool:
    return isinstance(value, str) and value.casefold() == arg.casefold()


_NUMERIC_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, "=": operator.eq, ">": operator.gt, ">=": operator.ge}


def _numeric(arg: list[Any], value: Any) -> bool:
    return _is_number(value) and all(_NUMERIC_OPS[op](float(value), float(bound))
                                     for op, bound in zip(arg[::2], arg[1::2], strict=True))


def _cidr(arg: str, value: Any) -> bool:
    try:
        return isinstance(value, str) and ipaddress.ip_address(value) in ipaddress.ip_network(arg, strict=False)
    except ValueError:
        return False


def _anything_but(arg: Any, value: Any) -> bool:
    if isinstance(arg, dict):
        (inner, values), = arg.items()
        if not isinstance(value, str):
            return True
        return not any(_OPERATORS[inner](v, value) for v in (values if isinstance(values, list) else [values]))
    return not any(_equal(v, value) for v in (arg if isinstance(arg, list) else [arg]))


_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "prefix": lambda arg, value: _affix(arg, value, str.startswith),
    "suffix": lambda arg, value: _affix(arg, value, str.endswith),
    "equals-ignore-case": _ignore_case, "wildcard": _wildcard, "numeric": _numeric, "cidr": _cidr,
    "anything-but": _anything_but,
}


# ------------------------------------------------------------------------------------------ target input (paths)


_PATH_STEP = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]|\['([^']*)'\]|\[\"([^\"]*)\"\]")


def json_path_steps(path: str) -> list[str | int]:
    """The steps of a simple JSONPath (``$``, ``$.a.b``, ``$.a[0]``, ``$['a-b']``); ``ValueError`` otherwise."""
    if not path.startswith("$"):
        raise ValueError(f"JSONPath {path!r} must start with '$'")
    steps: list[str | int] = []
    position = 1
    while position < len(path):
        match = _PATH_STEP.match(path, position)
        if match is None:
            raise ValueError(f"JSONPath {path!r} is not valid at position {position}")
        name, index, single, double = match.groups()
        steps.append(int(index) if index is not None else next(s for s in (name, single, double) if s is not None))
        position = match.end()
    return steps


def json_path(document: Any, path: str) -> Any:
    """The value at ``path`` in ``document``; ``None`` where there is none."""
    value = document
    for step in json_path_steps(path):
        if isinstance(step, int) and isinstance(value, list) and step < len(value):
            value = value[step]
        elif isinstance(step, str) and isinstance(value, dict) and step in value:
            value = value[step]
        else:
            return None
    return value


_PLACEHOLDER = re.compile(r"<([A-Za-z0-9_.\-]+)>")


def render_template(template: str, values: dict[str, Any]) -> str:
    """An ``InputTemplate`` with its ``<name>`` placeholders replaced: inside a JSON string by the value's text,
    elsewhere by its JSON (strings quoted), as EventBridge does; unknown names are left as they are."""
    out: list[str] = []
    in_string, i = False, 0
    while i < len(template):
        char = template[i]
        if char == "\\" and in_string:
            out.append(template[i:i + 2])
            i += 2
            continue
        match = _PLACEHOLDER.match(template, i)
        if match and match.group(1) in values:
            value = values[match.group(1)]
            if not in_string:
                out.append(json.dumps(value))
            elif value is not None:
                out.append(json.dumps(value if isinstance(value, str) else json.dumps(value))[1:-1])
            i = match.end()
            continue
        in_string = not in_string if char == '"' else in_string
        out.append(char)
        i += 1
    return "".join(out)


def target_input(target: dict[str, Any], event: dict[str, Any], rule_name: str) -> bytes:
    """What a target receives for ``event``: its ``Input``, the event at its ``InputPath``, its
    ``InputTransformer``'s rendering, or the event itself."""
    if target.get("Input") is not None:
        return str(target["Input"]).encode("utf-8")
    if target.get("InputPath"):
        return json.dumps(json_path(event, target["InputPath"])).encode("utf-8")
    transformer = target.get("InputTransformer")
    if transformer:
        values: dict[str, Any] = {
            "aws.events.rule-arn": rule_arn(rule_name), "aws.events.rule-name": rule_name,
            "aws.events.event.ingestion-time": event.get("time"), "aws.events.event": event,
            "aws.events.event.json": event}
        values.update({name: json_path(event, path) for name, path in (transformer.get("InputPathsMap") or {}).items()})
        return render_template(transformer["InputTemplate"], values).encode("utf-8")
    return json.dumps(event).encode("utf-8")


# ------------------------------------------------------------------------------------------------------ storage


def rule_arn(name: str) -> str:
    return arns.arn("events", LOCAL_REGION, LOCAL_ACCOUNT, f"rule/{name}")


def bus_arn(name: str = DEFAULT_BUS) -> str:
    return arns.arn("events", LOCAL_REGION, LOCAL_ACCOUNT, f"event-bus/{name}")


def _db(write: bool = False) -> contextlib.AbstractContextManager[sqlite3.Connection]:
    return store.transaction(SCHEMA, write)


def _check_bus(name: str | None) -> None:
    if name not in (None, DEFAULT_BUS, bus_arn()):
        raise ApiError("ResourceNotFoundException", f"Event bus {name} does not exist.")


def _rule_row(conn: sqlite3.Connection, name: str) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM eb_rules WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise ApiError("ResourceNotFoundException", f"Rule {name} does not exist on EventBus {DEFAULT_BUS}.")
    return row


def _rule_out(row: sqlite3.Row) -> dict[str, Any]:
    return {"Name": row["name"], "Arn": rule_arn(row["name"]), "EventPattern": row["event_pattern"],
            "ScheduleExpression": row["schedule_expression"], "State": row["state"],
            "Description": row["description"], "RoleArn": row["role_arn"], "EventBusName": DEFAULT_BUS,
            "CreatedBy": LOCAL_ACCOUNT}


def _targets(conn: sqlite3.Connection, rule: str) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT target FROM eb_targets WHERE rule = ? ORDER BY rowid", (rule,)).fetchall()
    return [json.loads(row["target"]) for row in rows]


def _page(operation: str, items: list[Any], params: dict[str, Any], key: str) -> dict[str, Any]:
    return shapes.paginate(operation, items, {"NextToken": params.get("NextToken"), "MaxResults": params.get("Limit")},
                           key, default_size=LIST_PAGE_SIZE)


# --------------------------------------------------------------------------------------------------- operations


def _checked_pattern(text: str) -> dict[str, Any]:
    try:
        return parse_pattern(text)
    except InvalidPattern as exc:
        raise ApiError("InvalidEventPatternException", f"Event pattern is not valid. Reason: {exc}") from exc


def put_rule(params: dict[str, Any], service_url: str) -> dict[str, Any]:
    """Create or replace a rule (omitted arguments are not kept, as on AWS); its targets stay."""
    _check_bus(params.get("EventBusName"))
    name, pattern, schedule = params["Name"], params.get("EventPattern"), params.get("ScheduleExpression")
    if not pattern and not schedule:
        raise validation_error("Parameter(s) EventPattern or ScheduleExpression must be specified.")
    if pattern:
        _checked_pattern(pattern)
    if schedule and not _SCHEDULE.fullmatch(schedule):
        raise validation_error("Parameter ScheduleExpression is not valid.")
    row = (name, pattern or None, schedule or None, params.get("State") or "ENABLED", params.get("Description"),
           params.get("RoleArn"), datetime.datetime.now(datetime.UTC).timestamp())
    with _db(write=True) as conn:
        conn.execute("""INSERT INTO eb_rules (name, event_pattern, schedule_expression, state, description, role_arn,
                        created) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET
                        event_pattern = excluded.event_pattern, schedule_expression = excluded.schedule_expression,
                        state = excluded.state, description = excluded.description, role_arn = excluded.role_arn""",
                     row)
    logger.info("rule %s put (%s)", name, row[3])
    return {"RuleArn": rule_arn(name)}


def describe_rule(params: dict[str, Any], service_url: str) -> dict[str, Any]:
    _check_bus(params.get("EventBusName"))
    with _db() as conn:
        return _rule_out(_rule_row(conn, params["Name"]))


def list_rules(params: dict[str, Any], service_url: str) -> dict[str, Any]:
    _check_bus(params.get("EventBusName"))
    prefix = params.get("NamePrefix") or ""
    with _db() as conn:
        rows = conn.execute("SELECT * FROM eb_rules ORDER BY name").fetchall()
    rules = [_rule_out(row) for row in rows if row["name"].startswith(prefix)]
    for rule in rules:
        rule.pop("CreatedBy")
    return _page("ListRules", rules, params, "Rules")


def delete_rule(params: dict[str, Any], service_url: str) -> dict[str, Any]:
    """Delete a rule without targets; a rule that does not exist is no error (AWS answers 200 too)."""
    _check_bus(params.get("EventBusName"))
    with _db(write=True) as conn:
        if conn.execute("SELECT 1 FROM eb_targets WHERE rule = ? LIMIT 1", (params["Name"],)).fetchone():
            raise validation_error("Rule can't be deleted since it has targets.")
        conn.execute("DELETE FROM eb_rules WHERE name = ?", (params["Name"],))
    logger.info("rule %s deleted", params["Name"])
    return {}


def _set_state(params: dict[str, Any], state: str) -> dict[str, Any]:
    _check_bus(params.get("EventBusName"))
    with _db(write=True) as conn:
        _rule_row(conn, params["Name"])
        conn.execute("UPDATE eb_rules SET state = ? WHERE name = ?", (state, params["Name"]))
    logger.info("rule %s %s", params["Name"], state)
    return {}


def enable_rule(params: dict[str, Any], service_url: str) -> dict[str, Any]:
    return _set_state(params, "ENABLED")


def disable_rule(params: dict[str, Any], service_url: str) -> dict[str, Any]:
    return _set_state(params, "DISABLED")


def _check_target(target: dict[str, Any]) -> None:
    given = [key for key in ("Input", "InputPath", "InputTransformer") if target.get(key) is not None]
    if len(given) > 1:
        raise validation_error("Only one of Input, InputPath, or InputTransformer must be provided.")
    try:
        arns.parse(target["Arn"])
        if target.get("Input") is not None:
            json.loads(target["Input"])
        if target.get("InputPath"):
            json_path_steps(target["InputPath"])
        for path in ((target.get("InputTransformer") or {}).get("InputPathsMap") or {}).values():
            json_path_steps(path)
    except ValueError as exc:
        raise validation_error(f"Target {target['Id']} is not valid: {exc}") from exc


def put_targets(params: dict[str, Any], service_url: str) -> dict[str, Any]:
    """Add or replace (by ``Id``) targets of a rule, at most :data:`MAX_TARGETS_PER_RULE` in all."""
    _check_bus(params.get("EventBusName"))
    rule, targets = params["Rule"], params["Targets"]
    for target in targets:
        _check_target(target)
    with _db(write=True) as conn:
        _rule_row(conn, rule)
        ids = {row["id"] for row in conn.execute("SELECT id FROM eb_targets WHERE rule = ?", (rule,))}
        if len(ids | {target["Id"] for target in targets}) > MAX_TARGETS_PER_RULE:
            raise ApiError("LimitExceededException", "The requested resource exceeds the maximum number allowed.")
        for target in targets:
            conn.execute("INSERT INTO eb_targets (rule, id, target) VALUES (?, ?, ?) "
                         "ON CONFLICT(rule, id) DO UPDATE SET target = excluded.target",
                         (rule, target["Id"], json.dumps(target)))
    logger.info("rule %s: targets %s put", rule, [target["Id"] for target in targets])
    return {"FailedEntryCount": 0, "FailedEntries": []}


def list_targets_by_rule(params: dict[str, Any], service_url: str) -> dict[str, Any]:
    _check_bus(params.get("EventBusName"))
    with _db() as conn:
        _rule_row(conn, params["Rule"])
        targets = _targets(conn, params["Rule"])
    return _page("ListTargetsByRule", targets, params, "Targets")


def remove_targets(params: dict[str, Any], service_url: str) -> dict[str, Any]:
    """Remove targets by ``Id``; ids the rule does not have are ignored."""
    _check_bus(params.get("EventBusName"))
    with _db(write=True) as conn:
        _rule_row(conn, params["Rule"])
        conn.executemany("DELETE FROM eb_targets WHERE rule = ? AND id = ?",
                         [(params["Rule"], target_id) for target_id in params["Ids"]])
    logger.info("rule %s: targets %s removed", params["Rule"], params["Ids"])
    return {"FailedEntryCount": 0, "FailedEntries": []}


def event_pattern_test(params: dict[str, Any], service_url: str) -> dict[str, Any]:
    pattern = _checked_pattern(params["EventPattern"])
    try:
        event = json.loads(params["Event"])
    except ValueError as exc:
        raise validation_error(f"Parameter Event is not valid. Reason: {exc}") from exc
    if not isinstance(event, dict):
        raise validation_error("Parameter Event is not valid. Reason: the event is not a JSON object.")
    missing = [name for name in REQUIRED_EVENT_FIELDS if name not in event]
    if missing:
        raise validation_error(f"Parameter Event is not valid. Reason: Provided Event is missing required field(s): "
                               f"{', '.join(missing)}.")
    return {"Result": matches(pattern, event)}


class _EntryError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _event_of(entry: dict[str, Any]) -> dict[str, Any]:
    """The event EventBridge makes of a PutEvents entry; :class:`_EntryError` for an entry it refuses."""
    bus = entry.get("EventBusName")
    if bus not in (None, DEFAULT_BUS, bus_arn()):
        raise _EntryError("ResourceNotFoundException", f"Event bus {bus} does not exist.")
    for name in ("Source", "DetailType", "Detail"):
        if not entry.get(name):
            raise _EntryError("InvalidArgument", f"Parameter {name} is not valid. Reason: {name} is a required "
                                                 "argument.")
    try:
        detail = json.loads(entry["Detail"])
    except ValueError:
        detail = None
    if not isinstance(detail, dict):
        raise _EntryError("MalformedDetail", "Detail is malformed.")
    when = entry.get("Time") or datetime.datetime.now(datetime.UTC)
    return {"version": "0", "id": str(uuid.uuid4()), "detail-type": entry["DetailType"], "source": entry["Source"],
            "account": LOCAL_ACCOUNT, "time": _event_time(when), "region": LOCAL_REGION,
            "resources": list(entry.get("Resources") or []), "detail": detail}


def _event_time(when: Any) -> str:
    if isinstance(when, int | float):
        when = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def put_events(params: dict[str, Any], service_url: str) -> dict[str, Any]:
    """Turn each entry into an event and deliver it (:func:`emit`); refused entries carry their error."""
    results: list[dict[str, Any]] = []
    for entry in params["Entries"]:
        try:
            event = _event_of(entry)
        except _EntryError as exc:
            results.append({"ErrorCode": exc.code, "ErrorMessage": exc.message})
            continue
        emit(event, service_url=service_url)
        results.append({"EventId": event["id"]})
    failed = sum(1 for result in results if "ErrorCode" in result)
    return {"FailedEntryCount": failed, "Entries": results}


OPERATIONS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "PutRule": put_rule, "DescribeRule": describe_rule, "ListRules": list_rules, "DeleteRule": delete_rule,
    "EnableRule": enable_rule, "DisableRule": disable_rule, "PutTargets": put_targets,
    "ListTargetsByRule": list_targets_by_rule, "RemoveTargets": remove_targets, "PutEvents": put_events,
    "TestEventPattern": event_pattern_test,
}


# ----------------------------------------------------------------------------------------------------- delivery


def _enabled_rules() -> list[tuple[str, str, list[dict[str, Any]]]]:
    """``(name, event pattern, targets)`` of every enabled rule with an event pattern."""
    with _db() as conn:
        rows = conn.execute("SELECT name, event_pattern FROM eb_rules WHERE state != 'DISABLED' "
                            "AND event_pattern IS NOT NULL ORDER BY name").fetchall()
        return [(row["name"], row["event_pattern"], _targets(conn, row["name"])) for row in rows]


def is_lambda_function_arn(value: str) -> bool:
    try:
        parts = arns.parse(value)
    except ValueError:
        return False
    return parts.service == "lambda" and parts.resource.startswith("function:")


def _deliver(rule: str, target: dict[str, Any], event: dict[str, Any], service_url: str) -> bool:
    """Invoke one Lambda target asynchronously; ``False`` (logged) when it is not one or the invoke fails."""
    arn = target["Arn"]
    if not is_lambda_function_arn(arn):
        logger.warning("rule %s: target %s (%s) is not a Lambda function: not delivered locally", rule,
                       target.get("Id"), arn)
        return False
    try:
        from pipelines.local.api import lambda_

        payload = target_input(target, event, rule)
        result = lambda_.invoke(arn, payload, service_url=service_url, invocation_type="Event")
    except Exception as exc:  # noqa: BLE001 -- a failed delivery is logged, as EventBridge reports it, never raised
        logger.warning("rule %s: delivering event %s to %s failed: %s: %s", rule, event.get("id"), arn,
                       type(exc).__name__, exc)
        return False
    if result.status_code >= 300 or result.function_error:
        logger.warning("rule %s: %s answered %s (%s) for event %s", rule, arn, result.status_code,
                       result.function_error, event.get("id"))
        return False
    logger.info("rule %s: event %s delivered to %s", rule, event.get("id"), arn)
    return True


def emit(event: dict[str, Any], *, service_url: str) -> list[str]:
    """Deliver ``event`` (the full envelope) to the Lambda targets of every enabled rule of the default bus whose
    pattern it matches; the target ARNs delivered to. Failures are logged, never raised."""
    delivered: list[str] = []
    try:
        rules = _enabled_rules()
    except sqlite3.Error as exc:
        logger.error("event %s not delivered: the rules cannot be read: %s", event.get("id"), exc)
        return delivered
    for name, pattern_text, targets in rules:
        try:
            pattern = parse_pattern(pattern_text)
        except InvalidPattern as exc:
            logger.warning("rule %s has an invalid pattern (%s): skipped", name, exc)
            continue
        if not matches(pattern, event):
            continue
        logger.info("event %s (%s) matches rule %s", event.get("id"), event.get("detail-type"), name)
        delivered.extend(t["Arn"] for t in targets if _deliver(name, t, event, service_url))
    return delivered


def _epoch_millis(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {key: _epoch_millis(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_epoch_millis(item) for item in value]
    return value


def model_package_state_change_event(described: dict[str, Any], *, account: str, region: str) -> dict[str, Any]:
    """The ``SageMaker Model Package State Change`` event for a ``DescribeModelPackage`` response: ``detail`` holds
    the response's fields (``ModelPackageGroupName``, ``ModelPackageVersion``, ``ModelPackageArn``,
    ``ModelApprovalStatus``, ``CreationTime``, ...) in its order, datetimes as epoch milliseconds (as in events
    SageMaker sent, e.g. ``"CreationTime": 1622695255225``)."""
    detail = _epoch_millis({key: value for key, value in described.items() if key != "ResponseMetadata"})
    return {
        "version": "0", "id": str(uuid.uuid4()), "detail-type": MODEL_PACKAGE_DETAIL_TYPE, "source": "aws.sagemaker",
        "account": account, "time": _event_time(datetime.datetime.now(datetime.UTC)), "region": region,
        "resources": [detail["ModelPackageArn"]] if detail.get("ModelPackageArn") else [], "detail": detail,
    }


# ---------------------------------------------------------------------------------------------------------- API


def _api(request: Request, request_id: str) -> Response:
    operation = shapes.json_target_operation(request, service=SERVICE, prefix=TARGET_PREFIX, served=OPERATIONS,
                                             title="EventBridge", serves=", ".join(sorted(OPERATIONS)))
    model = shapes.operation_model(SERVICE, operation)
    assert model is not None
    params = shapes.parse_input(model.input_shape, shapes.json_params(request))
    shapes.validate(model.input_shape, params)
    result = OPERATIONS[operation](params, request.service_url())
    body = shapes.shape_output(model.output_shape, result) if model.output_shape is not None else {}
    return Response.json(body or {}, headers={"x-amzn-RequestId": request_id})


def _error(exc: ApiError, request_id: str) -> Response:
    return Response.json({"__type": exc.code, "message": exc.message}, status=exc.status,
                         headers={"x-amzn-RequestId": request_id})


def handle(request: Request) -> Response:
    """Answer one EventBridge request; every failure is the protocol's error shape."""
    return shapes.answer(request, lambda request_id: _api(request, request_id), _error,
                         internal_code="InternalException", title="EventBridge")

