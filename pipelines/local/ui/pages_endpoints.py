"""Endpoints: status, the version each serves, recent invocations (the endpoint's log, as CloudWatch would show its
access lines; bodies are not recorded without data capture), recent deploys, and the "try it" box
(``InvokeEndpoint``)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from pipelines.local.ui import actions
from pipelines.local.ui.html import (
    Markup,
    badge,
    e,
    join,
    kv,
    link,
    note,
    page,
    section,
    table,
    url,
    when,
)
from pipelines.local.ui.pages_runs import signature
from pipelines.local.ui.reader import Reader
from pipelines.local.ui.web import App, Request, Response, html_response, json_response, route

ACCESS_LINE = re.compile(r'^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ .*?"(?P<method>POST) (?P<path>/\S*invocations)'
                         r' HTTP/[\d.]+" (?P<status>\d{3})')
INVOCATION_LINES = 20
_TRIED: deque[dict[str, Any]] = deque(maxlen=20)
_TRIED_LOCK = threading.Lock()


def invocations(log: Path, limit: int = INVOCATION_LINES) -> list[dict[str, str]]:
    """The latest invocation access lines of an endpoint's server log, newest first."""
    from pipelines.local.ui.reader import tail

    found = [m.groupdict() for line in tail(log, 4000, 2 * 2**20).splitlines() if (m := ACCESS_LINE.match(line))]
    return list(reversed(found[-limit:]))


def _server(name: str) -> Any:
    from pipelines.local.serving import endpoints

    try:
        return endpoints.get(name)
    except (endpoints.EndpointError, ValueError):  # no local server record (or an odd name): shown as such
        return None


def _endpoint_info(reader: Reader, endpoint: dict[str, Any]) -> Markup:
    name = endpoint["EndpointName"]
    serving = reader.serving_package(endpoint.get("EndpointConfigName"))
    pending = endpoint.get("PendingDeploymentSummary") or {}
    server = _server(name)
    pairs = [("Status", badge(endpoint["EndpointStatus"])),
             ("Serving", link(url("/models/version", arn=serving), actions.package_name(reader, serving))
              if serving else "nothing known"),
             ("Endpoint config", endpoint.get("EndpointConfigName")),
             ("Created", when(endpoint.get("CreationTime"))), ("Last modified", when(endpoint.get("LastModifiedTime")))]
    if pending:
        pairs.append(("Pending deployment", pending.get("EndpointConfigName")))
    if endpoint.get("FailureReason"):
        pairs.append(("Failure reason", Markup(f'<span class="error">{e(endpoint["FailureReason"])}</span>')))
    if server is not None:
        pairs.append(("Local server", f"{server.url or '-'} ({'up' if server.alive else 'down'})"))
    return kv(pairs)


def _invocations(name: str) -> Markup:
    from pipelines.local.serving import endpoints

    rows = invocations(endpoints.state_dir(name) / "server.log")
    with _TRIED_LOCK:
        tried = [t for t in _TRIED if t["endpoint"] == name]
    parts = [table(["Time", "Request", "HTTP status"], [[r["time"], f"{r['method']} {r['path']}",
                                                          (badge("Succeeded" if r["status"] == "200" else "Failed",
                                                                 r["status"]), r["status"])] for r in rows])
             if rows else note("no invocation in the endpoint's log yet"),
             note("From the endpoint's log (its CloudWatch stand-in): request bodies and predictions are not recorded "
                  "(the endpoint config has no data capture).")]
    if tried:
        parts.append(table(["Tried here at", "Content-Type", "Bytes", "Status", "Predicted"],
                           [[when(t["time"]), t["content_type"], t["bytes"], t["status"], t["predicted"]]
                            for t in reversed(tried)]))
    return join(parts)


def _deploys(name: str) -> Markup:
    rows = [[when(p.stat().st_mtime), (r or {}).get("status", "failed"), (r or {}).get("message", p.name)]
            for p, r in actions.recent_deploys() if r is None or r.get("endpoint_name") == name]
    return table(["Finished", "Result", "Message"], rows[:5]) if rows else note("no deploy recorded")


def _try_it(name: str) -> Markup:
    return Markup(f'<div class="tryit" data-endpoint="{e(name)}" id="tryit-{e(name)}"><p>Drop an image here or '
                  f'<label>choose one <input type="file" accept="image/*" name="image"></label> to send it to '
                  f'<code>{e(name)}</code> (InvokeEndpoint).</p><img class="preview" alt="" hidden>'
                  '<div class="prediction" aria-live="polite"></div></div>')


@route("GET", "/endpoints")
def endpoints_page(app: App, req: Request) -> Response:
    reader = app.reader
    described = reader.endpoints()
    body = [section(f"Endpoint {d['EndpointName']}",
                    _endpoint_info(reader, d) +
                    section("Try it", _try_it(d["EndpointName"])) +
                    section("Recent invocations", _invocations(d["EndpointName"])) +
                    section("Recent deploys (the deploy function's invocations)", _deploys(d["EndpointName"])),
                    id_=f"endpoint-{d['EndpointName']}")
            for d in described] or [note("No endpoints yet: approve a model version (Model registry).")]
    moving = any(d["EndpointStatus"] in ("Creating", "Updating") for d in described)
    return html_response(page("Endpoints", "endpoints", join(body), token=app.token,
                              poll="/api/endpoints-state" if moving else None, signature=_signature(reader)))


def _signature(reader: Reader) -> str:
    return signature([(d["EndpointName"], d["EndpointStatus"], d.get("EndpointConfigName"))
                      for d in reader.endpoints()])


@route("GET", "/api/endpoints-state")
def endpoints_state(app: App, req: Request) -> Response:
    described = app.reader.endpoints()
    return json_response({"signature": _signature(app.reader),
                          "terminal": not any(d["EndpointStatus"] in ("Creating", "Updating") for d in described),
                          "endpoints": {d["EndpointName"]: d["EndpointStatus"] for d in described}})


@route("POST", "/api/invoke")
def invoke(app: App, req: Request) -> Response:
    name = str(req.arg("endpoint", required=True))
    content_type = (req.headers.get("Content-Type") or "application/x-image").split(";")[0].strip()
    result = actions.invoke(app.reader, name, req.body, content_type)
    predicted = ""
    if result.get("status") == 200:
        try:
            value = json.loads(result["body"])
            top = value[0] if isinstance(value, list) and value else value
            predicted = str(top.get("class_name", "")) if isinstance(top, dict) else ""
        except ValueError:
            predicted = ""
    with _TRIED_LOCK:
        _TRIED.append({"time": time.time(), "endpoint": name, "content_type": content_type, "bytes": len(req.body),
                       "status": result.get("status"), "predicted": predicted or result.get("error", "")})
    return json_response(result, 200 if result.get("status") == 200 else 502)
