"""A replica whose start fails (a malformed webhook secret) fails with that error alone.

Serve calls the stop hook (``__del__``) after a failed ``__init__`` too; it used to raise
an AttributeError for what ``__init__`` never made, which buried the real error in the
replica's log, and the queue had been opened before the secret was read.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from serve_app.deployments import job_worker
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.job_worker import JobWorker
from serve_app.errors import ConfigError

BAD_SECRET = "whsec_not-base64"


def _half_made(cls: type) -> Any:
    """An instance on which ``__init__`` never ran: none of its attributes. Its class
    quiets ``__del__`` for Python's own collection (an async one would warn it was never
    awaited); the test calls the real one, as Serve does."""
    quiet = type(f"Quiet{cls.__name__}", (cls,), {"__del__": lambda self: None})
    return quiet.__new__(quiet)


@pytest.mark.parametrize("deployment", [Ingress, JobWorker], ids=["Ingress", "JobWorker"])
def test_the_stop_hook_after_a_failed_start_raises_nothing(deployment: Any) -> None:
    cls = deployment.func_or_class
    asyncio.run(cls.__del__(_half_made(cls)))


def test_a_job_worker_with_a_bad_secret_fails_before_opening_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_APP_WEBHOOK_SECRET", BAD_SECRET)
    # Not Serve's logs here: its handler would stay and double other tests' records.
    monkeypatch.setattr(job_worker, "route_to_serve_logs", lambda: None)
    queue = tmp_path / "jobs.db"
    cls = JobWorker.func_or_class
    worker = _half_made(cls)
    jobs = {"queue_url": f"sqlite:///{queue}"}
    with pytest.raises(ConfigError, match="webhook signing secret"):
        asyncio.run(cls.__init__(worker, None, jobs))
    assert not queue.exists()
    asyncio.run(cls.__del__(worker))
