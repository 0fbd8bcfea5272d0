"""The numpy column step: used only where it scores exactly as the whole pipeline does."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from serve_app.config import AppConfig
from serve_app.offline.training import category_encoder
from serve_app.scoring.artifact import load_artifact
from serve_app.scoring.boosted_trees import BoostedTrees, internal_layout
from serve_app.scoring.direct_encoding import direct_encoder
from serve_app.scoring.features import (
    CATEGORICAL_FEATURES,
    NUMERIC_FEATURES,
    build_frame,
)
from serve_app.scoring.scorer import Scorer


@pytest.fixture(scope="module")
def pipeline(small_config: AppConfig) -> Pipeline:
    return load_artifact(Path(small_config.artifacts.model_dir)).pipeline


@pytest.fixture(scope="module")
def stored_rows(small_config: AppConfig) -> list[dict[str, Any] | None]:
    from serve_app.stores import open_store

    ids = [f"E{i:07d}" for i in range(200)]
    found = asyncio.run(open_store(small_config.store.url).get_many(ids))
    return [found.get(i) for i in ids]


def _contexts(n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    channels = ["web", "app", "store", None, "fax"]  # "fax": unknown, becomes missing
    return [
        {
            "amount": None if i % 6 == 0 else float(rng.uniform(0, 900)),
            "hour": None if i % 8 == 0 else int(rng.integers(0, 24)),
            "channel": channels[i % len(channels)],
        }
        for i in range(n)
    ]


def test_the_example_model_is_scored_directly_and_exactly(
    pipeline: Pipeline, stored_rows: list[dict[str, Any] | None]
) -> None:
    encoder = direct_encoder(pipeline)
    assert encoder is not None
    assert encoder.path == "direct-trees"  # encoded as the trees' own preprocessor would
    rows = list(stored_rows)
    rows[3] = None  # degraded: no stored features
    rows[5] = {**(rows[5] or {}), "region": "atlantis", "age": "not a number"}  # messy data
    contexts = _contexts(len(rows))
    expected = pipeline.predict_proba(build_frame(rows, contexts))
    assert np.array_equal(encoder.predict_proba(rows, contexts), expected)


def test_scorer_gives_the_pipeline_scores_on_either_path(
    pipeline: Pipeline, stored_rows: list[dict[str, Any] | None], small_config: AppConfig
) -> None:
    model = load_artifact(Path(small_config.artifacts.model_dir))
    scorer = Scorer(model)
    assert scorer.path == "direct-trees"
    contexts = _contexts(len(stored_rows))
    reference = [
        round(float(p), 6) for p in pipeline.predict_proba(build_frame(stored_rows, contexts))[:, 1]
    ]
    assert scorer.predict(stored_rows, contexts) == reference
    assert scorer.predict(stored_rows[:1], contexts[:1]) == reference[:1]


def test_another_pipeline_shape_keeps_the_pipeline(pipeline: Pipeline) -> None:
    reshaped = copy.deepcopy(pipeline)
    column_step = reshaped.steps[0][1]
    name, _, columns = column_step.transformers_[1]
    scaler = StandardScaler().fit(np.zeros((2, len(columns))))
    column_step.transformers_[1] = (name, scaler, columns)
    assert direct_encoder(reshaped) is None
    assert direct_encoder(Pipeline([("model", pipeline.steps[-1][1])])) is None


def test_an_encoder_setting_it_does_not_model_keeps_the_pipeline(pipeline: Pipeline) -> None:
    changed = copy.deepcopy(pipeline)
    encoder = changed.steps[0][1].transformers_[0][1]
    encoder.unknown_value = -1.0  # unknown categories would get -1, not NaN
    assert direct_encoder(changed) is None


def test_a_model_whose_scores_differ_on_the_probe_keeps_the_pipeline(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exactness check is real: a direct path that disagrees is not used."""
    from serve_app.scoring import direct_encoding

    real = direct_encoding.DirectEncoder.matrix

    def off_by_one_code(self, entity_rows, request_rows):  # type: ignore[no-untyped-def]
        matrix = real(self, entity_rows, request_rows)
        matrix[:, 0] += 1.0
        return matrix

    monkeypatch.setattr(direct_encoding.DirectEncoder, "matrix", off_by_one_code)
    assert direct_encoder(pipeline) is None


def test_trees_that_disagree_on_the_probe_fall_back_to_the_estimator(
    pipeline: Pipeline, stored_rows: list[dict[str, Any] | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trees path goes through the same exactness check; plain ``direct`` remains."""
    real = BoostedTrees.predict_proba

    def nudged(self, x):  # type: ignore[no-untyped-def]
        return real(self, x) + 1e-12

    monkeypatch.setattr(BoostedTrees, "predict_proba", nudged)
    encoder = direct_encoder(pipeline)
    assert encoder is not None and encoder.path == "direct"
    contexts = _contexts(len(stored_rows))
    expected = pipeline.predict_proba(build_frame(stored_rows, contexts))
    assert np.array_equal(encoder.predict_proba(stored_rows, contexts), expected)


def test_categorical_columns_last_are_rearranged_for_the_trees(
    stored_rows: list[dict[str, Any] | None],
) -> None:
    """The trees' preprocessor puts categorical columns first; a pipeline that has them
    last is rearranged, and its codes re-coded (here "store" never occurs in training, so
    its internal code differs from the outer one), then scored exactly."""
    numeric, categorical = list(NUMERIC_FEATURES), list(CATEGORICAL_FEATURES)
    columns = ColumnTransformer(
        [("numeric", "passthrough", numeric), ("categorical", category_encoder(), categorical)],
        verbose_feature_names_out=False,
    )
    trees = HistGradientBoostingClassifier(
        max_iter=5,
        categorical_features=list(range(len(numeric), len(numeric) + len(categorical))),
        random_state=0,
    )
    reversed_pipeline = Pipeline([("columns", columns), ("model", trees)])
    contexts = _contexts(len(stored_rows))
    train = [{**c, "channel": None if c["channel"] == "store" else c["channel"]} for c in contexts]
    labels = np.arange(len(stored_rows)) % 3 == 0
    reversed_pipeline.fit(build_frame(stored_rows, train), labels)

    fitted = direct_encoder(reversed_pipeline)
    assert fitted is not None and fitted.path == "direct-trees"
    expected = reversed_pipeline.predict_proba(build_frame(stored_rows, contexts))
    assert np.array_equal(fitted.predict_proba(stored_rows, contexts), expected)


def test_only_the_preprocessor_sklearn_fits_is_bypassed(pipeline: Pipeline) -> None:
    trees = pipeline.steps[-1][1]
    assert internal_layout(trees) is not None
    assert internal_layout(StandardScaler()) is None
    changed = copy.deepcopy(trees)
    changed._preprocessor.named_transformers_["encoder"].unknown_value = -1.0
    assert internal_layout(changed) is None
    no_categories = copy.deepcopy(trees)
    no_categories._preprocessor = None  # fitted without categorical features
    assert internal_layout(no_categories) is None
