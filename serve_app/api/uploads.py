"""Slow uploads, counted per key: one key's stalled bodies must not fill a replica.

A request is admitted at its headers and counts against every caller's admission until
its body has arrived (``Admission.pending``, see :mod:`serve_app.api.admission`). So a
holder of one valid key who started many uploads and trickled their bodies held the
replica's backstop for ``limits.body_read_timeout_s`` at a time: 200 stalled
``POST /v1/predict/batch`` bodies and other keys got 503 for up to 20 s (attacker
review). Each key may now have ``limits.max_uploads_per_key`` bodies that have been
arriving for over :data:`SLOW_UPLOAD_S` per Ingress replica; its next request is a 429
for that key alone.

Only *slow* uploads count: a burst of one key's large batches has every body arriving at
once for a few milliseconds (past HAProxy's 16 KiB buffer they stream), and counting
those refused most of a 64-request burst that the replica could serve.

The key is the caller's API key, checked here (one SHA-256 and a constant-time compare
per stored key; the route's auth then reuses the result): keyed by the raw header,
``bearer K`` and ``Bearer  K`` were separate callers with separate caps. A request
without a valid key is not counted: it is refused with 401 before its body is read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from starlette.types import Scope

from serve_app.errors import TooManyRequests

# An upload still arriving after this long counts against its key's cap.
SLOW_UPLOAD_S = 1.0
# Where the middleware leaves the owner it found, for the route's auth to reuse.
OWNER_IN_SCOPE = "serve_app.owner"


class TooManyUploads(TooManyRequests):
    """429: this key already has its cap of slow uploads arriving at this replica."""

    retry_after_s = 1


class UploadSlots:
    """The bodies each key has arriving, with their start times; one event loop, no lock."""

    def __init__(
        self,
        per_key: int,
        slow_s: float = SLOW_UPLOAD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_key = per_key
        self.slow_s = slow_s
        self._clock = clock
        # owner -> {token: start}, oldest first (a dict keeps insertion order)
        self._arriving: dict[str, dict[object, float]] = {}
        self.refused = 0

    def take(self, owner: str) -> object:
        """Count one more body arriving for ``owner`` (give the token back when it is in);
        :class:`TooManyUploads` when ``owner`` already has its cap of slow ones."""
        now = self._clock()
        uploads = self._arriving.setdefault(owner, {})
        slow = self._slow(uploads, now)
        if slow >= self.per_key:
            self.refused += 1
            raise TooManyUploads(
                f"this key already has {slow} request bodies arriving slowly (for over "
                f"{self.slow_s:g} s) at this replica; send more when they are in",
                [{"type": "uploads_per_key", "limit": self.per_key}],
            )
        token = object()
        uploads[token] = now
        return token

    def _slow(self, uploads: dict[object, float], now: float) -> int:
        """How many of ``uploads`` started over ``slow_s`` ago (counted up to the cap)."""
        cutoff = now - self.slow_s
        count = 0
        for started in uploads.values():  # oldest first: stop at the first young one
            if started > cutoff or count >= self.per_key:
                break
            count += 1
        return count

    def give_back(self, owner: str, token: object) -> None:
        uploads = self._arriving[owner]
        del uploads[token]
        if not uploads:
            del self._arriving[owner]  # idle keys cost nothing

    @property
    def arriving(self) -> int:
        return sum(len(uploads) for uploads in self._arriving.values())


class _Keys(Protocol):
    def owner_of(self, presented: str | None) -> str | None: ...


@dataclass
class Upload:
    """One admitted request's body, counted for its key until :meth:`end`."""

    slots: UploadSlots
    owner: str
    token: object
    ended: bool = False

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.slots.give_back(self.owner, self.token)


def start_upload(scope: Scope, slots: UploadSlots | None, keys: _Keys | None) -> Upload | None:
    """Count this request's body for its key (None: auth off, or no valid key: such a
    request gets 401 before its body is read); :class:`TooManyUploads` at the cap."""
    if slots is None or keys is None:
        return None
    owner = keys.owner_of(bearer_token(scope))
    if owner is None:
        return None
    scope[OWNER_IN_SCOPE] = owner
    return Upload(slots, owner, slots.take(owner))


def bearer_token(scope: Scope) -> str | None:
    """The token of ``Authorization: Bearer <token>``, read as FastAPI's ``HTTPBearer``
    reads it (any case of the scheme, the token stripped)."""
    raw = next((value for key, value in scope["headers"] if key == b"authorization"), b"")
    scheme, _, token = raw.decode("latin-1").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
