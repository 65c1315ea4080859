"""Requests, responses and the route table of the UI (the page modules register their routes here)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from pipelines.local.ui.reader import Reader


class HttpError(Exception):
    """An answer other than 200, with its reason (shown to the user as text)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def bad_request(reason: str) -> HttpError:
    return HttpError(400, reason)


def not_found(reason: str) -> HttpError:
    return HttpError(404, reason)


@dataclass
class App:
    """What every handler gets: the reader (boto3 clients, caches) and the per-server token POSTs must carry."""

    reader: Reader
    token: str


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any
    body: bytes = b""
    form: dict[str, list[str]] = field(default_factory=dict)

    def arg(self, name: str, default: str | None = None, *, required: bool = False) -> str | None:
        """A query (or form) value; ``required`` ones answer 400 when missing."""
        values = self.query.get(name) or self.form.get(name)
        if values and values[0] != "":
            return values[0]
        if required:
            raise bad_request(f"missing parameter {name!r}")
        return default

    def args(self, name: str) -> list[str]:
        return [v for v in (self.query.get(name) or self.form.get(name) or []) if v]

    def int_arg(self, name: str, default: int, low: int = 1, high: int = 1_000_000) -> int:
        raw = self.arg(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise bad_request(f"parameter {name!r} must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise bad_request(f"parameter {name!r} must be between {low} and {high}, got {value}")
        return value

    def parse_form(self) -> None:
        if "application/x-www-form-urlencoded" in (self.headers.get("Content-Type") or ""):
            self.form = parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)


@dataclass
class Response:
    status: int = 200
    body: Any = b""
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    length: int | None = None  # with a streamed body (an iterator of bytes)


def html_response(body: bytes) -> Response:
    return Response(200, body)


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, default=str).encode(), "application/json")


def redirect(location: str) -> Response:
    return Response(303, b"", "text/plain", {"Location": location})


Handler = Callable[[App, Request], Response]
ROUTES: dict[tuple[str, str], Handler] = {}


def route(method: str, path: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        ROUTES[(method, path)] = handler
        return handler

    return register
