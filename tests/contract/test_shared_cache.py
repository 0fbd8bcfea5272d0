"""The shared prediction cache on a real redis-server: replicas share hits, Redis expires them."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from serve_app.cache import SharedPredictionCache
from tests.services import RedisServer

ANSWER = {"entity_id": "E0000001", "model_version": "1.0", "cached": False, "score": 0.25}
KEY = ("1.0", "E0000001", 9.5, 14, "web")


def test_a_replica_sees_another_replicas_answers(redis_srv: RedisServer) -> None:
    async def scenario() -> None:
        first = SharedPredictionCache(redis_srv.url, maxsize=100, ttl_s=60)
        second = SharedPredictionCache(redis_srv.url, maxsize=100, ttl_s=60)
        try:
            first.put(KEY, ANSWER)
            first.put(("1.0", "E2", None, None, None), {**ANSWER, "degraded": True})  # not kept
            await first.flush()
            assert second.get(KEY) is None  # not yet local
            assert await second.prefetch([KEY, ("1.0", "E2", None, None, None)]) == 1
            assert second.get(KEY) == ANSWER and second.shared_hits == 1
            # another model version never sees this answer
            assert await second.prefetch([("2.0", *KEY[1:])]) == 0
            assert await second.prefetch([KEY]) == 0  # local now: no Redis call at all
        finally:
            await first.aclose()
            await second.aclose()

    asyncio.run(scenario())
    ttl_ms = redis_srv.client().pttl(SharedPredictionCache.redis_key(KEY))
    assert 50_000 < ttl_ms <= 60_000  # expiry is Redis's TTL


def test_entries_expire_in_redis(redis_srv: RedisServer) -> None:
    key = ("1.0", "E0000002", None, None, None)

    async def scenario() -> int:
        writer = SharedPredictionCache(redis_srv.url, maxsize=10, ttl_s=0.2)
        reader = SharedPredictionCache(redis_srv.url, maxsize=10, ttl_s=0.2)
        writer.put(key, ANSWER)
        await writer.flush()
        await asyncio.sleep(0.4)
        found = await reader.prefetch([key])
        await writer.aclose()
        await reader.aclose()
        return found

    assert asyncio.run(scenario()) == 0


def test_a_frozen_redis_is_a_miss_not_a_failure(redis_srv: RedisServer) -> None:
    async def scenario() -> tuple[int, float, int]:
        cache = SharedPredictionCache(redis_srv.url, maxsize=10, ttl_s=60, timeout_s=0.05)
        await cache.prefetch([("warm", "up", None, None, None)])  # open a connection first
        os.kill(redis_srv.pid, signal.SIGSTOP)
        try:
            started = time.perf_counter()
            found = await cache.prefetch([("1.0", "E9", None, None, None)])
            elapsed = time.perf_counter() - started
        finally:
            os.kill(redis_srv.pid, signal.SIGCONT)
        errors = cache.shared_errors
        await cache.aclose()
        return found, elapsed, errors

    found, elapsed, errors = asyncio.run(scenario())
    assert found == 0 and errors == 1 and elapsed < 0.5


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_copy_made_late_keeps_only_the_rest_of_the_ttl(redis_srv: RedisServer) -> None:
    """Replica B copies replica A's answer 59.9 s into its 60 s life: B must drop it
    0.1 s later, not serve it for another 60 s (it did: 119.8 s in all)."""
    key = ("1.0", "E0000003", None, None, None)

    async def scenario() -> tuple[bool, bool, int]:
        wall = _Clock(1_000_000.0)
        local_b = _Clock(50.0)
        writer = SharedPredictionCache(redis_srv.url, maxsize=10, ttl_s=60, wall=wall)
        reader = SharedPredictionCache(
            redis_srv.url, maxsize=10, ttl_s=60, timer=local_b, wall=wall
        )
        try:
            writer.put(key, ANSWER)
            await writer.flush()
            wall.now += 59.9
            found = await reader.prefetch([key])
            fresh = reader.get(key) == ANSWER
            local_b.now += 0.2
            wall.now += 0.2
            stale = reader.get(key) is None
            return fresh, stale, found
        finally:
            await writer.aclose()
            await reader.aclose()

    fresh, stale, found = asyncio.run(scenario())
    assert found == 1 and fresh, "the answer is shared while it lives"
    assert stale, "served past its TTL"


def test_a_value_this_cache_did_not_write_is_a_miss(redis_srv: RedisServer) -> None:
    """Whatever else sits under the key (an old layout, a stray write): a counted miss."""
    keys = [("1.0", f"E{i}", None, None, None) for i in range(5)]
    client = redis_srv.client()
    foreign = ["not json", '{"score": 1}', "[1e300, 5]", '["x", {}]', "[" * 3000]
    for key, raw in zip(keys, foreign, strict=True):
        client.set(SharedPredictionCache.redis_key(key), raw, px=60_000)
    client.close()

    async def scenario() -> tuple[int, int]:
        # Not the 50 ms budget (test_a_frozen_redis_...): in a CI run with the image
        # building beside it, the first MGET and its connection took longer, and that one
        # timeout was counted instead of the five foreign values.
        cache = SharedPredictionCache(redis_srv.url, maxsize=10, ttl_s=60, timeout_s=5.0)
        try:
            return await cache.prefetch(keys), cache.shared_errors
        finally:
            await cache.aclose()

    assert asyncio.run(scenario()) == (0, 5)
