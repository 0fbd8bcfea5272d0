"""Locust users for serve_app: single predictions, batches and jobs.

Every response is checked (status and body), not just counted. Entity ids follow a
Zipf-like law over the real id space (a few hot entities, a long tail), so the caches see
what they would see in production. Settings come from the environment:

* ``SERVE_APP_API_KEY`` (required): the bearer key
* ``TASK_WEIGHTS`` (``single=8,batch=2,job=0``): how often each task runs
* ``ZIPF_A`` (``1.1``), ``N_ENTITIES`` (``100000``), ``BATCH_SIZE`` (``32``), ``JOB_SIZE`` (``200``)
* ``LOAD_SHAPE`` / ``SHAPE_SCALE``: see ``loadtests/shapes.py``

Run: ``locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000``
"""

from __future__ import annotations

import os
from typing import Any

import locust.stats
import numpy as np
from locust import FastHttpUser, constant_throughput, task

from loadtests.shapes import StagedShape  # noqa: F401 (locust runs the shape it finds here)

API_KEY = os.environ.get("SERVE_APP_API_KEY", "")
N_ENTITIES = int(os.environ.get("N_ENTITIES", "100000"))
BATCH_SIZE = int(os.environ.get("BATCH_SIZE", "32"))
JOB_SIZE = int(os.environ.get("JOB_SIZE", "200"))
ZIPF_A = float(os.environ.get("ZIPF_A", "1.1"))
# The stats history (--csv) reaches the file every second, not every 5 s: the load-test
# runner reads it while locust runs to show progress (loadtests/progress.py).
locust.stats.CSV_STATS_FLUSH_INTERVAL_SEC = 1
WEIGHTS = dict(
    (name, int(weight))
    for name, weight in (
        pair.split("=")
        for pair in os.environ.get("TASK_WEIGHTS", "single=8,batch=2,job=0").split(",")
    )
)


class ZipfIds:
    """Entity ids with Zipf-distributed popularity over a shuffled id space."""

    def __init__(self, n: int, a: float, seed: int) -> None:
        self.a = a
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(n)  # the hot ids are spread over the space

    def draw(self, k: int) -> list[str]:
        ranks = np.empty(0, dtype=np.int64)
        while len(ranks) < k:  # drop the far tail beyond the id space and redraw
            more = self.rng.zipf(self.a, k) - 1
            ranks = np.concatenate([ranks, more[more < len(self.order)]])
        return [f"E{self.order[r]:07d}" for r in ranks[:k]]


class ScoringUser(FastHttpUser):
    """One client of the service; each user waits ~50 ms between its requests."""

    wait_time = constant_throughput(20)

    def on_start(self) -> None:
        self.ids = ZipfIds(N_ENTITIES, ZIPF_A, seed=id(self) % 2**32)
        self.headers = {"Authorization": f"Bearer {API_KEY}"}

    def _post(self, path: str, body: dict[str, Any], name: str, expect: int) -> Any:
        with self.client.post(
            path, json=body, headers=self.headers, name=name, catch_response=True
        ) as response:
            if response.status_code != expect:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return None
            try:
                payload = response.json()
            except ValueError:
                response.failure("response is not JSON")
                return None
            return response, payload

    @task(WEIGHTS.get("single", 0))
    def single(self) -> None:
        entity = self.ids.draw(1)[0]
        got = self._post("/v1/predict", {"entity_id": entity}, "/v1/predict", 200)
        if got:
            response, body = got
            if body.get("entity_id") != entity or not 0 <= body.get("score", -1) <= 1:
                response.failure(f"bad answer: {body}")
            else:
                response.success()

    @task(WEIGHTS.get("batch", 0))
    def batch(self) -> None:
        entities = self.ids.draw(BATCH_SIZE)
        items = [{"entity_id": e} for e in entities]
        got = self._post("/v1/predict/batch", {"items": items}, "/v1/predict/batch", 200)
        if got:
            response, body = got
            results = body.get("results", [])
            ok = len(results) == len(items) and all(
                r["ok"] and r["entity_id"] == e for r, e in zip(results, entities, strict=True)
            )
            response.success() if ok else response.failure(f"bad batch: {str(body)[:200]}")

    @task(WEIGHTS.get("job", 0))
    def job(self) -> None:
        items = [{"entity_id": e} for e in self.ids.draw(JOB_SIZE)]
        got = self._post("/v1/jobs", {"items": items}, "/v1/jobs", 202)
        if got:
            response, body = got
            ok = body.get("id") and body.get("progress", {}).get("total") == JOB_SIZE
            response.success() if ok else response.failure(f"bad job: {body}")
