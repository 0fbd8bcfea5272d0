import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from serve_app.errors import QueueBusy
from serve_app.jobs import IdempotencyConflict
from serve_app.jobs.sqlite import (
    CLAIM_WEBHOOK_SQL,
    CLAIM_WORK_SQL,
    FAIR_CLAIM_SQL,
    OLDEST_QUEUED_SQL,
    SQLiteJobQueue,
)

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
    queue.record_webhook(job.id, "pending", 1, time.time() + 60, "HTTP 503", 0)
    assert queue.claim("w2", 30) is None  # not before its next attempt time
    queue.record_webhook(job.id, "delivered", 2, 0, None, 1)
    time.sleep(0.02)
    assert queue.purge_expired() == 1
    assert queue.get_any(job.id) is None and queue.results(job.id, 0, 10) == []


def _plan(queue: SQLiteJobQueue, sql: str, params: tuple[object, ...] | dict[str, object]) -> str:
    with sqlite3.connect(queue.path) as db:
        return " | ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params))


def test_claims_read_partial_indexes_not_the_whole_table(queue: SQLiteJobQueue) -> None:
    """An idle poll must not scan every retained job under the write lock."""
    fair = _plan(queue, FAIR_CLAIM_SQL, {"now": 1.0, "in_progress": "in_progress"})
    work = _plan(queue, CLAIM_WORK_SQL, {"now": 1.0})
    webhooks = _plan(queue, CLAIM_WEBHOOK_SQL, (1.0, 1.0))
    assert "USING INDEX jobs_owner_by_age" in fair and "jobs_leased" in fair, fair
    assert "USING INDEX jobs_active" in work, work
    assert "USING INDEX jobs_webhook_due" in webhooks, webhooks
    for plan in (work, webhooks):
        assert "SCAN jobs" not in plan.replace("SCAN jobs USING", ""), plan


def test_oldest_queued_age_reads_one_entry_of_its_partial_index(queue: SQLiteJobQueue) -> None:
    """Read every second by every worker: never a scan of the retained jobs."""
    plan = _plan(queue, OLDEST_QUEUED_SQL, ())
    assert "USING INDEX jobs_queued" in plan and "SCAN" not in plan, plan
    now = time.time()
    with sqlite3.connect(queue.path) as db:
        db.executemany(
            "INSERT INTO jobs (id, owner, state, total, created_at, finished_at, expires_at)"
            " VALUES (?, 'o', 'succeeded', 1, ?, ?, ?)",
            ((f"old{i}", now - 3600, now, now + 3600) for i in range(50_000)),
        )
    assert queue.oldest_queued_age() == 0.0  # finished jobs are not queued, however old
    job, _ = queue.create("o", ITEMS[:1], {}, None, None, "h")
    assert queue.oldest_queued_age(job.created_at + 2.5) == pytest.approx(2.5)


def test_an_idle_claim_costs_the_same_with_many_retained_jobs(queue: SQLiteJobQueue) -> None:
    now = time.time()
    with sqlite3.connect(queue.path) as db:
        db.executemany(
            "INSERT INTO jobs (id, owner, state, total, created_at, finished_at, expires_at)"
            " VALUES (?, 'o', 'succeeded', 1, ?, ?, ?)",
            ((f"old{i}", now, now, now + 3600) for i in range(50_000)),
        )
    started = time.perf_counter()
    for _ in range(20):
        assert queue.claim("w", 30) is None
    per_claim_ms = (time.perf_counter() - started) / 20 * 1000
    assert per_claim_ms < 5, f"an idle claim took {per_claim_ms:.1f} ms with 50,000 jobs"


