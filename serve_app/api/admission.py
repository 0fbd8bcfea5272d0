"""Admission control: shed load early with 503 + ``Retry-After`` instead of queueing.

A request past ``limits.max_inflight_requests`` in one Ingress replica is refused at
once: answering "retry shortly" in a millisecond beats queueing until every caller times
out. Each replica runs one event loop, so a plain counter needs no lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from serve_app.errors import Overloaded


class Admission:
    def __init__(self, max_inflight: int) -> None:
        self.max_inflight = max_inflight
        self.inflight = 0

    @contextmanager
    def admit(self) -> Iterator[None]:
        if self.inflight >= self.max_inflight:
            raise Overloaded("too many requests in progress; retry shortly")
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
