"""A Ray cluster of three nodes on this machine survives losing a worker node.

Head (0 CPUs: controller and HTTP proxy only) + two worker nodes, a real redis-server
(features and the shared prediction cache) and a real PostgreSQL (the job queue).
``configs/cluster.yaml`` is deployed with two replicas of every deployment, which Ray
spreads over the two workers (printed). Under a paced load of single and batch
predictions at about half the measured capacity, with jobs queued, one worker node is
killed (its raylet and every worker process on it, SIGKILL). It must show:

* zero failed ``/v1/predict`` and ``/v1/predict/batch`` requests: HAProxy resends a
  request whose Ingress replica died with the node (``configs/serve.env``), and the
  Ingress resends a call whose Model replica died, once, within the request's deadline;
  at most one answer cut short after its headers, and only around the kill
  (``conftest.cut_short``: no proxy can resend it), which the client retries once and
  must then get;
* every accepted job completes with each item exactly once (checked in PostgreSQL too);
* the time until throughput is back, printed.

Before that, the same cluster refuses a ``sqlite:///`` config with a clear message.

Throughput mode as ``serve run`` gets it from ``configs/serve.env`` (HAProxy in front of
the Ingress replicas' own HTTP servers), with ``proxy_location: HeadOnly``: with several
nodes on ONE machine every node's HAProxy would bind the same host port; on a real cluster
each node has its own address and ``cluster.yaml`` uses ``EveryNode``.
"""

from __future__ import annotations

import os
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from serve_app.config import AppConfig
from serve_app.offline.artifacts import build_artifacts
from serve_app.offline.load_features import load_into_redis, read_input
from serve_app.scoring.artifact import MODEL_FILE, sha256_of
from tests.integration.conftest import HAPROXY_ENV, cut_short, serve_env_file
from tests.servers import free_port
from tests.services import PostgresServer, RedisServer, postgres_server, redis_server

# What the README's run command gives Ray: throughput mode (HAProxy), its retry policy.
SERVE_ENV_FOR_CLUSTER = {**serve_env_file(), **HAPROXY_ENV}

pytestmark = [pytest.mark.integration, pytest.mark.own_ray]

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "mn-" + secrets.token_urlsafe(24)
APP = "serve_app"
N_ENTITIES = 2_000
LOAD_S = 36.0
KILL_AT_S = 12.0
JOB_ITEMS = 1_500


@dataclass
class Outcome:
    started: float
    finished: float
    route: str
    status: int
    items: int
    detail: str = ""
    cut_short: str = ""  # the first answer was cut short and the call retried (conftest)


@dataclass
class Load:
    """Requests sent by the paced load, with their outcome."""

    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


def _item(rng: random.Random) -> dict[str, Any]:
    return {
        "entity_id": f"E{rng.randrange(N_ENTITIES):07d}",
        "context": {"amount": round(rng.uniform(1, 500), 2), "hour": rng.randrange(24)},
    }


def _send(client: httpx.Client, rng: random.Random, batch: bool) -> Outcome:
    started = time.monotonic()
    if batch:
        route, body = "/v1/predict/batch", {"items": [_item(rng) for _ in range(16)]}
    else:
        route, body = "/v1/predict", _item(rng)
    cut = ""
    try:
        try:
            response = client.post(route, json=body)
        except httpx.HTTPError as exc:
            if not cut_short(exc):
                raise
            cut = repr(exc)  # retried once, as a client of an idempotent call should
            response = client.post(route, json=body)
    except httpx.HTTPError as exc:
        return Outcome(started, time.monotonic(), route, 0, 0, repr(exc), cut)
    ok = response.status_code == 200
    if ok and batch:
        summary = response.json()["summary"]
        ok = summary["failed"] == 0
    detail = "" if ok else response.text[:300]
    return Outcome(started, time.monotonic(), route, response.status_code if ok else -response.status_code or -1,
                   16 if batch else 1, detail, cut)  # fmt: skip


def _drive(base: str, rate_per_s: float, duration_s: float, load: Load, workers: int) -> None:
    """Open-loop-ish pacing: each worker sends at rate/workers, 1 batch per 5 requests."""
    interval = workers / rate_per_s
    end = time.monotonic() + duration_s

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            next_at = time.monotonic() + rng.uniform(0, interval)
            count = 0
            while next_at < end:
                time.sleep(max(0.0, next_at - time.monotonic()))
                load.add(_send(client, rng, batch=count % 5 == 4))
                count += 1
                next_at += interval

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(worker, range(workers)))


def _capacity(base: str, seconds: float = 6.0, workers: int = 8) -> float:
    """Requests/s with ``workers`` closed-loop clients (the same request mix)."""
    load = Load()
    end = time.monotonic() + seconds

    def worker(seed: int) -> None:
        rng = random.Random(1_000 + seed)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            count = 0
            while time.monotonic() < end:
                load.add(_send(client, rng, batch=count % 5 == 4))
                count += 1

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(worker, range(workers)))
    good = [o for o in load.outcomes if o.status == 200]
    return len(good) / seconds


