"""The JobWorker's webhook attempts against a real (hostile) receiver and a real queue.

An attempt is counted and fenced before it starts: a lease that expires mid-delivery does
not let a second worker start a concurrent delivery, and a webhook whose attempts were
used up by workers that died mid-way is dead, not re-claimed forever.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from serve_app.config import JobsConfig
from serve_app.deployments.job_worker import JobWorker
from serve_app.jobs.sqlite import SQLiteJobQueue
from serve_app.secret_files import new_webhook_secret
from tests.unit.test_webhooks import answer, drip, receiver


class _Worker(JobWorker.func_or_class):  # type: ignore[misc,name-defined]
    def __del__(self) -> None:
        """Serve's stop hook is not part of these tests (it is a coroutine)."""


def worker(queue: SQLiteJobQueue, config: JobsConfig) -> Any:
    """A JobWorker without Ray: its webhook logic on a real queue."""
    instance = object.__new__(_Worker)
    instance._queue = queue
    instance._config = config
    instance._secret = new_webhook_secret()
    instance._worker = "w1"
    counter = SimpleNamespace(inc=lambda *args, **kwargs: None)
    instance._metrics = SimpleNamespace(webhooks=counter)
    return instance


def finished_job(queue: SQLiteJobQueue, url: str, lease_s: float) -> str:
    job, _ = queue.create("o", [{"entity_id": "E1", "context": {}}], {}, url, None, "h")
    assert queue.claim("w1", lease_s) is not None
    assert queue.save_results(job.id, "w1", lease_s, [(0, {"score": 0.5})])
    assert queue.finish(job.id, "w1", "succeeded", None, lease_s, 3600)
    return job.id


def test_no_second_delivery_starts_while_an_attempt_outlives_its_lease(tmp_path: Path) -> None:
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    with receiver(drip) as server:
        config = JobsConfig(
            lease_s=0.2,
            webhooks={"allowed_hosts": [f"127.0.0.1:{server.port}"], "timeout_s": 1.5},
        )
        job_id = finished_job(queue, f"http://127.0.0.1:{server.port}/hook", lease_s=0.2)

        async def scenario() -> list[Any]:
            attempt = asyncio.create_task(worker(queue, config)._send_webhook(job_id))
            await asyncio.sleep(0.6)  # the lease (0.2 s) has expired; the attempt still runs
            claims = [await asyncio.to_thread(queue.claim, "w2", 30)]
            await attempt
            return claims

        claims = asyncio.run(scenario())
        assert claims == [None]
        assert len(server.requests) == 1  # one delivery, never two at once
    job = queue.get_any(job_id)
    assert job is not None
    assert (job.webhook_state, job.webhook_attempts, job.webhook_last_error) == (
        "pending",
        1,
        "timeout",
    )


def test_attempts_used_up_by_dying_workers_make_the_webhook_dead(tmp_path: Path) -> None:
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = JobsConfig(webhooks={"allowed_hosts": [f"127.0.0.1:{port}"], "max_attempts": 3})
    job_id = finished_job(queue, f"http://127.0.0.1:{port}/hook", lease_s=30)
    # three workers each counted an attempt, then died before recording its outcome
    queue.record_webhook(job_id, "pending", 3, time.time() - 1, "in_progress", 0)
    asyncio.run(worker(queue, config)._send_webhook(job_id))
    job = queue.get_any(job_id)
    assert job is not None and job.webhook_state == "dead" and job.webhook_attempts == 3


def test_a_refused_address_is_recorded_as_an_attempt_and_dead(tmp_path: Path) -> None:
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    # accepted at submission on an older, looser config; refused now
    job_id = finished_job(queue, "http://127.0.0.1:8265/hook", lease_s=30)
    asyncio.run(worker(queue, JobsConfig())._send_webhook(job_id))
    job = queue.get_any(job_id)
    assert job is not None
    assert (job.webhook_state, job.webhook_attempts, job.webhook_last_error) == (
        "dead",
        1,
        "refused_address",
    )


def test_a_webhook_is_signed_with_its_owners_secret(tmp_path: Path) -> None:
    """Not the service's own secret, which every tenant would then need to verify theirs."""
    from standardwebhooks.webhooks import Webhook, WebhookVerificationError

    from serve_app.jobs.webhooks import owner_secret

    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    with receiver(answer(204)) as server:
        config = JobsConfig(webhooks={"allowed_hosts": [f"127.0.0.1:{server.port}"]})
        job_id = finished_job(queue, f"http://127.0.0.1:{server.port}/hook", lease_s=30)
        instance = worker(queue, config)
        asyncio.run(instance._send_webhook(job_id))
    lines = server.requests[0].split("\r\n")[1:]
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}
    body = server.bodies[0]
    Webhook(owner_secret(instance._secret, "o")).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(instance._secret).verify(body, headers)


def test_secret_per_key_false_signs_with_the_services_secret(tmp_path: Path) -> None:
    """The way back for receivers that have not been given their key's secret yet."""
    from standardwebhooks.webhooks import Webhook

    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    with receiver(answer(204)) as server:
        hooks = {"allowed_hosts": [f"127.0.0.1:{server.port}"], "secret_per_key": False}
        job_id = finished_job(queue, f"http://127.0.0.1:{server.port}/hook", lease_s=30)
        instance = worker(queue, JobsConfig(webhooks=hooks))
        asyncio.run(instance._send_webhook(job_id))
    lines = server.requests[0].split("\r\n")[1:]
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}
    Webhook(instance._secret).verify(server.bodies[0], headers)


def test_a_delivery_refused_by_our_own_full_look_up_pool_is_not_an_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another tenant's hung name server filled the pool: this webhook's attempts were
    used up by instant refusals, dead within two minutes."""
    from serve_app.jobs import webhooks

    busy = "every look-up thread is busy"
    monkeypatch.setattr(webhooks._LOOKUPS, "start", lambda resolver, host, owner: busy)
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    job_id = finished_job(queue, "https://hooks.example.com/x", lease_s=30)
    before = time.time()
    asyncio.run(worker(queue, JobsConfig())._send_webhook(job_id))
    job = queue.get_any(job_id)
    assert job is not None
    assert (job.webhook_state, job.webhook_attempts, job.webhook_last_error) == (
        "pending",
        0,
        None,
    )
    with sqlite3.connect(queue.path) as db:
        (next_at,) = db.execute(
            "SELECT webhook_next_at FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
    assert before + 1 <= next_at <= time.time() + 3  # soon, not after a backoff
