"""A real local Ray cluster and the real Serve config, started once per test session.

The app is deployed the way ``serve run configs/config.yaml`` deploys it (by that very
command, see ``loadtests/launch.py``), in throughput-optimised HAProxy mode, with its
files redirected to a temp dir and HTTP on a free loopback port.
"""

from __future__ import annotations

import base64
import copy
import itertools
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtests.launch import (
    THROUGHPUT_ENV,
    deploy_config,
    local_config,
    set_nested,
    wait_ready,
)
from loadtests.launch import free_port as any_free_port
from serve_app.config import AppConfig, read_env_file

ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "serve_app"
API_KEY = "test-" + secrets.token_urlsafe(24)
OTHER_KEY = "other-" + secrets.token_urlsafe(24)
WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def serve_env_file(path: Path = ROOT / "configs" / "serve.env") -> dict[str, str]:
    """configs/serve.env: what the README's run command sources before `serve run`."""
    return read_env_file(path)


# HAProxy's admin socket (mode 0666, level admin), config and state files in a directory
# only this user can enter (mkdtemp: 0700); its stats and metrics ports, which Ray 2.60
# binds on every interface, on free ports. README, Security, lists what listens where.
# Short: Ray appends the node id (56 characters) and HAProxy's socket paths end at 97.
HAPROXY_DIR = Path(tempfile.mkdtemp(prefix="sa_", dir="/tmp"))
HAPROXY_STATS_PORT = any_free_port()
HAPROXY_METRICS_PORT = any_free_port()
HAPROXY_ENV = {
    "RAY_SERVE_HAPROXY_SOCKET_PATH": str(HAPROXY_DIR / "admin.sock"),
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(HAPROXY_DIR / "metrics.sock"),
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(HAPROXY_DIR / "haproxy.cfg"),
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(HAPROXY_DIR),
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(HAPROXY_DIR / "server-state"),
    "RAY_SERVE_HAPROXY_STATS_PORT": str(HAPROXY_STATS_PORT),
    "RAY_SERVE_HAPROXY_METRICS_PORT": str(HAPROXY_METRICS_PORT),
}


def cut_short(exc: Exception) -> bool:
    """An answer whose headers came and whose connection closed before its body: its
    Ingress replica died between writing the two (uvicorn writes them apart), after
    HAProxy had passed the headers on. No proxy can resend it; a client retries the
    idempotent call (README, "Replicas that die"). A request with no answer at all is a
    different error ("Server disconnected without sending a response"): HAProxy's
    resend covers that one. Matched on httpcore's words."""
    return isinstance(exc, httpx.RemoteProtocolError) and (
        "without sending complete message body" in str(exc)
    )


