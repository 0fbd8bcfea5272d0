"""The README's "Watch it", on a real Ray of its own: the Ray dashboard's Serve API, the
app's metrics in a real Prometheus, and the replicas' JSON logs.

One cluster for the module, started the way an operator would (``ray start --head`` with
the dashboard, then ``serve deploy`` of the YAML with ``logging_config: {encoding: JSON,
enable_access_log: true}``), before the session's cluster exists (``own_ray``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve_app.metrics import PROMETHEUS_PREFIX, SPECS
from tests.integration.conftest import (
    API_KEY,
    OTHER_KEY,
    SERVE_ENV,
    WEBHOOK_SECRET,
    free_port,
    load_test_config,
    pin_replicas,
    wait_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.own_ray]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEPLOYMENTS = {"Ingress", "Model", "FeatureFetcher", "JobWorker"}


@dataclass
class Cluster:
    base_url: str
    dashboard_url: str
    token: str
    session_dir: Path
    config: dict[str, Any]

    @property
    def dashboard_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid="], capture_output=True, text=True).stdout
    return [int(pid) for pid, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def _delete_serve_apps(dashboard_url: str, headers: dict[str, str]) -> None:
    """Serve's apps first, as an operator would: with them up, ``ray start --block`` took
    32 s to exit on SIGTERM (measured 2026-12-01); after this delete (3 s), 2 s."""
    with contextlib.suppress(httpx.HTTPError):
        httpx.delete(f"{dashboard_url}/api/serve/applications/", headers=headers, timeout=60)


def _stop_session(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``ray start --block`` (it stops its cluster), then kill what is left of
    the session it started (only processes of that session, by pid)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    deadline = time.monotonic() + 20
    while _session_pids(process.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _session_pids(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _wait_for(check: Any, timeout_s: float, what: str, every_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(every_s)
    raise TimeoutError(f"{what}: {last!r}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("watch")
    temp_dir = Path(f"/tmp/sa_watch_{os.getpid()}")  # short: Ray's socket paths are bounded
    config = load_test_config(workdir, free_port())
    config["logging_config"].update(encoding="JSON", enable_access_log=True)
    for deployment in config["applications"][0]["deployments"]:
        # One replica each: what is watched here does not depend on the count, and on 2
        # cores every replica started costs the run seconds of CPU (the chaos test keeps two).
        pin_replicas(config, deployment["name"], 1)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    dashboard_port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(SERVE_ENV)
    env["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] = "1"  # lines reach the files at once
    env["RAY_AUTH_MODE"] = "token"
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--metrics-export-port={free_port()}",
            f"--temp-dir={temp_dir}",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "ray_start.log").open("wb"),
        start_new_session=True,
    )
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    headers: dict[str, str] = {}
    try:
        token = subprocess.run(
            [str(BIN / "ray"), "get-auth-token"], env=env, capture_output=True, text=True
        ).stdout.strip()
        assert token, "ray get-auth-token printed nothing"
        headers = {"Authorization": f"Bearer {token}"}
        _wait_for(
            lambda: httpx.get(f"{dashboard_url}/api/version", headers=headers).is_success,
            120,
            "dashboard up",
        )
        subprocess.run(
            [str(BIN / "serve"), "deploy", str(config_path), "-a", dashboard_url],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        base_url = f"http://127.0.0.1:{config['http_options']['port']}"
        _wait_for(lambda: _app_running(dashboard_url, headers), 300, "app RUNNING", 2)
        wait_ready(base_url, timeout_s=120)
        yield Cluster(base_url, dashboard_url, token, temp_dir / "session_latest", config)
    finally:
        _delete_serve_apps(dashboard_url, headers)
        _stop_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _serve_applications(dashboard_url: str, headers: dict[str, str]) -> dict[str, Any]:
    response = httpx.get(f"{dashboard_url}/api/serve/applications/", headers=headers, timeout=10)
    response.raise_for_status()
    return response.json()


def _app_running(dashboard_url: str, headers: dict[str, str]) -> bool:
    apps = _serve_applications(dashboard_url, headers)["applications"]
    return apps.get("serve_app", {}).get("status") == "RUNNING"


def _drive(cluster: Cluster) -> dict[str, str]:
    """Single predictions, a batch, an unknown entity and a job; returns request ids."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    ids: dict[str, str] = {}
    with httpx.Client(base_url=cluster.base_url, headers=auth, timeout=30) as client:

        def single(n: int) -> None:
            rid = f"watch-single-{n}"
            ids[rid] = "/v1/predict"
            body = {"entity_id": f"E{1000 + n:07d}"}
            for _ in range(20):  # as a client would: 503 + Retry-After means retry
                response = client.post("/v1/predict", json=body, headers={"X-Request-ID": rid})
                if response.status_code != 503:
                    break
                time.sleep(float(response.headers.get("Retry-After", "1")))
            assert response.status_code == 200, response.text

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(single, range(16)))
        response = client.post(
            "/v1/predict/batch",
            json={"items": [{"entity_id": f"E{2000 + n:07d}"} for n in range(20)]},
            headers={"X-Request-ID": "watch-batch-1"},
        )
        assert response.status_code == 200
        ids["watch-batch-1"] = "/v1/predict/batch"
        for _ in range(6):  # a prediction-cache miss, then hits (on any Ingress replica)
            client.post("/v1/predict", json={"entity_id": "E0000042"})
        missing = client.post("/v1/predict", json={"entity_id": "NOPE"})
        assert missing.status_code == 404
        job = client.post("/v1/jobs", json={"items": [{"entity_id": "E0000001"}] * 3})
        assert job.status_code == 202
        _wait_for(
            lambda: client.get(f"/v1/jobs/{job.json()['id']}").json()["state"] == "succeeded",
            60,
            "job done",
            0.5,
        )
    return ids


