"""The feature-store interface and what a bulk look-up answers.

Every backend (``sqlite.py``, ``http.py``) implements :class:`FeatureStore`; callers see
only this protocol, and :func:`serve_app.stores.open_store` picks the backend by URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FeatureRow = dict[str, Any]
LookupStatus = Literal["ok", "degraded", "unavailable"]


class FeatureStore(Protocol):
    """Bulk look-up of stored per-entity features."""

    async def get_many(self, entity_ids: Sequence[str]) -> dict[str, FeatureRow]:
        """Rows for the ids that exist; unknown ids are simply absent.

        Raises :class:`~serve_app.errors.StoreUnavailable` when the store cannot answer.
        """
        ...

    async def ping(self) -> None:
        """Raise :class:`~serve_app.errors.StoreUnavailable` unless the store answers now."""
        ...

    async def aclose(self) -> None:
        """Release connections and pools."""
        ...


@dataclass(frozen=True)
class FeatureLookup:
    """The answer of one bulk look-up, as the FeatureFetcher sends it to the Model.

    ``ok``: ``rows`` holds every id that exists. When the store failed: ``degraded``
    (score on default features and say so) or ``unavailable`` (fail the items), as
    ``store.on_error`` says, with the ``reason``.
    """

    status: LookupStatus
    rows: dict[str, FeatureRow] = field(default_factory=dict)
    reason: str | None = None
    # When degraded: ids the FeatureFetcher knows the store does not hold (404, not a score).
    unknown: frozenset[str] = frozenset()
