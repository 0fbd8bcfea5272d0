"""Per-key caps on job creation: 429 for one key's excess, 503 for the replica's."""

from __future__ import annotations

import pytest

from serve_app.api.quotas import CreationSlots, check_job_size, queue_full
from serve_app.errors import Overloaded, TooManyRequests


def test_one_key_may_hold_a_few_creation_slots_and_all_keys_a_few_more() -> None:
    slots = CreationSlots(per_owner=2, total=3)
    slots.acquire("alice")
    slots.acquire("alice")
    with pytest.raises(TooManyRequests) as caught:
        slots.acquire("alice")
    assert caught.value.status_code == 429 and caught.value.retry_after_s > 0
    slots.acquire("bob")
    with pytest.raises(Overloaded):  # the replica's total, whoever asks
        slots.acquire("carol")
    slots.release("alice")
    slots.acquire("carol")
    for owner in ("alice", "bob", "carol"):
        slots.release(owner)
    slots.acquire("alice")  # all released: nothing leaked


def test_a_full_queue_is_a_429_that_says_how_full() -> None:
    refused = queue_full(backlog=250_001, new_items=50_000, limit=300_000)
    assert isinstance(refused, TooManyRequests) and refused.status_code == 429
    assert refused.details == [
        {"type": "too_many_queued_items", "limit": 300_000, "queued": 250_001}
    ]


def test_a_slot_handed_to_its_creation_stays_taken_until_the_creation_ends() -> None:
    """A client that disconnects leaves its creation running (a thread or a worker
    process): releasing its slot when the request ended let one key run five creations
    at once with a limit of one, all past the queued-items check together."""
    import asyncio

    from serve_app.api.quotas import HeldSlot

    async def scenario() -> None:
        slots = CreationSlots(per_owner=1, total=4)
        slots.acquire("alice")
        held = HeldSlot(slots, "alice")
        work: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        held.until_done(work)
        held.request_done()  # the client went away
        with pytest.raises(TooManyRequests):
            slots.acquire("alice")  # its creation still runs
        work.set_exception(RuntimeError("the creation failed"))  # nobody awaits it
        await asyncio.sleep(0)
        slots.acquire("alice")  # free again
        plain = HeldSlot(slots, "bob")
        slots.acquire("bob")
        plain.request_done()  # never handed over: released with the request
        slots.acquire("bob")

    asyncio.run(scenario())


def test_a_job_larger_than_the_whole_quota_is_a_422_not_a_retry_forever() -> None:
    """With jobs.max_items above max_queued_items_per_key, such a job got 429 "retry
    later" even with nothing queued: no retry could ever succeed."""
    from serve_app.errors import InvalidInput

    with pytest.raises(InvalidInput) as caught:
        check_job_size(new_items=300_001, limit=300_000)
    assert caught.value.status_code == 422
    assert caught.value.details == [
        {"type": "job_larger_than_queue_quota", "limit": 300_000, "items": 300_001}
    ]
    check_job_size(new_items=300_000, limit=300_000)  # exactly the quota fits