@pytest.fixture(scope="module")
def driven(cluster: Cluster) -> dict[str, str]:
    return _drive(cluster)


# ---- the Ray dashboard ---------------------------------------------------------------


def test_dashboard_serve_api_shows_four_healthy_deployments(cluster: Cluster) -> None:
    assert httpx.get(f"{cluster.dashboard_url}/api/serve/applications/").status_code in (
        401,
        403,
    ), "the dashboard must ask for the token"
    app = _serve_applications(cluster.dashboard_url, cluster.dashboard_headers)["applications"][
        "serve_app"
    ]
    assert app["status"] == "RUNNING"
    deployments = app["deployments"]
    assert set(deployments) == DEPLOYMENTS
    wanted = {
        d["name"]: d["autoscaling_config"]["min_replicas"]
        for d in cluster.config["applications"][0]["deployments"]
    }
    for name, deployment in deployments.items():
        assert deployment["status"] == "HEALTHY", (name, deployment["message"])
        running = [r for r in deployment["replicas"] if r["state"] == "RUNNING"]
        assert len(running) >= wanted[name], (name, deployment["replicas"])


# ---- Prometheus --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus (Debian's package) scraping Ray's service-discovery file."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    assert Path(binary).exists(), "prometheus is not installed: apt-get install prometheus"
    workdir = tmp_path_factory.mktemp("prometheus")
    sd_file = cluster.session_dir / "prom_metrics_service_discovery.json"
    _wait_for(sd_file.exists, 60, f"Ray's service discovery file {sd_file}")
    config = {
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "scrape_configs": [
            {
                "job_name": "ray",
                "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "2s"}],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "prometheus.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: httpx.get(f"{url}/-/ready").is_success, 60, "prometheus ready", 0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    response.raise_for_status()
    return response.json()["data"]["result"]


def _value(url: str, promql: str) -> float:
    result = _query(url, promql)
    return sum(float(series["value"][1]) for series in result) if result else 0.0


# Each metric, the PromQL that must show it after the driven traffic, and what it must be.
EXPECTED: list[tuple[str, str, float]] = [
    ("serve_app_requests_total", 'sum({m}{{route="/v1/predict",status="200"}})', 17),
    ("serve_app_requests_total", 'sum({m}{{route="/v1/predict",status="404"}})', 1),
    ("serve_app_requests_total", 'sum({m}{{route="/v1/jobs/{{job_id}}"}})', 1),
    ("serve_app_request_duration_seconds", 'sum({m}_count{{route="/v1/predict/batch"}})', 1),
    ("serve_app_request_items", 'sum({m}_sum{{route="/v1/predict/batch"}})', 20),
    ("serve_app_prediction_cache_total", 'sum({m}{{result="hit"}})', 1),
    ("serve_app_prediction_cache_total", 'sum({m}{{result="miss"}})', 18),
    ("serve_app_coalesced_batch_items", "sum({m}_count)", 1),
    ("serve_app_job_items_submitted_total", "sum({m})", 3),
    ("serve_app_model_batch_items", "sum({m}_sum)", 20),
    ("serve_app_model_batch_requests", "sum({m}_count)", 1),
    ("serve_app_model_predict_seconds", "sum({m}_count)", 1),
    ("serve_app_feature_cache_total", 'sum({m}{{result="miss"}})', 20),
    ("serve_app_feature_lookups_total", 'sum({m}{{outcome="ok"}})', 1),
    ("serve_app_feature_lookup_seconds", "sum({m}_count)", 1),
    ("serve_app_job_queue_depth", "max({m})", 0),
    ("serve_app_job_queue_oldest_age_seconds", "max({m})", 0),  # exported, 0 once claimed
    ("serve_app_job_queue_wait_seconds", "sum({m}_count)", 1),
    ("serve_app_job_items_total", 'sum({m}{{outcome="succeeded"}})', 3),
    ("serve_app_jobs_finished_total", 'sum({m}{{state="succeeded"}})', 1),
    ("serve_app_job_duration_seconds", "sum({m}_count)", 1),
]
# Not driven here: shed requests (test_operations), degraded items (a store outage),
# webhook attempts (test_jobs); they must still be exported (checked below by name).
NOT_DRIVEN = {
    "serve_app_shed_requests_total",
    "serve_app_degraded_items_total",
    "serve_app_webhook_attempts_total",
}


def test_every_metric_reaches_prometheus(
    prometheus: str, driven: dict[str, str], cluster: Cluster
) -> None:
    assert {name for name, _, _ in EXPECTED} | NOT_DRIVEN == set(SPECS)
    queries = {template.format(m=PROMETHEUS_PREFIX + name): n for name, template, n in EXPECTED}

    def missing() -> dict[str, float]:
        return {
            promql: _value(prometheus, promql)
            for promql, at_least in queries.items()
            if not _query(prometheus, promql) or _value(prometheus, promql) < at_least
        }

    deadline = time.monotonic() + 90  # Ray reports every 10 s; Prometheus scrapes every 2 s
    while missing() and time.monotonic() < deadline:
        time.sleep(2)
    assert missing() == {}, "PromQL results below what was driven (query: value)"
    # Deployment and replica come from Serve; no label carries an entity id or a key.
    series = _query(prometheus, '{__name__=~"ray_serve_app_.*"}')
    for labels in (s["metric"] for s in series):
        assert "deployment" in labels, labels
        assert not any(API_KEY in v or "E000" in v for v in labels.values()), labels
    routes = {s["metric"].get("route") for s in series} - {None}
    assert routes <= {
        "/v1/predict",
        "/v1/predict/batch",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/readyz",
        "/healthz",
        "unmatched",
    }, routes


# ---- logs --------------------------------------------------------------------------------


def _serve_log_lines(cluster: Cluster) -> dict[str, list[dict[str, Any]]]:
    """Deployment name -> JSON records of its replicas' log files."""
    lines: dict[str, list[dict[str, Any]]] = {}
    for path in (cluster.session_dir / "logs" / "serve").glob("replica_serve_app_*.log"):
        deployment = path.name.removeprefix("replica_serve_app_").split("_")[0]
        for line in path.read_text().splitlines():
            lines.setdefault(deployment, []).append(json.loads(line))
    return lines


def test_json_logs_carry_the_request_id_in_every_deployment(
    cluster: Cluster, driven: dict[str, str]
) -> None:
    def all_there() -> dict[str, list[dict[str, Any]]] | None:
        logs = _serve_log_lines(cluster)
        found = {
            (deployment, rid)
            for deployment, records in logs.items()
            for record in records
            for rid in str(record.get("request_id", "")).split(",")
        }
        wanted = {(d, rid) for rid in driven for d in ("Ingress", "Model", "FeatureFetcher")}
        return logs if wanted <= found else None

    logs = _wait_for(all_there, 30, "every request id in every deployment's log")
    ingress = [r for r in logs["Ingress"] if r.get("request_id") in driven]
    for record in ingress:  # the access line: route, status and duration
        assert record["route"] == driven[record["request_id"]], record
        _method, _path, status, duration = record["message"].split()
        assert status in ("200", "503") and duration.endswith("ms"), record
        assert record["deployment"].endswith("Ingress") and record["levelname"] == "INFO"


def test_no_secret_in_any_log(cluster: Cluster, driven: dict[str, str]) -> None:
    secrets = [API_KEY, OTHER_KEY, WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_")]
    scanned = 0
    for path in (cluster.session_dir / "logs").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            scanned += 1
            for secret in secrets:
                assert secret.encode() not in data, f"a secret is in {path}"
    assert scanned > 10


def test_serve_page_screenshot_shows_the_deployments(cluster: Cluster, tmp_path: Path) -> None:
    """The README's screenshot, taken by the repo's script with headless Chromium.

    ``UPDATE_SCREENSHOT=1`` copies it to docs/ray-dashboard-serve.png.
    """
    from tests.screenshots.serve_page import screenshot

    out = tmp_path / "serve.png"
    text = screenshot(cluster.dashboard_url, cluster.token, out, settle_s=10)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert "serve_app" in text, text[:1000]
    missing = {name for name in DEPLOYMENTS if name not in text}
    assert not missing, (missing, text[:1500])  # the app's row lists them, expanded
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copy(out, ROOT / "docs" / "ray-dashboard-serve.png")
