"""Creating a job from its raw body, away from the Ingress's event loop.

A job body may be 16 MB and 100,000 items. Parsing it (one ``json.loads`` call holds the
GIL for a third of a second and more), hashing it and validating every item takes
seconds of CPU and hundreds of MiB; in the Ingress process even a worker thread would
stall every other request of the replica, ``/healthz`` included, because the GIL is
shared. So a large body is handed as bytes to a small pool of worker processes that
parse, validate, check the callback URL and the key's backlog, and store the job; only
the stored job comes back. A small body (the common case) is handled in a thread: a
process hop would cost more than it saves.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from serve_app.api.body import parse_json, read_body_bytes
from serve_app.api.quotas import check_job_size, queue_full, storage_full
from serve_app.api.schemas import JobRequest
from serve_app.api.validation import check_item_count, parse_body, parse_item
from serve_app.config import JobsConfig
from serve_app.errors import (
    CallbackLookupUnavailable,
    Conflict,
    InvalidInput,
    JobWorkerLost,
    JobWorkersBusy,
)
from serve_app.jobs import (
    BacklogFull,
    IdempotencyConflict,
    Job,
    JobQueue,
    RetainedFull,
    open_job_queue,
)
from serve_app.jobs.webhooks import CallbackRefused, check_callback_url
from serve_app.scoring.items import Item

# Bodies up to this size are handled in a thread of the Ingress; larger ones in a process.
IN_PROCESS_MAX_BYTES = 1 << 20
# Worker processes per Ingress replica: each holds one large body's parse at a time. One:
# with two per replica (four large bodies parsing and writing the queue at once across two
# replicas on 2 cores) one of eight concurrent 16 MB posts ran past Serve's 30 s request
# timeout (408) in a CI run of 2026-11-30; one per replica keeps each creation well inside it.
WORKER_PROCESSES = 1
# What a refused item's stored error may hold. Errors echo the caller's field names, and
# each distinct error is stored once: a 14.5 MB body of items with 16 distinct unknown
# fields each took 474 MB of queue files (kept for days), and one key could fill a disk.
STORED_DETAILS = 3  # per item: the first three problems
STORED_LOC_CHARS = 64  # per field name or path element echoed
DISTINCT_ERRORS = 1_000  # per job: later items with new errors keep code and message only


@dataclass
class PreparedJob:
    """Valid items (``None`` where refused), refused items' errors, callback, body digest."""

    items: list[Item | None]
    rejected: dict[int, dict[str, Any]]
    callback_url: str | None
    body_hash: str


def prepare_job(body: Any, max_items: int, raw: bytes | None = None) -> PreparedJob:
    """Validate the envelope and every item; a bad item is kept as its error.

    Compact on purpose: an item's exception is turned into its error dict at once (the
    exception would keep its traceback and pydantic's error alive: measured, 446 MiB for
    100,000 bad items), and identical errors share one dict. The idempotency digest is
    of the raw bytes when given (hashlib releases the GIL; a canonical re-serialisation
    of 16 MB would not).
    """
    request = parse_body(JobRequest, body)
    check_item_count(len(request.items), max_items)
    items: list[Item | None] = []
    rejected: dict[int, dict[str, Any]] = {}
    shared: dict[str, dict[str, Any]] = {}
    for index, raw_item in enumerate(request.items):
        try:
            items.append(parse_item(raw_item))
        except InvalidInput as exc:
            items.append(None)
            error = {"ok": False, "error": stored_error(exc.to_dict(), len(shared))}
            rejected[index] = shared.setdefault(json.dumps(error, sort_keys=True), error)
    canonical = raw if raw is not None else json.dumps(body, sort_keys=True).encode()
    return PreparedJob(items, rejected, request.callback_url, body_digest(canonical))


def body_digest(raw: bytes) -> str:
    """The digest a job's idempotency key is bound to: of the bytes as sent."""
    return hashlib.sha256(raw).hexdigest()


