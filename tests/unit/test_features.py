import math

import pandas as pd

from serve_app.offline.datagen import generate_entities, generate_training_events
from serve_app.scoring.features import (
    CATEGORICAL_FEATURES,
    ENTITY_FEATURES,
    MODEL_COLUMNS,
    NUMERIC_FEATURES,
    build_frame,
)


def test_generator_is_deterministic_and_has_missing_values() -> None:
    first = generate_entities(1_000, seed=3)
    second = generate_entities(1_000, seed=3)
    pd.testing.assert_frame_equal(first, second)
    assert list(first.columns) == list(ENTITY_FEATURES)
    assert first.index[0] == "E0000000" and first.index.is_unique
    assert first["income"].isna().any() and first["region"].isna().any()
    assert not generate_entities(1_000, seed=4).equals(first)


def test_labels_depend_on_features() -> None:
    entities = generate_entities(5_000, seed=1)
    events, labels = generate_training_events(entities, 20_000, seed=1)
    assert 0.05 < labels.mean() < 0.6
    # returns_ratio enters the hidden rule with a positive weight
    high = labels[events["returns_ratio"] > events["returns_ratio"].quantile(0.8)].mean()
    low = labels[events["returns_ratio"] < events["returns_ratio"].quantile(0.2)].mean()
    assert high > low


def test_build_frame_types_order_and_missing() -> None:
    rows = [
        {"age": 30, "region": "north", "segment": "gold", "device": "ios", "income": None},
        None,  # degraded: no stored features
    ]
    contexts = [{"amount": 12.5, "channel": "web", "hour": 3}, {}]
    frame = build_frame(rows, contexts)
    assert list(frame.columns) == list(MODEL_COLUMNS)
    assert all(frame[name].dtype == "float64" for name in NUMERIC_FEATURES)
    assert frame.loc[0, "age"] == 30 and frame.loc[0, "amount"] == 12.5
    assert math.isnan(frame.loc[0, "income"])
    assert frame.loc[1, CATEGORICAL_FEATURES].isna().all()
    assert frame.loc[1, list(NUMERIC_FEATURES)].isna().all()


def test_build_frame_turns_unknown_categories_into_missing() -> None:
    frame = build_frame([{"region": "mars", "segment": "gold"}], [{"channel": "fax"}])
    assert pd.isna(frame.loc[0, "region"]) and pd.isna(frame.loc[0, "channel"])
    assert frame.loc[0, "segment"] == "gold"


def test_a_stored_integer_too_large_for_a_float_is_missing_not_a_failed_batch() -> None:
    """float(10**400) raises OverflowError, which failed the whole Model batch (a 500 for
    every coalesced caller); JSON from Redis or a feature API can carry such a number."""
    huge = 10**400
    frame = build_frame([{"income": huge, "age": 30}, {"age": 40}], [{}, {}])
    assert math.isnan(frame.loc[0, "income"]) and frame.loc[0, "age"] == 30
    assert frame.loc[1, "age"] == 40


def test_a_stored_non_finite_number_is_missing_not_an_extreme() -> None:
    """JSON from Redis or a feature API may carry Infinity or NaN (Python's json reads
    both); the loader refuses them, but a row written by other hands was scored with
    ``income = inf`` as if it were a real, extreme value."""
    rows = [{"income": float("inf"), "age": "-Infinity"}, {"income": float("nan"), "age": 40}]
    frame = build_frame(rows, [{}, {}])
    assert frame[["income", "age"]].iloc[0].isna().all()
    assert math.isnan(frame.loc[1, "income"]) and frame.loc[1, "age"] == 40
