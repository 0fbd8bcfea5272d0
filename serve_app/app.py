"""The application builder: ``import_path: serve_app.app:build_app`` in the Serve YAML.

It validates ``args`` (:class:`AppConfig`), builds missing artifacts, refuses to start
with auth on and no key, and wires the deployments together with ``.bind()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from ray.serve import Application

from serve_app.auth import KeyChecker
from serve_app.build import ensure_artifacts
from serve_app.config import AppConfig
from serve_app.errors import ConfigError
from serve_app.fetcher import FeatureFetcher
from serve_app.ingress import Ingress
from serve_app.job_worker import JobWorker
from serve_app.model import Model


def build_app(args: dict[str, Any]) -> Application:
    config = AppConfig.model_validate(args or {}).resolved(Path.cwd())
    KeyChecker(config.auth)  # fail fast: never start open because a key was forgotten
    ensure_artifacts(config)
    fetcher = FeatureFetcher.bind(config.store.model_dump())
    model = Model.bind(config.artifacts.model_dir, fetcher)
    worker = JobWorker.bind(model, config.jobs.model_dump()) if config.jobs.enabled else None
    return Ingress.bind(model, fetcher, config.model_dump(), worker)


def load_app_config(path: Path, app_name: str | None = None) -> AppConfig:
    """The validated ``args`` of an application in a Serve YAML (the first, by default)."""
    document = yaml.safe_load(path.read_text())
    for application in document.get("applications", []):
        if app_name is None or application.get("name") == app_name:
            return AppConfig.model_validate(application.get("args") or {})
    raise ConfigError(f"no application {app_name or ''} in {path}")
