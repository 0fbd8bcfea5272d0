"""Feature stores: one interface (bulk get by ids), a backend per URL scheme.

::

    FeatureStore (protocol, base.py)
    ├── SQLiteFeatureStore   sqlite:///FILE     (sqlite.py, the embedded default)
    └── HttpFeatureStore     http(s)://HOST     (http.py, a remote feature API)

Adding a backend means one class and one line in :func:`open_store`; callers do not change.
"""

from __future__ import annotations

from serve_app.config import sqlite_path
from serve_app.errors import ConfigError
from serve_app.stores.base import FeatureLookup, FeatureRow, FeatureStore
from serve_app.stores.http import HttpFeatureStore
from serve_app.stores.sqlite import SQLiteFeatureStore


def open_store(url: str) -> FeatureStore:
    """The store named by a URL from the YAML."""
    path = sqlite_path(url)
    if path is not None:
        return SQLiteFeatureStore(path)
    if url.startswith(("http://", "https://")):
        return HttpFeatureStore(url)
    raise ConfigError(f"unsupported feature store url: {url}")


__all__ = ["FeatureLookup", "FeatureRow", "FeatureStore", "open_store"]
