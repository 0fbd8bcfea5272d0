"""Bodies still arriving, counted per caller: one key's slow uploads must not fill a replica.

A request is admitted at its headers and counts against every caller's admission until
its body has arrived (``Admission.pending``, see :mod:`serve_app.api.admission`). So a
holder of one valid key who starts many uploads and trickles their bodies held the
replica's backstop for ``limits.body_read_timeout_s`` at a time: 200 stalled
``POST /v1/predict/batch`` bodies and other keys got 503 for up to 20 s (attacker
review). Each caller may now have ``limits.max_uploads_per_key`` bodies arriving per
Ingress replica; one more is a 429 for that caller alone.

The caller is told by its ``Authorization`` header, before the key is checked (the
middleware runs ahead of routing and auth, where a refusal is cheap). That needs no
trust: an invalid key is refused with 401 before its body is read, so a made-up token
holds nothing for long. Only a digest of the header is kept, never the key.
"""

from __future__ import annotations

import hashlib

from starlette.types import Scope

from serve_app.errors import TooManyRequests


class TooManyUploads(TooManyRequests):
    """429: this caller already has its cap of bodies arriving at this replica."""

    retry_after_s = 1


def caller_of(scope: Scope) -> bytes:
    """A digest of the request's ``Authorization`` header (empty header: one caller)."""
    header = next((value for key, value in scope["headers"] if key == b"authorization"), b"")
    return hashlib.sha256(header).digest()


class UploadSlots:
    """How many bodies each caller has arriving; one event loop, so no lock."""

    def __init__(self, per_caller: int) -> None:
        self.per_caller = per_caller
        self._arriving: dict[bytes, int] = {}
        self.refused = 0

    def take(self, caller: bytes) -> None:
        """Count one more body arriving for ``caller``; :class:`TooManyUploads` at the cap."""
        count = self._arriving.get(caller, 0)
        if count >= self.per_caller:
            self.refused += 1
            raise TooManyUploads(
                f"this key already has {count} request bodies arriving at this replica; "
                "send the rest when they are in",
                [{"type": "uploads_per_key", "limit": self.per_caller}],
            )
        self._arriving[caller] = count + 1

    def give_back(self, caller: bytes) -> None:
        count = self._arriving[caller] - 1
        if count:
            self._arriving[caller] = count
        else:
            del self._arriving[caller]  # idle callers cost nothing

    @property
    def arriving(self) -> int:
        return sum(self._arriving.values())
