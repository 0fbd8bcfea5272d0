"""Queued jobs: the durable queue, a backend per URL scheme, and completion webhooks.

::

    JobQueue (protocol, queue.py)
    └── SQLiteJobQueue   sqlite:///FILE   (sqlite.py: WAL mode, leases)
"""

from __future__ import annotations

from serve_app.config import sqlite_path
from serve_app.errors import ConfigError
from serve_app.jobs.queue import IdempotencyConflict, Job, JobQueue
from serve_app.jobs.sqlite import SQLiteJobQueue


def open_job_queue(url: str) -> JobQueue:
    """The queue named by a URL from the YAML."""
    path = sqlite_path(url)
    if path is not None:
        return SQLiteJobQueue(path)
    raise ConfigError(f"unsupported job queue url: {url}")


__all__ = ["IdempotencyConflict", "Job", "JobQueue", "open_job_queue"]
