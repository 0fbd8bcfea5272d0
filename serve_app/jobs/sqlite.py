"""The durable job queue on a SQLite file in WAL mode: at-least-once with leases.

Why not a library: persist-queue (SQLiteAckQueue), litequeue and huey's SQLite storage
were looked at. They give ack/nack of whole messages, but not what jobs need here:
leases that expire so a dead worker's job is claimed again, per-item progress that
survives the crash (so finished items are neither recomputed nor lost), idempotency keys
and a durable webhook schedule. So this is plain sqlite3 behind
:class:`~serve_app.jobs.queue.JobQueue`.

Exactly-once results: ``job_results`` has the primary key (job_id, idx) and rows are
inserted with ``INSERT OR IGNORE`` only while the writer holds the lease, so an item
recomputed after a crash cannot appear twice.

Cost under the write lock: claims, the queue depth and the oldest queued job's age read
partial indexes that hold only active (or queued) jobs and due webhooks, so an idle poll
costs the same with 200,000 retained jobs as with none; purging deletes in bounded
batches, one short transaction each. A database locked for longer than ``busy_timeout_s``
is :class:`~serve_app.errors.QueueBusy` (503 with ``Retry-After``), never an unhandled
error.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from serve_app.errors import QueueBusy
from serve_app.jobs.queue import (
    ATTEMPT_IN_PROGRESS,
    Job,
    check_retained,
    check_room,
    decode_item,
    is_job_id,
    same_request,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    total INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    body_hash TEXT,
    callback_url TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    expires_at REAL,
    claims INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    error TEXT,
    webhook_state TEXT NOT NULL DEFAULT 'none',
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_next_at REAL NOT NULL DEFAULT 0,
    webhook_last_error TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (owner, idempotency_key);
DROP INDEX IF EXISTS jobs_claimable;
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (created_at)
    WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (created_at) WHERE state = 'queued';
DROP INDEX IF EXISTS jobs_owner_active;
CREATE INDEX IF NOT EXISTS jobs_owner_by_age ON jobs (owner, created_at)
    WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (lease_until);
CREATE INDEX IF NOT EXISTS jobs_webhook_due ON jobs (webhook_next_at)
    WHERE webhook_state = 'pending';
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS job_items (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_results (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_errors (
    job_id TEXT NOT NULL,
    no INTEGER NOT NULL,
    error TEXT NOT NULL,
    PRIMARY KEY (job_id, no)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS owner_usage (
    owner TEXT PRIMARY KEY,
    items INTEGER NOT NULL
) WITHOUT ROWID;
"""
# The items of every job an owner still has (the retained-items cap), kept by create and
# purge: summed over the owner's jobs at each creation it cost 137 ms with a million kept,
# under the write lock. Filled from the jobs once, when the table is new (an upgrade).
_FILL_OWNER_USAGE = (
    "INSERT OR IGNORE INTO owner_usage (owner, items)"
    " SELECT owner, SUM(total) FROM jobs GROUP BY owner"
)

_JOB_COLUMNS = (
    "id, owner, state, total, done, failed, idempotency_key, body_hash, callback_url, "
    "created_at, started_at, finished_at, expires_at, claims, error, webhook_state, "
    "webhook_attempts, webhook_last_error"
)


# Claims: one query per index, each reading only the rows its partial index holds.
# First the oldest claimable job among owners holding no lease now (JobQueue.claim),
# then the oldest of all.
FAIR_CLAIM_SQL = (
    "SELECT j.id FROM owner_usage u JOIN jobs j ON j.id = ("
    "SELECT id FROM jobs WHERE owner = u.owner AND state IN ('queued', 'running')"
    " AND lease_until < :now ORDER BY created_at LIMIT 1)"
    " WHERE u.owner NOT IN (SELECT owner FROM jobs WHERE lease_until >= :now"
    " UNION SELECT owner FROM jobs WHERE webhook_state = 'pending'"
    " AND webhook_next_at >= :now AND webhook_last_error = :in_progress)"
    " ORDER BY j.created_at LIMIT 1"
)
CLAIM_WORK_SQL = (
    "SELECT id FROM jobs WHERE state IN ('queued', 'running') AND lease_until < :now"
    " ORDER BY created_at LIMIT 1"
)
CLAIM_WEBHOOK_SQL = (
    "SELECT id FROM jobs WHERE webhook_state = 'pending' AND webhook_next_at <= ?"
    " AND lease_until < ? ORDER BY webhook_next_at LIMIT 1"
)
# The oldest job waiting for its first claim: one entry of the partial index jobs_queued.
OLDEST_QUEUED_SQL = "SELECT MIN(created_at) FROM jobs WHERE state = 'queued'"
PURGE_BATCH = 500
_ERROR_REF = "#"  # a refused item's result points at its job's distinct error: "#3"