def replayed_job(
    queue: JobQueue, raw: bytes, owner: str, idempotency_key: str | None
) -> Job | None:
    """The job ``owner`` stored before under ``idempotency_key``, found before the body is
    parsed: a resend (HAProxy's or a client's) gets its job whatever the quota or the
    parsing workers' load says now, and a resend of a 16 MB body no longer costs the
    replica's one parsing process seconds. 409 if the key came with another body."""
    if idempotency_key is None:
        return None
    earlier = queue.job_for_key(owner, idempotency_key)
    if earlier is not None and earlier.body_hash != body_digest(raw):
        raise _reused_key()
    return earlier


def stored_error(error: dict[str, Any], distinct_so_far: int) -> dict[str, Any]:
    """A refused item's error as stored with its job: bounded (see ``STORED_DETAILS``).

    The code and message always stay; what was cut is said, never silently dropped."""
    details = error.get("details")
    if not details:
        return error
    if distinct_so_far >= DISTINCT_ERRORS:
        kept: list[Any] = []
    else:
        kept = [_short_detail(detail) for detail in details[:STORED_DETAILS]]
    if len(kept) < len(details):
        kept.append({"type": "more_errors_not_kept", "count": len(details) - len(kept)})
    return {**error, "details": kept}


def _short_detail(detail: Any) -> Any:
    if not isinstance(detail, dict) or not isinstance(detail.get("loc"), list):
        return detail
    loc = [part[:STORED_LOC_CHARS] if isinstance(part, str) else part for part in detail["loc"]]
    return {**detail, "loc": loc}


_QUEUES: dict[str, JobQueue] = {}


def _queue_for(url: str) -> JobQueue:
    """One queue client per URL per worker process."""
    if url not in _QUEUES:
        _QUEUES[url] = open_job_queue(url)
    return _QUEUES[url]


def create_job(
    raw: bytes,
    owner: str,
    idempotency_key: str | None,
    jobs_settings: dict[str, Any],
    webhooks_configured: bool,
    queue: JobQueue | None = None,
) -> tuple[Job, bool]:
    """Parse, validate, check and store one job; return it and whether it is new.

    Runs in a worker process (``queue`` None: opened from the settings' URL) or a thread.
    Raises the usual :class:`~serve_app.errors.ServeAppError` subclasses (4xx, 429, 503).
    """
    jobs = JobsConfig.model_validate(jobs_settings)
    queue = queue or _queue_for(jobs.queue_url)
    earlier = replayed_job(queue, raw, owner, idempotency_key)
    if earlier is not None:
        return earlier, False
    prepared = prepare_job(parse_json(raw), jobs.max_items, raw)
    if prepared.callback_url is not None:
        try:
            check_callback_url(prepared.callback_url, jobs.webhooks, owner=owner)
        except CallbackRefused as refused:
            if refused.temporary:
                raise CallbackLookupUnavailable(refused.message, refused.details) from refused
            raise
        if not webhooks_configured:
            raise InvalidInput(
                "webhooks are not configured on this service (no signing secret)",
                [{"type": "webhooks_not_configured"}],
            )
    valid = len(prepared.items) - len(prepared.rejected)
    limit = jobs.max_queued_items_per_key
    check_job_size(valid, limit)
    try:
        return queue.create(
            owner,
            prepared.items,
            prepared.rejected,
            prepared.callback_url,
            idempotency_key,
            prepared.body_hash,
            max_backlog=limit,
            max_retained=jobs.max_retained_items_per_key,
        )
    except IdempotencyConflict as exc:
        raise _reused_key() from exc
    except BacklogFull as full:
        raise queue_full(full.backlog, valid, limit) from full
    except RetainedFull as full:
        retained_limit = jobs.max_retained_items_per_key
        raise storage_full(full.retained, len(prepared.items), retained_limit) from full


def _reused_key() -> Conflict:
    return Conflict(
        "this Idempotency-Key was already used with a different body",
        [{"type": "idempotency_key_reused"}],
    )


