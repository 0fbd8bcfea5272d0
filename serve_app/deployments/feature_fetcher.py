"""The FeatureFetcher deployment: a pool of async, IO-bound feature look-ups.

One call fetches the features of many entities (the Model sends one call per batch).
The look-up itself (cache, store client, degraded answers, known ids) is
:class:`~serve_app.feature_lookup.FeatureSource`; this module only makes it a Ray Serve
deployment with its own replicas, ``user_config`` and metrics, shared by every Model
replica (a Model replica may also run a source of its own: ``ModelTuning.local_features``).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from serve_app.config import FetcherTuning, StoreConfig
from serve_app.feature_lookup import FeatureSource
from serve_app.logs import route_to_serve_logs
from serve_app.metrics import FetcherMetrics
from serve_app.stores import FeatureLookup


@serve.deployment(name="FeatureFetcher")
class FeatureFetcher:
    async def __init__(self, store: dict[str, Any]) -> None:
        route_to_serve_logs()
        config = StoreConfig.model_validate(store)
        self._source = FeatureSource(config, FetcherTuning(), FetcherMetrics())
        await self._source.start()  # the known ids, before the first call

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply cache settings in place; any change to them starts an empty cache."""
        self._source.retune(FetcherTuning.model_validate(user_config or {}))

    async def get_many(self, entity_ids: list[str]) -> FeatureLookup:
        """Features for ``entity_ids``; unknown ids are absent from ``rows``."""
        return await self._source.get_many(entity_ids)

    async def ping(self) -> bool:
        """Readiness: can the store answer now?"""
        return await self._source.ping()

    async def __del__(self) -> None:
        """Serve calls this when the replica stops: close the store's connection pool."""
        await self._source.aclose()

    def stats(self) -> dict[str, Any]:
        return self._source.stats()
