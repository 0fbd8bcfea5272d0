"""Feature look-ups in front of the store: a TTL cache, degraded answers, known ids.

One :class:`FeatureSource` answers "features of these entities" for a whole batch. It
keeps a per-entity TTL cache with single-flight in front of the store client (a timeout
per look-up, retries with backoff: :class:`~serve_app.stores.client.StoreClient`). When
the store still fails, the answer is "degraded" (callers score on default features and
say so) or "unavailable", as ``store.on_error`` says. While degraded, ids that are not
in the store's set of known ids (``serve_app/known_ids.py``, refreshed in the background)
still get 404: an id that does not exist never gets a score that looks real.

It runs where it is put: in the FeatureFetcher deployment (the default, a pool shared by
every Model replica), or inside a Model replica (``ModelTuning.local_features``: one hop
fewer per batch, a cache per Model replica). No Ray here: the caller passes its metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any, Protocol

from serve_app.cache import SingleFlightCache
from serve_app.config import FetcherTuning, StoreConfig
from serve_app.errors import StoreUnavailable
from serve_app.known_ids import KnownIds, can_list_ids
from serve_app.known_ids import refresh as refresh_known_ids
from serve_app.stores import CorruptRow, FeatureLookup, StoredRow, open_store
from serve_app.stores.client import StoreClient

logger = logging.getLogger("serve_app.fetcher")
# What callers learn of a store failure: no URL, no host, no exception text.
STORE_UNAVAILABLE_REASON = "the feature store is unavailable; retry shortly"


class _Count(Protocol):
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...


class _Observe(Protocol):
    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class LookupMetrics(Protocol):
    """What a source records (``serve_app.metrics.FetcherMetrics`` in a replica)."""

    cache: _Count
    lookups: _Count
    lookup_seconds: _Observe


def feature_cache(tuning: FetcherTuning) -> SingleFlightCache[str, StoredRow]:
    return SingleFlightCache(
        maxsize=tuning.cache_maxsize, ttl_s=tuning.cache_ttl_s, enabled=tuning.cache_enabled
    )


# The first load of the known ids may hold a starting replica this long, no longer.
FIRST_LOAD_TIMEOUT_S = 10.0


class FeatureSource:
    """Bulk feature look-ups for one replica: cache, store client, known ids."""

    def __init__(self, config: StoreConfig, tuning: FetcherTuning, metrics: LookupMetrics) -> None:
        self.config = config
        self.client = StoreClient(open_store(config.url), config)
        self.tuning = tuning
        self.cache = feature_cache(tuning)
        self._metrics = metrics
        self._failures = 0
        self._corrupt = 0
        self._known = KnownIds()
        self._known_task: asyncio.Task[None] | None = None

    def retune(self, tuning: FetcherTuning) -> None:
        """Apply cache settings in place; any change to them starts an empty cache."""
        if tuning != self.tuning:
            self.tuning = tuning
            self.cache = feature_cache(tuning)

    async def start(self) -> None:
        """Load the known ids before the replica serves, then keep refreshing them.

        Loaded lazily on the first call instead, a replica whose first call came during
        a store outage had no set and scored unknown ids as if they existed. The first
        load is bounded (:data:`FIRST_LOAD_TIMEOUT_S`): a store that is down at start
        must not keep the replica from serving degraded answers.
        """
        if self._known_task is not None or not can_list_ids(self.config.url):
            return
        # asyncio.TimeoutError is the built-in TimeoutError only from Python 3.11 on.
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await asyncio.wait_for(
                refresh_known_ids(self._known, self.config.url), FIRST_LOAD_TIMEOUT_S
            )
        self._start_known_ids(tried_now=True)

    def _start_known_ids(self, tried_now: bool = False) -> None:
        """Start the known-ids refresher on the running loop, if not yet running (from
        :meth:`start`, or as a fallback from the first call or readiness check)."""
        if self._known_task is None and can_list_ids(self.config.url):
            refresher = self._refresh_known(wait_first=tried_now)
            self._known_task = asyncio.get_running_loop().create_task(refresher)

    async def _refresh_known(self, wait_first: bool) -> None:
        """Load the known ids (after a period if :meth:`start` just tried, loaded or
        not: a second full scan at once would only repeat it), then every
        ``known_ids_refresh_s``; a failure keeps the last set."""
        if wait_first:
            await asyncio.sleep(self.tuning.known_ids_refresh_s)
        while True:
            await refresh_known_ids(self._known, self.config.url)
            await asyncio.sleep(self.tuning.known_ids_refresh_s)

    async def _load(self, entity_ids: list[str]) -> dict[str, StoredRow]:
        started = time.perf_counter()
        try:
            rows = await self.client.get_many(entity_ids)
        except StoreUnavailable:
            self._metrics.lookups.inc(tags={"outcome": "error"})
            self._metrics.lookup_seconds.observe(time.perf_counter() - started)
            raise
        self._metrics.lookups.inc(tags={"outcome": "ok"})
        self._metrics.lookup_seconds.observe(time.perf_counter() - started)
        for entity, row in rows.items():
            if isinstance(row, CorruptRow):  # once per load: then it is cached for the TTL
                self._corrupt += 1
                logger.warning("corrupt feature row for %r: %s", entity, row.reason)
        return rows

    async def get_many(self, entity_ids: list[str]) -> FeatureLookup:
        """Features for ``entity_ids``; unknown ids are absent from ``rows``."""
        self._start_known_ids()
        try:
            rows, hits = await self.cache.get_many(entity_ids, self._load)
        except StoreUnavailable as exc:
            self._failures += 1
            # The detail (a URL, a host, an error text) goes to the logs, never to clients.
            logger.warning("feature store look-up failed: %s", exc.message)
            if self.config.on_error == "fail":
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
        return self._ok(rows)

    def _ok(self, stored: dict[str, StoredRow]) -> FeatureLookup:
        """An ``ok`` answer; ids with a corrupt row fail alone or fall back to defaults,
        as ``store.on_error`` says for a store that fails."""
        corrupt = frozenset(e for e, row in stored.items() if isinstance(row, CorruptRow))
        if not corrupt:  # the usual case: no copy of the rows on every batch
            return FeatureLookup(status="ok", rows=stored)  # type: ignore[arg-type]
        rows = {entity: row for entity, row in stored.items() if entity not in corrupt}
        if self.config.on_error == "fail":
            return FeatureLookup(status="ok", rows=rows, invalid=corrupt)
        return FeatureLookup(status="ok", rows=rows, fallback=corrupt)

    async def ping(self) -> bool:
        """Readiness: can the store answer now?"""
        self._start_known_ids()
        return await self.client.ping()

    async def aclose(self) -> None:
        """Stop the known-ids refresher and close the store's connection pool."""
        if self._known_task is not None:
            self._known_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._known_task
        await self.client.store.aclose()

    def stats(self) -> dict[str, Any]:
        cache = self.cache
        return {
            "cache_entries": len(cache),
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "store_loads": cache.loads,
            "store_failures": self._failures,
            "corrupt_rows_loaded": self._corrupt,
            "pid": os.getpid(),
            "known_ids": self._known.size,
            "known_ids_loaded_at": self._known.loaded_at,
        }
