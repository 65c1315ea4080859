"""The bootstrap of one local Lambda invocation: ``python -m pipelines.local.api.lambda_runtime --result PATH ...``.

:mod:`.lambda_` starts it once per invocation with the same interpreter, the function's extracted code as the
working directory (``LAMBDA_TASK_ROOT``, first on ``sys.path``) and the event as JSON on stdin. It does what the
AWS Python runtime does for one event: imports ``module.function`` from ``_HANDLER`` (``dir/module.function`` and
``package.module.function`` too), calls ``handler(event, context)`` and writes the outcome as JSON to the file named
by ``--result`` -- never to stdout, which (with stderr) is the function's log, as CloudWatch Logs is on AWS:
``{"error": false, "payload": "<the result as JSON>"}`` or ``{"error": true, "payload": "<AWS's error document>"}``
(``errorMessage``, ``errorType``, ``requestId``, ``stackTrace``; ``Runtime.ImportModuleError``,
``Runtime.HandlerNotFound``, ``Runtime.UserCodeSyntaxError``, ``Runtime.MarshalError`` as AWS names them).

The root logger gets AWS's handler (``[LEVEL]\\t<time>\\t<request id>\\t<message>`` on stderr) at level WARNING,
so a handler that calls ``logging.getLogger().setLevel(logging.INFO)`` logs as it would on Lambda. A handler that
exits the process (``sys.exit``, a crash) leaves no result: the service reports ``Runtime.ExitError``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

Handler = Callable[[Any, "LambdaContext"], Any]


class LambdaContext:
    """The ``context`` argument of a Python Lambda handler (the attributes and method AWS's runtime gives it)."""

    def __init__(self, request_id: str, invoked_function_arn: str, deadline_ms: int) -> None:
        self.function_name = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "")
        self.function_version = os.environ.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        self.invoked_function_arn = invoked_function_arn
        self.memory_limit_in_mb = os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        self.aws_request_id = request_id
        self.log_group_name = os.environ.get("AWS_LAMBDA_LOG_GROUP_NAME", f"/aws/lambda/{self.function_name}")
        self.log_stream_name = os.environ.get("AWS_LAMBDA_LOG_STREAM_NAME", "")
        self.identity = None
        self.client_context = None
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, self._deadline_ms - int(time.time() * 1000))

    def __repr__(self) -> str:
        return (f"LambdaContext(function_name={self.function_name!r}, aws_request_id={self.aws_request_id!r}, "
                f"invoked_function_arn={self.invoked_function_arn!r})")


class HandlerError(Exception):
    """The handler could not be loaded: ``error_type`` is the AWS runtime's ``Runtime.*`` name."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class _LambdaFormatter(logging.Formatter):
    def __init__(self, request_id: str) -> None:
        super().__init__()
        self.request_id = request_id

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        text = f"[{record.levelname}]\t{stamp}\t{self.request_id}\t{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text + "\n"


def _setup_logging(request_id: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LambdaFormatter(request_id))
    handler.terminator = ""
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)


def load_handler(spec: str) -> Handler:
    """``module.function`` (or ``dir/module.function``, ``package.module.function``) -> the function."""
    try:
        module_path, function_name = spec.rsplit(".", 1)
    except ValueError as exc:
        raise HandlerError("Runtime.MalformedHandlerName", f"Bad handler '{spec}': {exc}") from None
    module_name = module_path.replace("/", ".")
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as exc:
        raise HandlerError("Runtime.UserCodeSyntaxError", f"Syntax error in module '{module_name}': {exc}") from exc
    except ImportError as exc:
        raise HandlerError("Runtime.ImportModuleError", f"Unable to import module '{module_name}': {exc}") from exc
    handler = getattr(module, function_name, None)
    if not callable(handler):
        raise HandlerError("Runtime.HandlerNotFound", f"Handler '{function_name}' missing on module '{module_name}'")
    return handler


def _stack(tb: TracebackType | None) -> list[str]:
    """The user's frames, as AWS's ``stackTrace`` lists them (this bootstrap's own frame left out)."""
    return traceback.format_list(traceback.extract_tb(tb.tb_next if tb is not None else None))


def error_document(request_id: str, error_type: str, message: str, stack: list[str] | None = None) -> dict[str, Any]:
    return {"errorMessage": message, "errorType": error_type, "requestId": request_id, "stackTrace": stack or []}


def _log_error(document: dict[str, Any]) -> None:
    """The ``[ERROR]`` entry AWS's runtime writes to the log for an unhandled error."""
    trace = "".join(document["stackTrace"])
    text = f"[ERROR] {document['errorType']}: {document['errorMessage']}"
    if trace:
        text += "\nTraceback (most recent call last):\n" + trace
    sys.stderr.write(text.rstrip("\n") + "\n")


def run(handler_spec: str, event: Any, context: LambdaContext) -> tuple[bool, str]:
    """``(error, payload JSON)`` of one handler call."""
    request_id = context.aws_request_id
    try:
        handler = load_handler(handler_spec)
    except HandlerError as exc:
        document = error_document(request_id, exc.error_type, str(exc))
        _log_error(document)
        return True, json.dumps(document)
    try:
        result = handler(event, context)
    except Exception as exc:  # noqa: BLE001 -- the function's unhandled error: reported as AWS reports it
        document = error_document(request_id, type(exc).__name__, str(exc), _stack(exc.__traceback__))
        _log_error(document)
        return True, json.dumps(document)
    try:
        return False, json.dumps(result)
    except (TypeError, ValueError) as exc:
        document = error_document(request_id, "Runtime.MarshalError", f"Unable to marshal response: {exc}")
        _log_error(document)
        return True, json.dumps(document)


def _read_event() -> Any:
    """The event from stdin; stdin is then ``/dev/null`` for the handler."""
    data = sys.stdin.buffer.read()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return json.loads(data) if data.strip() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bootstrap of one local Lambda invocation")
    parser.add_argument("--result", required=True, help="file the outcome is written to (JSON)")
    parser.add_argument("--request-id", required=True)
    parser.add_argument("--invoked-arn", default="")
    parser.add_argument("--deadline-ms", type=int, required=True, help="epoch milliseconds the invocation ends")
    args = parser.parse_args(argv)
    task_root = os.environ.get("LAMBDA_TASK_ROOT") or os.getcwd()
    sys.path[:] = [task_root] + [p for p in sys.path if p not in ("", task_root)]
    _setup_logging(args.request_id)
    event = _read_event()
    context = LambdaContext(args.request_id, args.invoked_arn, args.deadline_ms)
    error, payload = run(os.environ.get("_HANDLER", ""), event, context)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(args.result, "w", encoding="utf-8") as fh:
        json.dump({"error": error, "payload": payload}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
