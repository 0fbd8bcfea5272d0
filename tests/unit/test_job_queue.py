import time
from pathlib import Path

import pytest

from serve_app.jobs import IdempotencyConflict
from serve_app.jobs.sqlite import SQLiteJobQueue

ITEMS = [{"entity_id": f"E{i:07d}", "context": {}} for i in range(5)]


@pytest.fixture
def queue(tmp_path: Path) -> SQLiteJobQueue:
    return SQLiteJobQueue(tmp_path / "jobs.db")


def test_create_claim_run_finish(queue: SQLiteJobQueue) -> None:
    job, created = queue.create("owner", ITEMS, {}, None, None, "h")
    assert created and job.state == "queued" and queue.depth() == 1
    claimed = queue.claim("w1", lease_s=30)
    assert claimed is not None and claimed.id == job.id and claimed.state == "running"
    assert queue.claim("w2", lease_s=30) is None  # leased: nobody else gets it
    pending = queue.pending_items(job.id, 3)
    assert [idx for idx, _ in pending] == [0, 1, 2]
    assert queue.save_results(job.id, "w1", 30, [(i, {"score": 0.5}) for i, _ in pending])
    assert [idx for idx, _ in queue.pending_items(job.id, 10)] == [3, 4]
    assert queue.save_results(
        job.id, "w1", 30, [(3, {"score": 0.1}), (4, {"error": {"code": "x"}})]
    )
    assert queue.finish(job.id, "w1", "succeeded", None, 30, 60)
    final = queue.get(job.id, "owner")
    assert final is not None and final.state == "succeeded"
    assert (final.done, final.failed, final.total) == (5, 1, 5)
    assert [r["index"] for r in queue.results(job.id, 0, 10)] == [0, 1, 2, 3, 4]
    assert queue.depth() == 0


def test_expired_lease_is_claimed_again_and_results_stay_exactly_once(
    queue: SQLiteJobQueue,
) -> None:
    job, _ = queue.create("owner", ITEMS, {}, None, None, "h")
    assert queue.claim("dead-worker", lease_s=0.05) is not None
    queue.save_results(job.id, "dead-worker", 0.05, [(0, {"score": 0.1}), (1, {"score": 0.2})])
    time.sleep(0.1)
    again = queue.claim("w2", lease_s=30)
    assert again is not None and again.claims == 2
    # the dead worker lost its lease: its late writes are refused
    assert not queue.save_results(job.id, "dead-worker", 30, [(2, {"score": 0.9})])
    assert [idx for idx, _ in queue.pending_items(job.id, 10)] == [2, 3, 4]
    # a re-sent result for an item already stored is ignored, not duplicated
    assert queue.save_results(job.id, "w2", 30, [(1, {"score": 0.7}), (2, {"score": 0.3})])
    results = queue.results(job.id, 0, 10)
    assert [r["index"] for r in results] == [0, 1, 2]
    assert results[1]["score"] == 0.2
    assert queue.get(job.id, "owner").done == 3


def test_idempotency_and_ownership(queue: SQLiteJobQueue) -> None:
    job, _ = queue.create("alice", ITEMS, {}, None, "key-1", "hash-a")
    same, created = queue.create("alice", ITEMS, {}, None, "key-1", "hash-a")
    assert same.id == job.id and not created
    with pytest.raises(IdempotencyConflict):
        queue.create("alice", ITEMS, {}, None, "key-1", "hash-b")
    bob, created = queue.create("bob", ITEMS, {}, None, "key-1", "hash-b")
    assert created and bob.id != job.id
    assert queue.get(job.id, "bob") is None and queue.cancel(job.id, "bob", 60) == (None, False)


def test_rejected_items_are_stored_as_errors_at_once(queue: SQLiteJobQueue) -> None:
    items = [ITEMS[0], None, ITEMS[2]]
    job, _ = queue.create("o", items, {1: {"error": {"code": "invalid_input"}}}, None, None, "h")
    assert (job.done, job.failed) == (1, 1)
    assert [idx for idx, _ in queue.pending_items(job.id, 10)] == [0, 2]


def test_cancel_stops_the_worker_and_owes_a_webhook(queue: SQLiteJobQueue) -> None:
    job, _ = queue.create("o", ITEMS, {}, "https://93.184.216.34/h", None, "h")
    queue.claim("w1", 30)
    cancelled, changed = queue.cancel(job.id, "o", 60)
    assert changed and cancelled is not None and cancelled.state == "cancelled"
    assert cancelled.expires_at is not None  # purged after the retention time like others
    again, changed_again = queue.cancel(job.id, "o", 60)
    assert again is not None and again.state == "cancelled" and not changed_again
    assert cancelled.webhook_state == "pending"
    assert not queue.save_results(job.id, "w1", 30, [(0, {"score": 0.5})])
    webhook_claim = queue.claim("w2", 30)
    assert webhook_claim is not None and webhook_claim.finished


def test_webhook_schedule_and_purge(queue: SQLiteJobQueue) -> None:
    job, _ = queue.create("o", ITEMS[:1], {}, "https://93.184.216.34/h", None, "h")
    queue.claim("w1", 30)
    queue.save_results(job.id, "w1", 30, [(0, {"score": 0.5})])
    assert queue.finish(job.id, "w1", "succeeded", None, 30, result_ttl_s=0.01)
    assert queue.claim("w2", 30) is None  # the finishing worker delivers first
    queue.record_webhook(job.id, "pending", 1, time.time() + 60, "HTTP 503")
    assert queue.claim("w2", 30) is None  # not before its next attempt time
    queue.record_webhook(job.id, "delivered", 2, 0, None)
    time.sleep(0.02)
    assert queue.purge_expired() == 1
    assert queue.get_any(job.id) is None and queue.results(job.id, 0, 10) == []
