"""A remote feature API as a feature store (the talk's "external API call")."""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from serve_app.errors import StoreUnavailable
from serve_app.stores.base import FeatureRow


class HttpFeatureStore:
    """``POST {url}/features/bulk {"ids": [...]}`` -> ``{"features": {id: row | null}}``.

    One pooled async client per replica (keep-alive connections), one request per bulk
    look-up. Timeouts and retries are the caller's (:class:`~serve_app.stores.client.
    StoreClient`), so every backend behaves alike.
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

    async def aclose(self) -> None:
        await self._client.aclose()
