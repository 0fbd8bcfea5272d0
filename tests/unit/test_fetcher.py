import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from serve_app.config import StoreConfig
from serve_app.errors import StoreUnavailable
from serve_app.stores import FeatureRow
from serve_app.stores.client import StoreClient


class ScriptedStore:
    """A store whose calls take ``delays[i]`` seconds, or fail when the delay is None."""

    def __init__(self, delays: list[float | None]) -> None:
        self.delays = delays
        self.calls = 0

    async def get_many(self, entity_ids: Sequence[str]) -> dict[str, FeatureRow]:
        delay = self.delays[min(self.calls, len(self.delays) - 1)]
        self.calls += 1
        if delay is None:
            raise StoreUnavailable("down")
        await asyncio.sleep(delay)
        return {entity: {"age": 1.0} for entity in entity_ids}

    async def ping(self) -> None:
        return None


def config(**overrides: object) -> StoreConfig:
    return StoreConfig.model_validate({"timeout_s": 0.05, "attempts": 3, **overrides})


def test_each_attempt_times_out_then_the_store_is_unavailable() -> None:
    store = ScriptedStore([0.5])
    started = time.perf_counter()
    with pytest.raises(StoreUnavailable, match="timed out"):
        asyncio.run(StoreClient(store, config()).get_many(["E1"]))
    assert store.calls == 3
    assert time.perf_counter() - started < 1.0  # three 50 ms timeouts plus short backoff


def test_a_transient_failure_is_retried() -> None:
    store = ScriptedStore([None, 0.0])
    rows = asyncio.run(StoreClient(store, config()).get_many(["E1", "E2"]))
    assert set(rows) == {"E1", "E2"} and store.calls == 2


def test_one_attempt_means_no_retry() -> None:
    store = ScriptedStore([None, 0.0])
    with pytest.raises(StoreUnavailable):
        asyncio.run(StoreClient(store, config(attempts=1)).get_many(["E1"]))
    assert store.calls == 1


def test_slow_http_feature_api_times_out(small_store_path: Path) -> None:
    from loadtests.feature_api import create_app
    from serve_app.stores.http import HttpFeatureStore
    from tests.servers import serve_in_thread

    with serve_in_thread(create_app(small_store_path, latency_ms=300)) as url:
        client = StoreClient(HttpFeatureStore(url), config(attempts=2))
        with pytest.raises(StoreUnavailable, match="timed out"):
            asyncio.run(client.get_many(["E0000001"]))
