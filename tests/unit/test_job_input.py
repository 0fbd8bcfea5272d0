"""Job creation away from the event loop: large bodies in a worker process, small ones in
a thread; errors come back whole either way."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pickle
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from serve_app.api.job_input import (
    IN_PROCESS_MAX_BYTES,
    WORKER_PROCESSES,
    JobCreator,
    prepare_job,
)
from serve_app.config import JobsConfig
from serve_app.errors import (
    Conflict,
    InvalidInput,
    JobWorkerLost,
    Overloaded,
    TooManyRequests,
)
from serve_app.jobs.sqlite import SQLiteJobQueue
from serve_app.jobs.webhooks import CallbackRefused


def body(n: int, **extra: object) -> bytes:
    bad = {"entity_id": "E0000001", "context": {"amount": -1, "channel": "x" * 40}}
    return json.dumps({"items": [bad] * (n - 1) + [{"entity_id": "E0000002"}], **extra}).encode()


def test_errors_survive_pickling_with_their_details() -> None:
    error = CallbackRefused("nope", "refused_address", detail_type="callback_host_not_allowed")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is CallbackRefused and again.status_code == 422
    assert again.to_dict() == error.to_dict()


def test_large_bodies_are_created_in_a_worker_process(tmp_path: Path) -> None:
    jobs = JobsConfig(queue_url=f"sqlite:///{tmp_path / 'jobs.db'}", max_queued_items_per_key=3)
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    creator = JobCreator(jobs, queue, webhooks_configured=True)
    large = body(20_000)
    assert len(large) > IN_PROCESS_MAX_BYTES

    async def scenario() -> None:
        job, created = await creator.create(large, "alice", "k1")
        assert created and (job.total, job.failed) == (20_000, 19_999)
        assert creator._pool is not None  # it went through the process pool
        again, created = await creator.create(large, "alice", "k1")
        assert again.id == job.id and not created
        with pytest.raises(InvalidInput) as caught:  # raised in the worker, whole here
            await creator.create(body(20_000, callback_url="http://10.0.0.1/x"), "alice", None)
        assert caught.value.details == [{"type": "callback_host_not_allowed"}]
        small = json.dumps({"items": [{"entity_id": "E1"}] * 3}).encode()
        await creator.create(small, "bob", None)  # a thread: 3 items queued for bob
        with pytest.raises(TooManyRequests):
            await creator.create(small, "bob", None)

    try:
        asyncio.run(scenario())
    finally:
        creator.close()
    assert queue.owner_backlog("alice") == 1


@dataclass
class SlowCreator:
    """A JobCreator whose large-body creations block in a thread pool until released."""

    creator: JobCreator
    started: threading.Semaphore  # one release per creation that began
    release: threading.Event
    large: bytes


@pytest.fixture
def slow_creator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SlowCreator]:
    from serve_app.api import job_input

    release = threading.Event()
    started = threading.Semaphore(0)

    def slow_create(*args: object) -> tuple[str, bool]:
        started.release()
        release.wait(10)
        return "job", True

    jobs = JobsConfig(queue_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    creator = JobCreator(jobs, SQLiteJobQueue(tmp_path / "jobs.db"), webhooks_configured=True)
    pool = ThreadPoolExecutor(job_input.WORKER_PROCESSES)
    monkeypatch.setattr(creator, "_processes", lambda: pool)
    monkeypatch.setattr(job_input, "create_job", slow_create)
    try:
        yield SlowCreator(creator, started, release, b" " * (IN_PROCESS_MAX_BYTES + 1))
    finally:
        release.set()
        pool.shutdown()


def test_a_large_body_is_refused_at_once_when_every_worker_is_busy(
    slow_creator: SlowCreator,
) -> None:
    """Not queued behind busy workers (where it would meet the request timeout): 503 with a
    Retry-After long enough for a worker to free up; the busy ones still finish."""
    creator, large = slow_creator.creator, slow_creator.large

    async def scenario() -> None:
        busy = [
            asyncio.create_task(creator.create(large, f"key{i}", None))
            for i in range(WORKER_PROCESSES)
        ]
        for _ in busy:
            await asyncio.to_thread(slow_creator.started.acquire)
        with pytest.raises(Overloaded) as refused:
            await creator.create(large, "another", None)
        assert refused.value.status_code == 503
        assert refused.value.retry_after_s == 5  # parsing takes seconds: not 1
        slow_creator.release.set()
        assert [await task for task in busy] == [("job", True)] * len(busy)
        assert await creator.create(large, "another", None) == ("job", True)  # free again

    asyncio.run(scenario())


def test_a_caller_that_goes_away_leaves_its_worker_counted_busy(
    slow_creator: SlowCreator,
) -> None:
    """The count dropped when the caller's handler was cancelled, though its worker was
    still parsing: the next large body queued behind it instead of a 503 at once."""
    creator, large = slow_creator.creator, slow_creator.large

    async def scenario() -> None:
        gone = [
            asyncio.create_task(creator.create(large, f"key{i}", None))
            for i in range(WORKER_PROCESSES)
        ]
        for _ in gone:
            await asyncio.to_thread(slow_creator.started.acquire)
        for task in gone:
            task.cancel()  # the clients went away; their bodies are still being parsed
        await asyncio.gather(*gone, return_exceptions=True)
        with pytest.raises(Overloaded):
            await creator.create(large, "another", None)
        slow_creator.release.set()
        for _ in range(100):  # the workers finish the orphaned bodies
            if creator._in_processes == 0:
                break
            await asyncio.sleep(0.02)
        assert await creator.create(large, "another", None) == ("job", True)  # free again

    asyncio.run(scenario())


def test_a_large_resend_gets_its_job_without_a_parsing_worker(slow_creator: SlowCreator) -> None:
    """A resend of a 16 MB job was parsed again in the replica's one parsing process
    (2.4 s for 2.9 MB), and meanwhile other keys' large jobs got 503: now the stored job
    is found by the key and the raw bytes' digest first, even with every worker busy."""
    creator, large = slow_creator.creator, slow_creator.large
    stored, _created = creator._queue.create(
        "alice",
        [None],
        {0: {"ok": False}},
        None,
        "k1",
        hashlib.sha256(large).hexdigest(),
        max_backlog=10,
    )

    async def scenario() -> None:
        busy = asyncio.create_task(creator.create(large, "bob", None))
        await asyncio.to_thread(slow_creator.started.acquire)
        again, created = await creator.create(large, "alice", "k1")
        assert again.id == stored.id and not created
        with pytest.raises(Conflict):  # the key with another body: 409, still unparsed
            await creator.create(large + b" ", "alice", "k1")
        with pytest.raises(Overloaded):  # a new job still waits for a worker
            await creator.create(large, "alice", "k2")
        slow_creator.release.set()
        assert await busy == ("job", True)

    asyncio.run(scenario())


