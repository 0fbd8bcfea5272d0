import builtins
import io
import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from serve_app.config import AppConfig, ArtifactConfig
from serve_app.errors import ArtifactError
from serve_app.scoring.artifact import (
    METADATA_FILE,
    MODEL_FILE,
    expected_sha256,
    load_artifact,
    pin_line,
    read_metadata,
    record_built,
    sha256_of,
)
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


def _copy_model(small_config: AppConfig, target: Path) -> Path:
    source = Path(small_config.artifacts.model_dir)
    target.mkdir()
    for child in source.iterdir():
        (target / child.name).write_bytes(child.read_bytes())
    return target


def test_a_replaced_pickle_with_a_rewritten_sidecar_is_refused_by_the_pin(
    small_config: AppConfig, tmp_path: Path
) -> None:
    """The attacker who can write the model directory rewrites metadata.json too."""
    model_dir = _copy_model(small_config, tmp_path / "model")
    pinned = sha256_of(model_dir / MODEL_FILE)
    assert load_artifact(model_dir, pinned).metadata["sha256"] == pinned
    with (model_dir / MODEL_FILE).open("ab") as handle:
        handle.write(b"\n# attacker's payload")
    forged = sha256_of(model_dir / MODEL_FILE)
    metadata = json.loads((model_dir / METADATA_FILE).read_text())
    (model_dir / METADATA_FILE).write_text(json.dumps({**metadata, "sha256": forged}))
    with pytest.raises(ArtifactError) as caught:
        load_artifact(model_dir, pinned)
    message = caught.value.message
    assert pinned in message and forged in message
    assert f'artifacts: {{sha256: "{forged}"}}' in message  # how to pin a new model


class _Payload:
    """A pickle that runs code when loaded: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.marker,))


def test_the_bytes_unpickled_are_the_bytes_verified(
    small_config: AppConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can write the model directory swaps the pickle right after it was hashed
    (inotify tells them when): simulated by swapping it whenever the loader opens the
    model file a second time. Loading must neither run the swapped-in pickle nor fail."""
    model_dir = _copy_model(small_config, tmp_path / "model")
    model_path = model_dir / MODEL_FILE
    pinned = sha256_of(model_path)
    marker = tmp_path / "payload-ran"
    real_open = io.open
    opened: list[str] = []

    def swapping_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, Path)) and Path(file) == model_path and "r" in mode:
            opened.append(mode)
            if len(opened) > 1:  # the attacker's moment
                with real_open(model_path, "wb") as handle:
                    pickle.dump(_Payload(marker), handle)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", swapping_open)
    monkeypatch.setattr(builtins, "open", swapping_open)
    loaded = load_artifact(model_dir, pinned)
    monkeypatch.undo()
    assert opened, "the loader never opened the model file through open()"
    assert not marker.exists(), "a pickle swapped in after the hash was unpickled"
    assert loaded.metadata["sha256"] == pinned
    assert loaded.pipeline.predict_proba(build_frame([None], [{}])).shape == (1, 2)


def test_the_pin_comes_from_the_config_or_a_model_built_by_this_process(
    small_config: AppConfig, tmp_path: Path
) -> None:
    model_dir = _copy_model(small_config, tmp_path / "model")
    digest = sha256_of(model_dir / MODEL_FILE)
    pinned = ArtifactConfig(model_dir=str(model_dir), sha256=digest)
    assert expected_sha256(pinned) == digest
    with pytest.raises(ArtifactError, match=r"artifacts\.sha256 is not set") as caught:
        expected_sha256(ArtifactConfig(model_dir=str(model_dir)))
    assert pin_line(digest) in caught.value.message
    assert expected_sha256(ArtifactConfig(model_dir=str(model_dir), allow_unpinned=True)) is None
    record_built(model_dir, digest)  # what write_artifact does after building it
    assert expected_sha256(ArtifactConfig(model_dir=str(model_dir))) == digest
    with pytest.raises(ValueError):
        ArtifactConfig(sha256="not-a-digest")


