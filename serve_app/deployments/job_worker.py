"""The JobWorker deployment: claims queued jobs, runs them through the Model, notifies.

Each replica runs a claim loop. A claimed job is processed in chunks: the items still
without a result are sent to the Model as one list (so batching and caches serve jobs
too), and each chunk's results are stored durably. While the job runs, a heartbeat renews
its lease every third of ``lease_s``; a chunk slower than ``chunk_timeout_s`` ends the
attempt, so a hung Model cannot hold a job forever. A worker that dies loses its lease;
the job is claimed again and only its unfinished items are run.
When the job is done its webhook is owed; deliveries and their retries are scheduled in
the queue too, so they survive restarts as well.

Autoscaling: each replica reports the queue depth (``record_autoscaling_stats``) and
:func:`queue_depth_policy` asks for ``ceil(depth / target_ongoing_requests)`` replicas.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import time
import uuid
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import AutoscalingContext
from ray.serve.handle import DeploymentHandle

from serve_app.api.validation import parse_item
from serve_app.config import JobsConfig, JobWorkerTuning
from serve_app.errors import InvalidInput
from serve_app.jobs import Job, JobQueue, open_job_queue
from serve_app.jobs.queue import ATTEMPT_IN_PROGRESS
from serve_app.jobs.webhooks import (
    LOOKUPS_BUSY,
    Attempt,
    backoff_s,
    deliver,
    event_body,
    owner_secret,
    read_secret,
)
from serve_app.logs import route_to_serve_logs
from serve_app.metrics import JobMetrics
from serve_app.scoring.answers import job_result
from serve_app.scoring.items import Item

logger = logging.getLogger("serve_app.jobs")

_PURGE_EVERY_S = 300.0
# Past an attempt's deadline before another worker may claim its webhook again. Wide:
# the fence is computed before the write that records it, which may wait up to SQLite's
# 5 s busy timeout; a late outcome is refused anyway (record_webhook's expected_attempts).
_WEBHOOK_FENCE_MARGIN_S = 15.0


def queue_depth_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """Replicas for the current queue depth, ``ceil(depth / target_ongoing_requests)``.

    Every replica reports the same shared queue, so the newest report is the depth. The
    newest value is used rather than the look-back mean: a burst of jobs should add
    workers at once (Serve still applies upscale/downscale delays and the bounds).
    """
    newest: tuple[float, float] | None = None
    for series in (ctx.raw_metrics or {}).get("queue_depth", {}).values():
        for point in series:
            if newest is None or point.timestamp > newest[0]:
                newest = (point.timestamp, point.value)
    depth = newest[1] if newest else 0.0
    per_replica = getattr(ctx.config, "target_ongoing_requests", None) or 2
    desired = math.ceil(depth / per_replica)
    low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    return max(low, min(high, desired)), ctx.policy_state


@serve.deployment(name="JobWorker")
class JobWorker:
    async def __init__(self, model: DeploymentHandle, jobs: dict[str, Any]) -> None:
        route_to_serve_logs()
        self._config = JobsConfig.model_validate(jobs)
        self._secret = read_secret(self._config.webhooks)  # a malformed secret stops start
        self._queue: JobQueue = open_job_queue(self._config.queue_url)
        self._model = model
        self._worker = f"{serve.get_replica_context().replica_id.unique_id}-{uuid.uuid4().hex[:6]}"
        self._metrics = JobMetrics()
        self._slots = asyncio.Semaphore(JobWorkerTuning().concurrent_jobs)
        self._depth = 0
        self._running: set[asyncio.Task[None]] = set()
        self._claiming: asyncio.Task[Job | None] | None = None  # the claim in its thread
        loop = asyncio.get_running_loop()
        self._loop = loop.create_task(self._claim_loop())
        self._housekeeping = loop.create_task(self._housekeeping_loop())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        tuning = JobWorkerTuning.model_validate(user_config or {})
        self._slots = asyncio.Semaphore(tuning.concurrent_jobs)

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"queue_depth": float(self._depth)}

    def check_health(self) -> None:
        for task in (self._loop, self._housekeeping):
            if task.done():
                raise RuntimeError(f"background loop stopped: {task!r}")

    async def __del__(self) -> None:
        """Serve calls this when the replica stops (graceful stop, scale-down, `serve run`
        interrupted): stop the loops, give back this worker's leases, close the queue.

        Released jobs are claimable at once, so after a restart (or by another replica)
        they continue immediately with their unfinished items instead of waiting out the
        lease. A chunk whose results were not stored yet is simply run again: results are
        keyed by (job, index), so every item still appears exactly once.

        After a failed ``__init__`` there is nothing to stop (its last step starts the
        loops); an AttributeError here buried the start-up error in the replica's log.
        """
        if not hasattr(self, "_housekeeping"):
            return
        tasks = (self._loop, self._housekeeping, *self._running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._claiming is not None:
            # A claim already in its thread commits whatever a cancel says: wait for it,
            # or the job it takes stays leased to this stopped worker for lease_s.
            await asyncio.gather(self._claiming, return_exceptions=True)
        try:
            released = await asyncio.to_thread(self._queue.release, self._worker)
            logger.info("stopping: released %d job lease(s)", released)
        except Exception:  # a stop must finish; the leases then expire on their own
            logger.exception("stopping: could not release job leases")
        await asyncio.to_thread(self._queue.close)

    def stats(self) -> dict[str, Any]:
        return {
            "worker": self._worker,
            "pid": os.getpid(),
            "running_jobs": len(self._running),
            "depth": self._depth,
        }

    # ---- the claim loop ----------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            try:
                slots = self._slots
                await slots.acquire()
                claim = asyncio.to_thread(self._queue.claim, self._worker, self._config.lease_s)
                self._claiming = asyncio.create_task(claim)
                try:
                    job = await asyncio.shield(self._claiming)  # a stop waits for it: __del__
                except BaseException:  # a busy or restarting database: the slot is free again
                    slots.release()
                    raise
                if job is None:
                    slots.release()
                    await asyncio.sleep(self._config.poll_interval_s)
                    continue
                task = asyncio.create_task(self._handle(job))
                self._running.add(task)
                task.add_done_callback(lambda t, s=slots: (self._running.discard(t), s.release()))
            except Exception:  # the loop must outlive any single failure
                logger.exception("claim loop error")
                await asyncio.sleep(1.0)

    async def _housekeeping_loop(self) -> None:
        """Refresh the queue gauges (depth: the autoscaling metric) and purge expired jobs.

        Separate from the claim loop, which blocks while every slot is busy: exactly when
        the depth matters most.
        """
        last_purge = 0.0
        while True:
            try:
                await self._refresh_queue_gauges()
                if time.monotonic() - last_purge > _PURGE_EVERY_S:
                    last_purge = time.monotonic()
                    await asyncio.to_thread(self._queue.purge_expired)
            except Exception:
                logger.exception("housekeeping error")
            await asyncio.sleep(1.0)

    async def _refresh_queue_gauges(self) -> None:
        """The queue depth (also the autoscaling metric) and the oldest queued job's age."""
        self._depth = await asyncio.to_thread(self._queue.depth)
        self._metrics.queue_depth.set(self._depth)
        age = await asyncio.to_thread(self._queue.oldest_queued_age)
        self._metrics.oldest_queued_age.set(age)

    async def _handle(self, job: Job) -> None:
        try:
            if job.finished:
                await self._send_webhook(job.id)
            elif job.claims > self._config.max_claims:
                await self._finish(job, "failed", f"abandoned after {job.claims - 1} claims")
            else:
                if job.claims == 1:
                    self._metrics.queue_wait.observe(max(0.0, time.time() - job.created_at))
                heartbeat = asyncio.create_task(self._keep_lease(job.id))
                try:
                    await self._run_job(job)
                finally:
                    heartbeat.cancel()
        except Exception:  # the lease expires and another claim retries the job
            logger.exception("job %s: worker error; it will be claimed again", job.id)

    async def _keep_lease(self, job_id: str) -> None:
        """Renew the lease every third of ``lease_s`` while the job runs.

        A lease then expires only when its worker is dead (or its event loop stuck), not
        when a chunk is slow: a slow chunk used to let another worker take the job and
        count a claim against ``max_claims``, and ``lease_s`` can be short (a killed
        worker's job waits that long). A hung chunk ends at ``chunk_timeout_s`` and this
        task with it (:meth:`_handle`). A lost lease is noticed by the next
        ``save_results``, which stops the run; the heartbeat just stops here. After a
        failed renewal the next try comes within a second, not a period later: with a
        10 s lease, two slow periods in a row would lose it.
        """
        period = self._config.lease_s / 3
        wait = period
        while True:
            await asyncio.sleep(wait)
            try:
                held = await asyncio.to_thread(
                    self._queue.extend_lease, job_id, self._worker, self._config.lease_s
                )
            except Exception:  # the queue may be busy or down a moment: try again soon
                logger.exception("job %s: lease not renewed", job_id)
                wait = min(period, 1.0)
                continue
            if not held:
                return
            wait = period

    async def _run_job(self, job: Job) -> None:
        config = self._config
        outage = 0  # chunks in a row that the feature store could not serve whole
        waited = 0.0  # seconds this job has waited for the store, in all
        while True:
            pending = await asyncio.to_thread(self._queue.pending_items, job.id, config.chunk_size)
            if not pending:
                break
            results = await self._score_stored(pending)
            unserved = 0
            if waited < config.store_wait_total_s:  # past it, the failures are stored
                results, unserved = _without_store_outage(results)
            kept = await asyncio.to_thread(
                self._queue.save_results, job.id, self._worker, config.lease_s, results
            )
            if not kept:
                logger.info("job %s: lease lost or job cancelled; stopping", job.id)
                return
            self._metrics.record_items(result for _, result in results)
            outage = outage + 1 if unserved else 0
            if unserved:  # results are stored once: an outage must not become them
                wait = min(config.store_wait_max_s, 2.0 ** min(outage - 1, 16))
                wait = min(wait, config.store_wait_total_s - waited)
                logger.warning(
                    "job %s: the feature store could not serve %d items; again in %.0f s",
                    job.id,
                    unserved,
                    wait,
                )
                await asyncio.sleep(wait)
                waited += wait
        await self._finish(job, "succeeded", None)

    async def _score_stored(self, pending: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """Results for a chunk of stored items. Each item is checked again: one that the
        queue's database holds in another shape than submission stored (edited by hand,
        a bad migration) fails alone, instead of failing the Model batch it would share
        with live predictions, and the job with it after ``max_claims``."""
        results: list[tuple[int, Any]] = []
        valid: list[tuple[int, Item]] = []
        for idx, stored in pending:
            try:
                valid.append((idx, parse_item(stored)))
            except InvalidInput as exc:
                logger.warning("job item %d is not a valid item in the queue: %s", idx, exc)
                results.append((idx, {"ok": False, "error": exc.to_dict()}))
        if valid:
            scored = await self._score_chunk([item for _, item in valid])
            results += [
                (idx, job_result(item, result))
                for (idx, item), result in zip(valid, scored["results"], strict=True)
            ]
        return sorted(results, key=lambda entry: entry[0])

    async def _score_chunk(self, items: list[Any]) -> Any:
        """One Model call; sent once more if its replica died (scoring is idempotent), so a
        Model crash costs a retry, not the job's whole lease. Bounded by
        ``chunk_timeout_s`` (a TimeoutError ends the attempt: see :meth:`_keep_lease`)."""
        timeout = self._config.chunk_timeout_s
        try:
            return await asyncio.wait_for(self._model.score.remote(items), timeout)
        except RayActorError as exc:
            logger.warning("model replica died during a job chunk; retrying once: %r", exc)
            return await asyncio.wait_for(self._model.score.remote(items), timeout)

    async def _finish(self, job: Job, state: str, error: str | None) -> None:
        finished = await asyncio.to_thread(
            self._queue.finish,
            job.id,
            self._worker,
            state,
            error,
            self._config.lease_s,
            self._config.result_ttl_s,
        )
        if not finished:
            return
        self._metrics.jobs.inc(tags={"state": state})
        self._metrics.duration.observe(time.time() - job.created_at)
        if job.callback_url:
            await self._send_webhook(job.id)

    async def _send_webhook(self, job_id: str) -> None:
        """One delivery attempt, counted and fenced before it starts.

        Before sending, the attempt is recorded with ``webhook_next_at`` past the attempt's
        deadline: no other worker can claim the webhook while this attempt may still run,
        even if this worker's lease expires meanwhile (no second, concurrent delivery),
        and a worker that dies mid-attempt has used up an attempt, so a webhook that
        crashes its worker is dead after ``max_attempts``, never re-claimed forever.
        """
        job = await asyncio.to_thread(self._queue.get_any, job_id)
        if job is None or job.webhook_state != "pending" or not job.callback_url:
            return
        config = self._config.webhooks
        attempts = job.webhook_attempts + 1
        if attempts > config.max_attempts:  # attempts used up by workers that died mid-way
            await self._record_webhook(job, "dead", job.webhook_attempts, job.webhook_last_error)
            return
        fence = time.time() + config.timeout_s + _WEBHOOK_FENCE_MARGIN_S
        started = await asyncio.to_thread(
            self._queue.record_webhook,
            job.id,
            "pending",
            attempts,
            fence,
            ATTEMPT_IN_PROGRESS,
            job.webhook_attempts,
        )
        if not started:  # another worker started this attempt first
            return
        if self._secret is None:
            attempt = Attempt(False, False, "no_secret")
        else:
            try:
                body = json.dumps(event_body(job.public()), separators=(",", ":"))
                secret = self._secret
                if config.secret_per_key:  # each key's own: one tenant cannot forge another's
                    secret = owner_secret(secret, job.owner)
                attempt = await deliver(
                    job.callback_url, secret, f"msg_{job.id}", body, config, owner=job.owner
                )
            except Exception:  # deliver() classifies its own failures; this is a bug guard
                logger.exception("job %s: webhook attempt failed unexpectedly", job.id)
                attempt = Attempt(False, True, "internal_error")
        if attempt.error == LOOKUPS_BUSY:  # our own look-up threads were full: not counted
            await self._postpone_webhook(job, attempts)
            return
        if attempt.delivered:
            state = "delivered"
        elif attempt.retryable and attempts < config.max_attempts:
            state = "pending"
        else:
            state = "dead"
        self._metrics.webhooks.inc(tags={"outcome": "retrying" if state == "pending" else state})
        await self._record_webhook(job, state, attempts, attempt.error)

    async def _postpone_webhook(self, job: Job, attempts: int) -> None:
        """Give the attempt back and try again in 1-3 s: a tenant whose name server hangs
        must not use up other tenants' attempts (they were refused at once, counted, and
        dead after max_attempts within two minutes)."""
        await asyncio.to_thread(
            self._queue.record_webhook,
            job.id,
            "pending",
            job.webhook_attempts,
            time.time() + 1.0 + 2.0 * random.random(),
            job.webhook_last_error,
            attempts,
        )

    async def _record_webhook(self, job: Job, state: str, attempts: int, error: str | None) -> None:
        next_at = (
            time.time() + backoff_s(attempts, self._config.webhooks) if state == "pending" else 0.0
        )
        recorded = await asyncio.to_thread(
            self._queue.record_webhook, job.id, state, attempts, next_at, error, attempts
        )
        if not recorded:  # this attempt outlived its fence and a later one has begun
            logger.warning("job %s: webhook attempt %d ended after its fence", job.id, attempts)


def _without_store_outage(results: list[tuple[int, Any]]) -> tuple[list[tuple[int, Any]], int]:
    """The results to store, and how many items were left out because the feature store
    could not serve them (``store.on_error: fail``; in ``degrade`` mode they are scored
    on defaults and kept). A live request gets a 503 for that; a job item would have
    kept the failure for good, since each result is stored exactly once."""
    kept = [
        (idx, result)
        for idx, result in results
        if (result.get("error") or {}).get("code") != "store_unavailable"
    ]
    return kept, len(results) - len(kept)
