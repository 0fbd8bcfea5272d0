"""The JobQueue contract: every test runs against SQLite and a real PostgreSQL server.

The cases of tests/unit/test_job_queue.py, parametrised over the backends, plus what only
shows with concurrency: claims never overlap, an idempotency key wins once, cancel and
finish exclude each other, results stay exactly once, purge works past one batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from serve_app.jobs import (
    BacklogFull,
    IdempotencyConflict,
    JobQueue,
    RetainedFull,
    open_job_queue,
)
from serve_app.jobs.postgres import PostgresJobQueue
from serve_app.jobs.queue import ATTEMPT_IN_PROGRESS
from serve_app.jobs.sqlite import SQLiteJobQueue
from tests.services import PostgresServer

ITEMS = [{"entity_id": f"E{i:07d}", "context": {}} for i in range(5)]
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobQueue]:
    """A fresh, empty queue of each backend, opened by URL as the deployments do."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_srv")
        url = server.create_database("queue")
    queue = open_job_queue(url)
    assert isinstance(queue, SQLiteJobQueue if request.param == "sqlite" else PostgresJobQueue)
    yield queue
    queue.close()


def test_create_claim_run_finish(queue: JobQueue) -> None:
    job, created = queue.create("owner", ITEMS, {}, None, None, "h")
    assert created and job.state == "queued" and queue.depth() == 1
    claimed = queue.claim("w1", lease_s=30)
    assert claimed is not None and claimed.id == job.id and claimed.state == "running"
    assert queue.claim("w2", lease_s=30) is None  # leased: nobody else gets it
    pending = queue.pending_items(job.id, 3)
    assert [idx for idx, _ in pending] == [0, 1, 2]
    assert pending[0][1] == ITEMS[0]
    assert queue.save_results(job.id, "w1", 30, [(i, {"score": 0.5}) for i, _ in pending])
    assert [idx for idx, _ in queue.pending_items(job.id, 10)] == [3, 4]
    assert queue.save_results(
        job.id, "w1", 30, [(3, {"score": 0.1}), (4, {"error": {"code": "x"}})]
    )
    assert queue.finish(job.id, "w1", "succeeded", None, 30, 60)
    final = queue.get(job.id, "owner")
    assert final is not None and final.state == "succeeded" and final.finished
    assert (final.done, final.failed, final.total) == (5, 1, 5)
    results = queue.results(job.id, 0, 10)
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert results[4] == {"index": 4, "error": {"code": "x"}}
    assert [r["index"] for r in queue.results(job.id, 3, 1)] == [3]  # paging
    assert queue.depth() == 0
    assert not queue.finish(job.id, "w1", "failed", "again", 30, 60)  # only once


def test_expired_lease_is_claimed_again_and_results_stay_exactly_once(queue: JobQueue) -> None:
    job, _ = queue.create("owner", ITEMS, {}, None, None, "h")
    assert queue.claim("dead-worker", lease_s=0.05) is not None
    queue.save_results(job.id, "dead-worker", 0.05, [(0, {"score": 0.1}), (1, {"score": 0.2})])
    time.sleep(0.1)
    again = queue.claim("w2", lease_s=30)
    assert again is not None and again.claims == 2 and again.id == job.id
    # the dead worker lost its lease: its late writes are refused
    assert not queue.save_results(job.id, "dead-worker", 30, [(2, {"score": 0.9})])
    assert [idx for idx, _ in queue.pending_items(job.id, 10)] == [2, 3, 4]
    # a re-sent result for an item already stored is ignored, not duplicated
    assert queue.save_results(job.id, "w2", 30, [(1, {"score": 0.7}), (2, {"score": 0.3})])
    results = queue.results(job.id, 0, 10)
    assert [r["index"] for r in results] == [0, 1, 2]
    assert results[1]["score"] == 0.2
    final = queue.get(job.id, "owner")
    assert final is not None and final.done == 3


