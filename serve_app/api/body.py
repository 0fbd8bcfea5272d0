"""Reading a JSON body with a size bound: 413 before reading when ``Content-Length`` is
too large, and while streaming when it lies (or with chunked bodies).

A large body (a 16 MB job) is parsed in a worker thread: parsing it on the event loop
would stall every other request of the replica, ``/healthz`` included, for a second.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import (
    BodyTimeout,
    InvalidInput,
    MalformedJson,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from serve_app.streams import read_at_most

# Bodies up to this size are parsed inline (cheaper than a thread hop); larger off-loop.
PARSE_INLINE_MAX_BYTES = 64 * 1024
# A body declared this small is read with no timer of ours (asyncio.wait_for costs 10-15
# us per request): HAProxy holds it whole before forwarding it (`option
# http-buffer-request`, within `timeout http-request` 10 s), and Serve's
# request_timeout_s bounds every request, since its per-request override is dropped at
# the edge (request_id.py).
UNTIMED_MAX_BYTES = 16 * 1024


async def read_json_body(request: Request, max_bytes: int, timeout_s: float) -> Any:
    """The parsed JSON body, or a 413 (too large) / 408 (too slow) / 400 (not JSON) / 415
    (wrong type)."""
    raw = await read_body_bytes(request, max_bytes, timeout_s)
    if len(raw) <= PARSE_INLINE_MAX_BYTES:
        return parse_json(raw)
    return await asyncio.to_thread(parse_json, raw)


async def read_body_bytes(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The raw body, or a 413 (too large, declared or streamed) / 408 (not whole within
    ``timeout_s``) / 415 (wrong type)."""
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type.split(";")[0].lower():
        raise UnsupportedMediaType(f"content-type must be application/json, not {content_type!r}")
    header = request.headers.get("content-length")
    # isascii: str.isdigit() also passes "²", which int() refuses (a 500). The replicas'
    # HTTP parser refuses such a header first; this must not depend on it.
    declared = int(header) if header is not None and header.isascii() and header.isdigit() else None
    if declared is not None and declared > max_bytes:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {max_bytes}")
    reading = read_at_most(
        request.stream(),
        max_bytes,
        lambda: PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes"),
    )
    if declared is not None and declared <= UNTIMED_MAX_BYTES:
        return await reading
    try:
        return await asyncio.wait_for(reading, timeout_s)
    except TimeoutError as exc:
        raise BodyTimeout(f"the body did not arrive whole within {timeout_s:g} s") from exc


def parse_json(raw: bytes) -> Any:
    """The parsed body, or a 422 (empty) / 400 (not JSON)."""
    if not raw.strip():
        raise InvalidInput("request body is empty; send a JSON object", [{"type": "empty_body"}])
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # nesting bombs too
        raise MalformedJson(f"body is not valid JSON: {exc}") from exc


class CloseAfterUnreadBody:
    """``Connection: close`` on an answer sent before a large request body has arrived.

    Answered early (401, 404, 413, 415, 408, a refusal), a request's unread body would
    still be received and thrown away for as long as the client takes to send it, and
    HAProxy keeps the request's slot of the replica until the body has come whole: 300
    stalled uploads without a key held every slot, and HAProxy answered 503 to everyone
    for minutes. Once the replica has closed, HAProxy drops a client that sends more at
    its next byte; one that falls silent is dropped after HAProxy's ``timeout client``
    (configs/serve.env). Only bodies over :data:`UNTIMED_MAX_BYTES` or of unknown length
    are watched: smaller ones HAProxy forwards whole, so they are in the server's buffer
    already, and their connections stay open for the next request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _body_may_trickle(scope["headers"]):
            await self.app(scope, receive, send)
            return
        body_done = False

        async def receive_watched() -> Message:
            nonlocal body_done
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True  # the last part, or the client went away
            return message

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_done:
                headers = [*message.get("headers", ()), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive_watched, send_closing)


def _body_may_trickle(headers: list[tuple[bytes, bytes]]) -> bool:
    """A body declared over UNTIMED_MAX_BYTES, or chunked (of unknown length)."""
    for name, value in headers:
        if name == b"content-length":
            return not value.isdigit() or int(value) > UNTIMED_MAX_BYTES
        if name == b"transfer-encoding":
            return True
    return False