# Must be in the environment before Ray starts: Ray's processes inherit it.
SERVE_ENV = {
    **THROUGHPUT_ENV,
    **serve_env_file(),
    **HAPROXY_ENV,
    "SERVE_APP_API_KEYS": f"{API_KEY},{OTHER_KEY}",
    "SERVE_APP_WEBHOOK_SECRET": WEBHOOK_SECRET,
    # Ingress replicas otherwise drain for 30 s on shutdown; tests stop far more often.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}


# Webhooks may go to a non-public host only on a port its allowed_hosts entry names, so
# the tests' receivers listen on a pool of loopback ports that the test config allows.
WEBHOOK_PORTS = tuple(any_free_port() for _ in range(16))
_webhook_ports = itertools.cycle(WEBHOOK_PORTS)


def free_port() -> int:
    """A free loopback port from :data:`WEBHOOK_PORTS` (webhook receivers need one)."""
    for _ in range(len(WEBHOOK_PORTS)):
        port = next(_webhook_ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"every port of {WEBHOOK_PORTS} is in use")


def load_test_config(workdir: Path, port: int) -> dict[str, Any]:
    """configs/config.yaml with files under ``workdir`` and HTTP on ``port``."""
    config = local_config(ROOT / "configs" / "config.yaml", workdir, port)
    args = config["applications"][0]["args"]  # local_config made sure it is a dict
    overrides = {
        "jobs.lease_s": 3,  # a killed worker's job is claimed again within seconds
        "limits.body_read_timeout_s": 12,  # the slow-body test waits this out
        "jobs.chunk_size": 250,
        # receivers on loopback
        "jobs.webhooks.allowed_hosts": [f"127.0.0.1:{port}" for port in WEBHOOK_PORTS],
        "jobs.webhooks.timeout_s": 2,
        "jobs.webhooks.max_attempts": 4,
        "jobs.webhooks.backoff_initial_s": 0.5,
        "jobs.webhooks.backoff_max_s": 1,
    }
    for key, value in overrides.items():
        set_nested(args, key, value)
    return config


def deployment_entry(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The entry of deployment ``name`` in a Serve config."""
    return next(d for d in config["applications"][0]["deployments"] if d["name"] == name)


def pin_replicas(config: dict[str, Any], name: str, count: int) -> None:
    """Deployment ``name`` at exactly ``count`` replicas (autoscaling bounds both ``count``)."""
    scaling = deployment_entry(config, name).setdefault("autoscaling_config", {})
    scaling.update(min_replicas=count, max_replicas=count)
    scaling.pop("initial_replicas", None)


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

    @property
    def settings(self) -> AppConfig:
        """The app's validated ``args``: every setting, defaults included."""
        return AppConfig.model_validate(self.config["applications"][0].get("args") or {})

    def stable_replicas(self, deployment: str, timeout_s: float = 120) -> int:
        """The number of RUNNING replicas of ``deployment`` once none is starting or stopping."""
        from ray import serve

        deadline = time.monotonic() + timeout_s
        while True:
            app = serve.status().applications.get(APP_NAME)
            states = app.deployments[deployment].replica_states if app else {}
            running = states.get("RUNNING", 0)
            if running and running == sum(states.values()):
                return running
            if time.monotonic() > deadline:
                raise TimeoutError(f"{deployment}: {states}, never only RUNNING replicas")
            time.sleep(0.5)

    def stats(self) -> dict[str, Any]:
        response = self.client.get("/v1/stats")
        response.raise_for_status()
        return response.json()

    def redeploy(self, mutate: Any) -> None:
        config = copy.deepcopy(self.config)
        mutate(config)
        deploy(config)
        self.config = config

    def wait_for_replicas(self, deployment: str, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while (running := self.stable_replicas(deployment, timeout_s)) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{deployment}: {running} replicas, not {count}")
            time.sleep(0.5)

    @contextmanager
    def replicas(self, deployment: str, count: int) -> Iterator[None]:
        """``deployment`` at exactly ``count`` replicas for the block, then as before.

        A replica-count change is a light config update: the replicas that stay keep their
        processes and counters. Already at ``count``: nothing to change, nothing to wait.
        """
        wanted = self.stable_replicas(deployment)
        if wanted == count:
            yield
            return
        original = copy.deepcopy(self.config)
        self.redeploy(lambda config: pin_replicas(config, deployment, count))
        try:
            self.wait_for_replicas(deployment, count)
            yield
        finally:
            deploy(original)
            self.config = original
            self.wait_for_replicas(deployment, wanted)

    def one_replica(self, deployment: str) -> AbstractContextManager[None]:
        """One replica of ``deployment``: for counters that one ``/v1/stats`` call must see
        whole (Serve routes each call to a replica of its choosing)."""
        return self.replicas(deployment, 1)


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
            shutil.rmtree(HAPROXY_DIR, ignore_errors=True)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="session")
def serve_app(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> ServeApp:
    workdir = tmp_path_factory.mktemp("serve_app")
    config = load_test_config(workdir, free_port())
    # One Model replica for the session: the tests that count the Model's batches in
    # /v1/stats need one, and scaling 2 -> 1 -> 2 around each of them cost minutes of CI.
    # The chaos test scales it to configs/config.yaml's two for its kills.
    pin_replicas(config, "Model", 1)
    deploy(config)
    app = ServeApp(config, workdir)
    wait_ready(app.base_url)
    return app
