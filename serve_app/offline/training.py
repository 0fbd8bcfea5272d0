"""Train the example model and write it as an artifact (offline: never run by a replica).

The data set is generated deterministically (``datagen.py``), so the same seed and the
same library versions give the same model, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OrdinalEncoder
from threadpoolctl import threadpool_limits

from serve_app.errors import ArtifactError
from serve_app.offline.datagen import generate_training_events
from serve_app.scoring.artifact import METADATA_FILE, MODEL_FILE, record_built
from serve_app.scoring.features import (
    CATEGORICAL_FEATURES,
    CATEGORIES,
    MODEL_COLUMNS,
    NUMERIC_FEATURES,
    feature_types,
)

N_TRAIN_EVENTS = 60_000
N_TEST_EVENTS = 20_000


def category_encoder() -> OrdinalEncoder:
    """The categorical columns' encoder: explicit categories; unknown and missing -> NaN."""
    return OrdinalEncoder(
        categories=[list(CATEGORIES[name]) for name in CATEGORICAL_FEATURES],
        handle_unknown="use_encoded_value",
        unknown_value=np.nan,
        encoded_missing_value=np.nan,
    )


def make_pipeline(seed: int) -> Pipeline:
    """Ordinal-encode categoricals (unknown and missing -> NaN), then a boosted tree ensemble."""
    columns = ColumnTransformer(
        [
            ("categorical", category_encoder(), list(CATEGORICAL_FEATURES)),
            ("numeric", "passthrough", list(NUMERIC_FEATURES)),
        ],
        verbose_feature_names_out=False,
    )
    model = HistGradientBoostingClassifier(
        max_iter=150,
        learning_rate=0.08,
        categorical_features=list(range(len(CATEGORICAL_FEATURES))),
        random_state=seed,
    )
    return Pipeline([("columns", columns), ("model", model)])


def train(entities: Any, seed: int) -> tuple[Pipeline, dict[str, float]]:
    """Train on generated events; evaluate on a held-out set drawn the same way."""
    events, labels = generate_training_events(entities, N_TRAIN_EVENTS + N_TEST_EVENTS, seed)
    events = events[list(MODEL_COLUMNS)]
    train_x, test_x = events.iloc[:N_TRAIN_EVENTS], events.iloc[N_TRAIN_EVENTS:]
    train_y, test_y = labels[:N_TRAIN_EVENTS], labels[N_TRAIN_EVENTS:]
    # HistGradientBoosting's result depends on its OpenMP thread count: train on one
    # thread so the same seed and lock give the same model on every machine.
    with threadpool_limits(limits=1, user_api="openmp"):
        pipeline = make_pipeline(seed).fit(train_x, train_y)
        proba = pipeline.predict_proba(test_x)[:, 1]
    metrics = {
        "roc_auc": round(float(roc_auc_score(test_y, proba)), 4),
        "log_loss": round(float(log_loss(test_y, proba)), 4),
        "accuracy": round(float(accuracy_score(test_y, proba >= 0.5)), 4),
        "positive_rate": round(float(test_y.mean()), 4),
        "n_train": N_TRAIN_EVENTS,
        "n_test": N_TEST_EVENTS,
    }
    return pipeline, metrics


ARTIFACT_FILES = (MODEL_FILE, METADATA_FILE)


def check_replaceable(model_dir: Path) -> None:
    """Refuse to build into a directory that holds anything but a model artifact.

    A build replaces the directory. Pointed (by a typo, or at a folder holding another
    model) at a directory of other files, it deleted them.
    """
    if not model_dir.exists():
        return
    if not model_dir.is_dir():
        raise ArtifactError(f"artifacts.model_dir {model_dir} is a file, not a directory")
    others = sorted(child.name for child in model_dir.iterdir() if child.name not in ARTIFACT_FILES)
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ArtifactError(
            f"artifacts.model_dir {model_dir} holds files that are not this model's "
            f"({shown}): refusing to replace it. Point model_dir at a new or empty "
            "directory, or move those files away."
        )


def write_artifact(
    model_dir: Path, pipeline: Pipeline, metrics: dict[str, float], seed: int
) -> dict[str, Any]:
    """Write model and metadata into a temp dir, then rename: readers never see half."""
    check_replaceable(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=model_dir.parent))
    # Hash the bytes made here, not the file: whoever can write model_dir's parent can
    # swap the staging directory between a dump and a re-read, and the digest recorded
    # below is trusted without a pin. "x": never write into a file someone planted.
    buffer = io.BytesIO()
    joblib.dump(pipeline, buffer)
    model_bytes = buffer.getvalue()
    checksum = hashlib.sha256(model_bytes).hexdigest()
    try:
        with (staging / MODEL_FILE).open("xb") as handle:
            handle.write(model_bytes)
    except FileExistsError as exc:
        raise ArtifactError(
            f"{staging} was changed by someone else during the build: refusing to use it"
        ) from exc
    metadata = {
        "name": "example-churn-hgb",
        "version": f"1.0.0+{checksum[:12]}",
        "seed": seed,
        "features": list(MODEL_COLUMNS),
        "feature_types": feature_types(),
        "categories": {name: list(values) for name, values in CATEGORIES.items()},
        "metrics": metrics,
        "sha256": checksum,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    if model_dir.exists():
        for name in ARTIFACT_FILES:
            (model_dir / name).unlink(missing_ok=True)
        model_dir.rmdir()
    os.replace(staging, model_dir)
    record_built(model_dir, checksum)  # this process may serve it without a pin
    return metadata
