"""The feature-store interface and what a bulk look-up answers.

Every backend (``sqlite.py``, ``http.py``) implements :class:`FeatureStore`; callers see
only this protocol, and :func:`serve_app.stores.open_store` picks the backend by URL.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from serve_app.errors import StoreUnavailable
from serve_app.scoring.features import ENTITY_FEATURES, is_usable

FeatureRow = dict[str, Any]
LookupStatus = Literal["ok", "degraded", "unavailable"]
_SCALAR = (str, int, float, bool, type(None))
# Past this many digits an integer cannot be a float (the model's input), so it is read
# as NaN, a missing value, as the scoring reads any value that is no number.
_FLOAT_DIGITS = 310


def _json_int(digits: str) -> int | float:
    return int(digits) if len(digits) <= _FLOAT_DIGITS else math.nan


# One decoder for every row: json.loads with a keyword builds a new one per call, which
# doubled the cost of a Redis row (4.4 against 2.2 us).
_ROWS = json.JSONDecoder(parse_int=_json_int)


def loads_rows(text: str | bytes) -> Any:
    """``json.loads`` for what a store holds, where one value cannot fail the rest: Python
    refuses integers of over 4,300 digits with a ValueError, and one such value in a
    feature API's answer failed every id in it. Bytes must be UTF-8 (a ValueError else)."""
    return _ROWS.decode(text.decode() if isinstance(text, bytes) else text)


@dataclass(frozen=True)
class CorruptRow:
    """What the store holds for an id where no flat object is: that item alone fails
    (``store.on_error: fail``) or is scored on defaults (``degrade``); its batch-mates are
    scored. Cached like a row, so a flood of calls for it does not reach the store."""

    reason: str


StoredRow = FeatureRow | CorruptRow


def checked_rows(rows: object, asked: Sequence[str]) -> dict[str, StoredRow]:
    """The rows of the ``asked`` ids: each a flat JSON object, or a :class:`CorruptRow`.

    Remote and shared stores answer what they hold, not what we wrote: a row that is no
    object, or holds lists or objects, failed the whole Model batch it reached (a 500
    for every coalesced caller), and then the whole look-up it was in (every id in it
    degraded or 503 while that row stayed). Now it is that id's own failure. An answer
    that is not rows by id at all is the store failing (``StoreUnavailable``); rows for
    ids nobody asked for are dropped.
    """
    if not isinstance(rows, dict):
        raise StoreUnavailable(f"the store answered {type(rows).__name__}, not rows by id")
    wanted = set(asked)
    found: dict[str, StoredRow] = {}
    for entity, row in rows.items():
        if entity not in wanted:
            continue
        found[entity] = row if isinstance(row, CorruptRow) else _checked(row)
    return found


def _checked(row: object) -> StoredRow:
    """The row, or what is wrong with it, for the logs (never its values: they may be
    anyone's). A row with none of the model's features, or none the model could use
    (SQLite's NULL columns, ``Infinity``, unknown categories), would be scored exactly as
    the defaults yet look like a real, cacheable answer."""
    if not isinstance(row, dict):
        return CorruptRow(f"not a flat object but {type(row).__name__}")
    for name, value in row.items():
        if not isinstance(value, _SCALAR):
            return CorruptRow(f"not a flat object: {type(value).__name__} in {str(name)[:40]!r}")
    if not any(is_usable(name, row.get(name)) for name in ENTITY_FEATURES):
        return CorruptRow("none of the model's entity features (or none it could use)")
    return row


class FeatureStore(Protocol):
    """Bulk look-up of stored per-entity features."""

    async def get_many(self, entity_ids: Sequence[str]) -> Mapping[str, StoredRow]:
        """Rows for the ids that exist; unknown ids are simply absent. A row the store
        cannot decode (bad JSON) is a :class:`CorruptRow`; other shapes are checked by
        :func:`checked_rows`.

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

    ``ok``: ``rows`` holds every id that exists with a usable row; an id whose row is
    corrupt is in ``invalid`` or ``fallback`` instead. When the store failed: ``degraded``
    (score on default features and say so) or ``unavailable`` (fail the items), as
    ``store.on_error`` says, with the ``reason``.
    """

    status: LookupStatus
    rows: dict[str, FeatureRow] = field(default_factory=dict)
    reason: str | None = None
    # When degraded: ids the FeatureFetcher knows the store does not hold (404, not a score).
    unknown: frozenset[str] = frozenset()
    # When ok: ids whose stored row is corrupt. ``invalid`` fail alone (store.on_error:
    # fail); ``fallback`` are scored on defaults and marked degraded (degrade).
    invalid: frozenset[str] = frozenset()
    fallback: frozenset[str] = frozenset()
