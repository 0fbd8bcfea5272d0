"""The feature schema and the vectorised pre-processing from rows to a model frame.

Entity features come from the feature store; request-time features come with the request.
Both are turned into one pandas DataFrame per batch with fixed column order and dtypes,
so ``predict_proba`` is called once per batch on a well-typed frame.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

ENTITY_NUMERIC: tuple[str, ...] = (
    "age",
    "tenure_months",
    "income",
    "purchases_30d",
    "avg_basket",
    "days_since_last",
    "credit_score",
    "returns_ratio",
    "support_tickets",
)
ENTITY_CATEGORICAL: tuple[str, ...] = ("region", "segment", "device")
ENTITY_FEATURES: tuple[str, ...] = ENTITY_NUMERIC + ENTITY_CATEGORICAL

REQUEST_NUMERIC: tuple[str, ...] = ("amount", "hour")
REQUEST_CATEGORICAL: tuple[str, ...] = ("channel",)
REQUEST_FEATURES: tuple[str, ...] = REQUEST_NUMERIC + REQUEST_CATEGORICAL

CATEGORIES: dict[str, tuple[str, ...]] = {
    "region": ("north", "south", "east", "west"),
    "segment": ("bronze", "silver", "gold", "platinum"),
    "device": ("ios", "android", "web"),
    "channel": ("web", "app", "store"),
}

NUMERIC_FEATURES: tuple[str, ...] = ENTITY_NUMERIC + REQUEST_NUMERIC
CATEGORICAL_FEATURES: tuple[str, ...] = ENTITY_CATEGORICAL + REQUEST_CATEGORICAL
MODEL_COLUMNS: tuple[str, ...] = CATEGORICAL_FEATURES + NUMERIC_FEATURES


def feature_types() -> dict[str, str]:
    """Name -> type, recorded in the model artifact's metadata."""
    types = {name: "numeric" for name in NUMERIC_FEATURES}
    types.update({name: "categorical" for name in CATEGORICAL_FEATURES})
    return types


def build_frame(
    entity_rows: Sequence[Mapping[str, Any] | None],
    request_rows: Sequence[Mapping[str, Any]],
) -> pd.DataFrame:
    """Build the model input frame for a batch, column by column.

    ``entity_rows[i]`` is the stored feature row of item ``i`` (``None`` means "no stored
    features", e.g. a degraded fallback: every entity feature becomes missing, which the
    model handles natively). ``request_rows[i]`` holds its request-time fields; absent
    ones are missing too. Unknown category values become missing rather than errors:
    validation of request fields happens at the edge, and stored values are trusted.
    """
    if len(entity_rows) != len(request_rows):
        raise ValueError("entity_rows and request_rows must have the same length")
    empty: Mapping[str, Any] = {}
    entities = [empty if row is None else row for row in entity_rows]
    columns: dict[str, np.ndarray] = {}
    for name in CATEGORICAL_FEATURES:
        rows = entities if name in ENTITY_FEATURES else request_rows
        allowed = _ALLOWED[name]
        columns[name] = np.array(
            [value if (value := row.get(name)) in allowed else np.nan for row in rows], dtype=object
        )
    for name in NUMERIC_FEATURES:
        rows = entities if name in ENTITY_FEATURES else request_rows
        columns[name] = np.array([number(row.get(name)) for row in rows], dtype=np.float64)
    return pd.DataFrame(columns, columns=list(MODEL_COLUMNS), copy=False)


_ALLOWED: dict[str, frozenset[str]] = {
    name: frozenset(values) for name, values in CATEGORIES.items()
}


def is_usable(name: str, value: Any) -> bool:
    """Would ``value`` of feature ``name`` reach the model as a value, not as missing?
    (What :func:`build_frame` keeps: a finite number, or a known category.)"""
    if name in _ALLOWED:
        return value in _ALLOWED[name]
    return not math.isnan(number(value))


def number(value: Any) -> float:
    """A float, or NaN for missing, non-numeric or non-finite values (stored data may be
    messy: JSON from Redis or a feature API may say ``Infinity``, which the model would
    score as a real extreme, and the loader refuses)."""
    if value is None:
        return np.nan
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError):  # an int of 400 digits: no float
        return np.nan
    return result if math.isfinite(result) else np.nan
