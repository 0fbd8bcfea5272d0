"""Per-key caps on job creation: what one API key may have in flight on a replica.

A job body may be 16 MB and 100,000 items; parsing and validating one costs hundreds of
MiB for a moment. Without a cap, one key posting several at once exhausts the Ingress's
memory for everybody. So each key may create at most ``max_concurrent_creations_per_key``
jobs at once per replica (the slot is taken *before* the body is read), and may have at
most ``max_queued_items_per_key`` items waiting in the queue; beyond either, 429 with
``Retry-After``. All keys together may create ``max_concurrent_creations`` at once per
replica; beyond that the replica is busy: 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request

from serve_app.api.deps import Owner
from serve_app.errors import InvalidInput, Overloaded, RetainedItemsFull, TooManyRequests


class CreationSlots:
    """Counts job creations in progress per owner on this replica (one event loop)."""

    def __init__(self, per_owner: int, total: int) -> None:
        self.per_owner = per_owner
        self.total = total
        self._in_progress: Counter[str] = Counter()

    def acquire(self, owner: str) -> None:
        if self._in_progress.total() >= self.total:
            raise Overloaded(
                f"this replica is already creating {self.total} jobs; retry shortly",
                [{"type": "too_many_concurrent_submissions", "limit": self.total}],
            )
        if self._in_progress[owner] >= self.per_owner:
            raise TooManyRequests(
                f"this API key already has {self.per_owner} job submission(s) in progress; "
                "retry when one has been answered",
                [{"type": "too_many_concurrent_submissions", "limit": self.per_owner}],
            )
        self._in_progress[owner] += 1

    def release(self, owner: str) -> None:
        self._in_progress[owner] -= 1
        if self._in_progress[owner] <= 0:
            del self._in_progress[owner]


def install_creation_slots(state: object, slots: CreationSlots) -> None:
    """Make ``slots`` the replica's (the Ingress calls this when it starts)."""
    state.job_creation_slots = slots  # type: ignore[attr-defined]


class HeldSlot:
    """One creation slot, released when the request ends, or when the work it is handed
    to ends if that is later: a client that disconnects leaves its creation running (in a
    thread or a worker process), and its slot must stay taken until that is done."""

    def __init__(self, slots: CreationSlots, owner: str) -> None:
        self._slots = slots
        self._owner = owner
        self._handed_over = False

    def until_done(self, work: asyncio.Future[Any]) -> None:
        self._handed_over = True
        work.add_done_callback(self._work_done)

    def _work_done(self, work: asyncio.Future[Any]) -> None:
        self._slots.release(self._owner)
        if not work.cancelled():
            work.exception()  # retrieved: a caller that went away leaves no warning

    def request_done(self) -> None:
        if not self._handed_over:
            self._slots.release(self._owner)


async def creation_slot(request: Request, owner: Owner) -> AsyncIterator[HeldSlot]:
    """Hold one of ``owner``'s creation slots for the whole request, body reading included
    (and for the creation itself, when the handler hands it over: :class:`HeldSlot`)."""
    slots: CreationSlots = request.app.state.job_creation_slots
    slots.acquire(owner)
    held = HeldSlot(slots, owner)
    try:
        yield held
    finally:
        held.request_done()


def check_job_size(new_items: int, limit: int) -> None:
    """422 when a job's ``new_items`` are more than the key's whole queue quota ``limit``
    (a 429's "retry later" was a promise such a job could never see kept)."""
    if new_items > limit:
        raise InvalidInput(
            f"this job has {new_items} valid items, more than this API key may have queued "
            f"at all ({limit}): split it into smaller jobs",
            [{"type": "job_larger_than_queue_quota", "limit": limit, "items": new_items}],
        )


def storage_full(retained: int, new_items: int, limit: int) -> RetainedItemsFull:
    """The 429 for a key whose kept jobs hold too many items."""
    return RetainedItemsFull(
        f"this API key's jobs still hold {retained} items; {new_items} more would exceed "
        f"its limit of {limit}. Finished jobs are purged after the result retention time",
        [{"type": "too_many_retained_items", "limit": limit, "retained": retained}],
    )


def queue_full(backlog: int, new_items: int, limit: int) -> TooManyRequests:
    """The 429 for ``new_items`` that would take the key's queued items past ``limit``
    (the queue decides that in its insert's transaction: ``BacklogFull``)."""
    return TooManyRequests(
        f"this API key has {backlog} items waiting in the queue; {new_items} more would "
        f"exceed its limit of {limit}. Retry when some jobs have finished",
        [{"type": "too_many_queued_items", "limit": limit, "queued": backlog}],
    )


CreationSlot = Annotated[HeldSlot, Depends(creation_slot)]
