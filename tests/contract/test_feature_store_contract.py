"""The FeatureStore contract: every test runs against SQLite, the HTTP feature API and Redis.

All three serve the same 2,000 example entities (the HTTP API reads the SQLite file over
real loopback HTTP; Redis is loaded from it by ``serve-app load-features``), so a bulk
look-up must give the *same rows* whichever backend answers. Outages are real too: a
missing file, an API answering 503, a Redis server that was stopped or paused.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from serve_app.config import StoreConfig
from serve_app.errors import StoreUnavailable
from serve_app.offline.load_features import load_into_redis, read_input
from serve_app.scoring.features import ENTITY_FEATURES
from serve_app.stores import CorruptRow, FeatureStore, open_store
from serve_app.stores.client import StoreClient
from serve_app.stores.http import HttpFeatureStore
from serve_app.stores.redis import RedisFeatureStore, feature_key
from serve_app.stores.sqlite import SQLiteFeatureStore
from tests.services import RedisServer, redis_server

BACKENDS = ["sqlite", "http", "redis"]
KNOWN = ["E0000000", "E0000001", "E0001999"]


@dataclass
class Backend:
    """A store's URL and a way to make it fail for real."""

    name: str
    url: str
    break_it: Callable[[], None]
    restore: Callable[[], None]


@pytest.fixture(scope="module")
def loaded_redis(redis_srv: RedisServer, small_store_path: Path) -> str:
    report = load_into_redis(read_input(small_store_path), redis_srv.url, progress=False)
    assert report.loaded == 2_000 and report.refused == []
    return redis_srv.url


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, small_store_path: Path, tmp_path: Path
) -> Iterator[Backend]:
    with ExitStack() as stack:
        if request.param == "sqlite":
            copy = tmp_path / "features.db"
            copy.write_bytes(small_store_path.read_bytes())
            moved = tmp_path / "moved.db"
            yield Backend(
                "sqlite",
                f"sqlite:///{copy}",
                lambda: copy.rename(moved),
                lambda: moved.rename(copy),
            )
        elif request.param == "http":
            from loadtests.feature_api import create_app
            from tests.servers import serve_in_thread

            api = create_app(small_store_path, latency_ms=0)
            url = stack.enter_context(serve_in_thread(api))

            def set_healthy(value: bool) -> None:
                api.state.healthy = value

            yield Backend("http", url, lambda: set_healthy(False), lambda: set_healthy(True))
        else:
            url = request.getfixturevalue("loaded_redis")
            server: RedisServer = request.getfixturevalue("redis_srv")
            stack.callback(os.kill, server.pid, signal.SIGCONT)
            # a frozen server (SIGSTOP) takes connections but answers nothing: look-ups time out
            yield Backend(
                "redis",
                url,
                lambda: os.kill(server.pid, signal.SIGSTOP),
                lambda: os.kill(server.pid, signal.SIGCONT),
            )


