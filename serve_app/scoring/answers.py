"""The Ingress side of scoring, with no Ray: cached answers, batches, one hop for misses.

The Ingress deployment passes in how to reach the Model (``call_model`` for a list,
``submit`` for one item through the coalescer); everything else is here and is tested
without a cluster:

* :class:`Answers` builds the answer for a scored item and keeps it in the prediction
  cache (the single and the batch path share it);
* :func:`score_one` answers one item: a cache hit, or one coalesced call;
* :func:`score_batch` answers a batch: dedupe, serve cache hits, send the unique misses in
  ONE call, and put every item's result back at its index.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from serve_app.cache import PredictionCache
from serve_app.errors import InvalidInput, error_for_item
from serve_app.scoring.items import (
    Item,
    ItemKey,
    ItemResult,
    ModelAnswer,
    is_error,
    item_key,
)

Answer = dict[str, Any]
ModelCall = Callable[[list[Item]], Awaitable[ModelAnswer]]
Submit = Callable[[Item], Awaitable[tuple[str, ItemResult]]]


class Answers:
    """Builds answers and caches the clean ones, keyed by model version, caller and item.

    ``per_key`` (the default): each caller (API key id) has its own entries, so a hit
    and its ``cached: true`` tell a caller only what it asked itself. Shared, key B
    learned that key A had scored an entity in the last ``ttl_s`` (an attacker review's
    finding); sharing trades that for hits across callers. (Timing is not covered: the
    FeatureFetcher's row cache is by entity id, for everyone.)
    """

    def __init__(self, cache: PredictionCache, per_key: bool = True) -> None:
        self.cache = cache
        self.per_key = per_key
        self.version: str | None = None  # the newest model version seen

    def cache_key(self, key: ItemKey, owner: str, version: str | None) -> tuple[Any, ...]:
        """The cache's key of an item (:func:`item_key`) asked by ``owner``."""
        return (version, owner if self.per_key else "", *key)

    def cached(self, key: ItemKey, owner: str) -> Answer | None:
        """The cached answer for an item's key asked by ``owner``, or None."""
        hit = self.cache.get(self.cache_key(key, owner, self.version))
        return None if hit is None else {**hit, "cached": True}

    def record(
        self, item: Item, key: ItemKey, owner: str, version: str, result: ItemResult
    ) -> Answer:
        """The answer for a fresh result (cached unless degraded); errors pass through."""
        self.version = version
        if is_error(result):
            return result
        answer = {"entity_id": item["entity_id"], "model_version": version, "cached": False}
        answer.update(result)
        self.cache.put(self.cache_key(key, owner, version), answer)
        return answer


async def score_one(item: Item, owner: str, answers: Answers, submit: Submit) -> Answer:
    """One item's answer for ``owner``, or the exception its error maps to (404, 503, ...)."""
    key = item_key(item)
    hit = answers.cached(key, owner)
    if hit is not None:
        return hit
    version, result = await submit(item)
    answer = answers.record(item, key, owner, version, result)
    if is_error(answer):
        raise error_for_item(answer["error"])
    return answer


async def score_batch(
    entries: Sequence[Item | InvalidInput], owner: str, answers: Answers, call_model: ModelCall
) -> dict[str, Any]:
    """The ``/v1/predict/batch`` body for ``owner``: a result per entry, in order, and a
    summary.

    Each entry's key is computed once (it is the dedupe, cache and result key: computed
    per use it was a fifth of this function's time for 32 items).
    """
    keys: list[ItemKey | None] = []
    unique: dict[ItemKey, Item] = {}
    for entry in entries:
        key = None if isinstance(entry, InvalidInput) else item_key(entry)
        keys.append(key)
        if key is not None and key not in unique:
            unique[key] = entry  # an Item: only invalid entries have no key
    by_key: dict[ItemKey, Answer] = {}
    misses: list[tuple[ItemKey, Item]] = []
    for key, item in unique.items():
        hit = answers.cached(key, owner)
        if hit is None:
            misses.append((key, item))
        else:
            by_key[key] = hit
    if misses:
        answer = await call_model([item for _, item in misses])
        version = answer["model_version"]
        for (key, item), result in zip(misses, answer["results"], strict=True):
            by_key[key] = answers.record(item, key, owner, version, result)
    results = [
        batch_result(index, entry, by_key, key)
        for index, (entry, key) in enumerate(zip(entries, keys, strict=True))
    ]
    failed = sum(1 for result in results if not result["ok"])
    return {
        "model_version": answers.version,
        "results": results,
        "summary": {
            "items": len(results),
            "unique": len(unique),
            "succeeded": len(results) - failed,
            "failed": failed,
            "cached": sum(1 for result in results if result.get("cached")),
        },
    }


def batch_result(
    index: int,
    entry: Item | InvalidInput,
    by_key: dict[ItemKey, Answer],
    key: ItemKey | None,
) -> dict[str, Any]:
    """One entry of a batch response: a score, or this item's own error (``key`` is the
    entry's :func:`item_key`, None for an invalid entry)."""
    if isinstance(entry, InvalidInput):
        return {"index": index, "ok": False, "error": entry.to_dict()}
    answer = by_key[key]  # type: ignore[index]  # an Item always has its key
    if is_error(answer):
        return {"index": index, "ok": False, "entity_id": entry["entity_id"], **answer}
    return {
        "index": index,
        "ok": True,
        "entity_id": entry["entity_id"],
        "score": answer["score"],
        "cached": answer["cached"],
        "degraded": answer["degraded"],
    }


def job_result(item: Item, result: ItemResult) -> dict[str, Any]:
    """What a job stores for one item (the batch shape, without index and cache flag)."""
    return {"ok": not is_error(result), "entity_id": item["entity_id"], **result}