def test_a_heartbeat_keeps_the_lease_and_fails_once_it_is_lost(queue: JobQueue) -> None:
    """A worker alive but slow renews its lease (no other worker takes the job, no claim
    is counted); once another worker took over, its renewal says so."""
    job, _ = queue.create("owner", ITEMS, {}, None, None, "h")
    assert queue.claim("alive", lease_s=0.3) is not None
    assert queue.extend_lease(job.id, "alive", 30)
    time.sleep(0.4)  # past the first lease: the renewal holds
    assert queue.claim("other", lease_s=30) is None
    assert not queue.extend_lease(job.id, "other", 30)  # not its lease
    assert not queue.extend_lease("no-such-job", "alive", 30)
    assert queue.extend_lease(job.id, "alive", 0.05)
    time.sleep(0.1)
    taken = queue.claim("other", lease_s=30)
    assert taken is not None and taken.id == job.id and taken.claims == 2
    assert not queue.extend_lease(job.id, "alive", 30)
    assert queue.extend_lease(job.id, "other", 30)
    queue.save_results(job.id, "other", 30, [(i, {"score": 0.5}) for i in range(len(ITEMS))])
    assert queue.finish(job.id, "other", "succeeded", None, 30, 60)
    assert not queue.extend_lease(job.id, "other", 30)  # finished: the heartbeat stops


@pytest.mark.parametrize("job_id", ["\x00", "abc\x00def", "x" * 10_000, "%00", "' OR 1=1 --"])
def test_a_string_that_is_no_job_id_names_no_job(queue: JobQueue, job_id: str) -> None:
    """Ids come from the URL path: PostgreSQL refused a NUL byte with an error (a 500)."""
    job, _ = queue.create("alice", ITEMS, {}, None, None, "hash-a")
    assert queue.get(job_id, "alice") is None
    assert queue.cancel(job_id, "alice", 60) == (None, False)
    assert queue.get(job.id, "alice") is not None  # the real one is untouched


def test_the_job_for_an_idempotency_key_is_the_owners_own(queue: JobQueue) -> None:
    job, _ = queue.create("alice", ITEMS, {}, None, "key-9", "hash-a")
    found = queue.job_for_key("alice", "key-9")
    assert found is not None and found.id == job.id and found.body_hash == "hash-a"
    assert queue.job_for_key("bob", "key-9") is None
    assert queue.job_for_key("alice", "key-10") is None


def test_idempotency_and_ownership(queue: JobQueue) -> None:
    job, _ = queue.create("alice", ITEMS, {}, None, "key-1", "hash-a")
    same, created = queue.create("alice", ITEMS, {}, None, "key-1", "hash-a")
    assert same.id == job.id and not created
    with pytest.raises(IdempotencyConflict):
        queue.create("alice", ITEMS, {}, None, "key-1", "hash-b")
    bob, created = queue.create("bob", ITEMS, {}, None, "key-1", "hash-b")
    assert created and bob.id != job.id
    assert queue.get(job.id, "bob") is None and queue.cancel(job.id, "bob", 60) == (None, False)
    assert queue.get_any(job.id) is not None
    # no key: every create is a new job
    first, _ = queue.create("alice", ITEMS, {}, None, None, "hash-a")
    second, _ = queue.create("alice", ITEMS, {}, None, None, "hash-a")
    assert first.id != second.id


def test_concurrent_creates_with_one_key_make_one_job(queue: JobQueue) -> None:
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: queue.create("o", ITEMS, {}, None, "same", "h"), range(16))
        )
    assert len({job.id for job, _ in answers}) == 1
    assert sum(created for _, created in answers) == 1
    assert queue.depth() == 1


def test_rejected_items_are_stored_as_errors_at_once(queue: JobQueue) -> None:
    items = [ITEMS[0], None, ITEMS[2]]
    job, _ = queue.create("o", items, {1: {"error": {"code": "invalid_input"}}}, None, None, "h")
    assert (job.done, job.failed, job.total) == (1, 1, 3)
    assert [idx for idx, _ in queue.pending_items(job.id, 10)] == [0, 2]
    assert queue.results(job.id, 0, 10) == [{"index": 1, "error": {"code": "invalid_input"}}]


