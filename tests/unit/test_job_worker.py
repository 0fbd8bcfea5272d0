import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from serve_app.config import JobsConfig
from serve_app.deployments.job_worker import JobWorker, queue_depth_policy
from serve_app.jobs.sqlite import SQLiteJobQueue
from serve_app.metrics import JobMetrics, item_outcomes


def ctx(points: dict[str, list[tuple[float, float]]], low: int = 1, high: int = 4) -> object:
    series = {
        replica: [SimpleNamespace(timestamp=t, value=v) for t, v in values]
        for replica, values in points.items()
    }
    return SimpleNamespace(
        raw_metrics={"queue_depth": series},
        config=SimpleNamespace(target_ongoing_requests=2),
        capacity_adjusted_min_replicas=low,
        capacity_adjusted_max_replicas=high,
        policy_state={"k": 1},
    )


def test_policy_follows_the_newest_depth_report() -> None:
    replicas, state = queue_depth_policy(ctx({"a": [(1.0, 1.0), (5.0, 5.0)], "b": [(3.0, 0.0)]}))
    assert replicas == 3 and state == {"k": 1}  # ceil(5 / 2)
    replicas, _ = queue_depth_policy(ctx({"a": [(1.0, 9.0)], "b": [(2.0, 2.0)]}))
    assert replicas == 1


def test_policy_respects_bounds_and_empty_reports() -> None:
    assert queue_depth_policy(ctx({"a": [(1.0, 100.0)]}, high=2))[0] == 2
    assert queue_depth_policy(ctx({}, low=1))[0] == 1
    assert queue_depth_policy(ctx({"a": [(1.0, 0.0)]}, low=0))[0] == 0


# ---- job metrics, without Ray: the worker's code on a real SQLite queue ------------------


class _Recorder:
    """Stands for a Ray Counter or Gauge: remembers what was recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str] | None]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        assert value > 0, "Ray refuses increments that are not positive"
        self.calls.append((value, tags))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append((value, tags))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append((value, tags))


class _Model:
    """The Model handle's ``score.remote``: unknown entities are item errors."""

    def __init__(self) -> None:
        self.score = SimpleNamespace(remote=self._score)

    async def _score(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "results": [
                {"error": {"code": "entity_not_found"}}
                if item["entity_id"].startswith("X")
                else {"score": 0.5, "model_version": "v"}
                for item in items
            ]
        }


class _Worker(JobWorker.func_or_class):  # type: ignore[misc,name-defined]
    def __del__(self) -> None:
        """Serve's stop hook is not part of these tests (it is a coroutine)."""


def _worker(queue: SQLiteJobQueue) -> Any:
    instance = object.__new__(_Worker)
    instance._queue = queue
    instance._config = JobsConfig(chunk_size=2)
    instance._model = _Model()
    instance._worker = "w1"
    instance._depth = 0
    metrics = object.__new__(JobMetrics)
    names = ("queue_depth", "oldest_queued_age", "items", "jobs", "duration", "webhooks")
    for name in (*names, "queue_wait"):
        setattr(metrics, name, _Recorder())
    instance._metrics = metrics
    return instance


def test_job_progress_is_counted_by_outcome(tmp_path: Path) -> None:
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    items = [{"entity_id": e, "context": {}} for e in ("E1", "X2", "E3", "E4", "X5")]
    job, _ = queue.create("o", items, {}, None, None, "h")
    claimed = queue.claim("w1", 30)
    assert claimed is not None and claimed.id == job.id
    worker = _worker(queue)
    asyncio.run(worker._run_job(claimed))
    totals: dict[str, float] = {}
    for value, tags in worker._metrics.items.calls:
        assert tags is not None and set(tags) == {"outcome"}
        totals[tags["outcome"]] = totals.get(tags["outcome"], 0) + value
    assert totals == {"succeeded": 3, "failed": 2}
    final = queue.get(job.id, "o")
    assert final is not None and (final.done, final.failed) == (5, 2)  # the same count
    assert worker._metrics.jobs.calls == [(1.0, {"state": "succeeded"})]


