"""A real local Ray cluster and the real Serve config, started once per test session.

The app is deployed the way ``serve run configs/config.yaml`` deploys it (the controller
applies the YAML's ServeDeploySchema), in throughput-optimised HAProxy mode, with its
files redirected to a temp dir and HTTP on a free loopback port.
"""

from __future__ import annotations

import base64
import copy
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.launch import THROUGHPUT_ENV, deploy_config, free_port, local_config, wait_ready

ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "serve_app"
API_KEY = "test-" + secrets.token_urlsafe(24)
OTHER_KEY = "other-" + secrets.token_urlsafe(24)
WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()

# Must be in the environment before Ray starts: Ray's processes inherit it.
SERVE_ENV = {
    **THROUGHPUT_ENV,
    "SERVE_APP_API_KEYS": f"{API_KEY},{OTHER_KEY}",
    "SERVE_APP_WEBHOOK_SECRET": WEBHOOK_SECRET,
    # Ingress replicas otherwise drain for 30 s on shutdown; tests stop far more often.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}


def load_test_config(workdir: Path, port: int) -> dict[str, Any]:
    """configs/config.yaml with files under ``workdir`` and HTTP on ``port``."""
    config = local_config(ROOT / "configs" / "config.yaml", workdir, port)
    args = config["applications"][0]["args"]
    jobs = args["jobs"]
    jobs["lease_s"] = 3  # a killed worker's job is claimed again within seconds
    jobs["chunk_size"] = 250
    webhooks = jobs["webhooks"]
    webhooks.update(
        allowed_hosts=["127.0.0.1"],  # the test's receiver is on loopback
        timeout_s=2,
        max_attempts=4,
        backoff_initial_s=0.5,
        backoff_max_s=1,
    )
    return config


def deploy(config: dict[str, Any], timeout_s: float = 180) -> None:
    deploy_config(config, timeout_s)


class ServeApp:
    """The running app under test: its config, base URL and an authorised client."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        port = config["http_options"]["port"]
        self.base_url = f"http://127.0.0.1:{port}"
        self.auth = {"Authorization": f"Bearer {API_KEY}"}
        self.client = httpx.Client(base_url=self.base_url, headers=self.auth, timeout=30)

    @property
    def store_path(self) -> Path:
        return self.workdir / "features.db"

    def stats(self) -> dict[str, Any]:
        response = self.client.get("/v1/stats")
        response.raise_for_status()
        return response.json()

    def redeploy(self, mutate: Any) -> None:
        config = copy.deepcopy(self.config)
        mutate(config)
        deploy(config)
        self.config = config


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray
    from ray import serve

    saved = {key: os.environ.get(key) for key in SERVE_ENV}
    os.environ.update(SERVE_ENV)
    ray.init(num_cpus=2, include_dashboard=False, namespace="serve", log_to_driver=False)
    try:
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="session")
def serve_app(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> ServeApp:
    workdir = tmp_path_factory.mktemp("serve_app")
    config = load_test_config(workdir, free_port())
    deploy(config)
    app = ServeApp(config, workdir)
    wait_ready(app.base_url)
    return app
