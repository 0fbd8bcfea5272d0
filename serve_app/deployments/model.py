"""The Model deployment: where the batch is formed and scored.

Callers send lists of items (the Ingress coalesces single predictions into lists). Serve's
``@serve.batch`` merges concurrent calls into one batch; for each batch this deployment
makes ONE bulk call to the FeatureFetcher and hands the rest to the Ray-free
:class:`~serve_app.scoring.scorer.Scorer` (dedupe, per-item errors, ONE ``predict_proba``).
With ``user_config: {local_features: {...}}`` the replica looks the features up itself
(its own :class:`~serve_app.feature_lookup.FeatureSource`): one hop fewer per batch.
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

from serve_app.config import ModelTuning, StoreConfig
from serve_app.feature_lookup import FeatureSource
from serve_app.logs import batch_request_ids, route_to_serve_logs, tag_request_ids
from serve_app.metrics import FetcherMetrics, ModelMetrics
from serve_app.scoring.artifact import load_artifact
from serve_app.scoring.items import Item, ModelAnswer, entity_ids, unique_items
from serve_app.scoring.scorer import Scorer, flatten, split_by_call
from serve_app.stores.base import FeatureLookup

_DEFAULTS = ModelTuning()
# Two batches at once: one can await its feature fetch (IO) while the other predicts.
# Serve can change batch size and wait at run time, but not this.
MAX_CONCURRENT_BATCHES = 2


def pin_threads() -> int:
    """Limit OpenMP/BLAS threads to this replica's CPUs so replicas don't oversubscribe."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(1, math.floor(cpus))
    threadpool_limits(limits=threads)
    return threads


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


@serve.deployment(name="Model")
class Model:
    def __init__(
        self,
        model_dir: str,
        fetcher: DeploymentHandle,
        sha256: str | None = None,
        store: dict[str, Any] | None = None,
    ) -> None:
        route_to_serve_logs()
        self._threads = pin_threads()
        self._metrics = ModelMetrics()
        self._scorer = Scorer(load_artifact(Path(model_dir), sha256), self._metrics.record_predict)
        self._fetcher = fetcher
        self._store = StoreConfig.model_validate(store or {})
        self._local: FeatureSource | None = None  # set by user_config local_features
        self._stats = BatchStats()

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply batch size, wait and where features are looked up, in place: no restart,
        no lost requests (a batch in flight keeps the source it started with)."""
        tuning = ModelTuning.model_validate(user_config or {})
        self._score_batched.set_max_batch_size(tuning.max_batch_size)
        self._score_batched.set_batch_wait_timeout_s(tuning.batch_wait_timeout_s)
        if tuning.local_features is None:
            retired, self._local = self._local, None
            if retired is not None:
                await retired.aclose()
        elif self._local is None:
            self._local = FeatureSource(self._store, tuning.local_features, FetcherMetrics())
            await self._local.start()  # the known ids, before its first look-up
        else:
            self._local.retune(tuning.local_features)

    async def _features(self, ids: list[str]) -> FeatureLookup:
        """One bulk look-up: in this replica when configured, else one FeatureFetcher call."""
        if self._local is not None:
            return await self._local.get_many(ids)
        return await self._fetcher.get_many.remote(ids)

    async def score(self, items: list[Item]) -> ModelAnswer:
        """Score a list of items: ``{"model_version", "results": [result or error],
        "timing": {phase: seconds}}``; the timing feeds the caller's Server-Timing."""
        if not items:
            return {"model_version": self._scorer.version, "results": []}
        queued = time.perf_counter()
        answer = await self._score_batched(items)
        timing = answer["timing"]
        # The batch reported when it started; the wait before it was this call's queue.
        timing["model-queue"] = max(0.0, timing.pop("started") - queued)
        return answer

    @serve.batch(
        max_batch_size=_DEFAULTS.max_batch_size,
        batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s,
        max_concurrent_batches=MAX_CONCURRENT_BATCHES,
    )
    async def _score_batched(self, calls: list[list[Item]]) -> list[ModelAnswer]:
        started = time.perf_counter()
        tag_request_ids(batch_request_ids())  # the FeatureFetcher call carries them all
        flat = flatten(calls)
        unique = unique_items(flat)
        lookup = await self._features(entity_ids(unique))
        fetched = time.perf_counter()
        by_key = self._scorer.score(unique, lookup)
        timing = {"started": started, "features": fetched - started}
        timing["predict"] = time.perf_counter() - fetched
        degraded = sum(1 for result in by_key.values() if result.get("degraded"))
        if degraded:  # a store outage, or entities whose stored row is corrupt
            self._metrics.degraded_items.inc(degraded)
        self._stats.record(len(calls), len(flat), len(unique))
        self._metrics.batch_requests.observe(len(calls))
        self._metrics.batch_items.observe(len(unique))
        answers = split_by_call(calls, by_key, self._scorer.version)
        for answer in answers:
            answer["timing"] = dict(timing)
        return answers

    def metadata(self) -> dict[str, Any]:
        return self._scorer.model.metadata

    def stats(self) -> dict[str, Any]:
        """Batch counters plus the live batching settings and which replica answered."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "pid": os.getpid(),
            "threads": self._threads,
            "scoring_path": self._scorer.path,  # "direct-trees", "direct" or "pipeline"
            "max_batch_size": self._score_batched._get_max_batch_size(),
            "batch_wait_timeout_s": self._score_batched._get_batch_wait_timeout_s(),
            "local_features": None if self._local is None else self._local.stats(),
            **self._stats.snapshot(),
        }