def run(factory: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(factory())  # type: ignore[arg-type]


def _with_store(url: str, use: Callable[[FeatureStore], Awaitable[Any]]) -> Any:
    """Open the store inside the event loop that uses it (as a replica does), then close."""

    async def scenario() -> Any:
        store = open_store(url)
        try:
            return await use(store)
        finally:
            await store.aclose()

    return asyncio.run(scenario())


def test_url_scheme_picks_the_backend(backend: Backend) -> None:
    kind = {"sqlite": SQLiteFeatureStore, "http": HttpFeatureStore, "redis": RedisFeatureStore}
    assert _with_store(backend.url, lambda store: _is(store, kind[backend.name]))


async def _is(store: FeatureStore, kind: type) -> bool:
    return isinstance(store, kind)


def test_bulk_get_returns_known_rows_only(backend: Backend) -> None:
    ids = [KNOWN[0], KNOWN[1], "nope", KNOWN[1], KNOWN[2]]
    rows = _with_store(backend.url, lambda store: store.get_many(ids))
    assert set(rows) == set(KNOWN)
    assert set(rows[KNOWN[0]]) == set(ENTITY_FEATURES)


def test_the_metadata_key_is_no_entity(backend: Backend) -> None:
    """Redis keeps its metadata under the key an entity "_meta" would have: that id, which
    the API accepts, must be unknown there as everywhere, not a row of NaNs to score."""
    rows = _with_store(backend.url, lambda store: store.get_many(["_meta", KNOWN[0]]))
    assert set(rows) == {KNOWN[0]}


def test_every_backend_returns_the_same_rows(backend: Backend, small_store_path: Path) -> None:
    ids = [f"E{i:07d}" for i in range(0, 2_000, 7)] + ["E9999999"]
    rows = _with_store(backend.url, lambda store: store.get_many(ids))
    expected = asyncio.run(SQLiteFeatureStore(small_store_path).get_many(ids))
    assert rows == expected and len(rows) == len(ids) - 1


def test_empty_and_large_look_ups(backend: Backend) -> None:
    assert _with_store(backend.url, lambda store: store.get_many([])) == {}
    ids = [f"E{i:07d}" for i in range(1_500)]  # beyond SQLite's chunk of 900 parameters
    assert len(_with_store(backend.url, lambda store: store.get_many(ids))) == 1_500


def test_ping_and_outage_are_store_unavailable(backend: Backend) -> None:
    config = StoreConfig(url=backend.url, timeout_s=0.3, attempts=2)

    async def scenario(store: FeatureStore) -> tuple[bool, bool, bool]:
        client = StoreClient(store, config)
        healthy = await client.ping()
        backend.break_it()
        try:
            down = await client.ping()
            started = time.perf_counter()
            with pytest.raises(StoreUnavailable):
                await client.get_many(KNOWN)
            # bounded by the timeout per attempt and the retry backoff, never hanging
            # (about 0.8 s here: two timeouts and one capped backoff; 10x that is a hang)
            assert time.perf_counter() - started < 10 * (2 * config.timeout_s + 0.2)
        finally:
            backend.restore()
        recovered = await client.ping()
        assert set(await client.get_many(KNOWN)) == set(KNOWN)
        return healthy, down, recovered

    assert _with_store(backend.url, scenario) == (True, False, True)


def test_concurrent_look_ups_share_the_store(backend: Backend) -> None:
    async def scenario(store: FeatureStore) -> list[int]:
        calls = [store.get_many([f"E{i:07d}" for i in range(j, j + 64)]) for j in range(50)]
        return [len(rows) for rows in await asyncio.gather(*calls)]

    assert _with_store(backend.url, scenario) == [64] * 50


def test_redis_bulk_look_up_is_one_round_trip(loaded_redis: str) -> None:
    import redis

    admin = redis.Redis.from_url(loaded_redis)
    admin.config_resetstat()
    ids = [f"E{i:07d}" for i in range(64)]
    rows = _with_store(loaded_redis, lambda store: store.get_many(ids))
    stats = admin.info("commandstats")
    admin.close()
    assert len(rows) == 64
    assert stats["cmdstat_mget"]["calls"] == 1
    commands = {name for name in stats if name not in ("cmdstat_mget", "cmdstat_info")}
    assert commands <= {"cmdstat_config|resetstat", "cmdstat_hello", "cmdstat_client|setinfo"}


CORRUPT_REDIS_ROWS = {
    "null": "but NoneType",
    "[1, 2]": "but list",
    '{"age": [1]}': "list in 'age'",
    "{}": "none of the model's entity features",
    '{"age": null, "region": null}': "none of the model's entity features",
    # nothing the model could use: scored as the defaults, cached as a real answer before
    '{"age": Infinity, "income": NaN, "region": "mars"}': "none it could use",
    "7": "but int",
    "<html>": "not JSON",
    "[" * 3000: "not JSON",  # nested past the stack: a RecursionError, not a ValueError
}


@pytest.mark.parametrize("stored", sorted(CORRUPT_REDIS_ROWS), ids=lambda s: s[:12])
def test_a_corrupt_redis_row_is_that_ids_own_failure(loaded_redis: str, stored: str) -> None:
    """A row someone else wrote into the shared Redis: not a score on default features
    (``null`` was one), not a failed Model batch, not the whole look-up failing (every id
    in it, as long as the row stayed), but a mark on its own id."""
    import redis

    from serve_app.stores.redis import feature_key

    admin = redis.Redis.from_url(loaded_redis)
    admin.set(feature_key("CORRUPT1"), stored)
    admin.close()

    async def scenario(store: FeatureStore) -> None:
        client = StoreClient(store, StoreConfig(url=loaded_redis, attempts=1))
        rows = await client.get_many([KNOWN[0], "CORRUPT1"])
        assert set(rows) == {KNOWN[0], "CORRUPT1"}
        assert isinstance(rows[KNOWN[0]], dict)
        corrupt = rows["CORRUPT1"]
        assert isinstance(corrupt, CorruptRow)
        assert CORRUPT_REDIS_ROWS[stored] in corrupt.reason

    _with_store(loaded_redis, scenario)


def test_an_all_null_sqlite_row_is_that_ids_own_failure(
    small_store_path: Path, tmp_path: Path
) -> None:
    """Every feature column NULL: the entity exists, but nothing is known of it. Scored,
    it got exactly the defaults' score, marked neither degraded nor failed, and cached."""
    import sqlite3

    copy = tmp_path / "features.db"
    copy.write_bytes(small_store_path.read_bytes())
    with sqlite3.connect(copy) as db:
        columns = ", ".join(f"{name} = NULL" for name in ENTITY_FEATURES)
        db.execute(f"UPDATE entities SET {columns} WHERE entity_id = ?", (KNOWN[1],))
    url = f"sqlite:///{copy}"

    async def scenario(store: FeatureStore) -> None:
        rows = await StoreClient(store, StoreConfig(url=url, attempts=1)).get_many(KNOWN[:2])
        assert isinstance(rows[KNOWN[0]], dict)
        assert isinstance(rows[KNOWN[1]], CorruptRow), rows[KNOWN[1]]
        assert "none of the model's entity features" in rows[KNOWN[1]].reason

    _with_store(url, scenario)


def test_redis_server_gone_is_store_unavailable() -> None:
    with redis_server() as server:
        url = server.url

    async def scenario(store: FeatureStore) -> None:
        with pytest.raises(StoreUnavailable):
            await store.get_many(KNOWN)
        with pytest.raises(StoreUnavailable):
            await store.ping()

    _with_store(url, scenario)


def test_an_emptied_redis_is_not_ready(redis_srv: RedisServer, small_store_path: Path) -> None:
    """After FLUSHALL every id is a 404; a plain PING kept /readyz saying ready. Its own
    database of the session's server, so the loaded one of the other tests stays."""
    url = redis_srv.url.rsplit("/", 1)[0] + "/7"
    load_into_redis(read_input(small_store_path), url, progress=False)

    async def scenario(store: FeatureStore) -> None:
        await store.ping()
        redis.Redis.from_url(url).flushdb()
        with pytest.raises(StoreUnavailable, match="load-features"):
            await store.ping()
        admin = redis.Redis.from_url(url)
        admin.set(feature_key("E0000001"), '{"age": 40}')  # written by other hands: no _meta
        await store.ping()
        admin.flushdb()
        admin.close()

    _with_store(url, scenario)
