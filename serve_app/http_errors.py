"""Where bad inputs and failures become HTTP answers.

Every error leaves as ``{"error": {"code", "message", "details"}, "request_id"}`` with a
4xx for the caller's mistakes and a 503 with ``Retry-After`` for overload or outages.
Also here: the request-id middleware and the bounded JSON body reader (413 before the
body is read when ``Content-Length`` is too large, and while streaming when it lies).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import (
    ClientError,
    InvalidInput,
    MalformedJson,
    PayloadTooLarge,
    ServeAppError,
    ServiceError,
    Unauthorized,
    UnsupportedMediaType,
)

logger = logging.getLogger("serve_app.http")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


class RequestIdMiddleware:
    """Take a sane ``X-Request-ID`` from the caller or make one; echo it on the response.

    A pure ASGI middleware: Starlette's BaseHTTPMiddleware costs a task per request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append(
                    (b"x-request-id", request_id.encode("latin-1"))
                )
            await send(message)

        await self.app(scope, receive, send_with_id)


def error_response(exc: ServeAppError, request_id: str | None) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, ServiceError):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        {"error": exc.to_dict(), "request_id": request_id},
        status_code=exc.status_code,
        headers=headers,
    )


def validation_details(exc: ValidationError | RequestValidationError) -> list[dict[str, Any]]:
    """Pydantic errors without echoing the input back (it may be large or sensitive)."""
    return [
        {"loc": list(err.get("loc", ())), "type": err.get("type"), "msg": err.get("msg")}
        for err in exc.errors()
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeAppError)
    async def _app_error(request: Request, exc: ServeAppError) -> JSONResponse:
        if not isinstance(exc, ClientError):
            logger.warning("request %s failed: %s", request_id_of(request), exc.message)
        return error_response(exc, request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = InvalidInput("request is not valid", validation_details(exc))
        return error_response(error, request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ClientError(str(exc.detail))
        error.status_code = exc.status_code
        error.code = {404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        return error_response(error, request_id_of(request))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error in request %s", request_id_of(request))
        error = ServeAppError("internal error; quote the request_id when reporting it")
        return error_response(error, request_id_of(request))


async def read_json_body(request: Request, max_bytes: int) -> Any:
    """The parsed JSON body, or a 413 (too large) / 400 (not JSON) / 415 (wrong type)."""
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type.split(";")[0].lower():
        raise UnsupportedMediaType(f"content-type must be application/json, not {content_type!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise InvalidInput("request body is empty; send a JSON object", [{"type": "empty_body"}])
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # nesting bombs too
        raise MalformedJson(f"body is not valid JSON: {exc}") from exc
