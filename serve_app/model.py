"""The Model deployment: where the batch is formed and scored.

Callers send lists of items (the Ingress coalesces single predictions into lists). Serve's
``@serve.batch`` merges concurrent calls into one batch; for each batch this deployment
dedupes items, makes ONE bulk call to the FeatureFetcher, builds ONE frame and calls
``predict_proba`` ONCE. Each item gets its own result or its own error; a bad item never
fails its batch-mates.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from threadpoolctl import threadpool_limits

from serve_app.artifact import LoadedModel, load_artifact
from serve_app.config import ModelTuning
from serve_app.features import build_frame
from serve_app.metrics import ModelMetrics

Item = dict[str, Any]
ItemResult = dict[str, Any]


def pin_threads() -> int:
    """Limit OpenMP/BLAS threads to this replica's CPUs so replicas don't oversubscribe."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(1, math.floor(cpus))
    threadpool_limits(limits=threads)
    return threads


def item_key(item: Item) -> tuple[Any, ...]:
    ctx = item.get("context") or {}
    return (item["entity_id"], ctx.get("amount"), ctx.get("hour"), ctx.get("channel"))


def _error(code: str, message: str) -> ItemResult:
    return {"error": {"code": code, "message": message}}


class BatchStats:
    """Counters of what the batcher really formed; read by /v1/stats and the benchmarks."""

    def __init__(self) -> None:
        self.batches = 0
        self.requests = 0
        self.items = 0
        self.unique_items = 0
        self.recent: deque[int] = deque(maxlen=512)

    def record(self, requests: int, items: int, unique: int) -> None:
        self.batches += 1
        self.requests += requests
        self.items += items
        self.unique_items += unique
        self.recent.append(unique)

    def snapshot(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "items": self.items,
            "unique_items": self.unique_items,
            "mean_requests_per_batch": self.requests / self.batches if self.batches else 0.0,
            "mean_items_per_batch": self.unique_items / self.batches if self.batches else 0.0,
            "max_items_per_batch": max(self.recent, default=0),
            "recent_batch_items": list(self.recent)[-32:],
        }


@serve.deployment(name="Model", ray_actor_options={"num_cpus": 1})
class Model:
    def __init__(self, model_dir: str, fetcher: DeploymentHandle) -> None:
        self._threads = pin_threads()
        self._model: LoadedModel = load_artifact(Path(model_dir))
        self._fetcher = fetcher
        self._stats = BatchStats()
        self._metrics = ModelMetrics()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batch size and wait in place: no restart, no lost requests."""
        tuning = ModelTuning.model_validate(user_config or {})
        self._score_batched.set_max_batch_size(tuning.max_batch_size)
        self._score_batched.set_batch_wait_timeout_s(tuning.batch_wait_timeout_s)

    async def score(self, items: list[Item]) -> dict[str, Any]:
        """Score a list of items: ``{"model_version", "results": [result or error]}``."""
        if not items:
            return {"model_version": self._model.version, "results": []}
        return await self._score_batched(items)

    # Two batches at once: one can await its feature fetch (IO) while the other predicts.
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, max_concurrent_batches=2)
    async def _score_batched(self, calls: list[list[Item]]) -> list[dict[str, Any]]:
        flat = [item for call in calls for item in call]
        unique: dict[tuple[Any, ...], Item] = {}
        for item in flat:
            unique.setdefault(item_key(item), item)
        by_key = await self._score_unique(list(unique.values()))
        self._stats.record(len(calls), len(flat), len(unique))
        self._metrics.batch_requests.observe(len(calls))
        self._metrics.batch_items.observe(len(unique))
        version = self._model.version
        return [
            {"model_version": version, "results": [by_key[item_key(item)] for item in call]}
            for call in calls
        ]

    async def _score_unique(self, items: list[Item]) -> dict[tuple[Any, ...], ItemResult]:
        entity_ids = list(dict.fromkeys(item["entity_id"] for item in items))
        fetched = await self._fetcher.get_many.remote(entity_ids)
        status, rows = fetched["status"], fetched["rows"]
        results: dict[tuple[Any, ...], ItemResult] = {}
        scorable: list[Item] = []
        for item in items:
            if status == "unavailable":
                results[item_key(item)] = _error("store_unavailable", fetched["reason"])
            elif status == "ok" and item["entity_id"] not in rows:
                results[item_key(item)] = _error(
                    "unknown_entity", f"no features stored for entity {item['entity_id']!r}"
                )
            else:
                scorable.append(item)
        if scorable:
            degraded = status == "degraded"
            scores = self._predict(
                [None if degraded else rows[item["entity_id"]] for item in scorable],
                [item.get("context") or {} for item in scorable],
            )
            if degraded:
                self._metrics.degraded_items.inc(len(scorable))
            for item, score in zip(scorable, scores, strict=True):
                results[item_key(item)] = {"score": score, "degraded": degraded}
        return results

    def _predict(self, entity_rows: list[Any], contexts: list[dict[str, Any]]) -> list[float]:
        started = time.perf_counter()
        frame = build_frame(entity_rows, contexts)
        proba = self._model.pipeline.predict_proba(frame)[:, 1]
        self._metrics.predict_ms.observe((time.perf_counter() - started) * 1000)
        return [round(float(p), 6) for p in proba]

    def metadata(self) -> dict[str, Any]:
        return self._model.metadata

    def stats(self) -> dict[str, Any]:
        """Batch counters plus the live batching settings and which replica answered."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "pid": os.getpid(),
            "threads": self._threads,
            "max_batch_size": self._score_batched._get_max_batch_size(),
            "batch_wait_timeout_s": self._score_batched._get_batch_wait_timeout_s(),
            **self._stats.snapshot(),
        }
