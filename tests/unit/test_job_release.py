"""A graceful stop gives its job leases back: the job continues at once, elsewhere."""

from pathlib import Path

from serve_app.jobs.sqlite import SQLiteJobQueue

ITEMS = [{"entity_id": f"E{i:07d}", "context": {}} for i in range(4)]


def test_released_job_is_claimable_at_once_and_the_claim_is_not_counted(tmp_path: Path) -> None:
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    job, _ = queue.create("owner", ITEMS, {}, None, None, "h")
    other, _ = queue.create("owner", ITEMS, {}, None, None, "h2")
    first = queue.claim("stopping", lease_s=3600)
    assert first is not None and first.claims == 1
    assert queue.save_results(first.id, "stopping", 3600, [(0, {"score": 0.1})])
    second = queue.claim("other-worker", lease_s=3600)
    assert second is not None and second.id != first.id

    assert queue.release("stopping") == 1  # only its own lease
    # a late write of the stopped worker is refused: it no longer holds the lease
    assert not queue.save_results(first.id, "stopping", 3600, [(1, {"score": 0.2})])

    again = queue.claim("restarted", lease_s=3600)  # no wait for the hour-long lease
    assert again is not None and again.id == first.id
    assert again.claims == 1  # the stop is not held against max_claims
    assert [idx for idx, _ in queue.pending_items(first.id, 10)] == [1, 2, 3]
    assert queue.release("nobody") == 0
    assert {job.id, other.id} == {first.id, second.id}
