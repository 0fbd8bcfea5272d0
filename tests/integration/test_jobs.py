"""Queued jobs end to end: real Ray, real SQLite queue, real webhook receiver on loopback."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from loadtests import launch
from serve_app.api.auth import parse_entry
from serve_app.jobs.webhooks import owner_secret
from tests.integration.conftest import (
    API_KEY,
    APP_NAME,
    OTHER_KEY,
    WEBHOOK_SECRET,
    ServeApp,
    deploy,
    free_port,
    wait_ready,
)

pytestmark = pytest.mark.integration


class Receiver:
    """A webhook receiver: a real HTTP server that verifies Standard Webhooks signatures."""

    def __init__(self, port: int, key: str = API_KEY) -> None:
        self.port = port
        # each API key's webhooks are signed with that key's own secret
        self.secret = owner_secret(WEBHOOK_SECRET, parse_entry(key).owner)
        self.url = f"http://127.0.0.1:{port}/hook"
        self.deliveries: list[dict[str, Any]] = []
        self.rejected = 0
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    payload = Webhook(receiver.secret).verify(body, dict(self.headers.items()))
                except Exception:
                    receiver.rejected += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                receiver.deliveries.append({"id": self.headers["webhook-id"], "payload": payload})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver(free_port())
    hook.start()
    yield hook
    hook.stop()


def items(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"entity_id": f"E{(start + i) % 100_000:07d}"} for i in range(n)]


def submit(app: ServeApp, body: dict[str, Any], **headers: str) -> httpx.Response:
    return app.client.post("/v1/jobs", json=body, headers=headers)


def wait_for(app: ServeApp, job_id: str, predicate: Any, timeout_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = app.client.get(f"/v1/jobs/{job_id}")
        if response.status_code == 200 and predicate(response.json()):
            return response.json()
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id}: {app.client.get(f'/v1/jobs/{job_id}').text[:500]}")


def all_results(app: ServeApp, job_id: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = app.client.get(f"/v1/jobs/{job_id}", params={"offset": offset}).json()
        results.extend(page["results"])
        offset = page["next_offset"]
    return results


def finished(job: dict[str, Any]) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


def test_job_runs_and_signed_webhook_arrives_once(serve_app: ServeApp, receiver: Receiver) -> None:
    body = {
        "items": [*items(300, 1_000), {"entity_id": 5}, {"entity_id": "E9999999"}],
        "callback_url": receiver.url,
    }
    response = submit(serve_app, body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert (
        job["state"] in ("queued", "running") and response.headers["Location"] == job["status_url"]
    )
    done = wait_for(serve_app, job["id"], lambda j: j["webhook"]["state"] == "delivered")
    assert done["state"] == "succeeded"
    assert done["progress"] == {"done": 302, "total": 302, "failed": 2}
    results = all_results(serve_app, job["id"])
    assert [r["index"] for r in results] == list(range(302))
    assert results[300]["error"]["code"] == "invalid_input" and results[300]["ok"] is False
    assert results[301]["error"]["code"] == "unknown_entity"
    assert results[301]["entity_id"] == "E9999999"
    assert all(r["ok"] for r in results[:300])
    assert all(0 <= r["score"] <= 1 for r in results[:300])
    single = serve_app.client.post("/v1/predict", json={"entity_id": "E0001000"}).json()
    assert results[0]["score"] == single["score"]
    time.sleep(1.0)  # a duplicate delivery would arrive within the retry backoff
    assert receiver.rejected == 0
    assert [d["id"] for d in receiver.deliveries] == [f"msg_{job['id']}"]
    payload = receiver.deliveries[0]["payload"]
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job["id"]


def test_webhook_retries_until_receiver_comes_up(serve_app: ServeApp) -> None:
    late = Receiver(free_port())  # nothing listens there yet: connection refused
    job = submit(serve_app, {"items": items(20), "callback_url": late.url}).json()
    wait_for(serve_app, job["id"], lambda j: j["webhook"]["attempts"] >= 1)
    late.start()
    try:
        done = wait_for(serve_app, job["id"], lambda j: j["webhook"]["state"] == "delivered")
        assert done["webhook"]["attempts"] >= 2
        assert [d["id"] for d in late.deliveries] == [f"msg_{job['id']}"]
    finally:
        late.stop()


def test_webhook_to_a_receiver_that_never_comes_up_is_dead(serve_app: ServeApp) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"
    job = submit(serve_app, {"items": items(5), "callback_url": url}).json()
    done = wait_for(serve_app, job["id"], lambda j: j["webhook"]["state"] == "dead", 60)
    assert done["state"] == "succeeded"
    assert done["webhook"]["attempts"] == 4 and done["webhook"]["last_error"]


def test_idempotency_key(serve_app: ServeApp) -> None:
    body = {"items": items(3, 2_000)}
    first = submit(serve_app, body, **{"Idempotency-Key": "order-42"})
    again = submit(serve_app, body, **{"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = submit(serve_app, {"items": items(4, 2_000)}, **{"Idempotency-Key": "order-42"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "conflict"
    fresh = submit(serve_app, body, **{"Idempotency-Key": "order-43"})
    assert fresh.json()["id"] != first.json()["id"]
    # An empty key (a template's unset variable) is no key for all such jobs to share.
    for bad in (b"", b"x" * 129, b"ord\xe9r-42"):
        refused = serve_app.client.post("/v1/jobs", json=body, headers={"Idempotency-Key": bad})
        assert refused.status_code == 422, (bad, refused.text)
        assert "idempotency-key" in str(refused.json()["error"]["details"]).lower()
    assert submit(serve_app, body, **{"Idempotency-Key": "order 44"}).status_code == 202


def test_only_the_creating_key_sees_a_job(serve_app: ServeApp) -> None:
    job = submit(serve_app, {"items": items(2)}).json()
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert httpx.get(f"{serve_app.base_url}/v1/jobs/{job['id']}", headers=other).status_code == 404
    cancel = httpx.post(f"{serve_app.base_url}/v1/jobs/{job['id']}/cancel", headers=other)
    assert cancel.status_code == 404
    assert httpx.get(f"{serve_app.base_url}/v1/jobs/{job['id']}").status_code == 401


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        ({"items": []}, 422, "empty_batch"),
        ({"items": "E1"}, 422, "list_type"),
        (
            {"items": [{"entity_id": "E1"}], "callback_url": "ftp://127.0.0.1/x"},
            422,
            "bad_callback_url",
        ),
        (
            {"items": [{"entity_id": "E1"}], "callback_url": "http://10.1.2.3/x"},
            422,
            "callback_host_not_allowed",
        ),
        (
            {"items": [{"entity_id": "E1"}], "callback_url": "http://[::1]:9/x"},
            422,
            "callback_host_not_allowed",
        ),
        ({"items": [{"entity_id": "E1"}], "extra": 1}, 422, "extra_forbidden"),
    ],
)
def test_bad_job_requests_get_4xx(serve_app: ServeApp, body: Any, status: int, kind: str) -> None:
    response = submit(serve_app, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["details"][0]["type"] == kind


def test_too_many_job_items_and_malformed_body(serve_app: ServeApp) -> None:
    limit = serve_app.settings.jobs.max_items
    response = submit(serve_app, {"items": [{"entity_id": "E1"}] * (limit + 1)})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["type"] == "too_many_items"
    malformed = serve_app.client.post(
        "/v1/jobs", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 400


def test_unknown_job_and_cancel(serve_app: ServeApp) -> None:
    assert serve_app.client.get("/v1/jobs/0123456789abcdef").status_code == 404
    assert serve_app.client.post("/v1/jobs/nope/cancel").status_code == 404
    done = submit(serve_app, {"items": items(2)}).json()
    wait_for(serve_app, done["id"], finished)
    again = serve_app.client.post(f"/v1/jobs/{done['id']}/cancel")
    assert again.status_code == 409


def test_cancel_a_running_job(serve_app: ServeApp) -> None:
    job = submit(serve_app, {"items": items(30_000, 10_000)}).json()
    wait_for(serve_app, job["id"], lambda j: j["progress"]["done"] >= 500, 60)
    response = serve_app.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    at_cancel = response.json()["progress"]["done"]
    # A worker scores about 5,000 items/s here: were cancel ignored, progress would move
    # by thousands within these 3 s. After cancel no result may be stored any more.
    time.sleep(3)
    after = serve_app.client.get(f"/v1/jobs/{job['id']}").json()
    assert after["state"] == "cancelled"
    assert after["progress"]["done"] == at_cancel < 30_000
    # what it scored before the cancel is kept and shown, not scored again on resubmission
    shown = all_results(serve_app, job["id"])
    assert len(shown) == at_cancel and all("score" in r for r in shown)
    assert [r["index"] for r in shown] == sorted({r["index"] for r in shown})


def worker_pid(app: ServeApp) -> int:
    return int(app.stats()["job_worker"]["pid"])


def test_killed_worker_mid_job_loses_nothing(serve_app: ServeApp) -> None:
    n = 20_000
    job = submit(serve_app, {"items": items(n, 20_000)}).json()
    running = wait_for(serve_app, job["id"], lambda j: j["progress"]["done"] >= 500, 60)
    assert running["progress"]["done"] < n, "job finished before the kill; make it larger"
    # every JobWorker replica: /v1/stats names whichever one answered, which with two
    # replicas need not be the one running this job (the kill then tested nothing)
    pids = launch.replica_pids(APP_NAME, "JobWorker")
    assert pids and worker_pid(serve_app) in pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    done = wait_for(serve_app, job["id"], finished, 180)
    assert done["state"] == "succeeded" and done["progress"]["done"] == n
    results = all_results(serve_app, job["id"])
    assert [r["index"] for r in results] == list(range(n))  # each item exactly once
    assert all("score" in r for r in results)


def test_jobs_survive_an_application_restart(serve_app: ServeApp) -> None:
    from ray import serve

    jobs = [submit(serve_app, {"items": items(8_000, 40_000 + 8_000 * i)}).json() for i in range(3)]
    wait_for(serve_app, jobs[0]["id"], lambda j: j["progress"]["done"] > 0, 60)
    serve.delete(APP_NAME)  # the whole application goes away mid-work
    deploy(serve_app.config)
    wait_ready(serve_app.base_url)
    for job in jobs:
        done = wait_for(serve_app, job["id"], finished, 180)
        assert done["state"] == "succeeded" and done["progress"]["done"] == 8_000
        assert len(all_results(serve_app, job["id"])) == 8_000


def test_job_worker_scales_out_on_queue_depth(serve_app: ServeApp) -> None:
    """The custom autoscaling metric: queue depth 6 at 2 jobs per replica asks for max (2)."""
    from ray import serve

    jobs = [submit(serve_app, {"items": items(50_000, 1_000 * i)}).json() for i in range(6)]
    try:
        deadline = time.monotonic() + 90
        replicas, deepest = 0, 0
        while time.monotonic() < deadline and replicas < 2:
            deployment = serve.status().applications[APP_NAME].deployments["JobWorker"]
            replicas = deployment.replica_states.get("RUNNING", 0)
            deepest = max(deepest, serve_app.stats()["job_worker"]["depth"])
            time.sleep(1)
        assert deepest >= 3, "the queue never looked deep to the worker"
        assert replicas == 2
    finally:
        for job in jobs:
            serve_app.client.post(f"/v1/jobs/{job['id']}/cancel")
