"""Attacks of a key holder, on a real Ray: bad callback URLs, huge offsets, a locked queue,
and job bodies of the maximum size posted at once (issue 11).
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.api.job_input import WORKER_PROCESSES
from tests.integration.conftest import API_KEY, OTHER_KEY, ServeApp

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("callback_url", "kind"),
    [
        ("http://93.184.216.34:99999/x", "bad_callback_url"),  # was a 500
        ("http://" + "a" * 64 + ".example.com/x", "bad_callback_url"),  # crashed deliveries
        ("http://127.0.0.1:8265/x", "callback_host_not_allowed"),  # allowed host, other port
        ("http://100.100.100.200/latest/meta-data", "callback_host_not_allowed"),  # CGNAT
        ("http://[2002:7f00:1::]/x", "callback_host_not_allowed"),  # 6to4 of loopback
        ("https://93.184.216.34:8443/x", "port_not_allowed"),
    ],
)
def test_bad_callback_urls_are_422_at_submission(
    serve_app: ServeApp, callback_url: str, kind: str
) -> None:
    body = {"items": [{"entity_id": "E0000001"}], "callback_url": callback_url}
    response = serve_app.client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["type"] == kind


def test_offset_and_limit_are_bounded(serve_app: ServeApp) -> None:
    job = serve_app.client.post("/v1/jobs", json={"items": [{"entity_id": "E0000001"}]}).json()
    for params in ({"offset": 9223372036854775808}, {"offset": -1}, {"limit": 10**12}):
        response = serve_app.client.get(f"/v1/jobs/{job['id']}", params=params)
        assert response.status_code == 422, (params, response.text)
        assert response.json()["error"]["code"] == "invalid_input"


def test_a_locked_job_queue_answers_503_with_retry_after(serve_app: ServeApp) -> None:
    holder = sqlite3.connect(serve_app.workdir / "jobs.db", isolation_level=None, timeout=30)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        response = serve_app.client.post("/v1/jobs", json={"items": [{"entity_id": "E1"}]})
        elapsed = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "queue_busy"
    assert int(response.headers["Retry-After"]) >= 1 and elapsed < 15
    after = serve_app.client.post("/v1/jobs", json={"items": [{"entity_id": "E1"}]})
    assert after.status_code == 202


# ---- job bodies of the maximum size, eight at once ------------------------------------


def max_size_body(max_bytes: int, max_items: int) -> bytes:
    """``max_items`` invalid items, as close to ``max_bytes`` as they fit."""
    template = {"entity_id": "E0000001", "context": {"amount": -1, "hour": 99, "channel": ""}}
    envelope = len(json.dumps({"items": []}))
    per_item = (max_bytes - envelope) // max_items - len(json.dumps(template)) - 2
    template["context"]["channel"] = "x" * max(per_item, 0)
    body = json.dumps({"items": [template] * max_items}).encode()
    assert len(body) <= max_bytes, len(body)
    return body


def ingress_pids() -> list[int]:
    """Ingress replica processes, by the title Ray gives them (ray::ServeReplica:APP:Ingress)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if title.startswith("ray::ServeReplica:serve_app:Ingress") and _ours(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def _ours(pid: int) -> bool:
    """Started by this test session (Ray's processes descend from it), not another Ray."""
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and every process it started (its job-creation workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        total += int(status.split("VmRSS:")[1].split()[0]) * 1024
    return total


def test_eight_max_size_job_posts_keep_healthz_fast_and_memory_bounded(
    serve_app: ServeApp,
) -> None:
    jobs = serve_app.settings.jobs
    body = max_size_body(jobs.max_body_bytes, jobs.max_items)
    pids = ingress_pids()
    assert pids, "no Ingress replica found"
    baseline = {pid: rss_bytes(pid) for pid in pids}
    peak = dict(baseline)
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        nonlocal peak
        with httpx.Client(base_url=serve_app.base_url, timeout=10) as client:
            while not stop.is_set():
                started = time.perf_counter()
                client.get("/healthz").raise_for_status()
                latencies.append(time.perf_counter() - started)
                for pid in pids:
                    peak[pid] = max(peak[pid], rss_bytes(pid))
                time.sleep(0.02)

    def post(key: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        return httpx.post(
            f"{serve_app.base_url}/v1/jobs", content=body, headers=headers, timeout=120
        )

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    time.sleep(0.5)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, [API_KEY, OTHER_KEY] * 4))
    time.sleep(1.0)
    stop.set()
    prober.join(timeout=15)

    statuses = [r.status_code for r in responses]
    p99 = statistics.quantiles(latencies, n=100)[98]
    # per Ingress replica (each with its job-parsing worker processes): the bound is for one
    # replica's process tree, whatever the replica count
    growths = {pid: peak[pid] - baseline[pid] for pid in pids}
    growth = max(growths.values())
    print(
        f"statuses={statuses} ingress replicas={len(pids)} healthz n={len(latencies)} "
        f"p99={p99 * 1000:.0f} ms max={max(latencies) * 1000:.0f} ms RSS growth per "
        f"ingress replica={[round(g / 2**20) for g in growths.values()]} MiB"
    )
    assert set(statuses) <= {202, 429, 503}, [r.text[:300] for r in responses]
    # Per replica one large body parses at a time (WORKER_PROCESSES) and a key has a few
    # creation slots; the posts arrive together and a parse takes seconds, so most are
    # refused at once (a replica may take a second one if its first ended meanwhile).
    # Without those limits all eight were accepted.
    accepted = statuses.count(202)
    assert 1 <= accepted <= min(len(statuses) - 1, 2 * WORKER_PROCESSES * len(pids)), statuses
    for response in responses:
        if response.status_code == 202:
            assert response.json()["progress"]["failed"] == jobs.max_items
        else:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"]["code"] in {"overloaded", "too_many_requests"}
    # A bound that catches a 10x regression, not a slow machine: measured p99 36-64 ms
    # (2026-11-30), 213 ms in a CI run of 2026-12-01 on a machine twice as slow.
    assert p99 < 2.0, f"/healthz p99 {p99 * 1000:.0f} ms during the posts"
    assert growth < 2**30, f"an Ingress replica grew by {growth / 2**20:.0f} MiB"


def test_a_job_result_page_of_refused_items_reads_back(serve_app: ServeApp) -> None:
    bad: list[Any] = [{"entity_id": 5}] * 3
    job = serve_app.client.post("/v1/jobs", json={"items": bad}).json()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = serve_app.client.get(f"/v1/jobs/{job['id']}").json()
        if state["state"] == "succeeded":
            break
        time.sleep(0.3)
    assert [r["error"]["code"] for r in state["results"]] == ["invalid_input"] * 3
