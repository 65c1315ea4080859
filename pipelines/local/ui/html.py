"""HTML building blocks: everything interpolated is escaped unless it is already :class:`Markup`."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

NAV = (("executions", "/executions", "Executions"), ("tuning", "/tuning", "Tuning"),
       ("training", "/training", "Training"), ("evaluation", "/evaluation", "Evaluation"),
       ("models", "/models", "Model registry"), ("endpoints", "/endpoints", "Endpoints"))

#: Status -> CSS class (colours in assets.CSS).
STATUS_CLASSES = {
    "Succeeded": "ok", "Completed": "ok", "InService": "ok", "Approved": "ok", "NoIssuesFound": "ok",
    "Failed": "bad", "Rejected": "bad", "Error": "bad", "NonRetryableError": "bad",
    "Executing": "run", "InProgress": "run", "Starting": "run", "Creating": "run", "Updating": "run",
    "Stopping": "warn", "Stopped": "warn", "IssuesFound": "warn", "PendingManualApproval": "warn",
    "NotTaken": "off", "NotExecuted": "off", "NotStarted": "idle",
}


class Markup(str):
    """A string that is already HTML."""

    def __add__(self, other: str) -> Markup:
        return Markup(str.__add__(self, e(other)))


def e(value: Any) -> Markup:
    """``value`` as HTML text (escaped, quotes included); :class:`Markup` passes through."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[Any], sep: str = "") -> Markup:
    return Markup(sep.join(e(p) for p in parts))


def url(path: str, **query: Any) -> str:
    """``path?query`` (``None`` values left out; lists repeat the key)."""
    pairs = [(k, v) for k, v in query.items() if v is not None]
    flat = [(k, x) for k, v in pairs for x in (v if isinstance(v, list | tuple) else [v])]
    return f"{path}?{urlencode(flat)}" if flat else path


def link(href: str, text: Any, **attrs: Any) -> Markup:
    extra = "".join(f' {k.rstrip("_").replace("_", "-")}="{e(v)}"' for k, v in attrs.items())
    return Markup(f'<a href="{e(href)}"{extra}>{e(text)}</a>')


def badge(status: Any, text: Any = None) -> Markup:
    css = STATUS_CLASSES.get(str(status), "idle")
    return Markup(f'<span class="badge {css}" data-status="{e(status)}">{e(text if text is not None else status)}'
                  "</span>")


def table(headers: Sequence[Any], rows: Iterable[Sequence[Any]], *, cls: str = "", id_: str | None = None,
          row_attrs: Sequence[Mapping[str, Any]] | None = None) -> Markup:
    """A table; a cell may be ``(value, sort_key)`` to sort by something else than its text."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        attrs = (row_attrs[index] if row_attrs and index < len(row_attrs) else {}) or {}
        extra = "".join(f' {k.rstrip("_").replace("_", "-")}="{e(v)}"' for k, v in attrs.items())
        cells = []
        for cell in row:
            if isinstance(cell, tuple):
                cells.append(f'<td data-sort="{e(cell[1])}">{e(cell[0])}</td>')
            else:
                cells.append(f"<td>{e(cell)}</td>")
        body.append(f"<tr{extra}>{''.join(cells)}</tr>")
    ident = f' id="{e(id_)}"' if id_ else ""
    return Markup(f'<table class="{e(cls)}"{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}'
                  "</tbody></table>")


def kv(pairs: Iterable[tuple[Any, Any]], *, cls: str = "kv") -> Markup:
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in pairs)
    return Markup(f'<table class="{e(cls)}"><tbody>{rows}</tbody></table>')


def pre(text: Any, cls: str = "") -> Markup:
    return Markup(f'<pre class="{e(cls)}">{e(text)}</pre>')


def json_block(value: Any) -> Markup:
    return pre(json.dumps(value, indent=2, default=str, sort_keys=True), "json")


def section(title: Any, body: Any, *, id_: str | None = None, cls: str = "") -> Markup:
    ident = f' id="{e(id_)}"' if id_ else ""
    return Markup(f'<section class="{e(cls)}"{ident}><h2>{e(title)}</h2>{e(body)}</section>')


def details(summary: Any, body: Any, *, open_: bool = False) -> Markup:
    return Markup(f"<details{' open' if open_ else ''}><summary>{e(summary)}</summary>{e(body)}</details>")


def note(text: Any, cls: str = "note") -> Markup:
    return Markup(f'<p class="{e(cls)}">{e(text)}</p>')


def hidden(name: str, value: Any) -> Markup:
    return Markup(f'<input type="hidden" name="{e(name)}" value="{e(value)}">')


def when(value: Any) -> str:
    """A datetime (or epoch seconds) as local ``YYYY-MM-DD HH:MM:SS``."""
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, tz=UTC)
    if not isinstance(value, datetime):
        return "" if value is None else str(value)
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: float | None) -> str:
    if value is None:
        return ""
    value = max(0, int(round(value)))
    if value >= 3600:
        return f"{value // 3600}h{value % 3600 // 60:02d}m"
    return f"{value // 60}m{value % 60:02d}s" if value >= 60 else f"{value}s"


def number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else (
        "" if value is None else str(value))


def page(title: str, active: str, body: Any, *, token: str, poll: str | None = None,
         signature: str = "", flash: str | None = None) -> bytes:
    """The whole document: head (CSS and JS from /static, nothing external), nav, flash message, content."""
    nav = "".join(f'<a href="{href}" class="{"active" if key == active else ""}">{label}</a>'
                  for key, href, label in NAV)
    poll_attrs = f' data-poll="{e(poll)}" data-signature="{e(signature)}"' if poll else ""
    message = f'<div class="flash">{e(flash)}</div>' if flash else ""
    doc = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)} · local Studio</title>'
           f'<meta name="viewport" content="width=device-width, initial-scale=1">'
           f'<meta name="ui-token" content="{e(token)}">'
           '<link rel="stylesheet" href="/static/ui.css"><script src="/static/ui.js" defer></script></head>'
           f'<body data-page="{e(active)}"{poll_attrs}><header><span class="brand">local Studio</span>'
           f'<nav>{nav}</nav></header><main id="content">{message}<h1>{e(title)}</h1>{e(body)}</main>'
           '</body></html>')
    return doc.encode("utf-8")
