"""A feature store wrapped with a timeout per attempt and retries (tenacity)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from serve_app.config import StoreConfig
from serve_app.errors import StoreUnavailable
from serve_app.stores.base import FeatureStore, StoredRow, checked_rows


class StoreClient:
    """Same timeout and retry behaviour for every backend; raises StoreUnavailable."""

    def __init__(self, store: FeatureStore, config: StoreConfig) -> None:
        self.store = store
        self.config = config

    async def _attempt(self, entity_ids: Sequence[str]) -> dict[str, StoredRow]:
        try:
            rows = await asyncio.wait_for(self.store.get_many(entity_ids), self.config.timeout_s)
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"store look-up timed out after {self.config.timeout_s}s"
            ) from exc
        return checked_rows(rows, entity_ids)

    async def get_many(self, entity_ids: Sequence[str]) -> dict[str, StoredRow]:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.attempts),
            wait=wait_exponential_jitter(initial=0.01, max=0.2),
            retry=retry_if_exception_type(StoreUnavailable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._attempt(entity_ids)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def ping(self) -> bool:
        """Can the store answer now (within the look-up timeout)?"""
        try:
            await asyncio.wait_for(self.store.ping(), self.config.timeout_s)
        except (StoreUnavailable, TimeoutError):
            return False
        return True
