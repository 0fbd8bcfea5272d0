from pathlib import Path

import pytest

from serve_app.config import AppConfig
from serve_app.errors import ArtifactError
from serve_app.scoring.artifact import MODEL_FILE, load_artifact, read_metadata
from serve_app.scoring.features import MODEL_COLUMNS, build_frame


def test_artifact_has_metadata_and_loads(small_config: AppConfig) -> None:
    model_dir = Path(small_config.artifacts.model_dir)
    loaded = load_artifact(model_dir)
    meta = loaded.metadata
    assert meta["features"] == list(MODEL_COLUMNS)
    assert meta["feature_types"]["region"] == "categorical"
    assert meta["metrics"]["roc_auc"] > 0.6  # real signal, not a coin
    assert meta["version"].endswith(meta["sha256"][:12])
    proba = loaded.pipeline.predict_proba(build_frame([None], [{}]))
    assert proba.shape == (1, 2)


def test_tampered_artifact_is_refused(small_config: AppConfig, tmp_path: Path) -> None:
    source = Path(small_config.artifacts.model_dir)
    target = tmp_path / "model"
    target.mkdir()
    for child in source.iterdir():
        (target / child.name).write_bytes(child.read_bytes())
    with (target / MODEL_FILE).open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_artifact(target)


def test_missing_metadata_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="cannot read"):
        read_metadata(tmp_path)


def test_serving_frame_matches_the_training_frame(small_config: AppConfig) -> None:
    """No training/serving skew: rows as the store returns them score like training rows."""
    import asyncio

    import numpy as np

    from serve_app.offline.datagen import generate_entities, generate_requests
    from serve_app.stores import open_store

    loaded = load_artifact(Path(small_config.artifacts.model_dir))
    entities = generate_entities(small_config.artifacts.n_entities, small_config.artifacts.seed)
    ids = list(entities.index[:50])
    requests = generate_requests(50, np.random.default_rng(0))
    training_like = entities.loc[ids].reset_index(drop=True).join(requests)[list(MODEL_COLUMNS)]
    stored = asyncio.run(open_store(small_config.store.url).get_many(ids))
    contexts = [
        {k: (None if v is None or v != v else v) for k, v in row.items()}
        for row in requests.to_dict("records")
    ]
    serving = build_frame([stored[i] for i in ids], contexts)
    np.testing.assert_allclose(
        loaded.pipeline.predict_proba(serving), loaded.pipeline.predict_proba(training_like)
    )
