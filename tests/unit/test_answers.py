"""The Ingress's scoring logic without Ray: cache, dedupe, one call for misses, errors."""

import asyncio
from typing import Any

import pytest

from serve_app.cache import PredictionCache
from serve_app.errors import FeatureRowInvalid, InvalidInput, StoreUnavailable, UnknownEntity
from serve_app.scoring.answers import Answers, score_batch, score_one
from serve_app.scoring.items import Item, error_result


class FakeModel:
    """Stands for the Model deployment: scores by entity number, knows E1..E9 only."""

    def __init__(self, version: str = "v1") -> None:
        self.version = version
        self.calls: list[list[str]] = []

    def result(self, item: Item) -> dict[str, Any]:
        entity = item["entity_id"]
        if entity == "DOWN":
            return error_result("store_unavailable", "store down")
        if entity == "CORRUPT":
            return error_result("feature_row_invalid", "unusable row for 'CORRUPT'")
        if not (entity.startswith("E") and entity[1:].isdigit()):
            return error_result("unknown_entity", f"no features for {entity!r}")
        return {"score": int(entity[1:]) / 10, "degraded": entity == "E9"}

    async def call(self, items: list[Item]) -> dict[str, Any]:
        self.calls.append([item["entity_id"] for item in items])
        return {"model_version": self.version, "results": [self.result(i) for i in items]}

    async def submit(self, item: Item) -> tuple[str, dict[str, Any]]:
        answer = await self.call([item])
        return answer["model_version"], answer["results"][0]


def item(entity: str, hour: int | None = None) -> Item:
    return {"entity_id": entity, "context": {"amount": None, "hour": hour, "channel": None}}


def answers() -> Answers:
    return Answers(PredictionCache(maxsize=100, ttl_s=60))


def test_score_one_caches_clean_answers_only() -> None:
    model, cache = FakeModel(), answers()
    first = asyncio.run(score_one(item("E3"), "alice", cache, model.submit))
    assert first == {
        "entity_id": "E3",
        "model_version": "v1",
        "cached": False,
        "score": 0.3,
        "degraded": False,
    }
    assert asyncio.run(score_one(item("E3"), "alice", cache, model.submit)) == {
        **first,
        "cached": True,
    }
    asyncio.run(score_one(item("E9"), "alice", cache, model.submit))
    again = asyncio.run(score_one(item("E9"), "alice", cache, model.submit))
    assert again["cached"] is False  # degraded answers are not cached
    assert model.calls == [["E3"], ["E9"], ["E9"]]


def test_score_one_maps_item_errors_to_http_errors() -> None:
    model, cache = FakeModel(), answers()
    with pytest.raises(UnknownEntity):
        asyncio.run(score_one(item("NOPE"), "alice", cache, model.submit))
    with pytest.raises(StoreUnavailable):
        asyncio.run(score_one(item("DOWN"), "alice", cache, model.submit))
    with pytest.raises(FeatureRowInvalid, match="CORRUPT") as corrupt:
        asyncio.run(score_one(item("CORRUPT"), "alice", cache, model.submit))
    assert corrupt.value.status_code == 502 and corrupt.value.code == "feature_row_invalid"


def test_a_new_model_version_does_not_serve_old_cache_entries() -> None:
    model, cache = FakeModel("v1"), answers()
    asyncio.run(score_one(item("E3"), "alice", cache, model.submit))
    model.version = "v2"
    asyncio.run(score_one(item("E4"), "alice", cache, model.submit))  # the service learns of v2
    fresh = asyncio.run(score_one(item("E3"), "alice", cache, model.submit))
    assert fresh["model_version"] == "v2" and fresh["cached"] is False


def test_batch_dedupes_serves_hits_and_sends_misses_in_one_call() -> None:
    model, cache = FakeModel(), answers()
    asyncio.run(score_one(item("E1"), "alice", cache, model.submit))
    entries: list[Item | InvalidInput] = [
        item("E2"),
        InvalidInput("item is not valid", [{"loc": ["entity_id"]}]),
        item("E1"),
        item("E2"),
        item("NOPE"),
        item("E2", hour=5),
    ]
    body = asyncio.run(score_batch(entries, "alice", cache, model.call))
    assert model.calls[1:] == [["E2", "NOPE", "E2"]]  # one call, unique misses only
    results = body["results"]
    assert [r["index"] for r in results] == list(range(6))
    assert [r["ok"] for r in results] == [True, False, True, True, False, True]
    assert results[1]["error"]["code"] == "invalid_input" and "entity_id" not in results[1]
    assert results[2]["cached"] is True and results[0]["cached"] is False
    assert results[0] == {**results[3], "index": 0}
    assert results[4] == {
        "index": 4,
        "ok": False,
        "entity_id": "NOPE",
        "error": {"code": "unknown_entity", "message": "no features for 'NOPE'"},
    }
    assert body["summary"] == {"items": 6, "unique": 4, "succeeded": 4, "failed": 2, "cached": 1}
    assert body["model_version"] == "v1"


def test_batch_of_only_hits_makes_no_call() -> None:
    model, cache = FakeModel(), answers()
    asyncio.run(score_batch([item("E1"), item("E2")], "alice", cache, model.call))
    asyncio.run(score_batch([item("E2"), item("E1")], "alice", cache, model.call))
    assert model.calls == [["E1", "E2"]]


def test_one_key_never_sees_another_keys_answers_as_cached() -> None:
    """Attacker review: with one cache for all keys, ``cached: true`` (and a fast answer)
    told key B that key A had scored E3 with that context in the last ttl_s."""
    model, cache = FakeModel(), answers()
    asyncio.run(score_one(item("E3"), "id:alice", cache, model.submit))
    for_bob = asyncio.run(score_one(item("E3"), "id:bob", cache, model.submit))
    assert for_bob["cached"] is False and len(model.calls) == 2  # computed for bob
    batch = asyncio.run(score_batch([item("E3"), item("E4")], "id:carol", cache, model.call))
    assert batch["summary"]["cached"] == 0
    assert asyncio.run(score_one(item("E3"), "id:alice", cache, model.submit))["cached"] is True


def test_a_shared_scope_shares_hits_across_keys() -> None:
    model, cache = FakeModel(), Answers(PredictionCache(maxsize=100, ttl_s=60), per_key=False)
    asyncio.run(score_one(item("E3"), "id:alice", cache, model.submit))
    assert asyncio.run(score_one(item("E3"), "id:bob", cache, model.submit))["cached"] is True
    assert len(model.calls) == 1
