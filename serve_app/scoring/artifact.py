"""The model artifact as a replica sees it: read the metadata, verify, load.

An artifact is a directory holding ``model.joblib`` and ``metadata.json`` (version,
feature names and types, training metrics, the sha256 of the model file), written by
:mod:`serve_app.offline.training`.

The checksum in ``metadata.json`` detects a corrupt or half-written file. It does not
protect against a malicious one: whoever can replace the pickle can rewrite the sidecar
too, and unpickling runs their code. So the model directory must be writable only by
whoever deploys models, and its path is trusted configuration (from the Serve YAML,
never from a request).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
from sklearn.pipeline import Pipeline

from serve_app.errors import ArtifactError
from serve_app.scoring.features import MODEL_COLUMNS

MODEL_FILE = "model.joblib"
METADATA_FILE = "metadata.json"


@dataclass(frozen=True)
class LoadedModel:
    """A verified, loaded model and its metadata."""

    pipeline: Pipeline
    metadata: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.metadata["version"])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / METADATA_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {model_dir / METADATA_FILE}: {exc}") from exc


def load_artifact(model_dir: Path) -> LoadedModel:
    """Verify the checksum, then unpickle. Never call this on an untrusted path."""
    metadata = read_metadata(model_dir)
    model_path = model_dir / MODEL_FILE
    if not model_path.is_file():
        raise ArtifactError(f"model file missing: {model_path}")
    actual = sha256_of(model_path)
    if actual != metadata.get("sha256"):
        raise ArtifactError(
            f"checksum mismatch for {model_path}: metadata says {metadata.get('sha256')}, "
            f"file is {actual}; refusing to load"
        )
    pipeline = joblib.load(model_path)
    if list(metadata.get("features", [])) != list(MODEL_COLUMNS):
        raise ArtifactError("artifact feature list does not match this code's feature schema")
    return LoadedModel(pipeline=pipeline, metadata=metadata)