def test_build_prints_the_digest_and_the_yaml_line(
    small_config: AppConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from serve_app.offline.cli import main

    config_file = tmp_path / "serve.yaml"
    args = {
        "artifacts": {"model_dir": small_config.artifacts.model_dir, "n_entities": 2_000},
        "store": {"url": small_config.store.url},
    }
    config_file.write_text(json.dumps({"applications": [{"name": "a", "args": args}]}))
    assert main(["build", str(config_file)]) == 0
    digest = sha256_of(Path(small_config.artifacts.model_dir) / MODEL_FILE)
    assert capsys.readouterr().out.strip() == f'artifacts: {{sha256: "{digest}"}}'


def test_build_refusing_a_directory_says_why_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve-app build --force` into a directory of someone else's files: exit 1 and the
    reason, not a traceback."""
    from serve_app.offline.cli import main

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "stray.txt").write_text("theirs")
    config_file = tmp_path / "serve.yaml"
    args = {"artifacts": {"model_dir": str(model_dir), "n_entities": 2_000}}
    config_file.write_text(json.dumps({"applications": [{"name": "a", "args": args}]}))
    assert main(["build", "--force", str(config_file)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("build: artifacts.model_dir ") and "stray.txt" in err, err
    assert "Traceback" not in err


def test_a_build_never_deletes_files_that_are_not_a_model(tmp_path: Path) -> None:
    """model_dir pointed (by a typo) at a directory of other files: start-up's build
    replaced the directory and deleted them."""
    from serve_app.offline.training import write_artifact

    model_dir = tmp_path / "data"
    model_dir.mkdir()
    (model_dir / "my_model.bin").write_bytes(b"theirs")
    (model_dir / MODEL_FILE).write_bytes(b"a half-written model")
    with pytest.raises(ArtifactError, match=r"my_model\.bin"):
        write_artifact(model_dir, object(), {}, seed=1)  # type: ignore[arg-type]
    assert (model_dir / "my_model.bin").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging left


def test_a_build_into_a_directory_of_model_files_replaces_them(
    small_config: AppConfig, tmp_path: Path
) -> None:
    from serve_app.offline.training import write_artifact

    model_dir = _copy_model(small_config, tmp_path / "model")
    loaded = load_artifact(model_dir)
    metadata = write_artifact(model_dir, loaded.pipeline, {"roc_auc": 0.5}, seed=1)
    assert sorted(p.name for p in model_dir.iterdir()) == [METADATA_FILE, MODEL_FILE]
    assert read_metadata(model_dir)["sha256"] == metadata["sha256"]


def test_the_digest_a_build_trusts_is_of_the_bytes_it_made(
    small_config: AppConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model this process built is served without a pin, on the digest the build
    recorded. The build hashed the file it had written, so whoever can write the model
    directory's parent could rename the staging directory right after the dump and put
    their own pickle in its place: its digest was recorded as trusted and it ran at load
    (a helper's test). Simulated by doing just that inside joblib.dump."""
    from serve_app.offline import training

    pipeline = load_artifact(Path(small_config.artifacts.model_dir)).pipeline
    model_dir = tmp_path / "model"
    marker = tmp_path / "payload-ran"
    real_dump = training.joblib.dump

    def dump_then_swap(value: Any, target: Any, *args: Any, **kwargs: Any) -> Any:
        written = real_dump(value, target, *args, **kwargs)
        staging = next(tmp_path.glob(".model-*"))
        staging.rename(tmp_path / "moved-away")
        staging.mkdir()
        (staging / MODEL_FILE).write_bytes(pickle.dumps(_Payload(marker)))
        return written

    monkeypatch.setattr(training.joblib, "dump", dump_then_swap)
    with pytest.raises(ArtifactError):
        training.write_artifact(model_dir, pipeline, {"roc_auc": 0.5}, seed=1)
        load_artifact(model_dir, expected_sha256(ArtifactConfig(model_dir=str(model_dir))))
    assert not marker.exists(), "a pickle planted during the build was unpickled"