def test_purge_works_in_bounded_batches_and_includes_cancelled_jobs(
    queue: SQLiteJobQueue,
) -> None:
    ids = [queue.create("o", ITEMS[:2], {}, None, None, "h")[0].id for _ in range(7)]
    for job_id in ids:
        assert queue.cancel(job_id, "o", result_ttl_s=0.01)[1]
    time.sleep(0.02)
    statements: list[str] = []
    original = queue._transaction

    def counting() -> object:
        statements.append("tx")
        return original()

    queue._transaction = counting  # type: ignore[method-assign]
    assert queue.purge_expired(batch=3) == 7
    assert len(statements) == 3  # 3 + 3 + 1: never one transaction for everything
    assert all(queue.get_any(job_id) is None for job_id in ids)
    assert queue.pending_items(ids[0], 10) == []


def test_a_locked_database_is_queue_busy_not_an_unhandled_error(tmp_path: Path) -> None:
    queue = SQLiteJobQueue(tmp_path / "jobs.db", busy_timeout_s=0.2)
    holder = sqlite3.connect(queue.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(QueueBusy) as caught:
            queue.create("o", ITEMS, {}, None, None, "h")
        assert time.monotonic() - started < 2
        assert caught.value.status_code == 503 and caught.value.retry_after_s >= 1
        with pytest.raises(QueueBusy):
            queue.claim("w", 30)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert queue.create("o", ITEMS, {}, None, None, "h")[1]


def test_owner_backlog_counts_unfinished_items_of_active_jobs(queue: SQLiteJobQueue) -> None:
    job, _ = queue.create(
        "alice", ITEMS, {1: {"ok": False, "error": {"code": "x"}}}, None, None, "h"
    )
    queue.create("bob", ITEMS, {}, None, None, "h")
    assert queue.owner_backlog("alice") == 4 and queue.owner_backlog("bob") == 5
    queue.claim("w", 30)
    queue.save_results(job.id, "w", 30, [(0, {"score": 0.5})])
    assert queue.owner_backlog("alice") == 3
    queue.cancel(job.id, "alice", 60)
    assert queue.owner_backlog("alice") == 0 and queue.owner_backlog("nobody") == 0


def test_refused_items_are_stored_compactly_and_read_back_whole(tmp_path: Path) -> None:
    """A job of 20,000 bad items takes less room than its body (4.4 times it before)."""
    import json

    from serve_app.api.job_input import prepare_job

    bad = {"entity_id": "E0000001", "context": {"amount": -1, "hour": 99, "channel": "x" * 40}}
    body = {"items": [bad] * 19_999 + [{"entity_id": 7}]}
    body_bytes = len(json.dumps(body))
    prepared = prepare_job(body, 100_000)
    assert len(prepared.rejected) == 20_000
    assert len({id(error) for error in prepared.rejected.values()}) == 2  # shared, not copied
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    job, _ = queue.create("o", prepared.items, prepared.rejected, None, None, prepared.body_hash)
    with sqlite3.connect(queue.path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        stored = db.execute(
            "SELECT SUM(LENGTH(job_id) + LENGTH(result) + 16) FROM job_results"
        ).fetchone()[0]
    assert stored < body_bytes, (stored, body_bytes)
    page = queue.results(job.id, 19_998, 10)
    assert [r["index"] for r in page] == [19_998, 19_999]
    assert page[0]["error"]["details"][0]["loc"] == ["context", "amount"]
    assert page[1]["error"]["code"] == "invalid_input" and page[1]["ok"] is False


def test_a_results_page_reads_only_the_errors_it_shows(tmp_path: Path) -> None:
    """A job of 20,000 distinct errors: a page of one item read every one of them, on
    every poll. (The API stores at most 1,000 distinct errors per job since, but the
    queue must not depend on that.)"""
    import tracemalloc

    rejected = {
        i: {"ok": False, "error": {"code": "invalid_input", "details": [{"loc": [f"field_{i}"]}]}}
        for i in range(20_000)
    }
    assert len({json_text(e) for e in rejected.values()}) == 20_000
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    job, _ = queue.create("o", [None] * 20_000, rejected, None, None, "h")
    tracemalloc.start()
    try:
        page = queue.results(job.id, 12_345, 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r["index"] for r in page] == [12_345, 12_346]
    assert "field_12345" in str(page[0]["error"]) and "field_12346" in str(page[1]["error"])
    assert peak < 200_000, peak  # all 20,000 errors: several MB


def json_text(value: object) -> str:
    import json

    return json.dumps(value, sort_keys=True)


def test_a_created_job_is_on_disk_before_create_returns(tmp_path: Path) -> None:
    """WAL's synchronous=NORMAL loses the last commits on a power loss: a job already
    answered 202 could vanish. Creation commits with synchronous=FULL."""
    statements: list[str] = []

    class Traced(SQLiteJobQueue):
        def _connect(self):  # type: ignore[no-untyped-def]
            context = super()._connect()
            db = context.__enter__()
            db.set_trace_callback(statements.append)
            return _Entered(context, db)

    queue = Traced(tmp_path / "jobs.db")
    statements.clear()
    queue.create("o", ITEMS, {}, None, None, "h")
    begin = statements.index("BEGIN IMMEDIATE")
    assert statements[:begin].count("PRAGMA synchronous=FULL") == 1, statements[: begin + 1]


class _Entered:
    """A context manager already entered: hands out ``db``, exits ``context``."""

    def __init__(self, context: Any, db: sqlite3.Connection) -> None:
        self.context, self.db = context, db

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *exc: object) -> Any:
        return self.context.__exit__(*exc)


def test_the_queue_and_store_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """SQLite creates files with the umask's mode (0644): every local user could read the
    callers' items, results, key names and callback URLs (tokens in query strings)."""
    import os
    import sqlite3
    import stat

    import pandas as pd

    from serve_app.scoring.features import ENTITY_FEATURES
    from serve_app.stores.sqlite import write_sqlite_store

    fresh = SQLiteJobQueue(tmp_path / "fresh.db")
    fresh.create("o", [{"entity_id": "E1", "context": {}}], {}, "https://x/?token=t", None, "h")
    with sqlite3.connect(tmp_path / "fresh.db") as reader:  # -wal and -shm live while open
        assert reader.execute("SELECT count(*) FROM jobs").fetchone() == (1,)
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(f"{tmp_path / 'fresh.db'}{suffix}").st_mode)
            assert mode == 0o600, (suffix, oct(mode))
    reader.close()
    old = tmp_path / "old.db"
    SQLiteJobQueue(old).close()
    for name in (old, tmp_path / "old.db-wal", tmp_path / "old.db-shm"):
        if name.exists():
            name.chmod(0o644)  # as an earlier version left it
    SQLiteJobQueue(old)
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    store = tmp_path / "features.db"
    row = {name: [1.0 if name == "age" else None] for name in ENTITY_FEATURES}
    write_sqlite_store(store, pd.DataFrame(row, index=pd.Index(["E1"], name="entity_id")))
    assert stat.S_IMODE(store.stat().st_mode) == 0o600


def test_an_older_queue_file_counts_its_kept_jobs_once_upgraded(tmp_path: Path) -> None:
    """owner_usage is new: a file from before it has jobs and no counts. Without the
    fill at start every key would begin at zero and could keep twice its cap."""
    from serve_app.jobs import RetainedFull

    path = tmp_path / "jobs.db"
    old = SQLiteJobQueue(path)
    old.create("alice", [{"entity_id": "E1", "context": {}}] * 3, {}, None, None, "h")
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE owner_usage")  # as the older version left the file
    upgraded = SQLiteJobQueue(path)
    with pytest.raises(RetainedFull) as full:
        upgraded.create(
            "alice", [{"entity_id": "E2", "context": {}}], {}, None, None, "h2", max_retained=3
        )
    assert full.value.retained == 3
    SQLiteJobQueue(path)  # a later start keeps the counts it has, no second fill
    with pytest.raises(RetainedFull):
        upgraded.create(
            "alice", [{"entity_id": "E2", "context": {}}], {}, None, None, "h2", max_retained=3
        )
