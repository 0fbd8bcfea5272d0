"""CloseAfterUnreadBody: an answer sent before a large body arrived closes the connection
(the HAProxy side is tests/integration/test_haproxy_config.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve_app.api.body import UNTIMED_MAX_BYTES, CloseAfterUnreadBody

Headers = list[tuple[bytes, bytes]]


async def _answer_at_once(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 401, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _read_then_answer(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await _answer_at_once(scope, receive, send)


def _answer_headers(app: Any, headers: Headers) -> Headers:
    parts = [
        {"type": "http.request", "body": b"x", "more_body": True},
        {"type": "http.request", "body": b"y", "more_body": False},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return parts.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "headers": headers}
    asyncio.run(CloseAfterUnreadBody(app)(scope, receive, send))
    return list(sent[0]["headers"])


LARGE = str(UNTIMED_MAX_BYTES + 1).encode()


@pytest.mark.parametrize(
    "headers",
    [[(b"content-length", LARGE)], [(b"transfer-encoding", b"chunked")]],
)
def test_an_answer_before_a_large_body_closes(headers: Headers) -> None:
    assert (b"connection", b"close") in _answer_headers(_answer_at_once, headers)


def test_an_answer_after_the_whole_body_keeps_the_connection() -> None:
    headers = [(b"content-length", LARGE)]
    assert (b"connection", b"close") not in _answer_headers(_read_then_answer, headers)


@pytest.mark.parametrize(
    "headers",
    [[], [(b"content-length", str(UNTIMED_MAX_BYTES).encode())]],
)
def test_small_bodies_are_left_alone(headers: Headers) -> None:
    """HAProxy forwards them whole: they are in the server's buffer already."""
    assert (b"connection", b"close") not in _answer_headers(_answer_at_once, headers)


def test_a_content_length_of_non_ascii_digits_is_not_a_500() -> None:
    """``"²".isdigit()`` is true and ``int("²")`` raises: such a header was a ValueError
    (a 500 had the HTTP parser in front ever let it through); now it is ignored and the
    body is read and bounded as it streams."""
    from starlette.requests import Request

    from serve_app.api.body import read_body_bytes

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    headers = [(b"content-length", "²".encode("latin-1"))]
    request = Request({"type": "http", "method": "POST", "headers": headers}, receive)
    assert asyncio.run(read_body_bytes(request, max_bytes=1024, timeout_s=1.0)) == b"{}"
