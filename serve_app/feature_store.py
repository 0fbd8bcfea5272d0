"""Feature stores: one small interface (bulk get by ids), several backends.

Callers only ever see :class:`FeatureStore`. Adding Redis or another HTTP API means one
new class here and one line in :func:`open_store`, and no change to the callers.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
import pandas as pd

from serve_app.errors import ConfigError, StoreUnavailable
from serve_app.features import ENTITY_CATEGORICAL, ENTITY_FEATURES

FeatureRow = dict[str, Any]
# SQLite's default limit on host parameters is 32766 since 3.32; stay well below it.
_SQL_CHUNK = 900


class FeatureStore(Protocol):
    """Bulk look-up of stored per-entity features."""

    async def get_many(self, entity_ids: Sequence[str]) -> dict[str, FeatureRow]:
        """Rows for the ids that exist; unknown ids are simply absent.

        Raises :class:`StoreUnavailable` when the store cannot answer at all.
        """
        ...

    async def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store can answer now."""
        ...


class SQLiteFeatureStore:
    """The embedded default: a read-only SQLite file, queried in a worker thread.

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


class HttpFeatureStore:
    """A remote feature API: ``POST {url}/features/bulk {"ids": [...]}`` -> ``{"features": {id: row}}``.

    Stands for the "external API call" of the talk. One pooled async client per replica
    (keep-alive connections), one request per bulk look-up. Timeouts and retries are the
    caller's (:class:`serve_app.fetcher.StoreClient`), so every backend behaves alike.
    """

    def __init__(self, url: str, max_connections: int = 32) -> None:
        self.url = url.rstrip("/")
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._client = httpx.AsyncClient(limits=limits, timeout=None)

    async def get_many(self, entity_ids: Sequence[str]) -> dict[str, FeatureRow]:
        if not entity_ids:
            return {}
        try:
            response = await self._client.post(
                f"{self.url}/features/bulk", json={"ids": list(entity_ids)}
            )
            response.raise_for_status()
            rows = response.json()["features"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise StoreUnavailable(f"feature API failed: {type(exc).__name__}: {exc}") from exc
        return {entity: row for entity, row in rows.items() if row is not None}

    async def ping(self) -> None:
        try:
            (await self._client.get(f"{self.url}/healthz")).raise_for_status()
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"feature API unreachable: {exc}") from exc


def open_store(url: str) -> FeatureStore:
    """The store named by a URL from the YAML."""
    if url.startswith("sqlite:///"):
        return SQLiteFeatureStore(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("http://", "https://")):
        return HttpFeatureStore(url)
    raise ConfigError(f"unsupported feature store url: {url}")


def write_sqlite_store(path: Path, entities: pd.DataFrame) -> None:
    """Create the SQLite store from a generated entity table (atomically, via rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".building")
    staging.unlink(missing_ok=True)
    columns = ", ".join(
        f"{name} {'TEXT' if name in ENTITY_CATEGORICAL else 'REAL'}" for name in ENTITY_FEATURES
    )
    frame = entities.astype(object).where(entities.notna(), None)
    rows = list(frame.itertuples(index=True, name=None))
    with sqlite3.connect(staging) as connection:
        connection.execute(f"CREATE TABLE entities (entity_id TEXT PRIMARY KEY, {columns})")
        marks = ",".join("?" * (len(ENTITY_FEATURES) + 1))
        connection.executemany(f"INSERT INTO entities VALUES ({marks})", rows)
    staging.replace(path)
