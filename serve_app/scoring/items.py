"""What crosses the hops: items, their identity, and per-item results.

An item is the plain dict form of a validated ``/v1/predict`` body,
``{"entity_id": str, "context": {"amount", "hour", "channel"}}``. A result is either
``{"score": float, "degraded": bool}`` or ``{"error": {"code", "message"}}``: one per
item, so a bad item never fails its batch-mates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# What an entity id may be, at the API and in the loader alike: an id the API refuses
# could be loaded but never looked up.
ENTITY_ID_PATTERN = r"^[A-Za-z0-9_.:-]+$"
ENTITY_ID_MAX_LENGTH = 64

Item = dict[str, Any]
ItemResult = dict[str, Any]
ItemKey = tuple[Any, ...]
# What the Model answers one call: {"model_version": str, "results": [ItemResult, ...]}.
# Here, not in scorer.py, so that the Ingress and the JobWorker can name it without
# importing the scorer (pandas, scikit-learn: seconds of CPU at every replica start).
ModelAnswer = dict[str, Any]


def item_key(item: Item) -> ItemKey:
    """Identity of the work: equal keys are computed once and cached together."""
    ctx = item.get("context") or {}
    return (item["entity_id"], ctx.get("amount"), ctx.get("hour"), ctx.get("channel"))


def unique_items(items: Iterable[Item]) -> list[Item]:
    """The first item of each key, in order of first appearance."""
    unique: dict[ItemKey, Item] = {}
    for item in items:
        unique.setdefault(item_key(item), item)
    return list(unique.values())


def entity_ids(items: Iterable[Item]) -> list[str]:
    """Distinct entity ids, in order: what one bulk feature look-up asks for."""
    return list(dict.fromkeys(item["entity_id"] for item in items))


def error_result(code: str, message: str) -> ItemResult:
    return {"error": {"code": code, "message": message}}


def is_error(result: ItemResult) -> bool:
    return "error" in result
