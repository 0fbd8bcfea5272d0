"""What a route needs, as ``Annotated`` dependencies: its signature names them, its body
reads as the business logic only.

* :data:`Owner`: the caller's identity from ``Authorization: Bearer`` (401 otherwise);
* :data:`Admitted`: a slot under admission control, admitted while the measured queueing
  delay is under ``limits.max_queue_delay_s`` (503 + a measured ``Retry-After`` otherwise);
* :data:`JsonBody` / :data:`JobJsonBody`: the JSON body, read with a size bound.

They find the replica's :class:`ApiContext` on ``app.state``: the Ingress sets it when the
replica starts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serve_app.api.admission import SCOPE_KEY as ADMITTED_IN_SCOPE
from serve_app.api.admission import Admission
from serve_app.api.auth import KeyChecker
from serve_app.api.body import read_json_body
from serve_app.api.uploads import OWNER_IN_SCOPE, UploadSlots
from serve_app.config import AppConfig


@dataclass(frozen=True)
class ApiContext:
    """Per-replica state the dependencies use."""

    config: AppConfig
    auth: KeyChecker
    admission: Admission
    uploads: UploadSlots | None = None  # per-key bodies arriving; None with auth off


def install_context(app: FastAPI, context: ApiContext) -> None:
    app.state.api_context = context


def _context(request: Request) -> ApiContext:
    return request.app.state.api_context


_bearer = HTTPBearer(auto_error=False, description="An API key from SERVE_APP_API_KEYS.")


# Every dependency is ``async``: FastAPI runs plain ``def`` ones in a thread pool, which
# costs a thread hop per request and would break admission's single-threaded counter.


async def get_owner(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    found = request.scope.get(OWNER_IN_SCOPE)  # checked by the admission middleware
    if found is not None:
        return found
    return _context(request).auth.require(credentials.credentials if credentials else None)


async def admitted(request: Request) -> AsyncIterator[None]:
    if request.scope.get(ADMITTED_IN_SCOPE):  # AdmissionMiddleware holds the slot
        yield
        return
    with _context(request).admission.admit():
        yield


async def json_body(request: Request) -> Any:
    config = _context(request).config
    return await read_json_body(
        request, config.limits.max_body_bytes, config.limits.body_read_timeout_s
    )


async def job_json_body(request: Request) -> Any:
    config = _context(request).config
    return await read_json_body(
        request, config.jobs.max_body_bytes, config.limits.body_read_timeout_s
    )


Owner = Annotated[str, Depends(get_owner)]
Admitted = Annotated[None, Depends(admitted)]
JsonBody = Annotated[Any, Depends(json_body)]
JobJsonBody = Annotated[Any, Depends(job_json_body)]
