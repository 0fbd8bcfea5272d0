"""Where failures become HTTP answers.

Every error leaves as ``{"error": {"code", "message", "details"}, "request_id"}`` with a
4xx for the caller's mistakes and a 503 with ``Retry-After`` for overload or outages.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.api.request_id import request_id_of
from serve_app.errors import ClientError, InvalidInput, ServeAppError, ServiceError, Unauthorized

logger = logging.getLogger("serve_app.http")


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


# Enough to fix a request; more made a 2 MB body's answer 19 MB (one per unknown key).
MAX_ERROR_DETAILS = 20


def validation_details(exc: ValidationError | RequestValidationError) -> list[dict[str, Any]]:
    """Pydantic's first errors without echoing the input back (it may be large or
    sensitive), and how many more there were."""
    errors = list(exc.errors())
    details: list[dict[str, Any]] = [
        {"loc": list(err.get("loc", ())), "type": err.get("type"), "msg": err.get("msg")}
        for err in errors[:MAX_ERROR_DETAILS]
    ]
    if len(errors) > MAX_ERROR_DETAILS:
        more = len(errors) - MAX_ERROR_DETAILS
        details.append({"type": "more_errors", "count": more, "msg": f"and {more} more"})
    return details


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
        response = error_response(error, request_id_of(request))
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error in request %s", request_id_of(request))
        error = ServeAppError("internal error; quote the request_id when reporting it")
        return error_response(error, request_id_of(request))
