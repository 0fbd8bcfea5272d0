"""Chaos: SIGKILL one replica of each deployment in turn, under steady load and a job.

The default config keeps three Ingress replicas and two of Model and FeatureFetcher.
Predictions are idempotent, so a call whose Model replica died (or whose Model lost its
FeatureFetcher) is sent once more by the ingress, and HAProxy resends a request whose
ingress replica died before answering (``RAY_SERVE_HAPROXY_RETRY_ON`` in
``configs/serve.env``). A killed JobWorker's job is claimed again when its lease expires
(3 s here) and only its unfinished items run.

Asserted: zero failed predictions through all four kills; the job succeeds with every
item exactly once. HAProxy can resend a request only if it holds the whole request, which
``option http-buffer-request`` (``configs/serve.env``) ensures: before it, 1-3 requests
of ~2,000 whose body came in a second packet were closed unanswered after the Ingress
kill (README, "Replicas that die").

One case no proxy can resend: an answer whose headers had left the Ingress replica when
it died, its body not yet (uvicorn writes them apart). HAProxy has already passed the
headers on, so the client sees a 200 cut short (CI of 2026-12-07: 1 of 3,499, "received
0 bytes, expected 109"). The client retries such a call once, as the README tells clients
to do for idempotent calls; it is counted apart, allowed only after the Ingress kill and
at most once, and the retry must succeed. A request that got no answer at all is still a
failure: that is the case HAProxy's resend covers.

The recovery times are printed (``-s``), not asserted, apart from a generous bound that
catches a stall (a 10x regression), not a slow machine.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest
import yaml

from loadtests import launch
from tests.integration.conftest import APP_NAME, ROOT, ServeApp, cut_short, deployment_entry

pytestmark = [pytest.mark.integration]

CLIENT_THREADS = 6
PAUSE_S = 0.01  # between one client's requests: steady, well below capacity
JOB_ITEMS = 20_000
KILL_AT_ITEMS = 1_000  # done when the JobWorker is killed: early, the job ran 3,300 items/s
TERMINAL = ("succeeded", "failed", "cancelled")
MAX_CUT_SHORT = 1  # per run, after the Ingress kill only (module docstring)
STALL_BOUND_S = 45.0  # generous: a healthy recovery takes 0-8 s here, twice that in CI
MODEL_REPLICAS = deployment_entry(  # as configs/config.yaml runs it (the session runs one)
    yaml.safe_load((ROOT / "configs" / "config.yaml").read_text()), "Model"
)["autoscaling_config"]["min_replicas"]


@dataclass
class Load:
    """Steady single predictions from a thread pool, every outcome recorded."""

    base_url: str
    headers: dict[str, str]
    stop: threading.Event = field(default_factory=threading.Event)
    done: list[tuple[float, int]] = field(default_factory=list)  # (end time, status)
    failures: list[str] = field(default_factory=list)
    cut_short: list[str] = field(default_factory=list)  # answers cut short, then retried
    phase: str = "warm-up"  # the last fault injected, to tell which one a failure follows

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=30) as client:
            while not self.stop.is_set():
                body = {"entity_id": f"E{rng.randrange(100_000):07d}"}
                status = self.predict(client, body, retry_cut_short=True)
                self.done.append((time.monotonic(), status))
                time.sleep(PAUSE_S)

    def predict(self, client: httpx.Client, body: dict, retry_cut_short: bool) -> int:
        """One prediction's status (0: no answer), its failure recorded; an answer cut
        short is retried once (module docstring)."""
        try:
            response = client.post("/v1/predict", json=body)
        except httpx.HTTPError as exc:
            if retry_cut_short and cut_short(exc):
                self.cut_short.append(f"after {self.phase}: {exc!r}")
                return self.predict(client, body, retry_cut_short=False)
            self.failures.append(f"after {self.phase}: {exc!r}")
            return 0
        if response.status_code != 200:
            self.failures.append(
                f"after {self.phase}: {response.status_code} {response.text[:200]}"
            )
        return response.status_code

    def rate(self, start: float, end: float) -> float:
        return sum(1 for t, s in list(self.done) if start <= t < end and s == 200) / (end - start)


@contextmanager
def steady_load(app: ServeApp) -> Iterator[Load]:
    load = Load(app.base_url, app.auth)
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        futures = [pool.submit(load.client, seed) for seed in range(CLIENT_THREADS)]
        try:
            yield load
        finally:
            load.stop.set()
            for future in futures:
                future.result()


def replica_pids(deployment: str) -> list[int]:
    return launch.replica_pids(APP_NAME, deployment)


def running_replicas(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications[APP_NAME]
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


def recover_after_kill(load: Load, deployment: str, baseline: float) -> dict[str, float]:
    """SIGKILL one replica of ``deployment``; seconds until it is replaced and until the
    goodput is back to 90 % of ``baseline`` (1 s windows, for 2 s in a row)."""
    want = running_replicas(deployment)
    pid = replica_pids(deployment)[0]
    load.phase = f"SIGKILL {deployment}"
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    replaced = throughput_back = None
    while time.monotonic() - killed < STALL_BOUND_S:
        time.sleep(0.25)
        now = time.monotonic()
        if replaced is None and _replaced(deployment, pid, want):
            replaced = now - killed
        if throughput_back is None:
            for start in _windows(killed, now - 2.0):
                if all(load.rate(s, s + 1) >= 0.9 * baseline for s in (start, start + 1)):
                    throughput_back = start - killed
                    break
        if replaced is not None and throughput_back is not None and now - killed > 3:
            break
    assert replaced is not None, f"{deployment} replica not replaced in {STALL_BOUND_S}s"
    assert throughput_back is not None, f"throughput not back in {STALL_BOUND_S}s"
    worst_gap = _worst_gap(load, killed, time.monotonic())
    return {"replaced_s": replaced, "throughput_back_s": throughput_back, "worst_gap_s": worst_gap}


def _replaced(deployment: str, killed_pid: int, want: int) -> bool:
    pids = replica_pids(deployment)
    return killed_pid not in pids and len(pids) >= want and running_replicas(deployment) >= want


def _windows(start: float, end: float) -> Iterator[float]:
    t = start
    while t <= end:
        yield t
        t += 0.25


def _worst_gap(load: Load, start: float, end: float) -> float:
    """Longest time without any successful answer: the stall clients saw."""
    times = sorted(t for t, s in list(load.done) if start <= t < end and s == 200)
    edges = [start, *times, end]
    return max(b - a for a, b in itertools.pairwise(edges))


def job_progress(app: ServeApp, job_id: str) -> dict:
    response = app.client.get(f"/v1/jobs/{job_id}", params={"limit": 1})
    response.raise_for_status()
    return response.json()


def kill_job_worker_mid_job(app: ServeApp, job_id: str) -> dict[str, float]:
    """SIGKILL every JobWorker replica early in the job; seconds until the job moves again.

    ``before`` is read once the killed processes are gone, so any later progress is the
    replacement's. Resumed means more items done, or the job finished (the replacement may
    need only a chunk or two).
    """
    deadline = time.monotonic() + 60
    while job_progress(app, job_id)["progress"]["done"] < KILL_AT_ITEMS:
        assert time.monotonic() < deadline, "job made no progress"
        time.sleep(0.05)
    killed = time.monotonic()
    pids = replica_pids("JobWorker")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() - killed < 10, f"JobWorker {pids} still alive after SIGKILL"
        time.sleep(0.01)
    job = job_progress(app, job_id)
    before = job["progress"]["done"]
    assert job["state"] not in TERMINAL, f"the job ended before the kill: make it bigger: {job}"
    resumed = None
    while time.monotonic() - killed < STALL_BOUND_S:
        job = job_progress(app, job_id)
        if job["progress"]["done"] > before or job["state"] in TERMINAL:
            resumed = time.monotonic() - killed
            break
        time.sleep(0.1)
    assert resumed is not None, f"the job did not resume within {STALL_BOUND_S}s: {job}"
    return {"done_at_kill": before, "resumed_s": resumed}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by its raylet) has exited too.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def all_results(app: ServeApp, job_id: str) -> list[dict]:
    results, offset = [], 0
    while offset is not None:
        page = app.client.get(f"/v1/jobs/{job_id}", params={"offset": offset, "limit": 1000})
        page.raise_for_status()
        body = page.json()
        results.extend(body["results"])
        offset = body["next_offset"]
    return results


def test_killing_any_one_replica_fails_no_prediction_and_loses_no_job_item(
    serve_app: ServeApp,
) -> None:
    with serve_app.replicas("Model", MODEL_REPLICAS):  # the session runs one
        _kill_one_of_each(serve_app)


def _kill_one_of_each(serve_app: ServeApp) -> None:
    items = [
        {"entity_id": f"E{i % 100_000:07d}", "context": {"amount": i}} for i in range(JOB_ITEMS)
    ]
    report: dict[str, dict[str, float]] = {}
    with steady_load(serve_app) as load:
        time.sleep(4)  # warm: a baseline rate before the first kill
        now = time.monotonic()
        baseline = load.rate(now - 3, now)
        assert baseline > 0, load.failures[:5]
        # Created after the warm-up: created before it, the job was 90 % done by the kill
        # (CI of 2026-12-04), and a replacement that ran the last chunk looked like a stall.
        created = serve_app.client.post("/v1/jobs", json={"items": items}, timeout=60)
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        report["JobWorker"] = kill_job_worker_mid_job(serve_app, job_id)
        # The next baseline must see the resumed job's load too: taken over the JobWorker's
        # outage alone (the machine free of the job), it was a rate the predictions could
        # not reach again until the job ended (CI of 2026-12-01: "not back in 30 s").
        time.sleep(3)
        for deployment in ("Model", "FeatureFetcher", "Ingress"):
            now = time.monotonic()
            baseline = load.rate(now - 3, now)
            report[deployment] = recover_after_kill(load, deployment, baseline)
            report[deployment]["baseline_req_s"] = baseline
        time.sleep(1)
    print(
        f"\nchaos: {len(load.done)} predictions, {len(load.failures)} failed, "
        f"{len(load.cut_short)} answers cut short and retried {load.cut_short}"
    )
    for deployment, figures in report.items():
        print(f"  SIGKILL {deployment:15} " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))

    assert load.failures == [], load.failures[:10]
    assert len(load.cut_short) <= MAX_CUT_SHORT, load.cut_short
    assert all(c.startswith("after SIGKILL Ingress:") for c in load.cut_short), load.cut_short

    deadline = time.monotonic() + 120
    while (job := job_progress(serve_app, job_id))["state"] not in TERMINAL:
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["state"] == "succeeded", job
    assert job["progress"] == {"done": JOB_ITEMS, "total": JOB_ITEMS, "failed": 0}
    indexes = [result["index"] for result in all_results(serve_app, job_id)]
    assert sorted(indexes) == list(range(JOB_ITEMS))  # every item exactly once
