"""The feature-store interface and what a bulk look-up answers.

Every backend (``sqlite.py``, ``http.py``) implements :class:`FeatureStore`; callers see
only this protocol, and :func:`serve_app.stores.open_store` picks the backend by URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from serve_app.errors import StoreUnavailable

FeatureRow = dict[str, Any]
LookupStatus = Literal["ok", "degraded", "unavailable"]
_SCALAR = (str, int, float, bool, type(None))


def checked_rows(rows: object, asked: Sequence[str]) -> dict[str, FeatureRow]:
    """The rows of the ``asked`` ids, each a flat JSON object, or ``StoreUnavailable``.

    Remote and shared stores answer what they hold, not what we wrote: a row that is no
    object, or holds lists or objects, failed the whole Model batch it reached (a 500
    for every coalesced caller) and stayed in the feature cache. A corrupt row is the
    store failing (degraded or unavailable answers, as ``store.on_error`` says); rows
    for ids nobody asked for are dropped.
    """
    if not isinstance(rows, dict):
        raise StoreUnavailable(f"the store answered {type(rows).__name__}, not rows by id")
    wanted = set(asked)
    found: dict[str, FeatureRow] = {}
    for entity, row in rows.items():
        if entity not in wanted:
            continue
        if not isinstance(row, dict) or not all(isinstance(v, _SCALAR) for v in row.values()):
            raise StoreUnavailable(f"corrupt feature row for {entity!r}: not a flat object")
        found[entity] = row
    return found


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
