"""The pipeline's column step done in numpy, for the common pipeline shape, when it is exact.

Why: ``Pipeline.predict_proba`` on a pandas frame costs about 12 ms per call on this
machine whatever the batch size (1 or 64 rows), and the trees themselves only about 4 ms
of it. The rest is per-call overhead of ``ColumnTransformer`` (joblib dispatch, pandas
string columns, input validation), paid on every Model batch. For a pipeline of the
shape the example model has,

    Pipeline([ColumnTransformer([OrdinalEncoder(explicit categories), "passthrough"]),
              final estimator])

the encoding is a dictionary look-up per categorical value and a copy of the numeric
columns, so this module builds the estimator's input matrix directly from the rows and
calls the final estimator on it.

It is used only when it is exact: :func:`direct_encoder` recognises the shape strictly
(anything else, or any setting it does not model, returns ``None``) and then checks, on a
probe batch with missing rows, missing values and unknown categories, that the final
estimator's output on the direct matrix equals the whole pipeline's output on the frame,
bit for bit. Otherwise the Scorer keeps calling the pipeline. No library offers this: a
compiled-model runtime (ONNX, treelite) would change the numbers, which this must not.

Where the final estimator is a HistGradientBoostingClassifier, whose own predict_proba
re-encodes its categorical columns on every call (:mod:`serve_app.scoring.boosted_trees`),
the matrix is written in that internal encoding and handed to the trees directly: path
``direct-trees``. It goes through the same probe check, and plain ``direct`` is the
fall-back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, OrdinalEncoder

from serve_app.scoring.boosted_trees import BoostedTrees, internal_layout
from serve_app.scoring.features import (
    CATEGORICAL_FEATURES,
    CATEGORIES,
    ENTITY_FEATURES,
    NUMERIC_FEATURES,
    build_frame,
    number,
)


@dataclass(frozen=True)
class _Column:
    """One input column of the estimator: where its value comes from and how it is encoded."""

    name: str
    from_entity: bool
    codes: Mapping[str, float] | None  # categorical: value -> code; None: numeric


class DirectEncoder:
    """Rows -> the final estimator's input matrix, as the pipeline's column step makes it
    (or as the estimator's own preprocessor would, for ``direct-trees``), then scores."""

    def __init__(
        self,
        columns: Sequence[_Column],
        predict: Callable[[np.ndarray], np.ndarray],
        path: str = "direct",
    ) -> None:
        self._columns = tuple(columns)
        self._predict = predict
        self.path = path

    def matrix(
        self,
        entity_rows: Sequence[Mapping[str, Any] | None],
        request_rows: Sequence[Mapping[str, Any]],
    ) -> np.ndarray:
        empty: Mapping[str, Any] = {}
        entities = [empty if row is None else row for row in entity_rows]
        out = np.empty((len(entities), len(self._columns)), dtype=np.float64)
        for j, column in enumerate(self._columns):
            rows = entities if column.from_entity else request_rows
            if column.codes is None:
                out[:, j] = [number(row.get(column.name)) for row in rows]
            else:
                codes = column.codes
                out[:, j] = [codes.get(row.get(column.name), math.nan) for row in rows]
        return out

    def predict_proba(
        self,
        entity_rows: Sequence[Mapping[str, Any] | None],
        request_rows: Sequence[Mapping[str, Any]],
    ) -> np.ndarray:
        return np.asarray(self._predict(self.matrix(entity_rows, request_rows)))


def direct_encoder(pipeline: Any) -> DirectEncoder | None:
    """The fastest :class:`DirectEncoder` for ``pipeline`` whose scores on the probe batch
    equal the whole pipeline's; ``None`` if the shape is not supported or none is exact."""
    columns = _columns_of(pipeline)
    if columns is None:
        return None
    estimator = pipeline.steps[-1][1]
    candidates = [DirectEncoder(columns, estimator.predict_proba)]
    into_trees = _into_trees(columns, estimator)
    if into_trees is not None:
        candidates.insert(0, into_trees)
    entity_rows, request_rows = _probe_rows()
    try:
        reference = np.asarray(pipeline.predict_proba(build_frame(entity_rows, request_rows)))
    except Exception:  # the pipeline itself fails on the probe: leave it to the pipeline
        return None
    for encoder in candidates:
        try:
            direct = encoder.predict_proba(entity_rows, request_rows)
        except Exception:  # any surprise means: not the shape we think it is
            continue
        if np.array_equal(direct, reference, equal_nan=True):
            return encoder
    return None


def _into_trees(columns: Sequence[_Column], estimator: Any) -> DirectEncoder | None:
    """Columns rearranged and re-coded as the estimator's internal preprocessor would,
    scored by its trees directly; ``None`` where that layout is not known."""
    layout = internal_layout(estimator)
    if layout is None:
        return None
    internal: list[_Column] = []
    for position, source in enumerate(layout.order):
        column = columns[source]
        if position in layout.recode:
            if column.codes is None:  # a numeric input the trees treat as categorical
                return None
            recode = layout.recode[position]
            codes = {v: recode[c] for v, c in column.codes.items() if c in recode}
            column = _Column(column.name, column.from_entity, codes)
        internal.append(column)
    try:
        trees = BoostedTrees(estimator)
    except AttributeError:  # private attributes of another scikit-learn version
        return None
    return DirectEncoder(internal, trees.predict_proba, "direct-trees")


def _columns_of(pipeline: Any) -> list[_Column] | None:
    """The estimator's input columns, or ``None`` if any part is outside the shape."""
    if not isinstance(pipeline, Pipeline) or len(pipeline.steps) != 2:
        return None
    if hasattr(pipeline.steps[-1][1], "feature_names_in_"):  # fitted on a frame: keep it
        return None
    transformer = pipeline.steps[0][1]
    if not isinstance(transformer, ColumnTransformer) or transformer.sparse_output_:
        return None
    columns: list[_Column] = []
    for _name, step, names in transformer.transformers_:
        if isinstance(step, str) and step == "drop":
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return None
        if _passthrough(step) and set(names) <= set(NUMERIC_FEATURES):
            columns += [_Column(n, n in ENTITY_FEATURES, None) for n in names]
        elif _plain_ordinal(step, names):
            # build_frame turns a value outside CATEGORIES into NaN before the encoder
            # sees it, so such a value has no code here either.
            columns += [
                _Column(n, n in ENTITY_FEATURES, _codes(cats, CATEGORIES[n]))
                for n, cats in zip(names, step.categories_, strict=True)
            ]
        else:
            return None
    return columns


def _passthrough(step: Any) -> bool:
    """``"passthrough"``, which a fitted ColumnTransformer holds as an identity function."""
    return (isinstance(step, str) and step == "passthrough") or (
        type(step) is FunctionTransformer and step.func is None and step.inverse_func is None
    )


def _codes(categories: Sequence[str], allowed: Sequence[str]) -> dict[str, float]:
    return {value: float(i) for i, value in enumerate(categories) if value in allowed}


def _plain_ordinal(step: Any, names: list[str]) -> bool:
    """An OrdinalEncoder whose unknown and missing values both become NaN, over known
    string categories only."""
    return (
        type(step) is OrdinalEncoder
        and step.handle_unknown == "use_encoded_value"
        and _is_nan(step.unknown_value)
        and _is_nan(step.encoded_missing_value)
        and step.dtype in (np.float64, float)
        and getattr(step, "_infrequent_enabled", False) is False
        and set(names) <= set(CATEGORICAL_FEATURES)
        and len(step.categories_) == len(names)
        and all(all(isinstance(v, str) for v in cats) for cats in step.categories_)
    )


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _probe_rows() -> tuple[list[dict[str, Any] | None], list[dict[str, Any]]]:
    """A deterministic batch covering every category, missing rows, missing and odd values."""
    rng = np.random.default_rng(20261201)
    entity_rows: list[dict[str, Any] | None] = []
    request_rows: list[dict[str, Any]] = []
    for i in range(64):
        row: dict[str, Any] = {
            name: float(rng.normal(50, 30)) if i % 7 else None
            for name in ENTITY_FEATURES
            if name not in CATEGORIES
        }
        for name, values in CATEGORIES.items():
            if name in ENTITY_FEATURES:
                row[name] = values[i % len(values)] if i % 5 else "unknown-value"
        entity_rows.append(None if i % 11 == 0 else row)
        request_rows.append(
            {}
            if i % 9 == 0
            else {
                "amount": float(rng.uniform(0, 500)),
                "hour": int(i % 24),
                "channel": CATEGORIES["channel"][i % 3] if i % 4 else None,
            }
        )
    return entity_rows, request_rows
