"""Make the example artifacts: the SQLite feature store and the trained model.

``serve-app build`` runs :func:`build_artifacts`; the application builder calls
:func:`ensure_artifacts`, so the first ``serve run`` on a fresh machine builds what is
missing by itself. A file lock makes concurrent starts build once.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from serve_app.config import AppConfig, sqlite_path
from serve_app.errors import ArtifactError
from serve_app.offline.datagen import generate_entities
from serve_app.offline.training import check_replaceable, train, write_artifact
from serve_app.scoring.artifact import METADATA_FILE
from serve_app.stores.sqlite import write_sqlite_store

logger = logging.getLogger("serve_app.offline")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def missing_artifacts(config: AppConfig) -> list[str]:
    model_dir = Path(config.artifacts.model_dir)
    missing = [] if (model_dir / METADATA_FILE).is_file() else [str(model_dir)]
    store = sqlite_path(config.store.url)
    if store is not None and not store.is_file():
        missing.append(str(store))
    return missing


def build_artifacts(config: AppConfig, force: bool = False) -> None:
    """Generate entities, write the SQLite store, train and write the model."""
    model_dir = Path(config.artifacts.model_dir)
    with _file_lock(model_dir.parent / ".build.lock"):
        if not force and not missing_artifacts(config):
            return
        if force or not (model_dir / METADATA_FILE).is_file():
            check_replaceable(model_dir)  # before the training, not after it
        started = time.perf_counter()
        # A progress bar on a terminal (disable=None: off when stderr is not a TTY).
        progress = tqdm(total=4, desc="build artifacts", unit="step", disable=None)
        progress.set_postfix_str("generate entities")
        entities = generate_entities(config.artifacts.n_entities, config.artifacts.seed)
        progress.update()
        store = sqlite_path(config.store.url)
        if store is not None and (force or not store.is_file()):
            progress.set_postfix_str("write feature store")
            write_sqlite_store(store, entities)
            logger.info("wrote feature store %s (%d entities)", store, len(entities))
        progress.update()
        if force or not (model_dir / METADATA_FILE).is_file():
            progress.set_postfix_str("train model")
            pipeline, metrics = train(entities, config.artifacts.seed)
            progress.update()
            progress.set_postfix_str("write model")
            metadata = write_artifact(model_dir, pipeline, metrics, config.artifacts.seed)
            logger.info("wrote model %s %s metrics=%s", model_dir, metadata["version"], metrics)
        progress.update(progress.total - progress.n)
        progress.close()
        logger.info("artifacts built in %.1fs", time.perf_counter() - started)


def ensure_artifacts(config: AppConfig) -> None:
    """Build missing artifacts when the config allows it; otherwise fail clearly."""
    missing = missing_artifacts(config)
    if not missing:
        return
    if not config.artifacts.build_if_missing:
        raise ArtifactError(f"missing artifacts {missing} and build_if_missing is false")
    build_artifacts(config)
