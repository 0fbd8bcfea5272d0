"""The scoring routes' JSON responses, rendered once by pydantic-core's serializer.

A route that returns a plain dict has FastAPI validate it against its ``response_model``
and serialise it again: for a 32-item batch that is 150 us of the Ingress's time per
request, three times what rendering the dict costs (``pydantic_core.to_json``, Rust).
The scoring routes build their answers from typed parts (``scoring/answers.py``) and
return this response instead; their ``response_model`` still documents the shape, and the
schemathesis test checks every answer against it.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic_core import to_json


class ScoreResponse(JSONResponse):
    """``application/json`` rendered by pydantic-core: compact, UTF-8, no re-validation."""

    def render(self, content: Any) -> bytes:
        return to_json(content)
