"""405 answers carry ``Allow`` (RFC 9110 requires it): which methods the path does accept.

Starlette raises the 405 with the ``Allow`` header already computed from the route; a
handler for status 405 (looked up before the generic HTTPException handler) keeps it on
the usual ``{"error": ...}`` answer.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.api.errors import error_response
from serve_app.api.request_id import request_id_of
from serve_app.errors import ClientError


class MethodNotAllowed(ClientError):
    status_code = 405
    code = "method_not_allowed"


def install_method_not_allowed(app: FastAPI) -> None:
    @app.exception_handler(405)
    async def _method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
        detail = exc.detail if isinstance(exc, StarletteHTTPException) else "Method Not Allowed"
        response = error_response(MethodNotAllowed(str(detail)), request_id_of(request))
        allow = (getattr(exc, "headers", None) or {}).get("Allow")
        if allow:
            response.headers["Allow"] = allow
        return response
