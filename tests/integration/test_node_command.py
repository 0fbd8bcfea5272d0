"""Two machines' worth of ``ray start``, the README's "Several machines" steps, on loopback.

A head (0 CPUs: the controller and HAProxy) and a worker node are each started by
``serve-app node`` as their own process group, with the variables the cluster config
reads, a real redis-server (features, loaded by ``load-features``' code) and a real
PostgreSQL (the job queue). ``configs/cluster.yaml`` is deployed by ``serve deploy``, as
an operator would. It must show:

* every replica runs on the worker (the head has no CPUs), and each reads its Redis and
  PostgreSQL URLs from the worker's own environment: predictions and a job succeed;
* Ray's token auth is on: ``serve status`` with the token works, with a wrong one it is
  refused; the token file the head made is 0600;
* Ctrl-C (SIGINT) to each ``serve-app node`` stops its node with every process it
  started (time printed).

Ports: every agent port of the worker is given, since the head took the defaults on this
one machine; ``proxy_location: HeadOnly`` for the same reason as in test_multinode.py.
"""

from __future__ import annotations

import os
import secrets
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from loadtests.launch import free_port
from serve_app.config import AppConfig
from serve_app.offline.artifacts import build_artifacts
from serve_app.offline.load_features import load_into_redis, read_input
from serve_app.offline.run import ray_address_file
from serve_app.scoring.artifact import MODEL_FILE, sha256_of
from serve_app.secret_files import new_webhook_secret
from tests.services import postgres_server, redis_server

pytestmark = [pytest.mark.integration, pytest.mark.own_ray]

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
API_KEY = "node-" + secrets.token_urlsafe(24)
N_ENTITIES = 2_000
LOCAL = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats"]


