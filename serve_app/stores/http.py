"""A remote feature API as a feature store (the talk's "external API call")."""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from serve_app.errors import StoreUnavailable
from serve_app.stores.base import FeatureRow, loads_rows
from serve_app.streams import read_at_most

# A row is ~200 bytes of JSON; 4 KiB per id asked is generous, and bounds what a remote
# that answers too much can make a replica hold and parse.
MAX_BYTES_PER_ID = 4_096
# Asked of the remote, and the only encoding read: httpx inflates gzip, deflate and
# brotli with no bound of its own before a byte reaches our cap, so a 1 KB answer could
# expand to gigabytes inside the replica, synchronously (the timeout cannot interrupt it).
IDENTITY = {"accept-encoding": "identity"}


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
        self._client = httpx.AsyncClient(limits=limits, timeout=None, headers=IDENTITY)

    async def get_many(self, entity_ids: Sequence[str]) -> dict[str, FeatureRow]:
        if not entity_ids:
            return {}
        limit = MAX_BYTES_PER_ID * len(entity_ids) + 1_024
        try:
            body = await self._post_bulk(list(entity_ids), limit)
            answer = loads_rows(body)
            rows = answer["features"] if isinstance(answer, dict) else None
        except (httpx.HTTPError, ValueError, KeyError, RecursionError) as exc:  # deep JSON too
            detail = _without_credentials(str(exc), self.url)
            raise StoreUnavailable(f"feature API failed: {type(exc).__name__}: {detail}") from exc
        if not isinstance(rows, dict):
            raise StoreUnavailable('feature API answered no {"features": {id: row}} object')
        return {entity: row for entity, row in rows.items() if row is not None}

    async def _post_bulk(self, entity_ids: list[str], limit: int) -> bytes:
        """The answer's body, read as it streams in, or ``StoreUnavailable`` past
        ``limit`` bytes (the remote decides how much it sends, we how much we hold)."""
        request = self._client.build_request(
            "POST", f"{self.url}/features/bulk", json={"ids": entity_ids}
        )
        response = await self._client.send(request, stream=True)
        try:
            response.raise_for_status()
            _refuse_encoded(response)
            return await read_at_most(
                response.aiter_raw(),
                limit,
                lambda: StoreUnavailable(f"feature API answer over {limit} bytes"),
            )
        finally:
            await response.aclose()

    async def ping(self) -> None:
        """The status alone: the body is never read (nor inflated)."""
        try:
            async with self._client.stream("GET", f"{self.url}/healthz") as response:
                response.raise_for_status()
        except httpx.HTTPError as exc:
            detail = _without_credentials(str(exc), self.url)
            raise StoreUnavailable(f"feature API unreachable: {detail}") from exc

    async def aclose(self) -> None:
        await self._client.aclose()


def _refuse_encoded(response: httpx.Response) -> None:
    """``StoreUnavailable`` for an answer compressed although identity was asked for."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise StoreUnavailable(
            f"feature API answered Content-Encoding {encoding[:40]!r}; it is asked for identity"
        )


def _without_credentials(text: str, url: str) -> str:
    """``text`` (httpx's error, which quotes the URL) without the URL's user and password:
    ``store.url`` may carry them from the environment, and the text goes to the logs."""
    parts = httpx.URL(url)
    if not parts.userinfo:
        return text
    return text.replace(parts.userinfo.decode() + "@", "***@")
