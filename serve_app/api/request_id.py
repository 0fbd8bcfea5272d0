"""Request ids: take a sane ``X-Request-ID`` from the caller or make one; answer exactly one.

Ray Serve puts its own middleware in front of every application: it reads the request's
``X-Request-ID`` into the request context (which tags the replicas' log lines and travels
with every handle call to the Model and the FeatureFetcher) and echoes it on the response.
It echoes whatever the client sent, so an app-level middleware that sanitises and appends
its own header answers with two.

The fix is to sanitise *before* Ray reads the header: :func:`edge_middlewares` is the hook
Ray calls for middlewares placed in front of its own (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``,
set for the replicas by the application's ``runtime_env`` in ``configs/config.yaml``). Then
Ray's request context, its echo, the replicas' logs and our error bodies all carry the same
sanitised id, and there is exactly one header.

The same hook drops the headers Ray reads to control a request, which are meant for
callers inside the cluster, not the public: ``X-Request-Timeout-Seconds: 0`` turned off
``request_timeout_s`` for that request (so a slow upload held its slots for as long as
HAProxy's hour of client inactivity), ``X-Request-Disconnect-Disabled`` kept work going
for callers that had left, and the multiplexing and session ids steer routing.
"""

from __future__ import annotations

import logging
import os
import re
import uuid

from fastapi import Request
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

HEADER = b"x-request-id"
# Ray Serve's per-request control headers, compared as Ray does: lower case, "-" as "_"
# (as bytes: this runs for every header of every request). The session header's name is
# Ray's setting (RAY_SERVE_SESSION_ID_HEADER_KEY).
_SESSION_HEADER = os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", "x-session-id")
_SERVE_CONTROLS = frozenset(
    {
        b"x_request_timeout_seconds",
        b"x_request_disconnect_disabled",
        b"serve_multiplexed_model_id",
        _SESSION_HEADER.lower().replace("-", "_").encode("latin-1"),
    }
)
# The value of RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH.
EDGE_CALLBACK = "serve_app.api.request_id:edge_middlewares"

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
logger = logging.getLogger("serve_app.request_id")


def sanitize(raw: bytes | None) -> str:
    """The caller's id if it is sane (1-64 of ``A-Za-z0-9._-``), else a fresh uuid4 hex."""
    if raw is not None:
        given = raw.decode("latin-1")
        if _REQUEST_ID.match(given):
            return given
    return uuid.uuid4().hex


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _serve_control(name: bytes) -> bool:
    return name.lower().replace(b"-", b"_") in _SERVE_CONTROLS


class EdgeRequestIdMiddleware:
    """In front of Ray's own middleware: leave exactly one sane ``X-Request-ID`` header in
    the request, which Ray then uses everywhere and echoes once, and none of Serve's
    per-request control headers (module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = scope["headers"]
            if any(_serve_control(key) for key, _ in headers):
                headers = scope["headers"] = [(k, v) for k, v in headers if not _serve_control(k)]
            given = [value for key, value in headers if key == HEADER]
            request_id = sanitize(given[0] if given else None)
            if len(given) != 1 or given[0] != request_id.encode("latin-1"):
                kept = [(key, value) for key, value in headers if key != HEADER]
                scope["headers"] = [*kept, (HEADER, request_id.encode("latin-1"))]
        await self.app(scope, receive, send)


def edge_middlewares() -> list[Middleware]:
    """Ray's HTTP callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(EdgeRequestIdMiddleware)]


class RequestIdMiddleware:
    """Put the request's id on ``request.state`` for error bodies and logs.

    It does not add a response header: Ray's middleware in front already echoes the id it
    read (sanitised by :class:`EdgeRequestIdMiddleware`). A pure ASGI middleware:
    Starlette's BaseHTTPMiddleware costs a task per request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((value for key, value in scope["headers"] if key == HEADER), None)
        request_id = sanitize(raw)
        if raw is not None and raw != request_id.encode("latin-1") and not self._warned:
            self._warned = True
            logger.warning(
                "an unsanitised X-Request-ID reached the app: set "
                "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=%s for the Ingress replicas",
                EDGE_CALLBACK,
            )
        scope.setdefault("state", {})["request_id"] = request_id
        await self.app(scope, receive, send)
