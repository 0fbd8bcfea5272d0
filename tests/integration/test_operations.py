"""Operations on the running app: a store outage, and a live user_config change."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from serve_app.config import ModelTuning
from tests.integration.conftest import APP_NAME, ServeApp

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
        # an id the store never held is not scored as if it existed (the known-id set)
        unknown = serve_app.client.post("/v1/predict", json={"entity_id": "NOPE999"})
        assert unknown.status_code == 404, unknown.text
        assert unknown.json()["error"]["code"] == "unknown_entity"
        mixed = serve_app.client.post(
            "/v1/predict/batch",
            json={"items": [{"entity_id": "NOPE999"}, {"entity_id": "E0070003"}]},
        ).json()["results"]
        assert mixed[0]["ok"] is False and mixed[0]["error"]["code"] == "unknown_entity"
        assert mixed[1]["ok"] and mixed[1]["degraded"]
        ready = _readyz_once_it_is(serve_app, 503)  # a replica rechecks once a second
        assert ready.json()["store_reachable"] is False
        assert ready.headers["Retry-After"]
        # degraded answers are not cached: they must not outlive the outage. The cache is
        # per Ingress replica: as many calls as replicas, so that (were it cached) at
        # least one lands on the replica that scored it (pigeonhole)
        replicas = serve_app.stable_replicas("Ingress")
        for _ in range(replicas):
            again = serve_app.client.post("/v1/predict", json={"entity_id": "E0070000"}).json()
            assert again["cached"] is False and again["degraded"] is True, again
    finally:
        hidden.rename(store)
    for _ in range(replicas):  # no replica serves a degraded answer from its cache
        recovered = serve_app.client.post("/v1/predict", json={"entity_id": "E0070000"}).json()
        assert recovered["degraded"] is False, recovered
    _readyz_once_it_is(serve_app, 200)


def _readyz_once_it_is(serve_app: ServeApp, status: int, within_s: float = 5.0) -> Any:
    """/readyz's answer once it has ``status``: each replica reuses its check for 1 s."""
    deadline = time.monotonic() + within_s
    while True:
        ready = httpx.get(f"{serve_app.base_url}/readyz")
        if ready.status_code == status or time.monotonic() > deadline:
            assert ready.status_code == status, ready.text
            return ready
        time.sleep(0.2)


def _set_model_tuning(max_batch_size: int, wait_s: float) -> Any:
    return _set_model_user_config(
        {"max_batch_size": max_batch_size, "batch_wait_timeout_s": wait_s}
    )


def _set_model_user_config(user_config: dict[str, Any]) -> Any:
    def mutate(config: dict[str, Any]) -> None:
        for deployment in config["applications"][0]["deployments"]:
            if deployment["name"] == "Model":
                deployment["user_config"] = user_config

    return mutate


def _model_stats_when(serve_app: ServeApp, ready: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    stats = serve_app.stats()["model"]
    while not ready(stats) and time.monotonic() < deadline:
        time.sleep(0.5)
        stats = serve_app.stats()["model"]
    assert ready(stats), stats
    return stats


def test_the_model_can_look_features_up_itself_and_back(serve_app: ServeApp) -> None:
    """``local_features`` in the Model's user_config: the same replica looks features up
    with a source of its own (no FeatureFetcher hop), answers as before (unknown ids 404
    per item), and goes back to the FeatureFetcher when the setting is removed."""
    items = [{"entity_id": f"E00820{i:02d}", "context": {"hour": i % 24}} for i in range(20)]
    with serve_app.one_replica("Model"):
        before = serve_app.stats()["model"]
        assert before["local_features"] is None
        serve_app.redeploy(_set_model_user_config({"local_features": {"cache_ttl_s": 30}}))
        try:
            _model_stats_when(serve_app, lambda stats: stats["local_features"] is not None)
            answer = serve_app.client.post(
                "/v1/predict/batch", json={"items": [*items, {"entity_id": "NOPE999"}]}
            ).json()
            results = answer["results"]
            assert all(r["ok"] and not r["degraded"] for r in results[:20]), results
            assert results[20]["error"]["code"] == "unknown_entity"
            local = serve_app.stats()["model"]
            assert (local["replica"], local["pid"]) == (before["replica"], before["pid"])
            assert local["local_features"]["store_loads"] >= 1
            assert local["local_features"]["cache_misses"] >= 21  # its own cache, cold
        finally:
            serve_app.redeploy(_set_model_user_config({}))
        _model_stats_when(serve_app, lambda stats: stats["local_features"] is None)
        again = serve_app.client.post("/v1/predict", json={"entity_id": "E0082099"})
        assert again.status_code == 200 and again.json()["degraded"] is False


def test_user_config_change_applies_without_restart(serve_app: ServeApp) -> None:
    with serve_app.one_replica("Model"):
        _user_config_change_applies_without_restart(serve_app)


def _user_config_change_applies_without_restart(serve_app: ServeApp) -> None:
    defaults = ModelTuning()
    before = serve_app.stats()["model"]
    assert before["max_batch_size"] == defaults.max_batch_size
    assert before["scoring_path"] == "direct-trees"  # the example model: numpy into the trees
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


def test_a_burst_past_capacity_is_shed_with_503_and_retry_after(serve_app: ServeApp) -> None:
    """Admission by measured queueing delay, on the running app as configured.

    Two waves of batches of 1,000 distinct ids (64, then 60 more 1.5 s later): seconds of
    work for 2 cores, and fewer connections than HAProxy lets through (96 per replica),
    so that what is refused is refused by the app. The first wave arrives at once, before
    the ingress has measured anything about it (its drain rate is the one of the traffic
    before), so it may be admitted whole; by the second, the ingress has measured how
    slowly the first drains and refuses what it cannot answer within
    ``limits.max_queue_delay_s``, at once with 503, ``Retry-After`` and ``overloaded``. Nothing gets a 500 or hangs, and a
    prediction right after the burst is answered. (The in-flight backstop behind it,
    ``limits.max_inflight_requests``, is unit-tested in tests/unit/test_admission.py.)
    """
    from concurrent.futures import ThreadPoolExecutor

    def call(burst: int) -> httpx.Response:
        items = [{"entity_id": f"E{(burst * 1_000 + i) % 100_000:07d}"} for i in range(1_000)]
        with httpx.Client(base_url=serve_app.base_url, headers=serve_app.auth, timeout=60) as c:
            return c.post("/v1/predict/batch", json={"items": items})

    with ThreadPoolExecutor(max_workers=124) as pool:
        first = [pool.submit(call, burst) for burst in range(64)]
        time.sleep(1.5)
        second = [pool.submit(call, burst) for burst in range(64, 124)]
        responses = [future.result() for future in first + second]
    statuses = sorted(r.status_code for r in responses)
    print(f"\nburst of 124 x 1,000 items: {statuses.count(200)} answered, "
          f"{statuses.count(503)} refused")  # fmt: skip
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses and 503 in statuses, statuses
    for shed in (r for r in responses if r.status_code == 503):
        assert int(shed.headers["Retry-After"]) >= 1
        assert shed.json()["error"]["code"] == "overloaded", shed.text
        assert "queue_delay_ms" in shed.json()["error"]["details"], shed.text  # the app's
    after = serve_app.client.post("/v1/predict", json={"entity_id": "E0090000"})
    assert after.status_code == 200, after.text
