"""The application builder: ``import_path: serve_app.app:build_app`` in the Serve YAML.

It validates ``args`` (:class:`AppConfig`), refuses to start with auth on and no key,
builds missing example artifacts, and wires the deployments together with ``.bind()``:

    Ingress ──> Model ──> FeatureFetcher
       └──────> JobWorker ──> Model
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.serve import Application

from serve_app.api.auth import KeyChecker
from serve_app.config import AppConfig
from serve_app.deployments.feature_fetcher import FeatureFetcher
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.job_worker import JobWorker
from serve_app.deployments.model import Model
from serve_app.offline.artifacts import ensure_artifacts


def build_app(args: dict[str, Any]) -> Application:
    config = AppConfig.model_validate(args or {}).resolved(Path.cwd())
    KeyChecker(config.auth)  # fail fast: never start open because a key was forgotten
    ensure_artifacts(config)
    fetcher = FeatureFetcher.bind(config.store.model_dump())
    model = Model.bind(config.artifacts.model_dir, fetcher)
    worker = JobWorker.bind(model, config.jobs.model_dump()) if config.jobs.enabled else None
    return Ingress.bind(model, fetcher, config.model_dump(), worker)
