"""Redis as the feature store: shared by every node, one round trip per bulk look-up.

Key layout (written by ``serve-app load-features``, read here)::

    serve_app:features:v1:{entity_id}  ->  JSON object {feature name: value}  (a string key)
    serve_app:features:v1:_meta        ->  JSON {"columns": [...], "rows": n, "loaded_at": t}

One string per entity, so a bulk look-up is ONE ``MGET`` whatever the number of ids: a
single round trip, unlike a pipeline of ``HGETALL`` that Redis executes one by one. The
JSON keeps the same Python types the SQLite store returns (float, str, None). ``v1`` is
the layout version: a new layout is loaded next to the old one, never over it.

Timeouts and retries are the caller's (:class:`~serve_app.stores.client.StoreClient`), as
for every backend; connection errors and Redis errors become ``StoreUnavailable``.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from serve_app.errors import StoreUnavailable
from serve_app.stores.base import CorruptRow, StoredRow, loads_rows

KEY_PREFIX = "serve_app:features:v1:"
RESERVED_ID = "_meta"  # an entity id the API accepts, but its key holds the metadata
META_KEY = KEY_PREFIX + RESERVED_ID


def feature_key(entity_id: str) -> str:
    """The Redis key of one entity's feature row."""
    return KEY_PREFIX + entity_id


class RedisFeatureStore:
    """Rows as JSON strings under :func:`feature_key`, read with one MGET per look-up.

    The client holds a blocking connection pool (``max_connections``) for the replica's
    event loop: concurrent look-ups share its connections and wait for a free one rather
    than open more.
    """

    def __init__(self, url: str, max_connections: int = 32) -> None:
        self.url = url
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=5.0,  # wait this long for a free connection, never open more
            socket_connect_timeout=2.0,
        )
        self._redis = aioredis.Redis.from_pool(pool)

    async def get_many(self, entity_ids: Sequence[str]) -> dict[str, StoredRow]:
        if not entity_ids:
            return {}
        # The metadata's key is not an entity's: "_meta" is unknown, never a row.
        unique = [entity for entity in dict.fromkeys(entity_ids) if entity != RESERVED_ID]
        try:
            values = await self._redis.mget([feature_key(entity) for entity in unique])
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis look-up failed: {type(exc).__name__}: {exc}") from exc
        found: dict[str, StoredRow] = {}
        for entity, value in zip(unique, values, strict=True):
            if value is None:
                continue
            try:
                found[entity] = loads_rows(value)
            except (ValueError, RecursionError):  # bad JSON, or nested past the stack
                found[entity] = CorruptRow("not JSON")
        return found

    async def ping(self) -> None:
        """Reachable *and* holding something: after a ``FLUSHALL`` (or a Redis restarted
        without its data) every id is a 404, and a plain ``PING`` kept ``/readyz`` saying
        ready. Loaded means the loader's metadata key exists or, for rows written by other
        hands (or a load still running), that the database holds any key at all."""
        try:
            loaded = await self._redis.exists(META_KEY) or await self._redis.dbsize() > 0
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"redis unreachable: {type(exc).__name__}: {exc}") from exc
        if not loaded:
            raise StoreUnavailable(
                "redis holds no feature rows (its database is empty): load them with "
                "`serve-app load-features`"
            )

    async def aclose(self) -> None:
        await self._redis.aclose()