def _start_node(name: str, ray_args: list[str], env: dict[str, str], logs: Path) -> Any:
    """``serve-app node -- ARGS`` in a process group of its own, logging to a file."""
    log = logs / f"{name}.log"
    process = subprocess.Popen(
        [str(BIN / "serve-app"), "node", "--", *ray_args, *LOCAL],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while "will now block" not in log.read_text():
        assert process.poll() is None, f"{name} exited {process.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"{name} did not start:\n{log.read_text()}"
        time.sleep(0.5)
    return process


def _serve(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "serve"), *command], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("nodes")
    artifacts = AppConfig.model_validate(
        {"artifacts": {"n_entities": N_ENTITIES, "model_dir": "model"},
         "store": {"url": "sqlite:///features.db"}}
    ).resolved(workdir)  # fmt: skip
    build_artifacts(artifacts)
    home = workdir / "home"  # Ray's token goes to ~/.ray: this test's own
    home.mkdir()
    with redis_server() as redis_srv, postgres_server() as pg:
        load_into_redis(read_input(workdir / "features.db"), redis_srv.url, progress=False)
        env = {
            **os.environ,
            "HOME": str(home),
            "XDG_RUNTIME_DIR": "",  # HAProxy's files: /tmp/serve-app-$UID, as on a server
            "SERVE_APP_REDIS_URL": redis_srv.url,
            "SERVE_APP_POSTGRES_URL": pg.create_database("jobs"),
            "SERVE_APP_API_KEYS": API_KEY,
            "SERVE_APP_WEBHOOK_SECRET": new_webhook_secret(),
        }
        for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(name, None)
        gcs, dashboard = free_port(), free_port()
        started: list[subprocess.Popen[bytes]] = []
        try:
            started.append(
                _start_node(
                    "head",
                    f"--head --port {gcs} --num-cpus 0 --dashboard-port {dashboard}".split(),
                    env,
                    workdir,
                )
            )
            agents = (
                "--dashboard-agent-listen-port {} --dashboard-agent-grpc-port {} "
                "--metrics-export-port {} --runtime-env-agent-port {}"
            ).format(*(free_port() for _ in range(4)))
            started.append(
                _start_node(
                    "worker",
                    f"--address 127.0.0.1:{gcs} --num-cpus 2 {agents}".split(),
                    env,
                    workdir,
                )
            )
            yield {
                "env": {**env, "RAY_AUTH_MODE": "token"},  # what `serve` needs to find the token
                "dashboard": f"http://127.0.0.1:{dashboard}",
                "workdir": workdir,
                "started": started,
                "queue_url": env["SERVE_APP_POSTGRES_URL"],
            }
        finally:
            # `ray start` noted this cluster for later `ray.init()` calls; stopped by a
            # signal, it leaves the note behind, and the session's cluster would try to
            # join the dead head (`serve-app run` itself removes a dead note).
            note = ray_address_file(dict(os.environ))
            if note.exists() and note.read_text().strip().endswith(f":{gcs}"):
                note.unlink()
            for process in started:  # the test stops them; this only mops up after a failure
                if process.poll() is None:
                    for child in psutil.Process(process.pid).children(recursive=True):
                        child.kill()
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def _cluster_config(workdir: Path, port: int) -> Path:
    config: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    config["proxy_location"] = "HeadOnly"  # one machine: one proxy port
    config["http_options"].update(host="127.0.0.1", port=port)
    args = config["applications"][0]["args"]
    args["artifacts"]["model_dir"] = str(workdir / "model")
    args["artifacts"]["sha256"] = sha256_of(workdir / "model" / MODEL_FILE)
    path = workdir / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_for_answer(client: httpx.Client, status: Any, timeout_s: float) -> httpx.Response:
    """The first 200 of /v1/predict; a deploy Serve gave up on fails at once, with why."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            response = client.post("/v1/predict", json={"entity_id": "E0000042"})
            if response.status_code == 200:
                return response
        except httpx.HTTPError:
            pass
        report = status().stdout
        assert "DEPLOY_FAILED" not in report, report
        assert time.monotonic() < deadline, f"the deployed app never answered:\n{report}"
        time.sleep(1)


def test_nodes_started_by_serve_app_node_serve_the_cluster_config(nodes: dict[str, Any]) -> None:
    env, dashboard, workdir = nodes["env"], nodes["dashboard"], nodes["workdir"]
    token = workdir / "home" / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600

    port = free_port()
    started = time.monotonic()
    deployed = _serve(["deploy", str(_cluster_config(workdir, port)), "-a", dashboard], env)
    assert deployed.returncode == 0, deployed.stderr
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10) as client:
        status = partial(_serve, ["status", "-a", dashboard], env)
        answer = _wait_for_answer(client, status, timeout_s=240).json()
        print(f"\ndeployed and answering in {time.monotonic() - started:.1f} s: {answer}")
        assert answer["entity_id"] == "E0000042" and answer["degraded"] is False
        assert client.post("/v1/predict", json={"entity_id": "NOPE999"}).status_code == 404
        job = client.post("/v1/jobs", json={"items": [{"entity_id": "E0000001"}] * 3})
        assert job.status_code == 202, job.text
        deadline = time.monotonic() + 60
        while (state := client.get(f"/v1/jobs/{job.json()['id']}").json())["state"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline, state
            time.sleep(0.5)
        assert state["state"] == "succeeded", state

    report = status()
    assert report.returncode == 0 and "RUNNING" in report.stdout, report.stderr
    wrong = _serve(["status", "-a", dashboard], {**env, "RAY_AUTH_TOKEN": "0" * 64})
    assert wrong.returncode != 0, "a wrong Ray token was let in"

    processes = [
        member
        for node in nodes["started"]
        for member in [psutil.Process(node.pid), *psutil.Process(node.pid).children(True)]
    ]
    stopping = time.monotonic()
    for node in reversed(nodes["started"]):  # the worker first, as an operator would
        os.kill(node.pid, signal.SIGINT)
    for node in nodes["started"]:
        node.wait(timeout=60)
    _, alive = psutil.wait_procs(processes, timeout=30)
    print(f"Ctrl-C stopped both nodes in {time.monotonic() - stopping:.1f} s")
    assert not [(p.pid, p.name()) for p in alive if p.is_running()], "left running"
