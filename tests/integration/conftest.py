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
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "serve_app"
API_KEY = "test-" + secrets.token_urlsafe(24)
OTHER_KEY = "other-" + secrets.token_urlsafe(24)
WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()

# Must be in the environment before Ray starts: Ray's processes inherit it.
SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "SERVE_APP_API_KEYS": f"{API_KEY},{OTHER_KEY}",
    "SERVE_APP_WEBHOOK_SECRET": WEBHOOK_SECRET,
    # Ingress replicas otherwise drain for 30 s on shutdown; tests stop far more often.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_test_config(workdir: Path, port: int) -> dict[str, Any]:
    """configs/config.yaml with files under ``workdir`` and HTTP on ``port``."""
    config = yaml.safe_load((ROOT / "configs" / "config.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["artifacts"]["model_dir"] = str(workdir / "model")
    args["store"]["url"] = f"sqlite:///{workdir / 'features.db'}"
    args["auth"]["keys_file"] = None
    jobs = args["jobs"]
    jobs["queue_url"] = f"sqlite:///{workdir / 'jobs.db'}"
    jobs["lease_s"] = 3  # a killed worker's job is claimed again within seconds
    jobs["chunk_size"] = 250
    webhooks = jobs["webhooks"]
    webhooks.update(
        secret_file=None,
        allowed_hosts=["127.0.0.1"],  # the test's receiver is on loopback
        timeout_s=2,
        max_attempts=4,
        backoff_initial_s=0.5,
        backoff_max_s=1,
    )
    return config


def deploy(config: dict[str, Any], timeout_s: float = 180) -> None:
    """Apply a Serve config dict as ``serve deploy`` does, and wait for RUNNING."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
    )
    client.deploy_apps(schema)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"deploy failed: {status.message}")
        time.sleep(0.5)
    raise TimeoutError(f"{APP_NAME} not RUNNING after {timeout_s}s: {serve.status()}")


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


def wait_ready(base_url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/readyz", timeout=5)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"service not ready: {last}")


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
