"""The job-queue interface and the job record every backend returns.

Every method is synchronous and short; async callers (the Ingress and the JobWorker)
run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

TERMINAL = ("succeeded", "failed", "cancelled")
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def decode_item(text: str) -> Any:
    """A stored item as JSON, or the text itself when it is not JSON: the worker checks
    every item before scoring and fails a malformed one alone (not the whole chunk)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def is_job_id(text: str) -> bool:
    """Whether ``text`` can name a job (ids are ``uuid4().hex``). A caller's other string
    names none, and is not sent to the database: PostgreSQL refuses a NUL byte in text
    with an error, which answered ``GET /v1/jobs/%00`` with a 500."""
    return _JOB_ID.fullmatch(text) is not None


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    state: str
    total: int
    done: int
    failed: int
    idempotency_key: str | None
    body_hash: str | None
    callback_url: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    claims: int
    error: str | None
    webhook_state: str
    webhook_attempts: int
    webhook_last_error: str | None

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    def public(self) -> dict[str, Any]:
        """What callers see of a job (status endpoint and webhook payload); no owner."""
        return {
            "id": self.id,
            "state": self.state,
            "status_url": f"/v1/jobs/{self.id}",
            "progress": {"done": self.done, "total": self.total, "failed": self.failed},
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "expires_at": _iso(self.expires_at),
            "error": self.error,
            "webhook": None
            if self.callback_url is None
            else {
                "state": self.webhook_state,
                "attempts": self.webhook_attempts,
                "last_error": self.webhook_last_error,
            },
        }


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds")


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different body."""


class BacklogFull(Exception):
    """The owner's queued items plus this job's would pass ``max_backlog``."""

    def __init__(self, backlog: int) -> None:
        super().__init__(f"{backlog} items already queued")
        self.backlog = backlog


class RetainedFull(Exception):
    """The owner's retained items plus this job's would pass ``max_retained``."""

    def __init__(self, retained: int) -> None:
        super().__init__(f"{retained} items already retained")
        self.retained = retained


def same_request(job: Job | None, idempotency_key: str, body_hash: str) -> Job | None:
    """``job``, found by its ``idempotency_key``, as the answer to a resend;
    ``IdempotencyConflict`` if the key came with a different body this time."""
    if job is not None and job.body_hash != body_hash:
        raise IdempotencyConflict(idempotency_key)
    return job


def check_room(backlog: int, new_items: int, max_backlog: int) -> None:
    """``BacklogFull`` unless ``new_items`` fit next to ``backlog`` within ``max_backlog``."""
    if backlog + new_items > max_backlog:
        raise BacklogFull(backlog)


def check_retained(retained: int, new_items: int, max_retained: int) -> None:
    """``RetainedFull`` unless ``new_items`` fit next to ``retained`` within the cap."""
    if retained + new_items > max_retained:
        raise RetainedFull(retained)


# The error a webhook attempt records when it starts (with ``webhook_next_at`` past its
# deadline as a fence, and its lease released): an attempt in flight. Claims count its
# owner as busy, as they do an owner holding a lease.
ATTEMPT_IN_PROGRESS = "in_progress"


class JobQueue(Protocol):
    """A durable, at-least-once queue of jobs with leases, per-item results and webhooks."""

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
        """Enqueue a job; return it and whether it is new (a resend of ``idempotency_key``
        returns the earlier job, whatever the caps). ``BacklogFull`` when the owner's
        items not yet done plus this job's valid items would pass ``max_backlog``;
        ``RetainedFull`` when all the items of the owner's jobs still kept plus this job's
        would pass ``max_retained``. Checked in the insert's own transaction, so
        concurrent creations cannot pass them together."""
        ...

    def get(self, job_id: str, owner: str) -> Job | None: ...

    def get_any(self, job_id: str) -> Job | None: ...

    def results(self, job_id: str, offset: int, limit: int) -> list[dict[str, Any]]: ...

    def cancel(self, job_id: str, owner: str, result_ttl_s: float) -> tuple[Job | None, bool]:
        """Cancel unless finished, atomically: (the job or None if not the owner's, cancelled)."""
        ...

    def owner_backlog(self, owner: str) -> int:
        """Items not yet done in ``owner``'s queued and running jobs (for the per-key cap)."""
        ...

    def job_for_key(self, owner: str, idempotency_key: str) -> Job | None:
        """The job ``owner`` created with ``idempotency_key``, if any."""
        ...

    def depth(self) -> int: ...

    def oldest_queued_age(self, now: float | None = None) -> float:
        """Seconds since the oldest job still waiting for its first claim was created
        (``now`` defaults to the clock); 0.0 when no job is queued.

        Reads one entry of an index that holds only queued jobs, whatever the number of
        retained ones; running jobs (even with an expired lease) are not counted.
        """
        ...

    def claim(self, worker: str, lease_s: float) -> Job | None:
        """Lease one job: work before webhooks. Work is the oldest claimable job of the
        owners (API keys) that hold no lease now, else the oldest of all: one key's
        backlog of small jobs, or its jobs whose webhooks hang, took every worker in
        turn (oldest first) while another key's job waited behind all of them; now each
        key with work gets a worker before any key gets a second. Webhooks are claimed
        earliest due first."""
        ...

    def extend_lease(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Renew ``worker``'s lease on a running job for ``lease_s`` more seconds (the
        JobWorker's heartbeat); False when it no longer holds it."""
        ...

    def pending_items(self, job_id: str, limit: int) -> list[tuple[int, Any]]: ...

    def save_results(
        self,
        job_id: str,
        worker: str,
        lease_s: float,
        results: Sequence[tuple[int, dict[str, Any]]],
    ) -> bool: ...

    def finish(
        self,
        job_id: str,
        worker: str,
        state: str,
        error: str | None,
        lease_s: float,
        result_ttl_s: float,
    ) -> bool: ...

    def record_webhook(
        self,
        job_id: str,
        state: str,
        attempts: int,
        next_at: float,
        error: str | None,
        expected_attempts: int,
    ) -> bool:
        """Record an attempt's start or outcome, only if the webhook is still pending at
        ``expected_attempts``: a worker whose fence ran out (another worker started the
        next attempt meanwhile) must not overwrite that attempt with its late outcome."""
        ...

    def release(self, worker: str) -> int:
        """Give up every lease ``worker`` holds, uncounted against max_claims (graceful stop)."""
        ...

    def purge_expired(self) -> int:
        """Delete expired finished and cancelled jobs in bounded batches; return how many."""
        ...

    def close(self) -> None: ...