def _owner_only(path: Path) -> None:
    """Create the database file 0600 (SQLite gives its -wal and -shm the same mode), or
    take a file of ours that others could read down to 0600: it holds callers' items,
    results, key names and callback URLs, which may carry tokens. SQLite itself creates
    files with the umask's mode (0644 here)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            try:
                held = name.stat()
            except FileNotFoundError:
                continue
            if held.st_mode & 0o077 and held.st_uid == os.geteuid():
                name.chmod(0o600)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class SQLiteJobQueue:
    """Jobs, their items and results in one SQLite file shared by every replica."""

    def __init__(self, path: Path, busy_timeout_s: float = 5.0) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        path.parent.mkdir(parents=True, exist_ok=True)
        _owner_only(path)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM owner_usage LIMIT 1").fetchone() is None:
                db.execute(_FILL_OWNER_USAGE)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for one call; a database locked past the busy timeout is a 503."""
        try:
            db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        except sqlite3.OperationalError as exc:
            raise QueueBusy(f"the job queue cannot be opened: {exc}") from exc
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            yield db
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise QueueBusy("the job queue is busy; retry shortly") from exc
            raise
        finally:
            db.close()

    @contextmanager
    def _transaction(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE): no upgrade deadlocks.

        ``durable``: on disk before it returns (``synchronous=FULL``). WAL's ``NORMAL``
        survives a process crash but not a power loss or an OS crash, which could drop a
        job after its 202. Only creation needs it: a lost result or lease is redone.
        """
        with self._connect() as db:
            if durable:
                db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ---- API side ----------------------------------------------------------------------

    def create(
        self,
        owner: str,
        items: Sequence[dict[str, Any] | None],
        rejected: dict[int, dict[str, Any]],
        callback_url: str | None,
        idempotency_key: str | None,
        body_hash: str,
        max_backlog: int | None = None,
        max_retained: int | None = None,
    ) -> tuple[Job, bool]:
        """Enqueue a job; return it and whether it is new (see :meth:`JobQueue.create`).

        ``items[i]`` is ``None`` for an item that failed validation; its error is in
        ``rejected[i]`` and is stored as its result at once. ``BEGIN IMMEDIATE`` holds
        every other writer off, so the backlog read here stays true until the commit.
        """
        now = time.time()
        with self._transaction(durable=True) as db:
            earlier = self._earlier(db, owner, idempotency_key, body_hash)
            if earlier is not None:
                return earlier, False
            if max_backlog is not None:
                check_room(_backlog(db, owner), len(items) - len(rejected), max_backlog)
            if max_retained is not None:
                check_retained(_retained(db, owner), len(items), max_retained)
            job_id = uuid.uuid4().hex
            db.execute(
                "INSERT INTO jobs (id, owner, state, total, failed, idempotency_key, body_hash,"
                " callback_url, created_at) VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    owner,
                    len(items),
                    len(rejected),
                    idempotency_key,
                    body_hash,
                    callback_url,
                    now,
                ),
            )
            db.executemany(
                "INSERT INTO job_items (job_id, idx, item) VALUES (?, ?, ?)",
                ((job_id, i, _json(item)) for i, item in enumerate(items) if item is not None),
            )
            self._store_rejected(db, job_id, rejected)
            db.execute("UPDATE jobs SET done = ? WHERE id = ?", (len(rejected), job_id))
            db.execute(
                "INSERT INTO owner_usage (owner, items) VALUES (?, ?)"
                " ON CONFLICT (owner) DO UPDATE SET items = items + excluded.items",
                (owner, len(items)),
            )
        job = self.get(job_id, owner)
        assert job is not None
        return job, True

    @staticmethod
    def _earlier(
        db: sqlite3.Connection, owner: str, idempotency_key: str | None, body_hash: str
    ) -> Job | None:
        """The job created before with ``idempotency_key`` (``IdempotencyConflict`` if
        its body differed), or None."""
        if idempotency_key is None:
            return None
        row = db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE owner = ? AND idempotency_key = ?",
            (owner, idempotency_key),
        ).fetchone()
        return same_request(None if row is None else Job(*row), idempotency_key, body_hash)

    @staticmethod
    def _store_rejected(
        db: sqlite3.Connection, job_id: str, rejected: dict[int, dict[str, Any]]
    ) -> None:
        """Refused items' errors, each distinct error once: a row per item holds ``#no``.

        100,000 items refused for the same reason cost 100,000 short rows, not 100,000
        copies of the error (which made a job of bad items 4.4 times its body's size).
        """
        numbers: dict[str, int] = {}
        rows = []
        for index, error in rejected.items():
            text = _json(error)
            number = numbers.setdefault(text, len(numbers))
            rows.append((job_id, index, f"{_ERROR_REF}{number}"))
        db.executemany(
            "INSERT INTO job_errors (job_id, no, error) VALUES (?, ?, ?)",
            ((job_id, number, text) for text, number in numbers.items()),
        )
        db.executemany(
            "INSERT INTO job_results (job_id, idx, ok, result) VALUES (?, ?, 0, ?)", rows
        )

    def get(self, job_id: str, owner: str) -> Job | None:
        """The job if it exists and belongs to ``owner`` (otherwise None: a 404)."""
        if not is_job_id(job_id):
            return None
        with self._connect() as db:
            row = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ? AND owner = ?", (job_id, owner)
            ).fetchone()
        return Job(*row) if row else None

    def get_any(self, job_id: str) -> Job | None:
        """The job whoever owns it: for workers only, never for an API caller."""
        with self._connect() as db:
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(*row) if row else None

    def results(self, job_id: str, offset: int, limit: int) -> list[dict[str, Any]]:
        # One statement (one snapshot, so a purge cannot land between two reads), and only
        # the errors this page points at: a job of 100,000 distinct errors (an unknown
        # field's name is in its message) cost every page of it all of them.
        with self._connect() as db:
            rows = db.execute(
                "SELECT r.idx, COALESCE(e.error, r.result) FROM job_results r"
                " LEFT JOIN job_errors e ON r.result LIKE ? AND e.job_id = r.job_id"
                " AND e.no = CAST(substr(r.result, 2) AS INTEGER)"
                " WHERE r.job_id = ? AND r.idx >= ? ORDER BY r.idx LIMIT ?",
                (f"{_ERROR_REF}%", job_id, offset, limit),
            ).fetchall()
        return [{"index": idx, **json.loads(result)} for idx, result in rows]

    def cancel(self, job_id: str, owner: str, result_ttl_s: float) -> tuple[Job | None, bool]:
        """Cancel a job unless it has finished, in one step; return it and whether it was.

        Check and change are one UPDATE, so a job that finishes at the same moment is
        either cancelled or reported finished, never both. A cancelled job is purged
        after ``result_ttl_s`` like any finished one.
        """
        if not is_job_id(job_id):
            return None, False
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, expires_at = ?,"
                " webhook_state = CASE WHEN callback_url IS NULL THEN 'none' ELSE 'pending' END,"
                " lease_until = 0"
                " WHERE id = ? AND owner = ? AND state IN ('queued', 'running')",
                (now, now + result_ttl_s, job_id, owner),
            )
            cancelled = cursor.rowcount == 1
            row = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ? AND owner = ?", (job_id, owner)
            ).fetchone()
        return (Job(*row) if row else None), cancelled

    def job_for_key(self, owner: str, idempotency_key: str) -> Job | None:
        """The job ``owner`` created with ``idempotency_key``, if any."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE owner = ? AND idempotency_key = ?",
                (owner, idempotency_key),
            ).fetchone()
        return Job(*row) if row else None

    def owner_backlog(self, owner: str) -> int:
        """Items not yet done in ``owner``'s queued and running jobs (the per-key cap)."""
        with self._connect() as db:
            return _backlog(db, owner)

    def depth(self) -> int:
        """Jobs waiting or running: the JobWorker's autoscaling metric."""
        with self._connect() as db:
            return int(
                db.execute(
                    "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')"
                ).fetchone()[0]
            )

    def oldest_queued_age(self, now: float | None = None) -> float:
        """Seconds since the oldest queued (never claimed) job was created; 0.0 if none."""
        with self._connect() as db:
            oldest = db.execute(OLDEST_QUEUED_SQL).fetchone()[0]
        if oldest is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - oldest)

    # ---- worker side -------------------------------------------------------------------

    def claim(self, worker: str, lease_s: float) -> Job | None:
        """Lease one job that needs work: queued, abandoned (lease expired) or owed a webhook."""
        now = time.time()
        with self._transaction() as db:
            fair = {"now": now, "in_progress": ATTEMPT_IN_PROGRESS}
            row = db.execute(FAIR_CLAIM_SQL, fair).fetchone()
            row = row or db.execute(CLAIM_WORK_SQL, {"now": now}).fetchone()
            row = row or db.execute(CLAIM_WEBHOOK_SQL, (now, now)).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET lease_owner = ?, lease_until = ?,"
                " claims = claims + CASE WHEN state IN ('queued', 'running') THEN 1 ELSE 0 END,"
                " state = CASE WHEN state = 'queued' THEN 'running' ELSE state END,"
                " started_at = COALESCE(started_at, ?) WHERE id = ?",
                (worker, now + lease_s, now, row[0]),
            )
            job = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (row[0],)).fetchone()
        return Job(*job)

    def extend_lease(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Renew ``worker``'s lease on a running job; False when it no longer holds it."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET lease_until = ?"
                " WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (time.time() + lease_s, job_id, worker),
            )
            return cursor.rowcount == 1

    def pending_items(self, job_id: str, limit: int) -> list[tuple[int, Any]]:
        """Items without a result yet, in order (after a crash: only the unfinished ones)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT i.idx, i.item FROM job_items i LEFT JOIN job_results r"
                " ON r.job_id = i.job_id AND r.idx = i.idx"
                " WHERE i.job_id = ? AND r.idx IS NULL ORDER BY i.idx LIMIT ?",
                (job_id, limit),
            ).fetchall()
        return [(idx, decode_item(item)) for idx, item in rows]

    def save_results(
        self,
        job_id: str,
        worker: str,
        lease_s: float,
        results: Sequence[tuple[int, dict[str, Any]]],
    ) -> bool:
        """Store a chunk's results and extend the lease, only if ``worker`` still holds it.

        Returns False when the lease was lost (another worker took over, or the job was
        cancelled): the caller must stop working on this job.
        """
        now = time.time()
        with self._transaction() as db:
            held = db.execute(
                "SELECT 1 FROM jobs WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (job_id, worker),
            ).fetchone()
            if held is None:
                return False
            inserted = failed = 0
            for idx, result in results:
                cursor = db.execute(
                    "INSERT OR IGNORE INTO job_results (job_id, idx, ok, result) VALUES (?, ?, ?, ?)",
                    (job_id, idx, int("error" not in result), _json(result)),
                )
                if cursor.rowcount == 1:  # 0 means another worker already stored this item
                    inserted += 1
                    failed += "error" in result
            db.execute(
                "UPDATE jobs SET done = done + ?, failed = failed + ?, lease_until = ?"
                " WHERE id = ?",
                (inserted, failed, now + lease_s, job_id),
            )
        return True

    def finish(
        self,
        job_id: str,
        worker: str,
        state: str,
        error: str | None,
        lease_s: float,
        result_ttl_s: float,
    ) -> bool:
        """Mark a job finished and owed a webhook when it has a callback.

        The finishing worker keeps the lease so that it, and no other, makes the first
        delivery attempt; :meth:`record_webhook` releases it.
        """
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, error = ?, finished_at = ?, expires_at = ?,"
                " lease_until = CASE WHEN callback_url IS NULL THEN 0 ELSE ? END,"
                " webhook_state = CASE WHEN callback_url IS NULL THEN 'none' ELSE 'pending' END"
                " WHERE id = ? AND lease_owner = ? AND state = 'running'",
                (state, error, now, now + result_ttl_s, now + lease_s, job_id, worker),
            )
            return cursor.rowcount == 1

    def record_webhook(
        self,
        job_id: str,
        state: str,
        attempts: int,
        next_at: float,
        error: str | None,
        expected_attempts: int,
    ) -> bool:
        """Persist an attempt's start or outcome (delivered, pending: retry at next_at, or
        dead) if the webhook is still pending at ``expected_attempts`` (see JobQueue)."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET webhook_state = ?, webhook_attempts = ?, webhook_next_at = ?,"
                " webhook_last_error = ?, lease_until = 0, lease_owner = NULL"
                " WHERE id = ? AND webhook_state = 'pending' AND webhook_attempts = ?",
                (state, attempts, next_at, error, job_id, expected_attempts),
            )
            return cursor.rowcount == 1

    def release(self, worker: str) -> int:
        """Give up every lease ``worker`` holds (a graceful stop), so others claim at once.

        A running job becomes claimable now instead of after its lease expires, and this
        claim is not counted against ``max_claims``: the job did not fail, its worker
        stopped. A webhook attempt in flight keeps its fence (``webhook_next_at``).
        Returns the number of jobs released.
        """
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_until = 0,"
                " claims = CASE WHEN state IN ('queued', 'running') AND claims > 0"
                " THEN claims - 1 ELSE claims END"
                " WHERE lease_owner = ?",
                (worker,),
            )
            return cursor.rowcount

    def purge_expired(self, batch: int = PURGE_BATCH) -> int:
        """Delete finished (and cancelled) jobs past their retention time, in batches.

        Each batch of at most ``batch`` jobs is one short transaction, so the write lock
        is never held for the whole backlog.
        """
        now = time.time()
        purged = 0
        while True:
            with self._transaction() as db:
                ids = [
                    row[0]
                    for row in db.execute(
                        "SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at < ?"
                        " AND webhook_state != 'pending' LIMIT ?",
                        (now, batch),
                    )
                ]
                marks = ",".join("?" * len(ids))
                freed = db.execute(
                    f"SELECT owner, SUM(total) FROM jobs WHERE id IN ({marks}) GROUP BY owner",
                    ids,
                ).fetchall()
                db.executemany(
                    "UPDATE owner_usage SET items = MAX(0, items - ?) WHERE owner = ?",
                    [(total, owner) for owner, total in freed],
                )
                for table, column in (
                    ("job_items", "job_id"),
                    ("job_results", "job_id"),
                    ("job_errors", "job_id"),
                    ("jobs", "id"),
                ):
                    db.executemany(f"DELETE FROM {table} WHERE {column} = ?", ((i,) for i in ids))
            purged += len(ids)
            if len(ids) < batch:
                return purged

    def close(self) -> None:
        """Nothing to release: a connection lives for one call."""


def _retained(db: sqlite3.Connection, owner: str) -> int:
    """Items of every job of ``owner`` still kept (one row of owner_usage)."""
    row = db.execute("SELECT items FROM owner_usage WHERE owner = ?", (owner,)).fetchone()
    return int(row[0]) if row else 0


def _backlog(db: sqlite3.Connection, owner: str) -> int:
    row = db.execute(
        "SELECT COALESCE(SUM(total - done), 0) FROM jobs"
        " WHERE owner = ? AND state IN ('queued', 'running')",
        (owner,),
    ).fetchone()
    return int(row[0])
