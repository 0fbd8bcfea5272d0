"""Deploy a Serve config dict from Python, as ``serve run`` / ``serve deploy`` do.

Used by the integration tests, the load-test runner and the benchmarks, so that all of
them run exactly what the YAML describes (same builder, same deployment options).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

# Environment for Ray Serve's throughput-optimised mode with HAProxy; must be set before
# Ray starts (its processes inherit it).
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}


def deploy_config(config: dict[str, Any], timeout_s: float = 180) -> None:
    """Apply a Serve config (the YAML as a dict) and wait until every app is RUNNING."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
    )
    client.deploy_apps(schema)
    names = [app.name for app in schema.applications]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        statuses = serve.status().applications
        states = [statuses[name].status if name in statuses else None for name in names]
        if all(state == "RUNNING" for state in states):
            return
        for name, state in zip(names, states, strict=True):
            if state == "DEPLOY_FAILED":
                raise RuntimeError(f"deploy of {name} failed: {statuses[name].message}")
        time.sleep(0.5)
    raise TimeoutError(f"apps {names} not RUNNING after {timeout_s}s: {serve.status()}")


def wait_ready(base_url: str, timeout_s: float = 60) -> None:
    """Poll ``/readyz`` until it answers 200."""
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


def replica_counts(app_name: str) -> dict[str, int]:
    """RUNNING replicas per deployment of ``app_name`` (cheap: ~20 ms)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for tests, benchmarks and load tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_config(config_path: Path, workdir: Path, port: int) -> dict[str, Any]:
    """A Serve YAML with every file of the app under ``workdir`` and HTTP on ``port``.

    Keys and the webhook secret then come only from the environment
    (``SERVE_APP_API_KEYS``, ``SERVE_APP_WEBHOOK_SECRET``).
    """
    config = yaml.safe_load(config_path.read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["artifacts"]["model_dir"] = str(workdir / "model")
    args["store"]["url"] = f"sqlite:///{workdir / 'features.db'}"
    args["auth"]["keys_file"] = None
    args["jobs"]["queue_url"] = f"sqlite:///{workdir / 'jobs.db'}"
    args["jobs"]["webhooks"]["secret_file"] = None
    return config
