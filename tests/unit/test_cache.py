import asyncio

import pytest

from serve_app.cache import PredictionCache, SingleFlightCache


class CountingLoader:
    def __init__(self, known: set[str], delay: float = 0.01) -> None:
        self.known = known
        self.delay = delay
        self.calls: list[list[str]] = []

    async def __call__(self, keys: list[str]) -> dict[str, str]:
        self.calls.append(list(keys))
        await asyncio.sleep(self.delay)
        return {k: k.upper() for k in keys if k in self.known}


def test_concurrent_misses_for_one_key_cost_one_load() -> None:
    async def scenario() -> tuple[CountingLoader, list[tuple[dict[str, str], int]]]:
        cache: SingleFlightCache[str, str] = SingleFlightCache(100, ttl_s=60)
        loader = CountingLoader({"a", "b"})
        results = await asyncio.gather(*(cache.get_many(["a", "b"], loader) for _ in range(20)))
        return loader, results

    loader, results = asyncio.run(scenario())
    assert loader.calls == [["a", "b"]]
    assert all(found == {"a": "A", "b": "B"} for found, _ in results)


def test_hits_do_not_load_and_absent_keys_are_negatively_cached() -> None:
    async def scenario() -> CountingLoader:
        cache: SingleFlightCache[str, str] = SingleFlightCache(100, ttl_s=60)
        loader = CountingLoader({"a"})
        assert await cache.get_many(["a", "zz"], loader) == ({"a": "A"}, 0)
        assert await cache.get_many(["a", "zz", "b"], loader) == ({"a": "A"}, 2)
        return loader

    loader = asyncio.run(scenario())
    assert loader.calls == [["a", "zz"], ["b"]]


def test_loader_failure_reaches_every_waiter_and_is_not_cached() -> None:
    calls = 0

    async def failing(keys: list[str]) -> dict[str, str]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("store down")

    async def scenario() -> list[object]:
        cache: SingleFlightCache[str, str] = SingleFlightCache(100, ttl_s=60)
        outcomes = await asyncio.gather(
            *(cache.get_many(["a"], failing) for _ in range(5)), return_exceptions=True
        )
        with pytest.raises(RuntimeError):
            await cache.get_many(["a"], failing)
        return outcomes

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert calls == 2  # one for the five concurrent callers, one for the retry


def test_disabled_cache_still_single_flights_but_keeps_nothing() -> None:
    async def scenario() -> CountingLoader:
        cache: SingleFlightCache[str, str] = SingleFlightCache(100, ttl_s=60, enabled=False)
        loader = CountingLoader({"a"})
        await asyncio.gather(cache.get_many(["a"], loader), cache.get_many(["a"], loader))
        await cache.get_many(["a"], loader)
        return loader

    assert len(asyncio.run(scenario()).calls) == 2


class FakeClock:
    """Time that passes only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_prediction_cache_skips_degraded_and_errors_and_expires() -> None:
    clock = FakeClock()
    cache = PredictionCache(maxsize=10, ttl_s=60, timer=clock)
    cache.put("ok", {"score": 0.5, "degraded": False})
    cache.put("degraded", {"score": 0.5, "degraded": True})
    cache.put("error", {"error": {"code": "x"}})
    assert cache.get("ok") == {"score": 0.5, "degraded": False}
    assert cache.get("degraded") is None and cache.get("error") is None
    clock.now += 59.9
    assert cache.get("ok") is not None
    clock.now += 0.2
    assert cache.get("ok") is None


def test_feature_cache_entries_expire_after_ttl() -> None:
    async def scenario() -> CountingLoader:
        clock = FakeClock()
        cache: SingleFlightCache[str, str] = SingleFlightCache(100, ttl_s=10, timer=clock)
        loader = CountingLoader({"a"})
        await cache.get_many(["a"], loader)
        clock.now += 9.9
        assert await cache.get_many(["a"], loader) == ({"a": "A"}, 1)
        clock.now += 0.2
        assert await cache.get_many(["a"], loader) == ({"a": "A"}, 0)
        return loader

    assert asyncio.run(scenario()).calls == [["a"], ["a"]]


def test_an_expired_prediction_frees_its_slot_and_counts_as_a_miss() -> None:
    clock = FakeClock()
    cache = PredictionCache(maxsize=2, ttl_s=10, timer=clock)
    cache.put("old", {"score": 1})
    clock.now += 10
    assert "old" not in cache and cache.get("old") is None
    assert (cache.hits, cache.misses) == (0, 1)
    cache.put("a", {"score": 2})
    cache.put("b", {"score": 3})  # "old" is gone, so neither evicts the other
    assert cache.get("a") == {"score": 2} and cache.get("b") == {"score": 3}


def test_prediction_cache_is_lru_bounded() -> None:
    cache = PredictionCache(maxsize=2, ttl_s=60)
    cache.put("a", {"score": 1})
    cache.put("b", {"score": 2})
    cache.get("a")
    cache.put("c", {"score": 3})
    assert cache.get("b") is None and cache.get("a") is not None


def test_hit_counts_are_per_call_even_when_calls_interleave() -> None:
    async def scenario() -> list[int]:
        cache: SingleFlightCache[str, str] = SingleFlightCache(100, ttl_s=60)
        loader = CountingLoader({"a", "b", "c"}, delay=0.02)
        await cache.get_many(["a"], loader)
        calls = [cache.get_many(["a", "b"], loader) for _ in range(3)]
        calls.append(cache.get_many(["a", "c"], loader))
        return [hits for _, hits in await asyncio.gather(*calls)]

    assert asyncio.run(scenario()) == [1, 1, 1, 1]


def test_a_cancelled_leader_does_not_cancel_the_callers_waiting_for_its_load() -> None:
    """The caller that started a load goes away (client gone, timeout): the callers
    waiting for the same keys got its CancelledError (a failed Model batch, a 500)."""
    loader = CountingLoader({"a", "b"}, delay=0.05)

    async def scenario() -> tuple[dict[str, str], int]:
        cache: SingleFlightCache[str, str] = SingleFlightCache(maxsize=100, ttl_s=60)
        leader = asyncio.create_task(cache.get_many(["a", "b"], loader))
        await asyncio.sleep(0.01)
        follower = asyncio.create_task(cache.get_many(["a"], loader))
        await asyncio.sleep(0.01)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        rows, _ = await asyncio.wait_for(follower, 2)
        return rows, len(cache)

    rows, cached = asyncio.run(scenario())
    assert rows == {"a": "A"}
    assert cached == 2 and len(loader.calls) == 1  # the load finished and was kept