def test_a_resend_gets_its_job_even_when_its_own_items_fill_the_quota(tmp_path: Path) -> None:
    """HAProxy and clients resend a creation with its Idempotency-Key when the answer was
    lost. The quota counted the job's own items against the resend: a 429, and the
    client never learned its job's id."""
    jobs = JobsConfig(queue_url=f"sqlite:///{tmp_path / 'jobs.db'}", max_queued_items_per_key=3)
    creator = JobCreator(jobs, SQLiteJobQueue(tmp_path / "jobs.db"), webhooks_configured=True)
    three = json.dumps({"items": [{"entity_id": "E1"}] * 3}).encode()

    async def scenario() -> None:
        job, created = await creator.create(three, "carol", "order-42")
        assert created
        again, created = await creator.create(three, "carol", "order-42")
        assert again.id == job.id and not created
        with pytest.raises(Conflict):  # the key with another body: still a 409
            await creator.create(
                json.dumps({"items": [{"entity_id": "E2"}]}).encode(), "carol", "order-42"
            )
        with pytest.raises(TooManyRequests):  # a new job is still held to the quota
            await creator.create(three, "carol", "order-43")

    try:
        asyncio.run(scenario())
    finally:
        creator.close()


def test_a_killed_parsing_worker_is_a_503_and_the_next_body_gets_a_fresh_one(
    tmp_path: Path,
) -> None:
    """The OOM killer taking the worker breaks a ProcessPoolExecutor for good: without a
    fresh pool every later large body of the replica was a bare 500."""
    jobs = JobsConfig(queue_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    creator = JobCreator(jobs, SQLiteJobQueue(tmp_path / "jobs.db"), webhooks_configured=False)
    large = body(20_000)

    async def kill_the_worker() -> None:
        for _ in range(500):  # made once the replay look-up found no job
            if creator._pool is not None:
                break
            await asyncio.sleep(0.01)
        pool = creator._pool
        assert pool is not None
        while not pool._processes:  # started on the first submit
            await asyncio.sleep(0.01)
        for pid in list(pool._processes):
            os.kill(pid, signal.SIGKILL)

    async def scenario() -> None:
        creating = asyncio.ensure_future(creator.create(large, "alice", "k1"))
        await kill_the_worker()
        with pytest.raises(JobWorkerLost) as caught:
            await creating
        assert caught.value.status_code == 503 and caught.value.retry_after_s >= 1
        assert creator._pool is None and creator._in_processes == 0
        job, _created = await creator.create(large, "alice", "k1")  # a fresh pool
        assert job.total == 20_000

    try:
        asyncio.run(scenario())
    finally:
        creator.close()


def test_refused_items_errors_are_stored_bounded_whatever_the_caller_echoes(
    tmp_path: Path,
) -> None:
    """Each distinct error is stored once, and errors echo the caller's field names: items
    with distinct unknown fields made a job's stored errors grow with its body (474 MB of
    queue files for one 14.5 MB body). Every item is still refused, with its reason."""
    items = [
        {"entity_id": "E1", **{f"{i}-{j}-" + "x" * 200: 1 for j in range(15)}} for i in range(3_000)
    ]
    prepared = prepare_job({"items": items}, max_items=100_000)
    stored = {json.dumps(error, sort_keys=True) for error in prepared.rejected.values()}
    assert sum(map(len, stored)) < 1_000_000  # 13.3 MB before: 3,000 distinct errors of 15
    assert len(prepared.rejected) == 3_000 and all(i is None for i in prepared.items)
    first = prepared.rejected[0]["error"]
    assert first["code"] == "invalid_input" and len(first["details"]) == 4
    assert first["details"][0]["type"] == "extra_forbidden"
    assert len(first["details"][0]["loc"][0]) == 64
    assert first["details"][-1] == {"type": "more_errors_not_kept", "count": 12}
    last = prepared.rejected[2_999]["error"]
    assert last["code"] == "invalid_input"
    assert last["details"] == [{"type": "more_errors_not_kept", "count": 15}]
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    job, _ = queue.create("k", prepared.items, prepared.rejected, None, None, "h")
    assert queue.results(job.id, 0, 1)[0]["error"] == first
