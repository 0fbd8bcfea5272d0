from pathlib import Path

import pytest

from serve_app.artifact import MODEL_FILE, load_artifact, read_metadata
from serve_app.config import AppConfig
from serve_app.errors import ArtifactError
from serve_app.features import MODEL_COLUMNS, build_frame


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