def test_cancel_stops_the_worker_and_owes_a_webhook(queue: JobQueue) -> None:
    job, _ = queue.create("o", ITEMS, {}, "https://93.184.216.34/h", None, "h")
    queue.claim("w1", 30)
    cancelled, changed = queue.cancel(job.id, "o", 60)
    assert changed and cancelled is not None and cancelled.state == "cancelled"
    assert cancelled.expires_at is not None  # purged after the retention time like others
    again, changed_again = queue.cancel(job.id, "o", 60)
    assert again is not None and again.state == "cancelled" and not changed_again
    assert cancelled.webhook_state == "pending"
    assert not queue.save_results(job.id, "w1", 30, [(0, {"score": 0.5})])
    assert not queue.finish(job.id, "w1", "succeeded", None, 30, 60)
    webhook_claim = queue.claim("w2", 30)
    assert webhook_claim is not None and webhook_claim.finished
    assert webhook_claim.claims == 1  # a webhook claim is not a work claim


def test_cancel_and_finish_exclude_each_other(queue: JobQueue) -> None:
    """Racing cancel against finish: exactly one of them wins, every time."""
    for round_ in range(10):
        job, _ = queue.create("o", ITEMS[:1], {}, None, None, f"h{round_}")
        assert queue.claim("w", 30) is not None
        queue.save_results(job.id, "w", 30, [(0, {"score": 0.5})])
        barrier = threading.Barrier(2)

        def cancel(job_id: str = job.id, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            return queue.cancel(job_id, "o", 60)[1]

        def finish(job_id: str = job.id, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            return queue.finish(job_id, "w", "succeeded", None, 30, 60)

        with ThreadPoolExecutor(2) as pool:
            cancelled, finished = pool.submit(cancel), pool.submit(finish)
            outcome = (cancelled.result(), finished.result())
        assert outcome in ((True, False), (False, True))
        final = queue.get(job.id, "o")
        assert final is not None
        assert final.state == ("cancelled" if outcome[0] else "succeeded")


def test_concurrent_claims_never_take_one_job_twice(queue: JobQueue) -> None:
    jobs = {queue.create("o", ITEMS[:1], {}, None, None, f"h{i}")[0].id for i in range(20)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := queue.claim(name, 30)) is not None:
            with lock:
                claimed.append(job.id)

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(worker, [f"w{i}" for i in range(6)]))
    assert sorted(claimed) == sorted(jobs)  # each job exactly once


def test_concurrent_workers_store_each_item_exactly_once(queue: JobQueue) -> None:
    """Two workers racing on one job after a lease expiry: no item twice, none lost."""
    items = [{"entity_id": f"E{i:07d}"} for i in range(200)]
    job, _ = queue.create("o", items, {}, None, None, "h")
    assert queue.claim("slow", 0.01) is not None
    time.sleep(0.05)
    assert queue.claim("fast", 30) is not None

    def run(worker: str) -> None:
        while pending := queue.pending_items(job.id, 25):
            if not queue.save_results(
                job.id, worker, 30, [(i, {"score": 0.5}) for i, _ in pending]
            ):
                return

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(run, ["slow", "fast"]))
    results = queue.results(job.id, 0, 1_000)
    assert [r["index"] for r in results] == list(range(200))
    final = queue.get(job.id, "o")
    assert final is not None and final.done == 200


def test_webhook_schedule_and_purge(queue: JobQueue) -> None:
    job, _ = queue.create("o", ITEMS[:1], {}, "https://93.184.216.34/h", None, "h")
    queue.claim("w1", 30)
    queue.save_results(job.id, "w1", 30, [(0, {"score": 0.5})])
    assert queue.finish(job.id, "w1", "succeeded", None, 30, result_ttl_s=0.01)
    assert queue.claim("w2", 30) is None  # the finishing worker delivers first
    queue.record_webhook(job.id, "pending", 1, time.time() + 60, "HTTP 503", 0)
    assert queue.claim("w2", 30) is None  # not before its next attempt time
    time.sleep(0.02)
    assert queue.purge_expired() == 0  # a webhook still owed keeps the job
    queue.record_webhook(job.id, "pending", 2, time.time() - 1, "HTTP 503", 1)
    retry = queue.claim("w2", 30)
    assert retry is not None and retry.id == job.id and retry.webhook_attempts == 2
    queue.record_webhook(job.id, "delivered", 3, 0, None, 2)
    delivered = queue.get_any(job.id)
    assert delivered is not None and delivered.public()["webhook"] == {
        "state": "delivered",
        "attempts": 3,
        "last_error": None,
    }
    assert queue.purge_expired() == 1
    assert queue.get_any(job.id) is None and queue.results(job.id, 0, 10) == []