def test_a_malformed_stored_item_fails_alone(tmp_path: Path) -> None:
    """Items the queue's database holds in another shape than submission stored (edited
    by hand, a bad migration): each fails alone with its reason; the Model, whose batch
    live predictions share, never sees them, and the job still succeeds."""
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    items = [{"entity_id": e, "context": {}} for e in ("E1", "E2", "E3", "E4", "E5")]
    job, _ = queue.create("o", items, {}, None, None, "h")
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        for idx, stored in ((1, "{}"), (2, "not json"), (3, '{"entity_id": 5}')):
            db.execute(
                "UPDATE job_items SET item = ? WHERE job_id = ? AND idx = ?", (stored, job.id, idx)
            )
    claimed = queue.claim("w1", 30)
    assert claimed is not None
    worker = _worker(queue)
    seen: list[Any] = []
    score = worker._model.score.remote

    async def watching(items: list[Any]) -> dict[str, Any]:
        seen.extend(items)
        return await score(items)

    worker._model.score = SimpleNamespace(remote=watching)
    asyncio.run(worker._run_job(claimed))
    assert [item["entity_id"] for item in seen] == ["E1", "E5"]
    final = queue.get(job.id, "o")
    assert final is not None and final.state == "succeeded"
    assert (final.done, final.failed) == (5, 3)
    assert queue.pending_items(job.id, 10) == []  # every item has its result
    stored = queue.results(job.id, 0, 10)
    assert [r["ok"] for r in stored] == [True, False, False, False, True]
    assert {r["error"]["code"] for r in stored[1:4]} == {"invalid_input"}


def test_item_outcomes_count_errors_as_failed() -> None:
    assert item_outcomes([]) == {"succeeded": 0, "failed": 0}
    results = [{"ok": True, "score": 0.1}, {"ok": False, "error": {"code": "x"}}]
    assert item_outcomes(results) == {"succeeded": 1, "failed": 1}


def test_queue_gauges_show_depth_and_the_oldest_queued_jobs_age(tmp_path: Path) -> None:
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    worker = _worker(queue)
    asyncio.run(worker._refresh_queue_gauges())
    assert worker._metrics.queue_depth.calls[-1] == (0, None)
    assert worker._metrics.oldest_queued_age.calls[-1] == (0.0, None)  # none queued
    job, _ = queue.create("o", [{"entity_id": "E1", "context": {}}], {}, None, None, "h")
    with sqlite3.connect(queue.path) as db:  # submitted a minute ago
        db.execute("UPDATE jobs SET created_at = created_at - 60 WHERE id = ?", (job.id,))
    asyncio.run(worker._refresh_queue_gauges())
    assert worker._depth == 1 and worker._metrics.queue_depth.calls[-1] == (1, None)
    age, _ = worker._metrics.oldest_queued_age.calls[-1]
    assert 60 <= age < 70
    assert queue.claim("w1", 30) is not None  # claimed: no longer waiting
    asyncio.run(worker._refresh_queue_gauges())
    assert worker._metrics.queue_depth.calls[-1] == (1, None)
    assert worker._metrics.oldest_queued_age.calls[-1] == (0.0, None)


class _SlowModel(_Model):
    """Every chunk takes ``delay_s``: longer than the lease."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self._delay_s = delay_s
        self.score = SimpleNamespace(remote=self._slow)

    async def _slow(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        await asyncio.sleep(self._delay_s)
        return await self._score(items)


def test_a_slow_job_keeps_its_lease_while_its_worker_lives(tmp_path: Path) -> None:
    """Chunks slower than the lease: the heartbeat renews it, so no other worker takes
    the job over (nor counts a claim against max_claims) while its worker is alive."""
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    items = [{"entity_id": f"E{i}", "context": {}} for i in range(6)]
    job, _ = queue.create("o", items, {}, None, None, "h")
    claimed = queue.claim("w1", 0.3)
    assert claimed is not None
    worker = _worker(queue)
    worker._config = JobsConfig(chunk_size=2, lease_s=0.3)
    worker._model = _SlowModel(delay_s=0.5)  # 3 chunks of 0.5 s against a 0.3 s lease

    async def scenario() -> list[tuple[float, object]]:
        started = time.monotonic()
        run = asyncio.create_task(worker._handle(claimed))
        stolen = []
        while not run.done():
            taken = await asyncio.to_thread(queue.claim, "thief", 30)
            stolen.append((time.monotonic() - started, taken))
            await asyncio.sleep(0.05)
        return stolen

    stolen = asyncio.run(scenario())
    assert not any(taken for _, taken in stolen)
    assert max(at for at, _ in stolen) > 1.0  # tried long after the first 0.3 s lease
    final = queue.get(job.id, "o")
    assert final is not None and final.state == "succeeded" and final.claims == 1
    assert final.done == 6


class _HungModel(_Model):
    """A Model call that never returns."""

    def __init__(self) -> None:
        super().__init__()
        self.score = SimpleNamespace(remote=self._hang)

    async def _hang(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_a_hung_chunk_ends_the_attempt_and_the_lease_with_it(tmp_path: Path) -> None:
    """The heartbeat must not keep a job alive forever behind a Model call that never
    returns: the chunk times out, renewals stop, and another worker claims the job."""
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    job, _ = queue.create("o", [{"entity_id": "E1", "context": {}}], {}, None, None, "h")
    claimed = queue.claim("w1", 0.3)
    assert claimed is not None
    worker = _worker(queue)
    worker._config = JobsConfig(chunk_size=2, lease_s=0.3, chunk_timeout_s=0.5)
    worker._model = _HungModel()

    async def scenario() -> None:
        await asyncio.wait_for(worker._handle(claimed), 5)  # ends: the chunk timed out
        await asyncio.sleep(0.5)  # no renewal after it: the lease runs out

    asyncio.run(scenario())
    again = queue.claim("w2", 30)
    assert again is not None and again.id == job.id and again.claims == 2


def test_a_failed_claim_gives_its_job_slot_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that raised (database locked, restarting) kept its slot: with the default
    two slots, two such errors stopped the worker for good while it looked healthy."""
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    worker = _worker(queue)
    failures = 0
    real_claim = queue.claim

    def flaky_claim(*args: Any) -> Any:
        nonlocal failures
        if failures < 3:
            failures += 1
            raise sqlite3.OperationalError("database is locked")
        return real_claim(*args)

    monkeypatch.setattr(queue, "claim", flaky_claim)
    real_sleep = asyncio.sleep

    async def short_sleep(seconds: float) -> None:
        await real_sleep(min(seconds, 0.01))

    monkeypatch.setattr(asyncio, "sleep", short_sleep)
    worker._config = JobsConfig(chunk_size=2, poll_interval_s=0.01)
    worker._running = set()

    async def scenario() -> tuple[int, str | None]:
        worker._slots = asyncio.Semaphore(2)
        loop = asyncio.create_task(worker._claim_loop())
        await real_sleep(0.2)
        job, _ = queue.create("o", [{"entity_id": "E1", "context": {}}], {}, None, None, "h")
        for _ in range(200):
            final = queue.get(job.id, "o")
            if final is not None and final.state == "succeeded":
                break
            await real_sleep(0.02)
        loop.cancel()  # the loop may hold a slot mid-claim: cancelling gives it back
        await asyncio.gather(loop, *worker._running, return_exceptions=True)
        free = worker._slots._value
        final = queue.get(job.id, "o")
        return free, None if final is None else final.state

    free, state = asyncio.run(scenario())
    assert failures == 3
    assert state == "succeeded", "no slot was left to claim the job"
    assert free == 2


