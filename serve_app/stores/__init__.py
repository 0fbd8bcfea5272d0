"""Feature stores: one interface (bulk get by ids), a backend per URL scheme.

::

    FeatureStore (protocol, base.py)
    ├── SQLiteFeatureStore   sqlite:///FILE     (sqlite.py, the embedded default)
    ├── RedisFeatureStore    redis(s)://HOST    (redis.py, shared by every node)
    └── HttpFeatureStore     http(s)://HOST     (http.py, a remote feature API)

Adding a backend means one class and one line in :func:`open_store`; callers do not change.
"""

from __future__ import annotations

from serve_app.config import STORE_SCHEMES, expand_env, sqlite_path, url_scheme
from serve_app.errors import ConfigError
from serve_app.stores.base import CorruptRow, FeatureLookup, FeatureRow, FeatureStore, StoredRow
from serve_app.stores.http import HttpFeatureStore
from serve_app.stores.sqlite import SQLiteFeatureStore


def open_store(url: str) -> FeatureStore:
    """The store named by a URL from the YAML (``${VAR}`` read from the environment)."""
    try:
        url = expand_env(url)
        scheme = url_scheme(url, STORE_SCHEMES, "feature store")
    except ValueError as exc:
        raise ConfigError(f"unsupported feature store url: {exc}") from exc
    path = sqlite_path(url)
    if path is not None:
        return SQLiteFeatureStore(path)
    if scheme in ("redis://", "rediss://"):
        from serve_app.stores.redis import RedisFeatureStore  # only replicas that use it

        return RedisFeatureStore(url)
    return HttpFeatureStore(url)


__all__ = [
    "CorruptRow",
    "FeatureLookup",
    "FeatureRow",
    "FeatureStore",
    "StoredRow",
    "open_store",
]
