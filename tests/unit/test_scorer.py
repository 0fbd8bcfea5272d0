"""The Model's batch logic without Ray: dedupe, per-item errors, one predict per batch."""

from pathlib import Path

import pytest

from serve_app.config import AppConfig
from serve_app.scoring.artifact import load_artifact
from serve_app.scoring.items import entity_ids, item_key, unique_items
from serve_app.scoring.scorer import Scorer, flatten, split_by_call
from serve_app.stores import FeatureLookup

ROW = {"age": 40.0, "tenure_months": 12.0, "region": "north", "segment": "gold"}


@pytest.fixture(scope="module")
def scorer(small_config: AppConfig) -> tuple[Scorer, list[int]]:
    sizes: list[int] = []
    model = load_artifact(Path(small_config.artifacts.model_dir))
    return Scorer(model, on_predict=lambda rows, _seconds: sizes.append(rows)), sizes


def item(entity: str, hour: int | None = None) -> dict:
    return {"entity_id": entity, "context": {"amount": None, "hour": hour, "channel": None}}


def test_one_predict_for_all_scorable_items_and_errors_per_item(scorer) -> None:
    model, sizes = scorer
    sizes.clear()
    items = [item("E1"), item("E1", hour=3), item("NOPE"), item("E2")]
    lookup = FeatureLookup(status="ok", rows={"E1": ROW, "E2": ROW})
    results = model.score(items, lookup)
    assert sizes == [3]  # one predict_proba call for the three known items
    assert results[item_key(item("NOPE"))]["error"]["code"] == "unknown_entity"
    for known in (items[0], items[1], items[3]):
        result = results[item_key(known)]
        assert 0.0 <= result["score"] <= 1.0 and result["degraded"] is False
    # the context is a feature: the same entity at another hour scores differently
    assert results[item_key(items[0])]["score"] != results[item_key(items[1])]["score"]


def test_degraded_lookup_scores_every_item_on_defaults(scorer) -> None:
    model, _ = scorer
    results = model.score([item("E1"), item("NOPE")], FeatureLookup(status="degraded"))
    assert all(result["degraded"] is True for result in results.values())
    assert results[item_key(item("E1"))]["score"] == results[item_key(item("NOPE"))]["score"]


def test_unavailable_lookup_fails_each_item_with_the_reason(scorer) -> None:
    model, sizes = scorer
    sizes.clear()
    lookup = FeatureLookup(status="unavailable", reason="store down")
    results = model.score([item("E1"), item("E2")], lookup)
    assert sizes == []  # nothing to predict
    assert {r["error"]["code"] for r in results.values()} == {"store_unavailable"}
    assert {r["error"]["message"] for r in results.values()} == {"store down"}


def test_a_corrupt_row_fails_its_own_item_and_its_batch_mates_are_scored(scorer) -> None:
    """store.on_error: fail. One entity's corrupt row used to fail every id of the
    look-up it was in (503 for each, while the row stayed)."""
    model, sizes = scorer
    sizes.clear()
    lookup = FeatureLookup(status="ok", rows={"E1": ROW}, invalid=frozenset({"BAD"}))
    results = model.score([item("E1"), item("BAD"), item("NOPE")], lookup)
    assert sizes == [1]
    assert results[item_key(item("BAD"))]["error"]["code"] == "feature_row_invalid"
    assert "'BAD'" in results[item_key(item("BAD"))]["error"]["message"]
    assert results[item_key(item("NOPE"))]["error"]["code"] == "unknown_entity"
    assert results[item_key(item("E1"))]["degraded"] is False


def test_a_corrupt_row_falls_back_to_defaults_alone(scorer) -> None:
    """store.on_error: degrade. Only the corrupt entity is scored on defaults."""
    model, sizes = scorer
    sizes.clear()
    lookup = FeatureLookup(status="ok", rows={"E1": ROW}, fallback=frozenset({"BAD"}))
    results = model.score([item("E1"), item("BAD")], lookup)
    on_defaults = model.score([item("X")], FeatureLookup(status="degraded"))
    assert sizes == [2, 1]
    assert results[item_key(item("BAD"))] == {
        "score": on_defaults[item_key(item("X"))]["score"],
        "degraded": True,
    }
    assert results[item_key(item("E1"))]["degraded"] is False


def test_calls_are_deduped_and_answered_each_in_its_own_order() -> None:
    calls = [[item("E1"), item("E2")], [item("E2"), item("E3"), item("E1")]]
    unique = unique_items(flatten(calls))
    assert [u["entity_id"] for u in unique] == ["E1", "E2", "E3"]
    assert entity_ids(unique) == ["E1", "E2", "E3"]
    by_key = {item_key(u): {"score": float(i), "degraded": False} for i, u in enumerate(unique)}
    answers = split_by_call(calls, by_key, "v1")
    assert [[r["score"] for r in a["results"]] for a in answers] == [[0.0, 1.0], [1.0, 2.0, 0.0]]
    assert {a["model_version"] for a in answers} == {"v1"}
