"""Operations on the running app: a store outage, and a live user_config change."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from serve_app.config import ModelTuning
from tests.integration.conftest import APP_NAME, ServeApp, wait_ready

pytestmark = pytest.mark.integration


def test_store_outage_gives_degraded_answers_then_recovers(serve_app: ServeApp) -> None:
    store = serve_app.store_path
    hidden = store.with_suffix(".away")
    store.rename(hidden)  # the SQLite store disappears: every look-up now fails
    try:
        single = serve_app.client.post("/v1/predict", json={"entity_id": "E0070000"})
        assert single.status_code == 200, single.text
        assert single.json()["degraded"] is True
        batch = serve_app.client.post(
            "/v1/predict/batch",
            json={"items": [{"entity_id": "E0070001"}, {"entity_id": "E0070002"}]},
        ).json()
        assert all(r["ok"] and r["degraded"] for r in batch["results"])
        ready = httpx.get(f"{serve_app.base_url}/readyz")
        assert ready.status_code == 503 and ready.json()["store_reachable"] is False
        assert ready.headers["Retry-After"]
        # degraded answers are not cached: they must not outlive the outage
        again = serve_app.client.post("/v1/predict", json={"entity_id": "E0070000"}).json()
        assert again["cached"] is False
    finally:
        hidden.rename(store)
    recovered = serve_app.client.post("/v1/predict", json={"entity_id": "E0070000"}).json()
    assert recovered["degraded"] is False and recovered["cached"] is False
    assert httpx.get(f"{serve_app.base_url}/readyz").status_code == 200


def _set_model_tuning(max_batch_size: int, wait_s: float) -> Any:
    def mutate(config: dict[str, Any]) -> None:
        for deployment in config["applications"][0]["deployments"]:
            if deployment["name"] == "Model":
                deployment["user_config"] = {
                    "max_batch_size": max_batch_size,
                    "batch_wait_timeout_s": wait_s,
                }

    return mutate


def test_user_config_change_applies_without_restart(serve_app: ServeApp) -> None:
    with serve_app.one_replica("Model"):
        _user_config_change_applies_without_restart(serve_app)


def _user_config_change_applies_without_restart(serve_app: ServeApp) -> None:
    defaults = ModelTuning()
    before = serve_app.stats()["model"]
    assert before["max_batch_size"] == defaults.max_batch_size
    assert before["scoring_path"] == "direct"  # the example model takes the numpy path
    serve_app.redeploy(_set_model_tuning(16, 0.002))
    try:
        deadline = time.monotonic() + 30
        after = serve_app.stats()["model"]
        while after["max_batch_size"] != 16 and time.monotonic() < deadline:
            time.sleep(0.5)
            after = serve_app.stats()["model"]
        assert after["max_batch_size"] == 16 and after["batch_wait_timeout_s"] == 0.002
        assert (after["replica"], after["pid"]) == (before["replica"], before["pid"])
        assert after["batches"] >= before["batches"]  # counters survived: same process
        response = serve_app.client.post("/v1/predict", json={"entity_id": "E0080000"})
        assert response.status_code == 200
    finally:
        serve_app.redeploy(
            _set_model_tuning(defaults.max_batch_size, defaults.batch_wait_timeout_s)
        )
    from ray import serve

    assert serve.status().applications[APP_NAME].status == "RUNNING"


def test_overload_is_shed_with_503_and_retry_after(serve_app: ServeApp) -> None:
    """Past limits.max_inflight_requests the ingress answers 503 at once, never 500."""
    from concurrent.futures import ThreadPoolExecutor

    def limit_inflight(value: int) -> Any:
        def mutate(config: dict[str, Any]) -> None:
            args = config["applications"][0]["args"]
            args.setdefault("limits", {})["max_inflight_requests"] = value

        return mutate

    original = serve_app.settings.limits.max_inflight_requests
    serve_app.redeploy(limit_inflight(2))
    try:
        wait_ready(serve_app.base_url)
        items = [{"entity_id": f"E{i:07d}"} for i in range(1_000)]

        def call(_: int) -> httpx.Response:
            with httpx.Client(base_url=serve_app.base_url, headers=serve_app.auth, timeout=60) as c:
                return c.post("/v1/predict/batch", json={"items": items})

        with ThreadPoolExecutor(max_workers=16) as pool:
            responses = list(pool.map(call, range(16)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 503}, statuses
        assert 200 in statuses and 503 in statuses, statuses
        shed = next(r for r in responses if r.status_code == 503)
        assert shed.headers["Retry-After"] and shed.json()["error"]["code"] == "overloaded"
    finally:
        serve_app.redeploy(limit_inflight(original))
        wait_ready(serve_app.base_url)
