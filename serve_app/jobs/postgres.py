"""The job queue on PostgreSQL: shared by every node, same semantics as the SQLite queue.

psycopg 3 with a connection pool (``psycopg_pool``), synchronous like the protocol: the
Ingress and the JobWorker call it through ``asyncio.to_thread``.

* **Claims** lock one claimable row with ``FOR UPDATE SKIP LOCKED`` and lease it: two
  workers never take the same job, and none waits for another's lock.
* **Results exactly once**: ``job_results`` has the primary key (job_id, idx) and rows are
  inserted with ``ON CONFLICT DO NOTHING`` in the same transaction that checks, under the
  job row's lock, that the writer still holds the lease.
* **Idempotency keys** are a unique constraint on (owner, idempotency_key); a concurrent
  duplicate create loses the insert race and returns the winner's job.
* **Schema** is created or migrated at start, under an advisory lock so that replicas
  starting together do not race; ``serve_app_schema`` records the version.
* **Purge** deletes expired jobs in bounded batches, one short transaction each.

Times are epoch seconds from the caller's clock, as in the SQLite queue: keep the nodes'
clocks synchronised (NTP), since a lease written on one node is read on another.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

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

SCHEMA_VERSION = 6
_MIGRATION_LOCK = 0x5E27E_A99  # pg_advisory_xact_lock key: one migrator at a time
# With the owner's hashtext: one job creation per owner at a time (the two-int key space
# is apart from the one-bigint space of the migration lock).
_CREATE_LOCK_CLASS = 0x5E27E
CREATE_LOCK_TIMEOUT_S = 5  # as long as SQLite's busy_timeout
PURGE_BATCH = 500

_MIGRATIONS: dict[int, str] = {
    1: """
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
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    expires_at DOUBLE PRECISION,
    claims INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    error TEXT,
    webhook_state TEXT NOT NULL DEFAULT 'none',
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_next_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    webhook_last_error TEXT,
    CONSTRAINT jobs_idempotency UNIQUE (owner, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_claimable ON jobs (state, lease_until);
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS job_items (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    item TEXT NOT NULL,
    done BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS job_items_pending ON job_items (job_id, idx) WHERE NOT done;
CREATE TABLE IF NOT EXISTS job_results (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    ok BOOLEAN NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (job_id, idx)
);
""",
    # The oldest queued job's age (a gauge, read every second): one index entry.
    2: """
CREATE INDEX IF NOT EXISTS jobs_queued ON jobs (created_at) WHERE state = 'queued';
""",
    # Webhooks owed: an idle poll (several a second per worker) read every retained job.
    3: """
CREATE INDEX IF NOT EXISTS jobs_webhook_due ON jobs (webhook_next_at)
    WHERE webhook_state = 'pending';
""",
    # An owner's backlog (the per-key cap), read under the owner's lock at every creation:
    # its active jobs only, not the week of finished ones a busy key keeps.
    4: """
CREATE INDEX IF NOT EXISTS jobs_owner_active ON jobs (owner)
    WHERE state IN ('queued', 'running');
""",
    # The items of every job an owner still has (the retained-items cap), kept by create
    # and purge: summed over the owner's jobs at each creation it cost 98 ms with a
    # million kept, under the owner's lock.
    5: """
CREATE TABLE IF NOT EXISTS owner_usage (owner TEXT PRIMARY KEY, items BIGINT NOT NULL);
INSERT INTO owner_usage (owner, items)
    SELECT owner, SUM(total) FROM jobs GROUP BY owner ON CONFLICT (owner) DO NOTHING;
""",
    # Fair claims (JobQueue.claim): each owner's oldest claimable job, one index seek; the
    # owners holding a lease now, a range of live leases. The owner index also serves the
    # backlog (BACKLOG_SQL) that jobs_owner_active did.
    6: """
CREATE INDEX IF NOT EXISTS jobs_owner_by_age ON jobs (owner, created_at)
    WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs (lease_until);
DROP INDEX IF EXISTS jobs_owner_active;
""",
}

# Work: the oldest claimable job among owners holding no lease now (JobQueue.claim), an
# index seek per owner (jobs_owner_by_age) and a range of jobs_leased; then the oldest.
FAIR_CLAIM_SQL = (
    "SELECT j.id FROM owner_usage u JOIN jobs j ON j.id = ("
    "SELECT id FROM jobs WHERE owner = u.owner AND state IN ('queued', 'running')"
    " AND lease_until < %(now)s ORDER BY created_at LIMIT 1)"
    " WHERE u.owner NOT IN (SELECT owner FROM jobs WHERE lease_until >= %(now)s"
    " UNION SELECT owner FROM jobs WHERE webhook_state = 'pending'"
    " AND webhook_next_at >= %(now)s AND webhook_last_error = %(in_progress)s)"
    " ORDER BY j.created_at LIMIT 1 FOR UPDATE OF j SKIP LOCKED"
)
CLAIM_WORK_SQL = (
    "SELECT id FROM jobs WHERE state IN ('queued', 'running') AND lease_until < %(now)s"
    " ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED"
)
# A webhook owed and due, earliest first: the partial index jobs_webhook_due.
CLAIM_WEBHOOK_SQL = (
    "SELECT id FROM jobs WHERE webhook_state = 'pending' AND webhook_next_at <= %s"
    " AND lease_until < %s ORDER BY webhook_next_at LIMIT 1 FOR UPDATE SKIP LOCKED"
)
# An owner's items not yet done: the partial index jobs_owner_by_age.
BACKLOG_SQL = (
    "SELECT COALESCE(SUM(total - done), 0) FROM jobs"
    " WHERE owner = %s AND state IN ('queued', 'running')"
)
# The oldest job waiting for its first claim: min() over the partial index jobs_queued.
OLDEST_QUEUED_SQL = "SELECT min(created_at) FROM jobs WHERE state = 'queued'"

_JOB_COLUMNS = (
    "id, owner, state, total, done, failed, idempotency_key, body_hash, callback_url, "
    "created_at, started_at, finished_at, expires_at, claims, error, webhook_state, "
    "webhook_attempts, webhook_last_error"
)


def _retained(db: psycopg.Connection[Any], owner: str) -> int:
    """Items of every job of ``owner`` still kept (one row of owner_usage)."""
    row = db.execute("SELECT items FROM owner_usage WHERE owner = %s", (owner,)).fetchone()
    return int(row[0]) if row else 0


def _backlog(db: psycopg.Connection[Any], owner: str) -> int:
    row = db.execute(BACKLOG_SQL, (owner,)).fetchone()
    return int(row[0]) if row else 0


def _job(row: Sequence[Any] | None) -> Job | None:
    return None if row is None else Job(*row)


def _take_owner_turn(db: psycopg.Connection[Any], owner: str) -> None:
    """Make ``owner``'s creations take turns until this transaction ends, so the caps
    read next stay true until the insert (two creations on any replica each read the
    backlog before the other's insert and passed the cap together)."""
    # READ COMMITTED whatever the database's default: the backlog read after the lock
    # wait must see the creations committed during it (a REPEATABLE READ snapshot, taken
    # at the lock statement, let all eight of a test's concurrent creations through).
    db.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
    # A stuck holder (a lost node mid-COPY) must not hold the key's creations for hours:
    # past this, LockNotAvailable -> 503 queue_busy (PostgresJobQueue._connect).
    db.execute(f"SET LOCAL lock_timeout = '{CREATE_LOCK_TIMEOUT_S}s'")
    db.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_CREATE_LOCK_CLASS, owner))


def _copy_items(
    db: psycopg.Connection[Any],
    job_id: str,
    items: Sequence[dict[str, Any] | None],
    rejected: dict[int, dict[str, Any]],
) -> None:
    """A new job's items, and the errors of those refused at validation as their results
    (COPY: a 100,000-item job in one round trip per table)."""
    with db.cursor().copy("COPY job_items (job_id, idx, item) FROM STDIN") as copy:
        for index, item in enumerate(items):
            if item is not None:
                copy.write_row((job_id, index, json.dumps(item)))
    if rejected:
        with db.cursor().copy("COPY job_results (job_id, idx, ok, result) FROM STDIN") as copy:
            for index, error in rejected.items():
                copy.write_row((job_id, index, False, json.dumps(error)))


class PostgresJobQueue:
    """Jobs, their items and results in PostgreSQL, shared by every replica on every node."""

    def __init__(self, url: str, min_size: int = 1, max_size: int = 8) -> None:
        self._pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": False},
            open=False,
            name="serve_app-jobs",
            check=self._check_or_sweep,
        )
        self._pool.open(wait=True, timeout=30)
        self.migrate()

    def _check_or_sweep(self, conn: psycopg.Connection[Any]) -> None:
        """Check a connection before it is lent (one empty query). After a database
        restart each pooled connection failed its next call with a 503 (AdminShutdown):
        job uploads were lost for over a minute in a helper's test. One found dead
        means the rest are too: check every idle one now, so the pool replaces them
        together, not one per call after its growing back-off (1 + 2 + 4 s for four)."""
        try:
            ConnectionPool.check_connection(conn)
        except psycopg.Error:
            self._pool.check()
            raise

    @contextmanager
    def _connect(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; an unreachable or overloaded database is a 503.

        Inside it, ``db.transaction()`` commits or rolls back; a lost connection is
        replaced by the pool.
        """
        try:
            with self._pool.connection(timeout=10) as db:
                yield db
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise QueueBusy(f"the job queue is unavailable: {type(exc).__name__}") from exc

    def migrate(self) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION` (idempotent, safe to race)."""
        with self._connect() as db, db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS serve_app_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT max(version) FROM serve_app_schema").fetchone()
            current = row[0] if row and row[0] is not None else 0
            for version in range(current + 1, SCHEMA_VERSION + 1):
                db.execute(_MIGRATIONS[version])
                db.execute("INSERT INTO serve_app_schema (version) VALUES (%s)", (version,))

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

        With ``max_backlog``, the owner's creations take turns (a transaction-scoped
        advisory lock on the owner): two of them, on any replica, each read the backlog
        before the other's insert and passed the cap together.
        """
        now = time.time()
        job_id = uuid.uuid4().hex
        with self._connect() as db, db.transaction():
            if max_backlog is not None or max_retained is not None:
                _take_owner_turn(db, owner)
                earlier = self._earlier(db, owner, idempotency_key, body_hash)
                if earlier is not None:
                    return earlier, False
                if max_backlog is not None:
                    check_room(_backlog(db, owner), len(items) - len(rejected), max_backlog)
                if max_retained is not None:
                    check_retained(_retained(db, owner), len(items), max_retained)
            inserted = db.execute(
                "INSERT INTO jobs (id, owner, state, total, done, failed, idempotency_key,"
                " body_hash, callback_url, created_at)"
                " VALUES (%s, %s, 'queued', %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT ON CONSTRAINT jobs_idempotency DO NOTHING RETURNING id",
                (
                    job_id,
                    owner,
                    len(items),
                    len(rejected),
                    len(rejected),
                    idempotency_key,
                    body_hash,
                    callback_url,
                    now,
                ),
            ).fetchone()
            if inserted is None:  # the key was used before (perhaps a moment ago)
                job = self._earlier(db, owner, idempotency_key, body_hash)
                assert job is not None
                return job, False
            db.execute(
                "INSERT INTO owner_usage (owner, items) VALUES (%s, %s)"
                " ON CONFLICT (owner) DO UPDATE SET items = owner_usage.items + excluded.items",
                (owner, len(items)),
            )
            _copy_items(db, job_id, items, rejected)
            row = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s", (job_id,))
            job = _job(row.fetchone())
        assert job is not None
        return job, True

    @staticmethod
    def _earlier(
        db: psycopg.Connection[Any], owner: str, idempotency_key: str | None, body_hash: str
    ) -> Job | None:
        """The job created before with ``idempotency_key`` (``IdempotencyConflict`` if
        its body differed), or None."""
        if idempotency_key is None:
            return None
        row = db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE owner = %s AND idempotency_key = %s",
            (owner, idempotency_key),
        ).fetchone()
        return same_request(_job(row), idempotency_key, body_hash)

    def get(self, job_id: str, owner: str) -> Job | None:
        """The job if it exists and belongs to ``owner`` (otherwise None: a 404)."""
        if not is_job_id(job_id):
            return None
        with self._connect() as db:
            return _job(
                db.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s AND owner = %s",
                    (job_id, owner),
                ).fetchone()
            )

    def get_any(self, job_id: str) -> Job | None:
        """The job whoever owns it: for workers only, never for an API caller."""
        with self._connect() as db:
            return _job(
                db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s", (job_id,)).fetchone()
            )

    def results(self, job_id: str, offset: int, limit: int) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT idx, result FROM job_results WHERE job_id = %s AND idx >= %s"
                " ORDER BY idx LIMIT %s",
                (job_id, offset, limit),
            ).fetchall()
        return [{"index": idx, **json.loads(result)} for idx, result in rows]

    def cancel(self, job_id: str, owner: str, result_ttl_s: float) -> tuple[Job | None, bool]:
        """Cancel a job unless it has finished, in one UPDATE; return it and whether it was."""
        if not is_job_id(job_id):
            return None, False
        now = time.time()
        with self._connect() as db, db.transaction():
            changed = db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = %s, expires_at = %s,"
                " webhook_state = CASE WHEN callback_url IS NULL THEN 'none' ELSE 'pending' END,"
                " lease_until = 0"
                " WHERE id = %s AND owner = %s AND state IN ('queued', 'running')"
                f" RETURNING {_JOB_COLUMNS}",
                (now, now + result_ttl_s, job_id, owner),
            ).fetchone()
            if changed is not None:
                return _job(changed), True
            row = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s AND owner = %s", (job_id, owner)
            ).fetchone()
        return _job(row), False

    def job_for_key(self, owner: str, idempotency_key: str) -> Job | None:
        """The job ``owner`` created with ``idempotency_key``, if any."""
        with self._connect() as db:
            return _job(
                db.execute(
                    f"SELECT {_JOB_COLUMNS} FROM jobs WHERE owner = %s AND idempotency_key = %s",
                    (owner, idempotency_key),
                ).fetchone()
            )

    def owner_backlog(self, owner: str) -> int:
        """Items not yet done in ``owner``'s queued and running jobs (the per-key cap)."""
        with self._connect() as db:
            return _backlog(db, owner)

    def depth(self) -> int:
        """Jobs waiting or running: the JobWorker's autoscaling metric."""
        with self._connect() as db:
            row = db.execute(
                "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"
            ).fetchone()
        return int(row[0]) if row else 0

    def oldest_queued_age(self, now: float | None = None) -> float:
        """Seconds since the oldest queued (never claimed) job was created; 0.0 if none."""
        with self._connect() as db:
            row = db.execute(OLDEST_QUEUED_SQL).fetchone()
        if row is None or row[0] is None:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - row[0])

    # ---- worker side -------------------------------------------------------------------

    def claim(self, worker: str, lease_s: float) -> Job | None:
        """Lease one job that needs work (queued or abandoned) or else one owed a webhook
        (see :meth:`JobQueue.claim`; as in SQLite)."""
        now = time.time()
        with self._connect() as db, db.transaction():
            fair = {"now": now, "in_progress": ATTEMPT_IN_PROGRESS}
            row = db.execute(FAIR_CLAIM_SQL, fair).fetchone()
            row = row or db.execute(CLAIM_WORK_SQL, {"now": now}).fetchone()
            row = row or db.execute(CLAIM_WEBHOOK_SQL, (now, now)).fetchone()
            if row is None:
                return None
            leased = db.execute(
                "UPDATE jobs SET lease_owner = %s, lease_until = %s,"
                " claims = claims + CASE WHEN state IN ('queued', 'running') THEN 1 ELSE 0 END,"
                " state = CASE WHEN state = 'queued' THEN 'running' ELSE state END,"
                " started_at = COALESCE(started_at, %s)"
                f" WHERE id = %s RETURNING {_JOB_COLUMNS}",
                (worker, now + lease_s, now, row[0]),
            ).fetchone()
        return _job(leased)

    def extend_lease(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Renew ``worker``'s lease on a running job; False when it no longer holds it."""
        with self._connect() as db, db.transaction():
            cursor = db.execute(
                "UPDATE jobs SET lease_until = %s"
                " WHERE id = %s AND lease_owner = %s AND state = 'running'",
                (time.time() + lease_s, job_id, worker),
            )
            return cursor.rowcount == 1

    def pending_items(self, job_id: str, limit: int) -> list[tuple[int, Any]]:
        """Items without a result yet, in order (after a crash: only the unfinished ones).

        ``job_items.done`` is set in the transaction that stores the item's result, and a
        partial index holds only the pending items: an anti-join against ``job_results``
        was planned badly once autovacuum's statistics arrived mid-job (seconds a chunk).
        """
        with self._connect() as db:
            rows = db.execute(
                "SELECT idx, item FROM job_items WHERE job_id = %s AND NOT done"
                " ORDER BY idx LIMIT %s",
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

        The job row is locked first (``FOR UPDATE``), so a concurrent cancel or a new
        claim waits for this transaction or makes it see that the lease is gone.
        """
        now = time.time()
        with self._connect() as db, db.transaction():
            held = db.execute(
                "SELECT 1 FROM jobs WHERE id = %s AND lease_owner = %s AND state = 'running'"
                " FOR UPDATE",
                (job_id, worker),
            ).fetchone()
            if held is None:
                return False
            indexes = [idx for idx, _ in results]
            oks = ["error" not in result for _, result in results]
            bodies = [json.dumps(result) for _, result in results]
            inserted = db.execute(
                "INSERT INTO job_results (job_id, idx, ok, result)"
                " SELECT %s::text, * FROM unnest(%s::int[], %s::bool[], %s::text[])"
                " ON CONFLICT (job_id, idx) DO NOTHING RETURNING ok",
                (job_id, indexes, oks, bodies),
            ).fetchall()
            failed = sum(1 for (ok,) in inserted if not ok)
            db.execute(  # the partial index of pending items shrinks as results arrive
                "UPDATE job_items SET done = true WHERE job_id = %s AND idx = ANY(%s)",
                (job_id, indexes),
            )
            db.execute(
                "UPDATE jobs SET done = done + %s, failed = failed + %s, lease_until = %s"
                " WHERE id = %s",
                (len(inserted), failed, now + lease_s, job_id),
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
        """Mark a job finished and owed a webhook when it has a callback (the finishing
        worker keeps the lease to make the first delivery attempt)."""
        now = time.time()
        with self._connect() as db, db.transaction():
            cursor = db.execute(
                "UPDATE jobs SET state = %s, error = %s, finished_at = %s, expires_at = %s,"
                " lease_until = CASE WHEN callback_url IS NULL THEN 0 ELSE %s END,"
                " webhook_state = CASE WHEN callback_url IS NULL THEN 'none' ELSE 'pending' END"
                " WHERE id = %s AND lease_owner = %s AND state = 'running'",
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
        with self._connect() as db, db.transaction():
            cursor = db.execute(
                "UPDATE jobs SET webhook_state = %s, webhook_attempts = %s, webhook_next_at = %s,"
                " webhook_last_error = %s, lease_until = 0, lease_owner = NULL"
                " WHERE id = %s AND webhook_state = 'pending' AND webhook_attempts = %s",
                (state, attempts, next_at, error, job_id, expected_attempts),
            )
            return cursor.rowcount == 1

    def release(self, worker: str) -> int:
        """Give up every lease ``worker`` holds (a graceful stop), so others claim at once.

        Not counted against ``max_claims``: the job did not fail, its worker stopped. A
        webhook attempt in flight keeps its fence (``webhook_next_at``). Returns how many.
        """
        with self._connect() as db, db.transaction():
            cursor = db.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_until = 0,"
                " claims = CASE WHEN state IN ('queued', 'running') AND claims > 0"
                " THEN claims - 1 ELSE claims END"
                " WHERE lease_owner = %s",
                (worker,),
            )
            return cursor.rowcount

    def purge_expired(self, batch: int = PURGE_BATCH) -> int:
        """Delete finished jobs past their retention, ``batch`` jobs per transaction.

        Bounded batches keep each transaction (and its locks and WAL) short however many
        jobs expired at once; ``SKIP LOCKED`` lets two purging replicas split the work.
        """
        purged = 0
        while True:
            now = time.time()
            with self._connect() as db, db.transaction():
                ids = [
                    row[0]
                    for row in db.execute(
                        "SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at < %s"
                        " AND webhook_state != 'pending' LIMIT %s FOR UPDATE SKIP LOCKED",
                        (now, batch),
                    )
                ]
                if ids:
                    freed = db.execute(
                        "SELECT owner, SUM(total) FROM jobs WHERE id = ANY(%s)"
                        " GROUP BY owner ORDER BY owner",  # one lock order for every purger
                        (ids,),
                    ).fetchall()
                    for owner, total in freed:
                        db.execute(
                            "UPDATE owner_usage SET items = GREATEST(0, items - %s)"
                            " WHERE owner = %s",
                            (total, owner),
                        )
                    for table, column in (
                        ("job_items", "job_id"),
                        ("job_results", "job_id"),
                        ("jobs", "id"),
                    ):
                        db.execute(f"DELETE FROM {table} WHERE {column} = ANY(%s)", (ids,))
            purged += len(ids)
            if len(ids) < batch:
                return purged

    def close(self) -> None:
        """Close the pool's connections."""
        self._pool.close()
