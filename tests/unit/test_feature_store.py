import asyncio
from pathlib import Path

import pytest

from serve_app.errors import ConfigError, StoreUnavailable
from serve_app.stores import SQLiteFeatureStore, open_store


def test_bulk_get_returns_known_rows_only(small_store_path: Path) -> None:
    store = open_store(f"sqlite:///{small_store_path}")
    ids = ["E0000000", "E0000001", "nope", "E0000001"]
    rows = asyncio.run(store.get_many(ids))
    assert set(rows) == {"E0000000", "E0000001"}
    assert set(rows["E0000000"]) >= {"age", "region", "segment"}


def test_bulk_get_beyond_one_sql_chunk(small_store_path: Path) -> None:
    store = SQLiteFeatureStore(small_store_path)
    ids = [f"E{i:07d}" for i in range(1_500)]
    assert len(asyncio.run(store.get_many(ids))) == 1_500


def test_missing_file_is_store_unavailable(tmp_path: Path) -> None:
    store = SQLiteFeatureStore(tmp_path / "absent.db")
    with pytest.raises(StoreUnavailable):
        asyncio.run(store.get_many(["E0000000"]))
    with pytest.raises(StoreUnavailable):
        asyncio.run(store.ping())


def test_corrupt_file_is_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "broken.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable):
        asyncio.run(SQLiteFeatureStore(path).get_many(["E0000000"]))


def test_unknown_scheme_is_config_error() -> None:
    with pytest.raises(ConfigError):
        open_store("ftp://example")


def test_http_store_bulk_get_and_outage(small_store_path: Path) -> None:
    from loadtests.feature_api import create_app
    from serve_app.stores.http import HttpFeatureStore
    from tests.servers import serve_in_thread

    api = create_app(small_store_path, latency_ms=1)
    with serve_in_thread(api) as url:
        store = open_store(url)
        assert isinstance(store, HttpFeatureStore)

        async def scenario() -> dict[str, dict[str, object]]:
            await store.ping()
            rows = await store.get_many(["E0000000", "nope", "E0000003"])
            api.state.healthy = False
            with pytest.raises(StoreUnavailable):
                await store.get_many(["E0000000"])
            with pytest.raises(StoreUnavailable):
                await store.ping()
            return rows

        rows = asyncio.run(scenario())
    sqlite_rows = asyncio.run(
        SQLiteFeatureStore(small_store_path).get_many(["E0000000", "E0000003"])
    )
    assert rows == sqlite_rows  # same data through either backend

    async def down() -> None:
        with pytest.raises(StoreUnavailable):
            await HttpFeatureStore(url).get_many(["E0000000"])  # server gone: connect error

    asyncio.run(down())
