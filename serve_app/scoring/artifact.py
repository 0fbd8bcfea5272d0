"""The model artifact as a replica sees it: read the metadata, verify, load.

An artifact is a directory holding ``model.joblib`` and ``metadata.json`` (version,
feature names and types, training metrics, the sha256 of the model file), written by
:mod:`serve_app.offline.training`.

The checksum in ``metadata.json`` detects a corrupt or half-written file, not a malicious
one: whoever can replace the pickle can rewrite the sidecar too, and unpickling runs
their code. So the digest that decides is pinned where the model directory's writers
cannot reach it, in the Serve YAML (``artifacts.sha256``), and checked before unpickling;
a mismatch refuses to start with the line to pin a newly trained model. Without a pin the
model loads only when this very process has just built it (the example model on first
start: the digest comes from the bytes it wrote) or when ``artifacts.allow_unpinned`` says
to trust the directory's permissions.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
from sklearn.pipeline import Pipeline

from serve_app.config import ArtifactConfig
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


# Digests of models this process wrote itself (``serve_app.offline.training``): the one
# case where no pin is needed, since the digest comes from bytes written a moment ago.
_BUILT_HERE: dict[str, str] = {}


def record_built(model_dir: Path, sha256: str) -> None:
    """Remember that this process has just written the model in ``model_dir``."""
    _BUILT_HERE[str(model_dir.resolve())] = sha256


def pin_line(sha256: str) -> str:
    """The YAML that pins a model, as ``serve-app build`` prints it."""
    return f'artifacts: {{sha256: "{sha256}"}}'


def expected_sha256(config: ArtifactConfig) -> str | None:
    """The digest the model file must have, decided where the YAML is read (the builder).

    The pin from the YAML; else the digest of a model this process has just built; else
    None when ``allow_unpinned`` (only the sidecar's checksum is checked); else refuse.
    """
    if config.sha256:
        return config.sha256
    model_dir = Path(config.model_dir)
    built = _BUILT_HERE.get(str(model_dir.resolve()))
    if built is not None or config.allow_unpinned:
        return built
    model_path = model_dir / MODEL_FILE
    actual = sha256_of(model_path) if model_path.is_file() else "<digest>"
    raise ArtifactError(
        f"artifacts.sha256 is not set, so the model in {model_dir} cannot be verified: its "
        "metadata.json can be rewritten along with the pickle, and unpickling runs code. "
        f"If {model_path} is the model you built (its sha256 is {actual}; `serve-app build` "
        f"prints it), pin it in the YAML's args: {pin_line(actual)}. Or set "
        "artifacts.allow_unpinned: true to trust the directory's permissions instead."
    )


def load_artifact(model_dir: Path, expected: str | None = None) -> LoadedModel:
    """Verify the file's bytes against the pin (else the sidecar), then unpickle them.

    Never call this on an untrusted path.
    """
    metadata = read_metadata(model_dir)
    if list(metadata.get("features", [])) != list(MODEL_COLUMNS):
        raise ArtifactError("artifact feature list does not match this code's feature schema")
    model_path = model_dir / MODEL_FILE
    if not model_path.is_file():
        raise ArtifactError(f"model file missing: {model_path}")
    # Read once, hash and unpickle the same bytes: hashing the file and then opening it
    # again to unpickle would let whoever can write the directory swap the file in
    # between (inotify tells them when the hash has read it).
    data = model_path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if expected is not None and actual != expected:
        raise ArtifactError(
            f"model file {model_path} has sha256 {actual}, but artifacts.sha256 pins "
            f"{expected}: refusing to load it (tampered, or a newly trained model). If you "
            f"trained it yourself, pin it in the YAML's args: {pin_line(actual)} "
            "(`serve-app build` prints this line)"
        )
    if actual != metadata.get("sha256"):
        raise ArtifactError(
            f"checksum mismatch for {model_path}: metadata says {metadata.get('sha256')}, "
            f"file is {actual}; refusing to load"
        )
    pipeline = joblib.load(io.BytesIO(data))
    return LoadedModel(pipeline=pipeline, metadata=metadata)
