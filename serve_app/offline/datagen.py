"""A deterministic generator of the example entity table and of labelled training events.

Everything is drawn from ``numpy.random.default_rng(seed)``, so the same seed gives the
same entities, the same labels and therefore the same trained model on every machine,
with no download. Labels depend on entity and request-time features through a known
non-linear score, so the trained model has real signal to find.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from serve_app.scoring.features import CATEGORIES, ENTITY_FEATURES, REQUEST_FEATURES


def entity_id(index: int) -> str:
    """The id of the ``index``-th generated entity, e.g. ``E0000042``."""
    return f"E{index:07d}"


def _with_missing(rng: np.random.Generator, values: np.ndarray, rate: float) -> np.ndarray:
    values = values.astype(object) if values.dtype.kind in "OU" else values.astype(np.float64)
    mask = rng.random(len(values)) < rate
    values[mask] = None if values.dtype == object else np.nan
    return values


def generate_entities(n: int, seed: int) -> pd.DataFrame:
    """The entity feature table: ``n`` rows indexed by ``entity_id``."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": _with_missing(rng, rng.integers(18, 90, n), 0.05),
            "tenure_months": rng.integers(0, 240, n).astype(np.float64),
            "income": _with_missing(rng, rng.lognormal(10.5, 0.6, n).round(2), 0.10),
            "purchases_30d": rng.poisson(3.0, n).astype(np.float64),
            "avg_basket": rng.gamma(2.0, 30.0, n).round(2),
            "days_since_last": _with_missing(rng, rng.exponential(20.0, n).round(1), 0.08),
            "credit_score": _with_missing(rng, rng.normal(650, 80, n).clip(300, 850), 0.12),
            "returns_ratio": rng.beta(1.5, 8.0, n).round(4),
            "support_tickets": rng.poisson(0.7, n).astype(np.float64),
            "region": _with_missing(rng, rng.choice(CATEGORIES["region"], n), 0.05),
            "segment": rng.choice(CATEGORIES["segment"], n, p=[0.5, 0.3, 0.15, 0.05]),
            "device": rng.choice(CATEGORIES["device"], n, p=[0.4, 0.4, 0.2]),
        },
        columns=list(ENTITY_FEATURES),
    )
    frame.index = pd.Index([entity_id(i) for i in range(n)], name="entity_id")
    return frame


def generate_requests(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Request-time fields as callers send them (some absent)."""
    return pd.DataFrame(
        {
            "amount": _with_missing(rng, rng.lognormal(3.5, 1.0, n).round(2), 0.05),
            "hour": rng.integers(0, 24, n).astype(np.float64),
            "channel": _with_missing(rng, rng.choice(CATEGORIES["channel"], n), 0.05),
        },
        columns=list(REQUEST_FEATURES),
    )


def _true_logit(events: pd.DataFrame) -> np.ndarray:
    """The hidden scoring rule the labels are drawn from (non-linear, with interactions)."""
    segment_effect = (
        events["segment"]
        .map({"bronze": 0.4, "silver": 0.0, "gold": -0.5, "platinum": -1.0})
        .astype(float)
    )
    channel_effect = events["channel"].map({"web": 0.3, "app": -0.2, "store": -0.6})
    night = ((events["hour"] < 6) | (events["hour"] > 22)).astype(float)
    logit = (
        -1.2
        + 0.9 * np.log1p(events["amount"].fillna(30.0)) / 4.0
        + 1.4 * events["returns_ratio"]
        + 0.35 * events["support_tickets"]
        - 0.012 * events["tenure_months"]
        + 0.015 * events["days_since_last"].fillna(60.0)
        - 0.004 * (events["credit_score"].fillna(560.0) - 650.0)
        + segment_effect
        + channel_effect.astype(float).fillna(0.0)
        + 0.8 * night * (events["device"] == "web").astype(float)
        - 0.15 * events["purchases_30d"].clip(upper=8)
    )
    return logit.to_numpy(dtype=np.float64)


def generate_training_events(
    entities: pd.DataFrame, n_events: int, seed: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """Labelled events: an entity's stored features plus request-time fields, and a label."""
    rng = np.random.default_rng(seed + 1)
    rows = rng.integers(0, len(entities), n_events)
    events = entities.iloc[rows].reset_index(drop=True)
    requests = generate_requests(n_events, rng)
    events = pd.concat([events, requests], axis=1)
    probability = 1.0 / (1.0 + np.exp(-_true_logit(events)))
    labels = (rng.random(n_events) < probability).astype(np.int64)
    return events, labels
