"""Caches: a bulk TTL cache with single-flight for feature look-ups, and the prediction cache
(local, or local in front of Redis to share hits between Ingress replicas on every node).

cachetools gives the eviction policies (TTL, LRU); what it does not give is
*single-flight* for asyncio: when many concurrent requests miss on the same key, only one
look-up may go to the store and the others must wait for its answer. That part is
written here because no maintained library does bulk single-flight over asyncio futures.
Each replica runs one event loop, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

from cachetools import LRUCache, TTLCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

BulkLoader = Callable[[list[K]], Awaitable[dict[K, V]]]


class SingleFlightCache(Generic[K, V]):
    """A TTL cache whose misses are loaded in bulk, once per key however many callers wait.

    ``loader(keys)`` returns a dict of the keys it found; a key it leaves out is cached as
    absent (negative caching, so a flood of unknown ids does not reach the store). If the
    loader raises, every waiter gets the exception and nothing is cached.
    """

    _ABSENT: Any = object()

    def __init__(
        self,
        maxsize: int,
        ttl_s: float,
        enabled: bool = True,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self._cache: TTLCache[K, Any] = TTLCache(maxsize=maxsize, ttl=ttl_s, timer=timer)
        self._inflight: dict[K, asyncio.Future[Any]] = {}
        self._loading: set[asyncio.Task[dict[K, Any]]] = set()  # referenced until done
        self.hits = 0
        self.misses = 0
        self.loads = 0

    def __len__(self) -> int:
        return len(self._cache)

    async def get_many(self, keys: Iterable[K], loader: BulkLoader[K, V]) -> tuple[dict[K, V], int]:
        """Values for ``keys`` (absent keys left out), loading only what is needed, and
        how many distinct keys were served from the cache.

        The count is this call's own: concurrent calls interleave at every ``await``, so
        differences of the shared counters would mix their hits up.
        """
        unique = list(dict.fromkeys(keys))
        found: dict[K, Any] = {}
        waiting: dict[K, asyncio.Future[Any]] = {}
        to_load: list[K] = []
        for key in unique:
            if self.enabled and key in self._cache:
                found[key] = self._cache[key]
            elif key in self._inflight:
                waiting[key] = self._inflight[key]
            else:
                to_load.append(key)
        self.hits += len(found)
        self.misses += len(unique) - len(found)
        hits = len(found)
        if to_load:
            found.update(await self._load(to_load, loader))
        for key, future in waiting.items():
            found[key] = await asyncio.shield(future)
        return {key: value for key, value in found.items() if value is not self._ABSENT}, hits

    async def _load(self, keys: list[K], loader: BulkLoader[K, V]) -> dict[K, Any]:
        loop = asyncio.get_running_loop()
        futures = {key: loop.create_future() for key in keys}
        self._inflight.update(futures)
        self.loads += 1
        # The load runs as its own task: when the caller that started it goes away
        # (client gone, timeout), the callers waiting for the same keys still get them,
        # instead of its CancelledError.
        task = loop.create_task(self._fill(keys, loader, futures))
        self._loading.add(task)
        task.add_done_callback(self._load_done)
        return await asyncio.shield(task)

    def _load_done(self, task: asyncio.Task[dict[K, Any]]) -> None:
        self._loading.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: every waiter got it already

    async def _fill(
        self, keys: list[K], loader: BulkLoader[K, V], futures: dict[K, asyncio.Future[Any]]
    ) -> dict[K, Any]:
        try:
            loaded = await loader(keys)
        except BaseException as exc:
            for future in futures.values():
                future.set_exception(exc)
                future.exception()  # mark retrieved: no "never retrieved" warnings
            raise
        finally:
            for key in keys:
                self._inflight.pop(key, None)
        results: dict[K, Any] = {}
        for key, future in futures.items():
            value = loaded.get(key, self._ABSENT)
            if self.enabled:
                self._cache[key] = value
            future.set_result(value)
            results[key] = value
        return results


class PredictionCache:
    """LRU with TTL for finished predictions, keyed by model version, caller, entity and fields.

    Only clean answers are cached: degraded answers and errors are not, so a store outage
    does not linger in the cache after the store comes back.

    Each entry carries its own deadline and an expired one is dropped when it is read,
    over cachetools' ``LRUCache`` (which bounds the size). ``TTLCache`` does the same work
    eagerly: every put walks its expiry list and links the key into it, 10-20 us per
    get + put against 1.5 us here, and a 32-item batch does 32 of each.
    """

    def __init__(
        self,
        maxsize: int,
        ttl_s: float,
        enabled: bool = True,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self._ttl_s = ttl_s
        self._timer = timer
        # key -> (deadline on ``timer``, answer)
        self._cache: LRUCache[Hashable, tuple[float, dict[str, Any]]] = LRUCache(maxsize)
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: Hashable) -> bool:
        entry = self._cache.get(key)
        return entry is not None and entry[0] > self._timer()

    def get(self, key: Hashable) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        entry = self._cache.get(key)
        if entry is not None and entry[0] <= self._timer():
            del self._cache[key]  # expired: a miss, and its slot is free again
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry[1]

    def put(self, key: Hashable, value: dict[str, Any]) -> None:
        if self.enabled and not value.get("degraded") and "error" not in value:
            self._store(key, value)

    def _store(self, key: Hashable, value: dict[str, Any]) -> None:
        self._cache[key] = (self._timer() + self._ttl_s, value)


class SharedPredictionCache(PredictionCache):
    """The local LRU in front of Redis, so Ingress replicas on every node share hits.

    Reads stay synchronous and local (:meth:`get`); the Ingress calls :meth:`prefetch`
    before scoring, which copies the shared answers of the items not in the local LRU
    with ONE ``MGET``, and :meth:`flush` after, which writes the new answers with one
    pipeline of ``SET ... PX ttl`` (expiry is Redis's TTL). Keys carry the model version,
    so a new model never serves an old model's answers::

        serve_app:pred:v3:{model_version}:{json [owner, entity_id, amount, hour, channel]}
          -> json [expires_at (Unix time), answer]

    (``owner`` is the caller's key id with ``scope: per_key``, empty when shared.)

    The value carries its expiry so that a copy made late in its life keeps only the
    rest of it locally: with a fresh local TTL, an answer copied at 59 s of a 60 s TTL
    was served until 119 s. (One ``MGET`` cannot return Redis's own TTLs; the nodes'
    clocks are assumed synchronised, as for any TTL across machines.)

    Redis is an optimisation here, never a dependency: any Redis error or a look-up slower
    than ``timeout_s`` is counted and skipped, and the request is scored as a miss.
    """

    PREFIX = "serve_app:pred:v3:"

    def __init__(
        self,
        url: str,
        maxsize: int,
        ttl_s: float,
        timeout_s: float = 0.05,
        max_connections: int = 16,
        timer: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        import redis.asyncio as aioredis

        super().__init__(maxsize, ttl_s, True, timer)
        self._wall = wall
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s, socket_connect_timeout=1.0
        )
        self._redis = aioredis.Redis.from_pool(pool)
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._timeout_s = timeout_s
        self._outbox: dict[str, tuple[float, dict[str, Any]]] = {}
        self.shared_hits = 0
        self.shared_errors = 0

    @classmethod
    def redis_key(cls, key: Hashable) -> str:
        """The Redis key of a local key ``(model_version, *item_key)``."""
        version, *rest = key  # type: ignore[misc]
        return f"{cls.PREFIX}{version}:{json.dumps(rest, separators=(',', ':'))}"

    def put(self, key: Hashable, value: dict[str, Any]) -> None:
        if value.get("degraded") or "error" in value:
            return
        super().put(key, value)
        self._outbox[self.redis_key(key)] = (self._wall() + self._ttl_s, value)

    async def prefetch(self, keys: Iterable[Hashable]) -> int:
        """Copy shared answers for ``keys`` missing locally into the LRU; how many were found."""
        missing = {self.redis_key(key): key for key in keys if key not in self}
        if not missing:
            return 0
        try:
            values = await asyncio.wait_for(self._redis.mget(list(missing)), self._timeout_s)
        except Exception:  # redis errors, timeouts: a miss, never a failed request
            self.shared_errors += 1
            return 0
        found = 0
        now = self._wall()
        for key, value in zip(missing.values(), values, strict=True):
            if value is None:
                continue
            try:
                expires_at, answer = json.loads(value)
                left = min(float(expires_at) - now, self._ttl_s)
                if not isinstance(answer, dict):
                    raise TypeError("an answer is a JSON object")
            except (TypeError, ValueError, RecursionError):  # not flush's: a counted miss
                self.shared_errors += 1
                continue
            if left > 0:
                self._cache[key] = (self._timer() + left, answer)
                found += 1
        self.shared_hits += found
        return found

    async def flush(self) -> None:
        """Write the answers computed since the last flush, in one pipeline."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for redis_key, entry in outbox.items():
                    pipe.set(redis_key, json.dumps(entry, separators=(",", ":")), px=self._ttl_ms)
                await asyncio.wait_for(pipe.execute(), max(self._timeout_s, 1.0))
        except Exception:
            self.shared_errors += 1

    async def aclose(self) -> None:
        await self._redis.aclose()
