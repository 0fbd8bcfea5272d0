"""The set of entity ids the feature store holds, kept in the FeatureFetcher for outages.

When the store is down the FeatureFetcher degrades: items are scored on default features
and marked ``degraded``. Without this set an id that does not exist (``NOPE999``) got such
a score too, indistinguishable from a real entity's. With it, an id that is not in the
set still gets 404 ``unknown_entity`` during an outage, as it would with the store up.

Why a sorted numpy array and not a Bloom filter: it is exact. A Bloom filter's false
positives are precisely the bug (an unknown id scored as if it existed), and at 1 % they
would let one unknown id in a hundred through. Every entry is as wide as the longest id
(at most 64 bytes, the API's limit): 100,000 ids of 8 bytes take 0.8 MB, ten million
80 MB, and ten million with one id of 64 bytes 640 MB, where a Bloom filter would start
to pay. A membership test of a
whole batch is one vectorised ``searchsorted``.

The set is loaded from the store when the replica starts and refreshed every
``known_ids_refresh_s``; a refresh that fails keeps the last set (that is the point:
the store is down). An id added to the store after the last refresh is "unknown" during
an outage until the next refresh succeeds; the refresh period bounds that window.

Backends that can list their ids: SQLite (``SELECT entity_id``) and Redis (``SCAN`` of
the feature keys). An HTTP feature API cannot; there, as before a first successful load,
:meth:`KnownIds.unknown` answers None ("cannot tell") and degraded mode refuses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from serve_app.config import expand_env, sqlite_path

logger = logging.getLogger("serve_app.known_ids")

_REDIS_SCAN_COUNT = 10_000


class KnownIds:
    """An exact, compact set of ids: a sorted array of fixed-width byte strings."""

    def __init__(self) -> None:
        self._ids: np.ndarray | None = None
        self.loaded_at: float | None = None

    def replace(self, ids: Iterable[str]) -> None:
        self.install(sorted_ids(ids))

    def install(self, array: np.ndarray) -> None:
        """Swap in an array made by :func:`sorted_ids` (one assignment: lookups see the
        old set or the new one, never half)."""
        self._ids = array
        self.loaded_at = time.time()

    @property
    def size(self) -> int:
        return 0 if self._ids is None else len(self._ids)

    @property
    def nbytes(self) -> int:
        return 0 if self._ids is None else int(self._ids.nbytes)

    def unknown(self, entity_ids: Sequence[str]) -> set[str] | None:
        """The ids of ``entity_ids`` that are not in the set; None if no set is loaded."""
        known = self._ids
        if known is None:
            return None
        if not entity_ids or len(known) == 0:
            return set(entity_ids)
        # Ids longer than the array's width cannot be in it; numpy would truncate them.
        width = known.dtype.itemsize
        probe = np.array([i.encode()[: width + 1] for i in entity_ids], dtype=np.bytes_)
        positions = np.searchsorted(known, probe)
        found = (positions < len(known)) & (known[np.minimum(positions, len(known) - 1)] == probe)
        return {entity_id for entity_id, hit in zip(entity_ids, found, strict=True) if not hit}


# ---- loading from a store ----------------------------------------------------------------


def _sqlite_ids(path: Path) -> list[str]:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        return [row[0] for row in connection.execute("SELECT entity_id FROM entities")]
    finally:
        connection.close()


async def _redis_ids(url: str) -> list[str]:
    import redis.asyncio as aioredis

    from serve_app.stores.redis import KEY_PREFIX, META_KEY

    client = aioredis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=10.0)
    try:
        ids = []
        async for key in client.scan_iter(match=KEY_PREFIX + "*", count=_REDIS_SCAN_COUNT):
            name = key.decode() if isinstance(key, bytes) else key
            if name != META_KEY:
                ids.append(name.removeprefix(KEY_PREFIX))
        return ids
    finally:
        await client.aclose()


def can_list_ids(url: str) -> bool:
    """Whether the store at ``url`` can list its ids (SQLite and Redis can)."""
    url = expand_env(url)
    return sqlite_path(url) is not None or url.startswith(("redis://", "rediss://"))


async def load_ids(url: str) -> list[str]:
    """Every entity id in the store at ``url``; raises on any failure."""
    url = expand_env(url)
    path = sqlite_path(url)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"feature store file not found: {path.name}")
        return await asyncio.to_thread(_sqlite_ids, path)
    if url.startswith(("redis://", "rediss://")):
        return await _redis_ids(url)
    raise ValueError("this feature store cannot list its ids")


def sorted_ids(ids: Iterable[str]) -> np.ndarray:
    """The ids as a sorted array of fixed-width byte strings (the width of the longest)."""
    return np.array(sorted({i.encode() for i in ids}), dtype=np.bytes_)


async def refresh(known: KnownIds, url: str) -> bool:
    """Reload ``known`` from the store; on failure keep the last set and say so."""
    try:
        ids = await load_ids(url)
    except Exception as exc:  # the store may be down: that is when the old set matters
        logger.warning("known ids not refreshed (keeping %d): %r", known.size, exc)
        return False
    # Sorting a million ids takes over a second: off the event loop, which meanwhile
    # keeps answering look-ups from the old set.
    known.install(await asyncio.to_thread(sorted_ids, ids))
    return True
