"""Adaptive coalescing: merge concurrent single calls into one downstream call.

Why not ``@serve.batch`` here: Ray's batcher closes a batch when its wait expires and
queues it even while the previous batch is still running (``max_concurrent_batches`` is
only enforced when a batch starts). Under load it therefore lines up many small batches
behind each other: measured on this machine, ~4 items per call to the Model at 32
concurrent clients, with a 300 ms p50. This coalescer forms the next batch only when a
call slot is free and takes everything queued by then (up to ``max_batch_size``): the
slower the downstream call, the larger the next batch, which is what keeps hops few.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from serve_app.errors import ServiceError

T = TypeVar("T")
R = TypeVar("R")


class CallCancelled(ServiceError):
    """The shared call was cancelled under its callers (not by them): a 503, retry."""


class Coalescer(Generic[T, R]):
    """``await coalescer.submit(item)`` -> the item's result from one shared ``call(items)``.

    ``call`` receives a list and must return one result per item, in order. If it raises,
    every caller in that batch gets the exception. At most ``max_in_flight`` calls run at
    once; a free slot waits up to ``wait_s`` for more items before calling with less than
    ``max_batch_size``. ``size`` weighs an entry (default 1 each): with entries that are
    lists of items, ``size=len`` bounds the items per call, not the entries; an entry
    larger than ``max_batch_size`` goes alone.
    """

    def __init__(
        self,
        call: Callable[[list[T]], Awaitable[list[R]]],
        max_batch_size: int,
        wait_s: float,
        max_in_flight: int,
        size: Callable[[T], int] | None = None,
    ) -> None:
        self._call = call
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._size = size
        self._queued = 0  # the summed size of the queue
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._ready = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._max_in_flight = max_in_flight
        self.batches = 0
        self.items = 0

    def configure(self, max_batch_size: int, wait_s: float, max_in_flight: int) -> None:
        """Change the settings in place (from ``reconfigure``); extra workers retire."""
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._max_in_flight = max_in_flight
        if self._workers:
            self._start_workers()

    def _start_workers(self) -> None:
        self._workers = [task for task in self._workers if not task.done()]
        while len(self._workers) < self._max_in_flight:
            # A fresh context, not the first caller's (a task copies its creator's): Ray
            # Serve files a handle call under the request in the context, so every later
            # shared call was that request's child, cancelled when its client went away.
            work = self._work(len(self._workers))
            self._workers.append(asyncio.create_task(work, context=contextvars.Context()))

    async def submit(self, item: T) -> R:
        if not self._workers:
            self._start_workers()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._queued += self._weight(item)
        self._ready.set()
        return await future

    def _weight(self, item: T) -> int:
        return 1 if self._size is None else self._size(item)

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        taken = 0
        while self._queue:
            item, future = self._queue[0]
            weight = self._weight(item)
            if batch and taken + weight > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued -= weight
            if not future.done():  # a caller that went away is skipped
                batch.append((item, future))
                taken += weight
        if not self._queue:
            self._ready.clear()
        return batch

    async def _work(self, slot: int) -> None:
        while slot < self._max_in_flight:
            await self._ready.wait()
            if self.wait_s and self._queued < self.max_batch_size:
                await asyncio.sleep(self.wait_s)
            batch = self._take()
            if not batch:
                continue
            self.batches += 1
            self.items += sum(self._weight(item) for item, _ in batch)
            try:
                results = await self._call([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} items")
            except asyncio.CancelledError:
                # Raised by the call itself (Ray cancelled its routing), or the worker is
                # being stopped: either way this batch's callers get an answer, not a hang.
                _fail(batch, CallCancelled("the shared model call was cancelled; retry"))
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                continue
            except Exception as exc:  # every caller of this batch gets it; the worker lives on
                _fail(batch, exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


def _fail(batch: list[tuple[T, asyncio.Future[R]]], exc: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)
