"""The embedded default feature store: a read-only SQLite file, and its writer."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from serve_app.errors import StoreUnavailable
from serve_app.scoring.features import ENTITY_CATEGORICAL, ENTITY_FEATURES
from serve_app.stores.base import FeatureRow

if TYPE_CHECKING:
    import pandas as pd

# SQLite's default limit on host parameters is 32766 since 3.32; stay well below it.
_SQL_CHUNK = 900


class SQLiteFeatureStore:
    """Rows of the ``entities`` table, queried in a worker thread.

    A connection is opened per call (about 0.1 ms) instead of being kept, so that a file
    that disappears or is replaced is noticed at once, as a real outage would be.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._select_head = f"SELECT entity_id, {', '.join(ENTITY_FEATURES)} FROM entities"

    def _connect(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise StoreUnavailable(f"feature store file not found: {self.path.name}")
        try:
            return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1.0)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open feature store: {exc}") from exc

    def _get_many_sync(self, entity_ids: Sequence[str]) -> dict[str, FeatureRow]:
        found: dict[str, FeatureRow] = {}
        connection = self._connect()
        try:
            for start in range(0, len(entity_ids), _SQL_CHUNK):
                chunk = list(entity_ids[start : start + _SQL_CHUNK])
                marks = ",".join("?" * len(chunk))
                query = f"{self._select_head} WHERE entity_id IN ({marks})"
                for row in connection.execute(query, chunk):
                    found[row[0]] = dict(zip(ENTITY_FEATURES, row[1:], strict=True))
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"feature store query failed: {exc}") from exc
        finally:
            connection.close()
        return found

    async def get_many(self, entity_ids: Sequence[str]) -> dict[str, FeatureRow]:
        if not entity_ids:
            return {}
        return await asyncio.to_thread(self._get_many_sync, entity_ids)

    async def ping(self) -> None:
        await asyncio.to_thread(lambda: self._connect().close())

    async def aclose(self) -> None:
        """Nothing to release: a connection lives for one call."""


def write_sqlite_store(path: Path, entities: pd.DataFrame) -> None:
    """Create the store from an entity table indexed by ``entity_id`` (atomic rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".building")
    staging.unlink(missing_ok=True)
    columns = ", ".join(
        f"{name} {'TEXT' if name in ENTITY_CATEGORICAL else 'REAL'}" for name in ENTITY_FEATURES
    )
    frame = entities.astype(object).where(entities.notna(), None)
    rows = list(frame.itertuples(index=True, name=None))
    # 0600, not the umask's 0644: per-entity features (income, credit score) may be
    # personal data. The image makes its copy readable to its service user on purpose.
    os.close(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    with sqlite3.connect(staging) as connection:
        connection.execute(f"CREATE TABLE entities (entity_id TEXT PRIMARY KEY, {columns})")
        marks = ",".join("?" * (len(ENTITY_FEATURES) + 1))
        connection.executemany(f"INSERT INTO entities VALUES ({marks})", rows)
    staging.replace(path)
