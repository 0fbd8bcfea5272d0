"""The FeatureFetcher deployment: a pool of async, IO-bound feature look-ups.

One call fetches the features of many entities (the Model sends one call per batch).
In front of the store: a per-entity TTL cache with single-flight, a timeout per look-up
and retries with backoff (:class:`~serve_app.stores.client.StoreClient`). When the store
still fails, the answer is either "degraded" (callers score on default features and say
so) or "unavailable", as ``store.on_error`` says.
"""

from __future__ import annotations

import time
from typing import Any

from ray import serve

from serve_app.cache import SingleFlightCache
from serve_app.config import FetcherTuning, StoreConfig
from serve_app.errors import StoreUnavailable
from serve_app.metrics import FetcherMetrics
from serve_app.stores import FeatureLookup, FeatureRow, open_store
from serve_app.stores.client import StoreClient


def _feature_cache(tuning: FetcherTuning) -> SingleFlightCache[str, FeatureRow]:
    return SingleFlightCache(
        maxsize=tuning.cache_maxsize, ttl_s=tuning.cache_ttl_s, enabled=tuning.cache_enabled
    )


@serve.deployment(name="FeatureFetcher")
class FeatureFetcher:
    def __init__(self, store: dict[str, Any]) -> None:
        self._config = StoreConfig.model_validate(store)
        self._client = StoreClient(open_store(self._config.url), self._config)
        self._tuning = FetcherTuning()
        self._cache = _feature_cache(self._tuning)
        self._metrics = FetcherMetrics()
        self._failures = 0

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply cache settings in place; any change to them starts an empty cache."""
        tuning = FetcherTuning.model_validate(user_config or {})
        if tuning != self._tuning:
            self._tuning = tuning
            self._cache = _feature_cache(tuning)

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

    async def get_many(self, entity_ids: list[str]) -> FeatureLookup:
        """Features for ``entity_ids``; unknown ids are absent from ``rows``."""
        try:
            rows, hits = await self._cache.get_many(entity_ids, self._load)
        except StoreUnavailable as exc:
            self._failures += 1
            status = "degraded" if self._config.on_error == "degrade" else "unavailable"
            return FeatureLookup(status=status, reason=exc.message)
        misses = len(set(entity_ids)) - hits
        if hits:
            self._metrics.cache.inc(hits, tags={"result": "hit"})
        if misses:
            self._metrics.cache.inc(misses, tags={"result": "miss"})
        return FeatureLookup(status="ok", rows=rows)

    async def ping(self) -> bool:
        """Readiness: can the store answer now?"""
        return await self._client.ping()

    def stats(self) -> dict[str, Any]:
        cache = self._cache
        return {
            "cache_entries": len(cache),
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "store_loads": cache.loads,
            "store_failures": self._failures,
        }