def _exit_with(replica_pid: int) -> None:
    """In a worker process: end when the replica ends, even if it is killed."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(replica_pid, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=watch, daemon=True, name="exit-with-replica").start()


class JobCreator:
    """Creates jobs in a thread (small bodies) or a worker process (large bodies)."""

    def __init__(self, jobs: JobsConfig, queue: JobQueue, webhooks_configured: bool) -> None:
        self._settings = jobs.model_dump()
        self._queue = queue
        self._webhooks_configured = webhooks_configured
        self._pool: ProcessPoolExecutor | None = None
        self._in_processes = 0  # large bodies being created now (this event loop only)

    def _processes(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # Not fork: the replica runs threads (gRPC, Ray). The fork server preloads this
            # module only, not the replica's __main__ (Ray's worker script).
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self._pool = ProcessPoolExecutor(
                WORKER_PROCESSES,
                mp_context=context,
                initializer=_exit_with,
                initargs=(os.getpid(),),
            )
        return self._pool

    async def create(self, raw: bytes, owner: str, idempotency_key: str | None) -> tuple[Job, bool]:
        args = (raw, owner, idempotency_key, self._settings, self._webhooks_configured)
        if len(raw) <= IN_PROCESS_MAX_BYTES:
            return await asyncio.to_thread(create_job, *args, self._queue)
        if idempotency_key is not None:
            earlier = await asyncio.to_thread(
                replayed_job, self._queue, raw, owner, idempotency_key
            )
            if earlier is not None:
                return earlier, False
        # Refuse rather than queue behind busy workers: a large body waiting for one would
        # hold its 16 MB and run into the request timeout (408s in an 8-post test), while a
        # 503 + Retry-After lets the client come back when a worker is free.
        if self._in_processes >= WORKER_PROCESSES:
            raise JobWorkersBusy(
                f"this replica's job-parsing worker(s) ({WORKER_PROCESSES}) are busy with "
                "large bodies; retry after the Retry-After seconds",
                [{"type": "job_workers_busy", "limit": WORKER_PROCESSES}],
            )
        self._in_processes += 1
        pool = self._processes()
        try:
            work = asyncio.get_running_loop().run_in_executor(pool, create_job, *args)
        except BrokenProcessPool as broken:
            self._in_processes -= 1
            raise self._lost(pool, broken) from broken
        except BaseException:
            self._in_processes -= 1
            raise
        # Counted until the worker is done, not until this caller stops waiting: a client
        # that went away leaves its body being parsed, and the next large one must be
        # refused at once, not queued behind it.
        work.add_done_callback(self._worker_done)
        try:
            return await asyncio.shield(work)
        except BrokenProcessPool as broken:
            raise self._lost(pool, broken) from broken

    def _lost(self, pool: ProcessPoolExecutor, broken: BrokenProcessPool) -> JobWorkerLost:
        """A dead worker breaks a ``ProcessPoolExecutor`` for good: drop it, so the next
        large body gets a fresh pool instead of the same error until the replica restarts.
        Only that pool: a caller that wakes late must not stop the fresh one."""
        pool.shutdown(wait=False, cancel_futures=True)
        if self._pool is pool:
            self._pool = None
        return JobWorkerLost(
            "the process parsing this job's body died; send it again (with the same "
            "Idempotency-Key, a job it had stored already comes back instead of a new one)",
            [{"type": "job_worker_lost", "reason": str(broken)[:200]}],
        )

    def _worker_done(self, work: asyncio.Future[tuple[Job, bool]]) -> None:
        self._in_processes -= 1
        if not work.cancelled():
            work.exception()  # retrieved: a caller that went away leaves no warning

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


async def job_raw_body(request: Request) -> bytes:
    """The job body as bytes, size-bounded while streaming (413), parsed later elsewhere."""
    config = request.app.state.api_context.config
    return await read_body_bytes(
        request, config.jobs.max_body_bytes, config.limits.body_read_timeout_s
    )


JobRawBody = Annotated[bytes, Depends(job_raw_body)]