def test_an_attempt_that_outlived_its_fence_cannot_overwrite_the_next(queue: JobQueue) -> None:
    """Worker A's attempt 1 ran past its fence; B claimed and started attempt 2. A's late
    "timeout" used to overwrite B's attempt (and later B's "delivered"), so the webhook
    was sent a third time."""
    job, _ = queue.create("o", ITEMS[:1], {}, "https://93.184.216.34/h", None, "h")
    queue.claim("a", 30)
    queue.save_results(job.id, "a", 30, [(0, {"score": 0.5})])
    assert queue.finish(job.id, "a", "succeeded", None, 30, result_ttl_s=60)
    fence_over = time.time() - 1
    assert queue.record_webhook(job.id, "pending", 1, fence_over, "in_progress", 0)  # A starts
    assert queue.claim("b", 30) is not None
    assert queue.record_webhook(job.id, "pending", 2, time.time() + 60, "in_progress", 1)  # B
    assert not queue.record_webhook(job.id, "pending", 1, time.time() - 1, "timeout", 1)  # A
    assert not queue.record_webhook(job.id, "pending", 2, time.time(), "in_progress", 1)  # twice
    assert queue.record_webhook(job.id, "delivered", 2, 0, None, 2)  # B's outcome
    assert not queue.record_webhook(job.id, "dead", 1, 0, "timeout", 1)
    done = queue.get_any(job.id)
    assert done is not None and (done.webhook_state, done.webhook_attempts) == ("delivered", 2)
    assert queue.claim("c", 30) is None


def test_purge_goes_past_one_batch(queue: JobQueue) -> None:
    ids = []
    for i in range(230):
        job, _ = queue.create("o", ITEMS[:2], {}, None, None, f"h{i}")
        ids.append(job.id)
        assert queue.cancel(job.id, "o", result_ttl_s=0.001)[1]
    keep, _ = queue.create("o", ITEMS[:1], {}, None, None, "keep")
    time.sleep(0.01)
    assert queue.purge_expired() == 230
    assert queue.get_any(ids[0]) is None and queue.pending_items(ids[-1], 10) == []
    assert queue.get_any(keep.id) is not None and queue.depth() == 1


def test_a_large_job_round_trips(queue: JobQueue) -> None:
    items = [{"entity_id": f"E{i:07d}", "context": {"amount": i / 10}} for i in range(5_000)]
    job, _ = queue.create("o", items, {}, None, None, "h")
    assert queue.claim("w", 30) is not None
    while pending := queue.pending_items(job.id, 1_000):
        assert queue.save_results(job.id, "w", 30, [(i, {"score": 0.25}) for i, _ in pending])
    assert queue.finish(job.id, "w", "succeeded", None, 30, 60)
    final = queue.get(job.id, "o")
    assert final is not None and (final.done, final.total) == (5_000, 5_000)
    page = queue.results(job.id, 4_990, 100)
    assert [r["index"] for r in page] == list(range(4_990, 5_000))


def test_postgres_schema_is_created_once_and_reopened(postgres_srv: PostgresServer) -> None:
    url = postgres_srv.create_database("schema")
    with ThreadPoolExecutor(4) as pool:  # replicas starting at once must not race
        queues = list(pool.map(lambda _: PostgresJobQueue(url), range(4)))
    job, _ = queues[0].create("o", ITEMS, {}, None, None, "h")
    assert queues[3].get(job.id, "o") is not None
    for queue in queues:
        queue.close()
    reopened = PostgresJobQueue(url)
    assert reopened.get(job.id, "o") is not None
    reopened.close()


def test_owner_backlog_counts_items_not_done(queue: JobQueue) -> None:
    job, _ = queue.create("alice", ITEMS, {}, None, None, "h1")
    queue.create("alice", [ITEMS[0], None], {1: {"error": {"code": "x"}}}, None, None, "h2")
    queue.create("bob", ITEMS, {}, None, None, "h3")
    assert queue.owner_backlog("alice") == 5 + 1
    claimed = queue.claim("w", 30)
    assert claimed is not None and claimed.id == job.id
    queue.save_results(job.id, "w", 30, [(0, {"score": 0.5}), (1, {"score": 0.5})])
    assert queue.owner_backlog("alice") == 3 + 1
    queue.cancel(job.id, "alice", 60)
    assert queue.owner_backlog("alice") == 1 and queue.owner_backlog("nobody") == 0