class _OutageModel(_Model):
    """A Model whose feature store (on_error: fail) is down for its first ``down_calls``
    calls (None: for good)."""

    def __init__(self, down_calls: int | None) -> None:
        super().__init__()
        self.down_calls = down_calls
        self.calls = 0

    async def _score(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls += 1
        if self.down_calls is None or self.calls <= self.down_calls:
            down = {"error": {"code": "store_unavailable", "message": "feature store down"}}
            return {"results": [down for _ in items]}
        return await super()._score(items)


def _run_through_outage(tmp_path: Path, model: _OutageModel, config: JobsConfig) -> Any:
    """A job of three items run by a worker with ``model``; the job when it has ended."""
    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    items = [{"entity_id": e, "context": {}} for e in ("E1", "E2", "E3")]
    job, _ = queue.create("o", items, {}, None, None, "h")
    claimed = queue.claim("w1", 30)
    assert claimed is not None
    worker = _worker(queue)
    worker._model = model
    worker._config = config
    asyncio.run(asyncio.wait_for(worker._run_job(claimed), 30))
    final = queue.get(job.id, "o")
    assert final is not None
    return final, queue.results(job.id, 0, 10)


def test_a_store_outage_is_waited_out_not_stored_as_failed_items(tmp_path: Path) -> None:
    """A live request gets a 503 during an outage; a job used to store the failure as the
    item's result for good (results are stored once) and report "succeeded"."""
    model = _OutageModel(down_calls=2)
    final, stored = _run_through_outage(
        tmp_path, model, JobsConfig(chunk_size=2, store_wait_max_s=0.05)
    )
    assert model.calls == 4  # twice refused, then both chunks scored
    assert final.state == "succeeded"
    assert (final.done, final.failed, final.claims) == (3, 0, 1)
    assert [r["ok"] for r in stored] == [True, True, True]


def test_a_store_down_for_good_ends_the_job_after_its_wait_budget(tmp_path: Path) -> None:
    """Waiting without a bound held the job (its worker slot and its key's quota) for
    as long as the store was down (or, before a corrupt row became its own item's
    failure, for ever behind one)."""
    model = _OutageModel(down_calls=None)
    config = JobsConfig(chunk_size=2, store_wait_max_s=0.02, store_wait_total_s=0.1)
    final, stored = _run_through_outage(tmp_path, model, config)
    assert final.state == "succeeded"
    assert (final.done, final.failed) == (3, 3)
    assert {r["error"]["code"] for r in stored} == {"store_unavailable"}
    assert model.calls >= 4  # it did wait and retry before giving up


class _SlowClaims(SQLiteJobQueue):
    """A queue whose claim is still in its thread when the stop comes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.claiming = threading.Event()

    def claim(self, worker: str, lease_s: float) -> Any:
        self.claiming.set()
        time.sleep(0.3)
        return super().claim(worker, lease_s)


def test_a_stop_waits_for_the_claim_in_its_thread_and_gives_that_lease_back(
    tmp_path: Path,
) -> None:
    """Cancelling the claim loop does not stop a claim already in its thread: it
    committed after release(), and its job stayed leased to the stopped worker for
    lease_s (an hour here) instead of continuing at once after a restart."""
    queue = _SlowClaims(tmp_path / "jobs.db")
    job, _ = queue.create("o", [{"entity_id": "E1", "context": {}}], {}, None, None, "h")
    worker = _worker(queue)
    worker._config = JobsConfig(chunk_size=2, lease_s=3600)
    worker._running = set()
    worker._claiming = None

    async def start_then_stop() -> None:
        worker._slots = asyncio.Semaphore(1)
        worker._loop = asyncio.create_task(worker._claim_loop())
        worker._housekeeping = asyncio.create_task(asyncio.sleep(3600))
        assert await asyncio.to_thread(queue.claiming.wait, 5)
        await JobWorker.func_or_class.__del__(worker)  # Serve's stop hook

    asyncio.run(start_then_stop())
    restarted = SQLiteJobQueue(tmp_path / "jobs.db")
    again = restarted.claim("restarted", 3600)
    assert again is not None and again.id == job.id
    assert again.claims == 1  # the stopped worker's claim is not held against it
    restarted.close()


class _CorruptRowModel(_Model):
    """A Model (on_error: fail) for which E2's stored row is corrupt."""

    async def _score(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        answer = await super()._score(items)
        invalid = {"error": {"code": "feature_row_invalid", "message": "unusable row"}}
        answer["results"] = [
            invalid if item["entity_id"] == "E2" else result
            for item, result in zip(items, answer["results"], strict=True)
        ]
        return answer


def test_a_corrupt_row_is_stored_as_its_items_failure_not_waited_out(tmp_path: Path) -> None:
    """Unlike a store outage, waiting does not mend a corrupt row: E2 fails alone at
    once, with its code, and the job goes on."""
    model = _CorruptRowModel()
    config = JobsConfig(chunk_size=2, store_wait_max_s=30, store_wait_total_s=600)
    started = time.monotonic()
    final, stored = _run_through_outage(tmp_path, model, config)  # type: ignore[arg-type]
    assert time.monotonic() - started < 10  # no store-outage wait (30 s at the first)
    assert final.state == "succeeded" and (final.done, final.failed) == (3, 1)
    codes = [r.get("error", {}).get("code") for r in stored]
    assert codes == [None, "feature_row_invalid", None]


def test_one_keys_hanging_webhooks_do_not_hold_another_keys_job(tmp_path: Path) -> None:
    """A hostile key's one-item jobs whose receivers never answer: each held a job slot
    for the first attempt's whole timeout, and claims went oldest first, so another key's
    job waited behind all of them (12 jobs x 1 s / 2 slots: 6 s; a helper saw it grow
    without bound). Now a key holding a lease yields the next slot to a key with none."""
    from serve_app.secret_files import new_webhook_secret
    from tests.unit.test_webhooks import drip, receiver

    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    item = [{"entity_id": "E1", "context": {}}]
    with receiver(drip) as server:
        hook = f"http://127.0.0.1:{server.port}/hook"
        for i in range(12):
            queue.create("hostile", item, {}, hook, None, f"h{i}")
        victim, _ = queue.create("victim", item, {}, None, None, "v")
        worker = _worker(queue)
        worker._secret = new_webhook_secret()
        worker._config = JobsConfig(
            poll_interval_s=0.01,
            webhooks={"allowed_hosts": [f"127.0.0.1:{server.port}"], "timeout_s": 1.0},
        )
        worker._running = set()

        async def victims_wait() -> float:
            worker._slots = asyncio.Semaphore(2)
            started = time.monotonic()
            loop = asyncio.create_task(worker._claim_loop())
            try:
                while time.monotonic() - started < 20:
                    final = await asyncio.to_thread(queue.get, victim.id, "victim")
                    if final is not None and final.state == "succeeded":
                        return time.monotonic() - started
                    await asyncio.sleep(0.02)
                return float("inf")
            finally:
                loop.cancel()
                await asyncio.gather(loop, *worker._running, return_exceptions=True)

        waited = asyncio.run(victims_wait())
    assert waited < 3.0, f"the other key's job waited {waited:.1f} s behind hanging webhooks"
