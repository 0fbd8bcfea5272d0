"""The FeatureFetcher deployment: a pool of async, IO-bound feature look-ups.

One call fetches the features of many entities (the Model sends one call per batch).
In front of the store: a per-entity TTL cache with single-flight, a timeout per look-up
and retries with backoff (tenacity). When the store still fails, the answer is either
"degraded" (callers score on default features and say so) or "unavailable", by config.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray import serve
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from serve_app.cache import SingleFlightCache
from serve_app.config import FetcherTuning, StoreConfig
from serve_app.errors import StoreUnavailable
from serve_app.feature_store import FeatureRow, FeatureStore, open_store
from serve_app.metrics import FetcherMetrics


class StoreClient:
    """A store wrapped with a timeout per attempt and retries; raises StoreUnavailable."""

    def __init__(self, store: FeatureStore, config: StoreConfig) -> None:
        self.store = store
        self.config = config

    async def _attempt(self, entity_ids: list[str]) -> dict[str, FeatureRow]:
        try:
            return await asyncio.wait_for(self.store.get_many(entity_ids), self.config.timeout_s)
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"store look-up timed out after {self.config.timeout_s}s"
            ) from exc

    async def get_many(self, entity_ids: list[str]) -> dict[str, FeatureRow]:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.attempts),
            wait=wait_exponential_jitter(initial=0.01, max=0.2),
            retry=retry_if_exception_type(StoreUnavailable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._attempt(entity_ids)
        raise AssertionError("unreachable: tenacity re-raises the last error")


def fetch_status(rows: dict[str, FeatureRow], ids: list[str]) -> dict[str, Any]:
    return {"status": "ok", "rows": rows, "missing": [i for i in ids if i not in rows]}


@serve.deployment(name="FeatureFetcher", ray_actor_options={"num_cpus": 0.25})
class FeatureFetcher:
    def __init__(self, store: dict[str, Any]) -> None:
        self._config = StoreConfig.model_validate(store)
        self._client = StoreClient(open_store(self._config.url), self._config)
        self._cache: SingleFlightCache[str, FeatureRow] = SingleFlightCache(
            maxsize=FetcherTuning().cache_maxsize, ttl_s=FetcherTuning().cache_ttl_s
        )
        self._metrics = FetcherMetrics()
        self._failures = 0

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply cache settings in place. A new TTL starts a fresh cache."""
        tuning = FetcherTuning.model_validate(user_config or {})
        self._cache = SingleFlightCache(
            maxsize=tuning.cache_maxsize, ttl_s=tuning.cache_ttl_s, enabled=tuning.cache_enabled
        )

    async def _load(self, entity_ids: list[str]) -> dict[str, FeatureRow]:
        started = time.perf_counter()
        try:
            rows = await self._client.get_many(entity_ids)
        except StoreUnavailable:
            self._metrics.store_calls.inc(tags={"outcome": "error"})
            raise
        self._metrics.store_calls.inc(tags={"outcome": "ok"})
        self._metrics.store_ms.observe((time.perf_counter() - started) * 1000)
        return rows

    async def get_many(self, entity_ids: list[str]) -> dict[str, Any]:
        """Features for ``entity_ids``: ``{"status", "rows", "missing"}``.

        ``status`` is ``ok``; or ``degraded`` (no rows; score on defaults) or
        ``unavailable`` (fail the items) when the store failed, per ``store.on_error``.
        """
        try:
            rows, hits = await self._cache.get_many_counted(entity_ids, self._load)
        except StoreUnavailable as exc:
            self._failures += 1
            status = "degraded" if self._config.on_error == "degrade" else "unavailable"
            return {"status": status, "rows": {}, "missing": [], "reason": exc.message}
        misses = len(set(entity_ids)) - hits
        if hits:
            self._metrics.cache.inc(hits, tags={"result": "hit"})
        if misses:
            self._metrics.cache.inc(misses, tags={"result": "miss"})
        return fetch_status(rows, entity_ids)

    async def ping(self) -> bool:
        """Readiness: can the store answer now?"""
        try:
            await asyncio.wait_for(self._client.store.ping(), self._config.timeout_s)
        except (StoreUnavailable, TimeoutError):
            return False
        return True

    def stats(self) -> dict[str, Any]:
        cache = self._cache
        return {
            "cache_entries": len(cache),
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "store_loads": cache.loads,
            "store_failures": self._failures,
        }
