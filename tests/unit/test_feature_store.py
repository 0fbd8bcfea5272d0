import asyncio
from pathlib import Path

import pytest

from serve_app.errors import ConfigError, StoreUnavailable
from serve_app.feature_store import SQLiteFeatureStore, open_store


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
