import asyncio
import contextvars

import pytest

from serve_app.scoring.coalescer import CallCancelled, Coalescer


class SlowDouble:
    """A downstream call that takes a while, like a hop to another deployment."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.calls: list[list[int]] = []
        self.active = 0
        self.max_active = 0  # the most calls that were in flight at once

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        return [2 * item for item in items]


def test_concurrent_submits_share_few_calls_and_keep_their_results() -> None:
    async def scenario() -> tuple[SlowDouble, list[int]]:
        call = SlowDouble()
        coalescer: Coalescer[int, int] = Coalescer(
            call, max_batch_size=64, wait_s=0.002, max_in_flight=1
        )
        results = await asyncio.gather(*(coalescer.submit(i) for i in range(100)))
        return call, results

    call, results = asyncio.run(scenario())
    assert results == [2 * i for i in range(100)]
    assert len(call.calls) == 2 and [len(c) for c in call.calls] == [64, 36]
    assert call.max_active == 1


def test_batches_grow_while_a_call_is_in_flight() -> None:
    """Items arriving during a slow call are all taken by the next one."""

    async def scenario() -> SlowDouble:
        call = SlowDouble(delay=0.05)
        coalescer: Coalescer[int, int] = Coalescer(
            call, max_batch_size=1000, wait_s=0, max_in_flight=1
        )
        first = asyncio.create_task(coalescer.submit(0))
        await asyncio.sleep(0.01)
        rest = [asyncio.create_task(coalescer.submit(i)) for i in range(1, 40)]
        await asyncio.gather(first, *rest)
        return call

    call = asyncio.run(scenario())
    assert [len(c) for c in call.calls] == [1, 39]


def test_a_failing_call_fails_only_its_batch_and_the_worker_survives() -> None:
    async def scenario() -> tuple[list[object], int]:
        attempts = 0

        async def flaky(items: list[int]) -> list[int]:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise RuntimeError("downstream restarting")
            return items

        coalescer: Coalescer[int, int] = Coalescer(
            flaky, max_batch_size=64, wait_s=0.01, max_in_flight=1
        )
        failed = await asyncio.gather(
            *(coalescer.submit(i) for i in range(3)), return_exceptions=True
        )
        later = await coalescer.submit(7)
        return failed, later

    failed, later = asyncio.run(scenario())
    assert all(isinstance(outcome, RuntimeError) for outcome in failed)
    assert later == 7


def test_wrong_result_count_is_an_error_not_a_hang() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async def scenario() -> None:
        coalescer: Coalescer[int, int] = Coalescer(
            short, max_batch_size=64, wait_s=0.01, max_in_flight=2
        )
        with pytest.raises(RuntimeError, match="results for"):
            await asyncio.gather(coalescer.submit(1), coalescer.submit(2))

    asyncio.run(scenario())


def test_configure_changes_batch_size_and_slots() -> None:
    async def scenario() -> tuple[SlowDouble, int]:
        call = SlowDouble(delay=0.02)
        coalescer: Coalescer[int, int] = Coalescer(
            call, max_batch_size=64, wait_s=0.002, max_in_flight=1
        )
        await asyncio.gather(*(coalescer.submit(i) for i in range(20)))
        before = call.max_active
        call.max_active = 0
        coalescer.configure(max_batch_size=5, wait_s=0.005, max_in_flight=3)
        await asyncio.gather(*(coalescer.submit(i) for i in range(20)))
        return call, before

    call, before = asyncio.run(scenario())
    assert before == 1
    assert max(len(c) for c in call.calls[1:]) <= 5
    assert call.max_active == 3  # 4 batches of 5, at most 3 of them in flight at once


def test_entries_weighed_by_size_bound_the_items_per_call() -> None:
    """Lists of items (batch requests) share calls up to ``max_batch_size`` items; a list
    larger than that goes alone, and every caller gets its own results."""

    async def total(lists: list[list[int]]) -> list[int]:
        calls.append([len(items) for items in lists])
        return [sum(items) for items in lists]

    coalescer: Coalescer[list[int], int] = Coalescer(
        total, max_batch_size=10, wait_s=0, max_in_flight=1, size=len
    )

    async def scenario() -> list[int]:
        entries = [[1] * 4, [1] * 4, [1] * 4, [1] * 25, [1] * 2, [1] * 3]
        return await asyncio.gather(*(coalescer.submit(entry) for entry in entries))

    calls: list[list[int]] = []
    assert asyncio.run(scenario()) == [4, 4, 4, 25, 2, 3]
    assert calls == [[4, 4], [4], [25], [2, 3]]
    assert (coalescer.batches, coalescer.items) == (4, 42)  # items, not entries


def test_a_shared_call_cancelled_under_its_callers_fails_them_and_the_worker_lives() -> None:
    """Awaiting a Ray response raises CancelledError when Serve cancels its routing. That
    killed the worker: the batch's callers hung, and so did every later request."""
    calls = 0

    async def call(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 1:
            raise asyncio.CancelledError()
        return [item * 2 for item in items]

    async def scenario() -> None:
        coalescer = Coalescer(call, max_batch_size=64, wait_s=0.002, max_in_flight=1)
        first = await asyncio.wait_for(
            asyncio.gather(*(coalescer.submit(i) for i in range(3)), return_exceptions=True), 2
        )
        assert all(isinstance(outcome, CallCancelled) for outcome in first), first
        assert first[0].status_code == 503
        assert await asyncio.wait_for(coalescer.submit(7), 2) == 14  # the worker lives on

    asyncio.run(scenario())


def test_shared_calls_run_in_no_callers_context() -> None:
    """A task copies its creator's context, and the first caller created the workers: Ray
    Serve would file every later shared call under that one request (and cancel them all
    with it). The calls see none of their callers' context."""
    request = contextvars.ContextVar("request", default="none")
    seen: list[str] = []

    async def call(items: list[int]) -> list[int]:
        seen.append(request.get())
        return items

    async def caller(coalescer: Coalescer[int, int], i: int) -> int:
        request.set(f"request-{i}")
        return await coalescer.submit(i)

    async def scenario() -> None:
        coalescer = Coalescer(call, max_batch_size=1, wait_s=0, max_in_flight=2)
        assert await asyncio.gather(*(caller(coalescer, i) for i in range(4))) == [0, 1, 2, 3]

    asyncio.run(scenario())
    assert seen and set(seen) == {"none"}, seen


def test_stopping_a_worker_mid_call_answers_its_callers() -> None:
    async def call(items: list[int]) -> list[int]:
        await asyncio.sleep(10)
        return items

    async def scenario() -> None:
        coalescer = Coalescer(call, max_batch_size=8, wait_s=0, max_in_flight=1)
        waiting = asyncio.gather(coalescer.submit(1), coalescer.submit(2), return_exceptions=True)
        await asyncio.sleep(0.05)
        for worker in coalescer._workers:
            worker.cancel()
        outcomes = await asyncio.wait_for(waiting, 2)
        assert all(isinstance(outcome, CallCancelled) for outcome in outcomes), outcomes

    asyncio.run(scenario())