def test_a_full_backlog_refuses_new_jobs_but_returns_a_resent_one(queue: JobQueue) -> None:
    job, new = queue.create("alice", ITEMS, {}, None, "k1", "h1", max_backlog=5)
    assert new
    again, new = queue.create("alice", ITEMS, {}, None, "k1", "h1", max_backlog=5)
    assert (again.id, new) == (job.id, False)  # a resend, whatever the backlog
    with pytest.raises(BacklogFull) as full:
        queue.create("alice", ITEMS[:1], {}, None, "k2", "h2", max_backlog=5)
    assert full.value.backlog == 5
    with pytest.raises(IdempotencyConflict):
        queue.create("alice", ITEMS, {}, None, "k1", "other body", max_backlog=5)
    queue.create("bob", ITEMS, {}, None, "k2", "h2", max_backlog=5)  # a key of its own
    assert queue.owner_backlog("alice") == 5 and queue.owner_backlog("bob") == 5


def test_kept_jobs_count_against_the_retained_cap_refused_items_and_finished_too(
    queue: JobQueue,
) -> None:
    """A job of refused items queues nothing (the backlog stays 0) yet keeps a row per
    item for result_ttl_s: the queued-items cap alone let one key store without bound."""
    refused = {i: {"error": {"code": "invalid_input"}} for i in range(4)}
    queue.create("alice", [None] * 4, refused, None, None, "h1", max_backlog=1, max_retained=10)
    assert queue.owner_backlog("alice") == 0
    job, _ = queue.create("alice", ITEMS, {}, None, None, "h2", max_backlog=5, max_retained=10)
    claimed = [queue.claim("w", 30), queue.claim("w", 30)]  # the refused job first
    assert {c.id for c in claimed if c is not None} >= {job.id}
    queue.save_results(job.id, "w", 30, [(i, {"score": 0.5}) for i in range(5)])
    assert queue.finish(job.id, "w", "succeeded", None, 30, 3600)  # finished, still kept
    with pytest.raises(RetainedFull) as full:
        queue.create("alice", ITEMS[:2], {}, None, None, "h3", max_retained=10)
    assert full.value.retained == 9
    queue.create("alice", ITEMS[:1], {}, None, None, "h4", max_retained=10)  # exactly fits
    queue.create("bob", ITEMS, {}, None, None, "h5", max_retained=10)  # a key of its own
    # purged, a job's items are room again: the refused job goes, the finished one stays
    refused_job = next(c for c in claimed if c is not None and c.id != job.id)
    assert queue.finish(refused_job.id, "w", "succeeded", None, 30, 0)
    time.sleep(0.01)
    assert queue.purge_expired() == 1
    queue.create("alice", ITEMS[:4], {}, None, None, "h6", max_retained=10)
    with pytest.raises(RetainedFull) as full:
        queue.create("alice", ITEMS[:1], {}, None, None, "h7", max_retained=10)
    assert full.value.retained == 10


def test_a_refused_storage_quota_is_a_429_for_an_hour() -> None:
    """The error crosses from the parsing process pickled: its Retry-After must too."""
    import pickle

    from serve_app.api.quotas import storage_full

    refused = pickle.loads(pickle.dumps(storage_full(9, 2, 10)))
    assert refused.status_code == 429 and refused.retry_after_s == 3600
    assert refused.details == [{"type": "too_many_retained_items", "limit": 10, "retained": 9}]


