"""The application builder: ``import_path: serve_app.app:build_app`` in the Serve YAML.

It validates ``args`` (:class:`AppConfig`), refuses to start with auth on and no key,
builds missing example artifacts, and wires the deployments together with ``.bind()``:

    Ingress ──> Model ──> FeatureFetcher
       └──────> JobWorker ──> Model
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray.serve import Application

from serve_app.api.auth import KeyChecker
from serve_app.config import AppConfig, sqlite_path
from serve_app.deployments.feature_fetcher import FeatureFetcher
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.job_worker import JobWorker
from serve_app.deployments.model import Model
from serve_app.errors import ConfigError
from serve_app.offline.artifacts import ensure_artifacts
from serve_app.scoring.artifact import expected_sha256


def node_local_state(config: AppConfig) -> list[str]:
    """The settings that keep state in files of one node (``sqlite:///``)."""
    local = []
    if sqlite_path(os.path.expandvars(config.store.url)) is not None:
        local.append(f"store.url={config.store.url}")
    if config.jobs.enabled and sqlite_path(os.path.expandvars(config.jobs.queue_url)):
        local.append(f"jobs.queue_url={config.jobs.queue_url}")
    return local


def check_cluster_state(config: AppConfig, alive_nodes: int) -> None:
    """Refuse SQLite on a cluster of more than one node, unless explicitly allowed.

    Replicas on another node would open their own files: jobs queued on one node would
    never run on the other, and features would differ per node.
    """
    local = node_local_state(config)
    if alive_nodes > 1 and local and not config.allow_sqlite_on_cluster:
        raise ConfigError(
            f"this Ray cluster has {alive_nodes} nodes, but {', '.join(local)} is a file on "
            "one node. Use shared backends (store.url: redis://..., jobs.queue_url: "
            "postgresql://..., see configs/cluster.yaml), or set allow_sqlite_on_cluster: "
            "true if every node mounts the same files and you accept the risk."
        )


def _alive_nodes() -> int:
    import ray

    if not ray.is_initialized():  # built outside a cluster (tests, tools): one machine
        return 1
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def build_app(args: dict[str, Any]) -> Application:
    config = AppConfig.model_validate(args or {}).resolved(Path.cwd())
    check_cluster_state(config, _alive_nodes())
    KeyChecker(config.auth)  # fail fast: never start open because a key was forgotten
    ensure_artifacts(config)
    fetcher = FeatureFetcher.bind(config.store.model_dump())
    pin = expected_sha256(config.artifacts)  # the YAML's pin; refuses an unpinned model
    model = Model.bind(config.artifacts.model_dir, fetcher, pin, config.store.model_dump())
    worker = JobWorker.bind(model, config.jobs.model_dump()) if config.jobs.enabled else None
    return Ingress.bind(model, fetcher, config.model_dump(), worker)
