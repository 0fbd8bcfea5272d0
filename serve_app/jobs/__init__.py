"""Queued jobs: the durable queue, a backend per URL scheme, and completion webhooks.

::

    JobQueue (protocol, queue.py)
    ├── SQLiteJobQueue     sqlite:///FILE        (sqlite.py: WAL mode, leases; one machine)
    └── PostgresJobQueue   postgresql://HOST/DB  (postgres.py: SKIP LOCKED claims; any node)
"""

from __future__ import annotations

from serve_app.config import QUEUE_SCHEMES, expand_env, sqlite_path, url_scheme
from serve_app.errors import ConfigError
from serve_app.jobs.queue import BacklogFull, IdempotencyConflict, Job, JobQueue, RetainedFull
from serve_app.jobs.sqlite import SQLiteJobQueue


def open_job_queue(url: str) -> JobQueue:
    """The queue named by a URL from the YAML (``${VAR}`` read from the environment)."""
    try:
        url = expand_env(url)
        url_scheme(url, QUEUE_SCHEMES, "job queue")
    except ValueError as exc:
        raise ConfigError(f"unsupported job queue url: {exc}") from exc
    path = sqlite_path(url)
    if path is not None:
        return SQLiteJobQueue(path)
    from serve_app.jobs.postgres import PostgresJobQueue  # only replicas that use it

    return PostgresJobQueue(url)


__all__ = [
    "BacklogFull",
    "IdempotencyConflict",
    "Job",
    "JobQueue",
    "RetainedFull",
    "open_job_queue",
]