@pytest.mark.parametrize("backend", [*BACKENDS, "postgresql-repeatable-read"])
def test_concurrent_creations_of_one_key_cannot_pass_its_items_cap_together(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Eight creations of 100 items at once, each through its own queue client (as from
    several Ingress replicas), against a cap of 300: exactly three are stored. The cap
    was checked before the insert's transaction, and creations that read the backlog
    together passed it together."""
    import json

    from serve_app.api.job_input import create_job
    from serve_app.config import JobsConfig
    from serve_app.errors import TooManyRequests

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_srv")
        url = server.create_database(backend.replace("-", "_"))
        if backend == "postgresql-repeatable-read":  # a DBA's default: snapshots at BEGIN
            with psycopg.connect(url, autocommit=True) as admin:
                name = admin.info.dbname
                admin.execute(
                    f"ALTER DATABASE {name} SET default_transaction_isolation = 'repeatable read'"
                )
    settings = JobsConfig(queue_url=url, max_queued_items_per_key=300).model_dump()
    raw = json.dumps({"items": [{"entity_id": f"E{i:07d}"} for i in range(100)]}).encode()
    clients = [open_job_queue(url) for _ in range(8)]
    start = threading.Barrier(len(clients))

    def create(client: JobQueue) -> str:
        start.wait()
        try:
            create_job(raw, "alice", None, settings, False, client)
        except TooManyRequests:
            return "429"
        return "202"

    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            outcomes = sorted(pool.map(create, clients))
        assert outcomes == ["202"] * 3 + ["429"] * 5
        assert clients[0].owner_backlog("alice") == 300
    finally:
        for client in clients:
            client.close()


def test_release_gives_leases_back_uncounted(queue: JobQueue) -> None:
    job, _ = queue.create("o", ITEMS, {}, None, None, "h")
    first = queue.claim("stopping", 30)
    assert first is not None and first.claims == 1
    assert queue.claim("other", 30) is None
    assert queue.release("stopping") == 1
    again = queue.claim("other", 30)
    assert again is not None and again.id == job.id and again.claims == 1  # not counted
    assert not queue.save_results(job.id, "stopping", 30, [(0, {"score": 0.1})])
    assert queue.release("nobody") == 0


def test_work_is_claimed_before_due_webhooks(queue: JobQueue) -> None:
    done, _ = queue.create("o", ITEMS[:1], {}, "https://93.184.216.34/h", None, "h1")
    queue.claim("w", 30)
    queue.save_results(done.id, "w", 30, [(0, {"score": 0.5})])
    queue.finish(done.id, "w", "succeeded", None, 30, 60)
    queue.record_webhook(done.id, "pending", 1, time.time() - 1, "HTTP 503", 0)
    work, _ = queue.create("o", ITEMS, {}, None, None, "h2")
    first = queue.claim("w2", 30)
    second = queue.claim("w3", 30)
    assert first is not None and first.id == work.id
    assert second is not None and second.id == done.id and second.finished


def test_each_key_with_work_gets_a_worker_before_any_key_gets_a_second(queue: JobQueue) -> None:
    """A hostile key's backlog of small jobs (or of jobs whose webhooks hang, each held by
    its worker for the first attempt) took every worker in turn, oldest first, while
    another key's job waited behind all of it: 10 s for one item in a helper's test."""
    hog = [queue.create("hog", ITEMS[:1], {}, None, None, f"h{i}")[0] for i in range(6)]
    other, _ = queue.create("other", ITEMS[:1], {}, None, None, "o1")
    later, _ = queue.create("late", ITEMS[:1], {}, None, None, "l1")
    first = queue.claim("w1", 30)
    assert first is not None and first.id == hog[0].id  # nobody busy: oldest first
    second = queue.claim("w2", 30)
    third = queue.claim("w3", 30)
    assert second is not None and second.id == other.id  # hog holds a lease: others first
    assert third is not None and third.id == later.id
    fourth = queue.claim("w4", 30)  # every key with work is busy: oldest again
    assert fourth is not None and fourth.id == hog[1].id
    # A finished job whose worker keeps its lease for the first webhook attempt counts.
    queue.save_results(other.id, "w2", 30, [(0, {"score": 0.5})])
    queue.finish(other.id, "w2", "succeeded", None, 30, 60)
    with_hook, _ = queue.create("other", ITEMS[:1], {}, "https://93.184.216.34/h", None, "o2")
    fifth = queue.claim("w5", 30)  # "other" finished with no webhook: it holds nothing
    assert fifth is not None and fifth.id == with_hook.id
    queue.save_results(with_hook.id, "w5", 30, [(0, {"score": 0.5})])
    assert queue.finish(with_hook.id, "w5", "succeeded", None, 30, 60)
    queue.create("other", ITEMS[:1], {}, None, None, "o3")
    sixth = queue.claim("w6", 30)  # "other" holds the webhook's lease: the oldest, hog's
    assert sixth is not None and sixth.id == hog[2].id
    # The attempt starts: the lease is given up for a fence (JobWorker._send_webhook),
    # and the attempt in flight still counts (it once did not: CI, 2026-12-07).
    fence = time.time() + 60
    assert queue.record_webhook(with_hook.id, "pending", 1, fence, ATTEMPT_IN_PROGRESS, 0)
    seventh = queue.claim("w7", 30)
    assert seventh is not None and seventh.id == hog[3].id


def test_oldest_queued_age_counts_only_jobs_waiting_for_their_first_claim(
    queue: JobQueue,
) -> None:
    assert queue.oldest_queued_age() == 0.0  # nothing queued: 0, not an error
    first, _ = queue.create("o", ITEMS, {}, None, None, "h1")
    second, _ = queue.create("o", ITEMS, {}, None, None, "h2")
    now = second.created_at + 10
    assert queue.oldest_queued_age(now) == pytest.approx(now - first.created_at)
    assert 0.0 <= queue.oldest_queued_age() < 60  # the clock by default
    claimed = queue.claim("w", 30)
    assert claimed is not None and claimed.id == first.id
    # a running job is not waiting in the queue: the next one is the oldest
    assert queue.oldest_queued_age(now) == pytest.approx(now - second.created_at)
    assert queue.oldest_queued_age(second.created_at - 5) == 0.0  # never negative
    queue.cancel(second.id, "o", 60)
    assert queue.oldest_queued_age(now) == 0.0
    assert queue.save_results(first.id, "w", 30, [(i, {"score": 0.5}) for i in range(5)])
    assert queue.finish(first.id, "w", "succeeded", None, 30, 60)
    assert queue.oldest_queued_age(now) == 0.0 and queue.depth() == 0


def _postgres_plan(server: PostgresServer, sql: str, params: object = None) -> str:
    """PostgreSQL's plan for ``sql`` on a fresh database, sequential scans discouraged
    (the tables are tiny: ask what the query can use, not what is cheapest now)."""
    queue = PostgresJobQueue(server.create_database("plan"))
    try:
        with queue._connect() as db, db.transaction():
            db.execute("SET LOCAL enable_seqscan = off")
            return " ".join(row[0] for row in db.execute(f"EXPLAIN {sql}", params))
    finally:
        queue.close()


def test_postgres_oldest_queued_age_reads_its_partial_index(postgres_srv: PostgresServer) -> None:
    """The gauge is read every second by every worker: one index entry, not a scan."""
    from serve_app.jobs.postgres import OLDEST_QUEUED_SQL

    plan = _postgres_plan(postgres_srv, OLDEST_QUEUED_SQL)
    assert "jobs_queued" in plan, plan


def test_postgres_webhook_claim_reads_its_partial_index(postgres_srv: PostgresServer) -> None:
    """An idle poll (several a second per worker) must not read every retained job."""
    from serve_app.jobs.postgres import CLAIM_WEBHOOK_SQL

    plan = _postgres_plan(postgres_srv, CLAIM_WEBHOOK_SQL, (1.0, 1.0))
    assert "jobs_webhook_due" in plan, plan


def test_postgres_connections_killed_by_a_restart_are_not_lent(
    postgres_srv: PostgresServer,
) -> None:
    """A PostgreSQL restart ends every pooled connection; each then failed its next call
    (503 queue_busy, AdminShutdown) for over a minute of job uploads. Killing the
    backends does to the pool what the restart does. One dead connection found means
    all are checked at once (psycopg_pool alone took 7 s for the first call)."""
    url = postgres_srv.create_database("restart")
    queue = PostgresJobQueue(url, min_size=4, max_size=4)
    try:
        for i in range(4):
            queue.create("o", ITEMS[:1], {}, None, None, f"h{i}")
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(postgres_srv.url(), autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            ).fetchall()
        assert killed and all(ok for (ok,) in killed), killed
        started = time.monotonic()
        queue.create("o", ITEMS[:1], {}, None, None, "after")
        # generous: checked one by one, the four dead connections cost 1 + 2 + 4 s
        assert time.monotonic() - started < 3.0
        for i in range(8):  # every pooled connection is lent again at least once
            queue.create("o", ITEMS[:1], {}, None, None, f"after{i}")
        assert queue.depth() == 13
    finally:
        queue.close()


def test_postgres_fair_claim_reads_its_indexes(postgres_srv: PostgresServer) -> None:
    """Run at every claim: a seek per owner and the live leases, not every queued job."""
    from serve_app.jobs.postgres import FAIR_CLAIM_SQL

    params = {"now": 1.0, "in_progress": ATTEMPT_IN_PROGRESS}
    plan = _postgres_plan(postgres_srv, FAIR_CLAIM_SQL, params)
    assert "jobs_owner_by_age" in plan and "jobs_leased" in plan, plan


def test_postgres_owner_backlog_reads_its_partial_index(postgres_srv: PostgresServer) -> None:
    """Read at every creation while the owner's lock is held: its active jobs only, not
    the week of finished ones a busy key keeps."""
    from serve_app.jobs.postgres import BACKLOG_SQL

    plan = _postgres_plan(postgres_srv, BACKLOG_SQL, ("o",))
    assert "jobs_owner_by_age" in plan, plan


def test_postgres_a_stuck_creation_of_one_key_holds_the_others_for_seconds_only(
    postgres_srv: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A creation stuck holding its key's lock (its node lost mid-COPY: PostgreSQL keeps
    the transaction until TCP keepalive notices, hours) blocked every creation of that
    key on every replica, each holding a creation slot and a thread. Now: 503 after the
    lock timeout; other keys never wait."""
    from serve_app.errors import QueueBusy
    from serve_app.jobs import postgres

    monkeypatch.setattr(postgres, "CREATE_LOCK_TIMEOUT_S", 1)
    url = postgres_srv.create_database("stuck_lock")
    queue = PostgresJobQueue(url)
    try:
        with psycopg.connect(url) as stuck, stuck.transaction():
            lock = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
            stuck.execute(lock, (postgres._CREATE_LOCK_CLASS, "alice"))
            started = time.monotonic()
            with pytest.raises(QueueBusy):
                queue.create("alice", ITEMS, {}, None, None, "h1", max_backlog=100)
            waited = time.monotonic() - started
            other, new = queue.create("bob", ITEMS, {}, None, None, "h2", max_backlog=100)
            assert new and other.owner == "bob"
        assert 0.9 <= waited < 10, waited  # the timeout, not the holder's lifetime
        again, new = queue.create("alice", ITEMS, {}, None, None, "h1", max_backlog=100)
        assert new and again.owner == "alice"  # the lock is free again
    finally:
        queue.close()