def _replica_nodes(names: dict[str, str]) -> dict[str, list[str]]:
    """Deployment -> the node name of each of its live replicas."""
    from ray.util.state import list_actors

    placed: dict[str, list[str]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1_000):
        cls = actor.class_name or ""
        if cls.startswith(f"ServeReplica:{APP}:"):
            deployment = cls.rsplit(":", 1)[1]
            placed.setdefault(deployment, []).append(names.get(actor.node_id, actor.node_id))
    return {key: sorted(value) for key, value in sorted(placed.items())}


def _wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def services() -> Iterator[tuple[RedisServer, PostgresServer]]:
    with redis_server() as redis_srv, postgres_server() as pg:
        yield redis_srv, pg


@pytest.fixture(scope="module")
def cluster(
    services: tuple[RedisServer, PostgresServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    redis_srv, pg = services
    workdir = tmp_path_factory.mktemp("multinode")
    artifacts = AppConfig.model_validate(
        {"artifacts": {"n_entities": N_ENTITIES, "model_dir": "model"},
         "store": {"url": "sqlite:///features.db"}}
    ).resolved(workdir)  # fmt: skip
    build_artifacts(artifacts)
    report = load_into_redis(read_input(workdir / "features.db"), redis_srv.url, progress=False)
    assert report.loaded == N_ENTITIES
    queue_url = pg.create_database("jobs")

    env = {
        **SERVE_ENV_FOR_CLUSTER,
        "SERVE_APP_API_KEYS": API_KEY,
        "SERVE_APP_REDIS_URL": redis_srv.url,
        "SERVE_APP_POSTGRES_URL": queue_url,
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }
    dropped = ("RAY_ADDRESS",)
    saved = {key: os.environ.get(key) for key in (*env, *dropped)}
    os.environ.update(env)
    for key in dropped:
        os.environ.pop(key, None)
    system = {"health_check_period_ms": 1_000, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": True, "_system_config": system},
    )
    nodes = {
        "worker-1": cluster.add_node(num_cpus=2, resources={"worker_1": 1}),
        "worker-2": cluster.add_node(num_cpus=2, resources={"worker_2": 1}),
    }
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="serve", log_to_driver=False)
    names = {cluster.head_node.node_id: "head"}
    names.update({node.node_id: name for name, node in nodes.items()})
    try:
        yield {
            "cluster": cluster,
            "nodes": nodes,
            "names": names,
            "workdir": workdir,
            "queue_url": queue_url,
            "redis": redis_srv,
            "port": free_port(),  # Serve's HTTP options are fixed by the first deploy
        }
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _cluster_config(workdir: Path, port: int) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    config["proxy_location"] = "HeadOnly"  # one machine: one proxy port (see the docstring)
    config["http_options"].update(host="127.0.0.1", port=port)
    args = config["applications"][0]["args"]
    args["artifacts"]["model_dir"] = str(workdir / "model")
    args["artifacts"]["sha256"] = sha256_of(workdir / "model" / MODEL_FILE)  # pin it
    args["jobs"].update(lease_s=3, chunk_size=250)  # a dead worker's job moves in seconds
    return config


def test_sqlite_on_a_multi_node_cluster_is_refused(cluster: dict[str, Any]) -> None:
    from loadtests.launch import deploy_config

    workdir = cluster["workdir"]
    config = _cluster_config(workdir, cluster["port"])
    args = config["applications"][0]["args"]
    args["jobs"]["queue_url"] = f"sqlite:///{workdir / 'jobs.db'}"
    with pytest.raises(RuntimeError, match="allow_sqlite_on_cluster") as failure:
        deploy_config(config, timeout_s=120)
    print(f"\nrefused as expected: {str(failure.value)[:400]}")


def test_node_loss_loses_no_request_and_no_job_item(cluster: dict[str, Any]) -> None:
    from loadtests.launch import deploy_config, wait_ready

    port = cluster["port"]
    base = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    deploy_config(_cluster_config(cluster["workdir"], port), timeout_s=240)
    wait_ready(base, timeout_s=120)
    print(f"\ndeployed and ready in {time.monotonic() - began:.0f} s")
    placement = _replica_nodes(cluster["names"])
    print("\nreplicas by node before the loss:")
    for deployment, where in placement.items():
        print(f"  {deployment:15s} {where}")
    for deployment in ("Ingress", "Model", "FeatureFetcher", "JobWorker"):
        assert sorted(placement[deployment]) == ["worker-1", "worker-2"], placement

    capacity = _capacity(base)
    rate = max(4.0, capacity / 2)
    print(f"capacity {capacity:.0f} req/s; driving {rate:.0f} req/s for {LOAD_S:.0f} s")

    headers = {"Authorization": f"Bearer {API_KEY}"}
    jobs: list[str] = []
    load = Load()
    start = time.monotonic()
    driver = threading.Thread(target=_drive, args=(base, rate, LOAD_S, load, 8))
    driver.start()
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        for when in (2.0, 6.0, KILL_AT_S - 1, KILL_AT_S + 3):
            time.sleep(max(0.0, start + when - time.monotonic()))
            items = [{"entity_id": f"E{i % N_ENTITIES:07d}"} for i in range(JOB_ITEMS)]
            response = client.post("/v1/jobs", json={"items": items})
            assert response.status_code == 202, response.text
            jobs.append(response.json()["id"])
            if when == KILL_AT_S - 1:
                time.sleep(max(0.0, start + KILL_AT_S - time.monotonic()))
                cluster["cluster"].remove_node(cluster["nodes"]["worker-2"], allow_graceful=False)
                killed_at = time.monotonic() - start
                print(f"killed worker-2 (raylet and its workers) at t={killed_at:.1f} s")
    driver.join()

    outcomes = sorted(load.outcomes, key=lambda o: o.started)
    failed = [o for o in outcomes if o.status != 200]
    kill_time = start + killed_at
    by_route = Counter(o.route for o in outcomes)
    cut = [o for o in outcomes if o.cut_short]
    print(f"requests sent: {len(outcomes)} ({dict(by_route)}); failed: {len(failed)}; "
          f"answers cut short and retried: {[(o.route, o.cut_short) for o in cut]}")  # fmt: skip
    for outcome in failed[:10]:
        print(f"  FAILED {outcome.route} {outcome.status} {outcome.detail} "
              f"sent {outcome.started - kill_time:+.3f} s after the kill, "
              f"closed {outcome.finished - kill_time:+.3f} s")  # fmt: skip

    recovery = _recovery_time(outcomes, start, killed_at)
    print(f"throughput back (3 s mean >= 80% of before) {recovery:.1f} s after the kill")

    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:

        def all_done() -> bool:
            states = [client.get(f"/v1/jobs/{job}").json()["state"] for job in jobs]
            return all(state in ("succeeded", "failed", "cancelled") for state in states)

        _wait_for(all_done, 120, "jobs did not finish within 120 s after the load")
        checked_items = 0
        for job in jobs:
            status = client.get(f"/v1/jobs/{job}").json()
            assert status["state"] == "succeeded", status
            assert status["progress"] == {"done": JOB_ITEMS, "total": JOB_ITEMS, "failed": 0}
            indexes: list[int] = []
            offset: int | None = 0
            while offset is not None:
                page = client.get(f"/v1/jobs/{job}", params={"offset": offset}).json()
                indexes += [result["index"] for result in page["results"]]
                assert all(result["ok"] for result in page["results"])
                offset = page["next_offset"]
            assert indexes == list(range(JOB_ITEMS))  # each item exactly once, none lost
            checked_items += len(indexes)
    with psycopg.connect(cluster["queue_url"]) as db:
        rows = db.execute(
            "SELECT job_id, count(*), count(DISTINCT idx) FROM job_results"
            " WHERE job_id = ANY(%s) GROUP BY job_id",
            (jobs,),
        ).fetchall()
        claims = db.execute("SELECT max(claims) FROM jobs WHERE id = ANY(%s)", (jobs,)).fetchone()
    assert sorted((count, distinct) for _, count, distinct in rows) == [
        (JOB_ITEMS, JOB_ITEMS)
    ] * len(jobs)
    print(f"jobs: {len(jobs)} accepted, {len(jobs)} succeeded; items checked: "
          f"{checked_items}, each exactly once (max claims of a job: {claims[0]})")  # fmt: skip

    after = _replica_nodes(cluster["names"])
    print("replicas by node after the loss:")
    for deployment, where in after.items():
        print(f"  {deployment:15s} {where}")
    assert not failed, f"{len(failed)} failed requests, first: {failed[0]}"
    assert len(cut) <= 1, (
        f"{len(cut)} answers cut short (one dying Ingress writes one at a time): {cut}"
    )
    assert all(o.finished >= kill_time for o in cut), f"cut short before the kill: {cut}"


def _recovery_time(outcomes: list[Outcome], start: float, killed_at: float) -> float:
    """Seconds after the kill until the 3 s mean of answered req/s is >= 80% of before.

    Counted by completion time: a request that stalls through the loss counts when it
    is finally answered, so a stall shows as a dip.
    """
    per_second = Counter(int(o.finished - start) for o in outcomes if o.status == 200)
    before = [per_second[s] for s in range(3, int(killed_at))]
    baseline = sum(before) / max(1, len(before))
    for second in range(int(killed_at), int(LOAD_S) - 2):
        window = [per_second[s] for s in range(second, second + 3)]
        if sum(window) / 3 >= 0.8 * baseline:
            return max(0.0, second - killed_at)
    return float("inf")
