"""The FeatureFetcher deployment: a pool of async, IO-bound feature look-ups.

One call fetches the features of many entities (the Model sends one call per batch).
In front of the store: a per-entity TTL cache with single-flight, a timeout per look-up
and retries with backoff (:class:`~serve_app.stores.client.StoreClient`). When the store
still fails, the answer is either "degraded" (callers score on default features and say
so) or "unavailable", as ``store.on_error`` says. While degraded, ids that are not in
the store's set of known ids (``serve_app/known_ids.py``, refreshed in the background)
still get 404: an id that does not exist never gets a score that looks real.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from ray import serve

from serve_app.cache import SingleFlightCache
from serve_app.config import FetcherTuning, StoreConfig
from serve_app.errors import StoreUnavailable
from serve_app.known_ids import KnownIds, can_list_ids
from serve_app.known_ids import refresh as refresh_known_ids
from serve_app.logs import route_to_serve_logs
from serve_app.metrics import FetcherMetrics
from serve_app.stores import FeatureLookup, FeatureRow, open_store
from serve_app.stores.client import StoreClient

logger = logging.getLogger("serve_app.fetcher")
# What callers learn of a store failure: no URL, no host, no exception text.
STORE_UNAVAILABLE_REASON = "the feature store is unavailable; retry shortly"


def _feature_cache(tuning: FetcherTuning) -> SingleFlightCache[str, FeatureRow]:
    return SingleFlightCache(
        maxsize=tuning.cache_maxsize, ttl_s=tuning.cache_ttl_s, enabled=tuning.cache_enabled
    )


@serve.deployment(name="FeatureFetcher")
class FeatureFetcher:
    def __init__(self, store: dict[str, Any]) -> None:
        route_to_serve_logs()
        self._config = StoreConfig.model_validate(store)
        self._client = StoreClient(open_store(self._config.url), self._config)
        self._tuning = FetcherTuning()
        self._cache = _feature_cache(self._tuning)
        self._metrics = FetcherMetrics()
        self._failures = 0
        self._known = KnownIds()
        self._known_task: asyncio.Task[None] | None = None

    def _start_known_ids(self) -> None:
        """Start the known-ids refresher on the replica's loop (first call or readiness)."""
        if self._known_task is None and can_list_ids(self._config.url):
            self._known_task = asyncio.get_running_loop().create_task(self._refresh_known())

    async def _refresh_known(self) -> None:
        """Load the known ids now, then every ``known_ids_refresh_s`` (a failure keeps them)."""
        while True:
            await refresh_known_ids(self._known, self._config.url)
            await asyncio.sleep(self._tuning.known_ids_refresh_s)

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
            self._metrics.lookups.inc(tags={"outcome": "error"})
            self._metrics.lookup_seconds.observe(time.perf_counter() - started)
            raise
        self._metrics.lookups.inc(tags={"outcome": "ok"})
        self._metrics.lookup_seconds.observe(time.perf_counter() - started)
        return rows

    async def get_many(self, entity_ids: list[str]) -> FeatureLookup:
        """Features for ``entity_ids``; unknown ids are absent from ``rows``."""
        self._start_known_ids()
        try:
            rows, hits = await self._cache.get_many(entity_ids, self._load)
        except StoreUnavailable as exc:
            self._failures += 1
            # The detail (a URL, a host, an error text) goes to the logs, never to clients.
            logger.warning("feature store look-up failed: %s", exc.message)
            if self._config.on_error == "fail":
                return FeatureLookup(status="unavailable", reason=STORE_UNAVAILABLE_REASON)
            unknown = self._known.unknown(entity_ids) or set()
            return FeatureLookup(
                status="degraded", reason=STORE_UNAVAILABLE_REASON, unknown=frozenset(unknown)
            )
        misses = len(set(entity_ids)) - hits
        if hits:
            self._metrics.cache.inc(hits, tags={"result": "hit"})
        if misses:
            self._metrics.cache.inc(misses, tags={"result": "miss"})
        return FeatureLookup(status="ok", rows=rows)

    async def ping(self) -> bool:
        """Readiness: can the store answer now?"""
        self._start_known_ids()
        return await self._client.ping()

    async def __del__(self) -> None:
        """Serve calls this when the replica stops: close the store's connection pool."""
        if self._known_task is not None:
            self._known_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._known_task
        await self._client.store.aclose()

    def stats(self) -> dict[str, Any]:
        cache = self._cache
        return {
            "cache_entries": len(cache),
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "store_loads": cache.loads,
            "store_failures": self._failures,
            "pid": os.getpid(),
            "known_ids": self._known.size,
            "known_ids_loaded_at": self._known.loaded_at,
        }