def test_postgres_schema_1_is_migrated_to_the_current_indexes(
    postgres_srv: PostgresServer,
) -> None:
    url = postgres_srv.create_database("migrate")
    before = PostgresJobQueue(url)
    kept, _ = before.create("kept", ITEMS, {}, None, None, "h0")  # from before the upgrade
    before.close()
    with psycopg.connect(url, autocommit=True) as db:  # as a version-1 database was
        db.execute("DROP INDEX jobs_queued")
        db.execute("DROP INDEX jobs_webhook_due")
        db.execute("DROP INDEX jobs_owner_by_age")
        db.execute("DROP INDEX jobs_leased")
        db.execute("CREATE INDEX jobs_owner_active ON jobs (owner)")  # version 4's, replaced
        db.execute("DROP TABLE owner_usage")
        db.execute("DELETE FROM serve_app_schema WHERE version > 1")
    migrated = PostgresJobQueue(url)
    try:
        with psycopg.connect(url, autocommit=True) as db:
            versions = [v for (v,) in db.execute("SELECT version FROM serve_app_schema")]
            indexes = {n for (n,) in db.execute("SELECT indexname FROM pg_indexes")}
        assert sorted(versions) == [1, 2, 3, 4, 5, 6]
        assert {"jobs_queued", "jobs_webhook_due", "jobs_owner_by_age", "jobs_leased"} <= indexes
        assert "jobs_owner_active" not in indexes
        with pytest.raises(RetainedFull) as full:  # its items were counted at the upgrade
            migrated.create("kept", ITEMS[:1], {}, None, None, "h1", max_retained=5)
        assert full.value.retained == 5
        migrated.create("o", ITEMS, {}, None, None, "h")
        assert migrated.oldest_queued_age(kept.created_at + 3) == pytest.approx(3)
    finally:
        migrated.close()
