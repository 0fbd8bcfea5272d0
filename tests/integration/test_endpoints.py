"""Every endpoint over real HTTP on 127.0.0.1, against the app deployed from the YAML."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.conftest import OTHER_KEY, ServeApp

pytestmark = pytest.mark.integration

DATA_ROUTES = [
    ("POST", "/v1/predict", {"entity_id": "E0000001"}),
    ("POST", "/v1/predict/batch", {"items": [{"entity_id": "E0000001"}]}),
    ("GET", "/v1/model", None),
    ("GET", "/v1/stats", None),
]


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error", "request_id"}, body
    assert body["error"]["message"]
    return str(body["error"]["code"])


def test_health_endpoints_are_open(serve_app: ServeApp) -> None:
    assert httpx.get(f"{serve_app.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{serve_app.base_url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["model_loaded"] and ready.json()["store_reachable"]


@pytest.mark.parametrize(("method", "path", "body"), DATA_ROUTES)
@pytest.mark.parametrize("header", [None, "Bearer wrong-key-wrong-key", "Basic dXNlcjpwYXNz"])
def test_data_endpoints_need_a_valid_key(
    serve_app: ServeApp, method: str, path: str, body: object, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    response = httpx.request(method, serve_app.base_url + path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert error_code(response) == "unauthorized"


def test_model_metadata(serve_app: ServeApp) -> None:
    meta = serve_app.client.get("/v1/model").json()
    assert meta["version"] and len(meta["sha256"]) == 64
    assert "region" in meta["features"] and meta["metrics"]["roc_auc"] > 0.6


def test_predict_then_cached(serve_app: ServeApp) -> None:
    body = {"entity_id": "E0000042", "context": {"amount": 59.9, "channel": "web", "hour": 14}}
    first = serve_app.client.post("/v1/predict", json=body)
    assert first.status_code == 200, first.text
    answer = first.json()
    assert 0.0 <= answer["score"] <= 1.0
    assert answer["cached"] is False and answer["degraded"] is False
    assert answer["model_version"] == serve_app.client.get("/v1/model").json()["version"]
    # The cache is per Ingress replica and HAProxy picks one per call: with N replicas,
    # N more calls cannot all miss (each miss caches the answer on one more replica).
    again = []
    for _ in range(serve_app.stable_replicas("Ingress")):
        again.append(serve_app.client.post("/v1/predict", json=body).json())
        if again[-1]["cached"]:
            break
    assert all(call["score"] == answer["score"] for call in again), again
    assert again[-1]["cached"] is True, again
    other = serve_app.client.post("/v1/predict", json={**body, "context": {"amount": 1.0}})
    assert other.json()["cached"] is False  # context is part of the cache key
    assert first.headers["x-request-id"]


def test_another_key_is_never_told_what_was_scored(serve_app: ServeApp) -> None:
    """The cache is per key id: a key's first call is never ``cached``, though the same
    (entity, context) was just cached for another key (on every replica, very likely:
    each context is asked twice per replica first)."""
    another_key = {"Authorization": f"Bearer {OTHER_KEY}"}
    replicas = serve_app.stable_replicas("Ingress")
    for amount in (11.0, 12.0, 13.0, 14.0, 15.0):
        body = {"entity_id": "E0000043", "context": {"amount": amount}}
        mine = [serve_app.client.post("/v1/predict", json=body).json() for _ in range(2 * replicas)]
        assert any(call["cached"] for call in mine), mine
        theirs = serve_app.client.post("/v1/predict", json=body, headers=another_key).json()
        assert theirs["score"] == mine[0]["score"] and theirs["cached"] is False, theirs


def test_unknown_entity_is_404(serve_app: ServeApp) -> None:
    response = serve_app.client.post("/v1/predict", json={"entity_id": "E9999999"})
    assert response.status_code == 404
    assert error_code(response) == "unknown_entity"


BAD_SINGLE = [
    ("malformed json", b'{"entity_id": ', 400, "malformed_json"),
    ("not json at all", b"entity_id=E1", 400, "malformed_json"),
    ("not utf-8", b'{"entity_id": "\xff\xfe"}', 400, "malformed_json"),
    ("nesting bomb", b"[" * 200_000 + b"]" * 200_000, 400, "malformed_json"),
    ("NaN amount", b'{"entity_id": "E1", "context": {"amount": NaN}}', 422, "invalid_input"),
    ("empty body", b"", 422, "invalid_input"),
    ("missing field", b"{}", 422, "invalid_input"),
    ("wrong type", b'{"entity_id": 42}', 422, "invalid_input"),
    ("bad id", b'{"entity_id": "../etc/passwd"}', 422, "invalid_input"),
    ("unknown field", b'{"entity_id": "E1", "amount": 3}', 422, "invalid_input"),
    ("bad context", b'{"entity_id": "E1", "context": {"hour": 99}}', 422, "invalid_input"),
    ("array body", b'["E1"]', 422, "invalid_input"),
]


@pytest.mark.parametrize(
    ("name", "raw", "status", "code"), BAD_SINGLE, ids=[b[0] for b in BAD_SINGLE]
)
def test_bad_single_inputs_get_clear_4xx(
    serve_app: ServeApp, name: str, raw: bytes, status: int, code: str
) -> None:
    response = serve_app.client.post(
        "/v1/predict", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert error_code(response) == code


def test_wrong_content_type_is_415(serve_app: ServeApp) -> None:
    response = serve_app.client.post(
        "/v1/predict", content=b"entity_id=E1", headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 415
    assert error_code(response) == "unsupported_media_type"


def test_oversized_body_is_413(serve_app: ServeApp) -> None:
    limit = serve_app.settings.limits.max_body_bytes
    raw = json.dumps({"items": [{"entity_id": "E0000001"}] * (limit // 20)}).encode()
    assert len(raw) > limit
    response = serve_app.client.post(
        "/v1/predict/batch", content=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert error_code(response) == "payload_too_large"


def test_oversized_chunked_body_is_413(serve_app: ServeApp) -> None:
    """No Content-Length to trust: the limit is enforced while streaming."""
    limit = serve_app.settings.limits.max_body_bytes

    def chunks():  # a generator body is sent with Transfer-Encoding: chunked
        yield b'{"items": ['
        for _ in range(limit // 1000 + 2):
            yield b'{"entity_id": "E0000001"},' * 40
        yield b'{"entity_id": "E0000001"}]}'

    response = serve_app.client.post(
        "/v1/predict/batch", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert error_code(response) == "payload_too_large"


def test_unknown_route_and_method_are_json_4xx(serve_app: ServeApp) -> None:
    assert error_code(serve_app.client.get("/v1/nothing-here")) == "not_found"
    response = serve_app.client.get("/v1/predict")
    assert response.status_code == 405
    assert error_code(response) == "method_not_allowed"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"items": []}, "invalid_input"),
        ({"items": "E1"}, "invalid_input"),
        ({"entries": [{"entity_id": "E1"}]}, "invalid_input"),
        ([{"entity_id": "E1"}], "invalid_input"),
    ],
)
def test_bad_batch_bodies_get_422(serve_app: ServeApp, body: object, code: str) -> None:
    response = serve_app.client.post("/v1/predict/batch", json=body)
    assert response.status_code == 422, response.text
    assert error_code(response) == code


def test_too_many_items_is_422_with_the_limit(serve_app: ServeApp) -> None:
    limit = serve_app.settings.limits.max_batch_items
    items = [{"entity_id": f"E{i:07d}"} for i in range(limit + 1)]
    response = serve_app.client.post("/v1/predict/batch", json={"items": items})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0] == {"type": "too_many_items", "limit": limit}


def test_batch_keeps_order_and_bad_items_fail_alone(serve_app: ServeApp) -> None:
    unique = {"amount": 7007.07}  # a context no other test sends: no cache holds these yet
    items = [
        {"entity_id": "E0000100", "context": unique},
        {"entity_id": 7},  # wrong type
        {"entity_id": "E0000101", "context": {"channel": "app", **unique}},
        {"entity_id": "E9999998"},  # unknown
        "not an object",
        {"entity_id": "E0000100", "context": unique},  # duplicate of item 0
    ]
    response = serve_app.client.post("/v1/predict/batch", json={"items": items})
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(items)))
    assert [r["ok"] for r in results] == [True, False, True, False, False, True]
    assert results[1]["error"]["code"] == "invalid_input"
    assert results[3]["error"]["code"] == "unknown_entity"
    assert results[4]["error"]["code"] == "invalid_input"
    assert results[0]["entity_id"] == "E0000100" and results[2]["entity_id"] == "E0000101"
    assert results[0]["score"] == results[5]["score"]
    assert body["summary"] == {
        "items": 6,
        "unique": 3,
        "succeeded": 3,
        "failed": 3,
        "cached": 0,
    }
    # The prediction cache is per Ingress replica. With N replicas, N single calls after the
    # batch cannot all miss: each miss caches the answer on one more replica (pigeonhole).
    singles = []
    for _ in range(serve_app.stable_replicas("Ingress")):
        singles.append(serve_app.client.post("/v1/predict", json=items[2]).json())
        if singles[-1]["cached"]:
            break
    assert all(single["score"] == results[2]["score"] for single in singles)
    assert singles[-1]["cached"] is True, singles


def test_a_corrupt_stored_row_is_scored_on_defaults_alone(serve_app: ServeApp) -> None:
    """A row no flat object (a BLOB where a number belongs, written by someone else):
    with store.on_error: degrade, that entity alone is scored on defaults and marked
    degraded; its batch-mates keep their stored features. It failed the whole look-up:
    every item in the batch came back degraded."""
    import sqlite3

    corrupt = "ZCORRUPT1"  # a row of its own, inserted here and removed after
    with sqlite3.connect(serve_app.store_path) as db:
        db.execute("INSERT INTO entities (entity_id, age) VALUES (?, ?)", (corrupt, b"\x00"))
    try:
        context = {"amount": 6006.06}  # a context no other test sends: nothing cached
        items = [{"entity_id": "E0000102", "context": context}]
        items.append({"entity_id": corrupt, "context": context})
        response = serve_app.client.post("/v1/predict/batch", json={"items": items})
        single = serve_app.client.post("/v1/predict", json=items[1])
    finally:
        with sqlite3.connect(serve_app.store_path) as db:
            db.execute("DELETE FROM entities WHERE entity_id = ?", (corrupt,))
    assert response.status_code == 200, response.text
    good, bad = response.json()["results"]
    assert good["ok"] is True and good["degraded"] is False, good
    assert bad["ok"] is True and bad["degraded"] is True, bad
    assert single.status_code == 200 and single.json()["degraded"] is True, single.text


def test_batch_duplicates_are_computed_once(serve_app: ServeApp) -> None:
    fresh = [f"E00{i:05d}" for i in range(50_000, 50_010)]
    # 50 items, 10 distinct; a context no other test sends, so no Ingress cache holds them
    # (the chaos test predicts random ids without context)
    items = [{"entity_id": entity, "context": {"amount": 5005.05}} for entity in fresh] * 5
    with serve_app.one_replica("Model"):
        before = serve_app.stats()["model"]
        body = serve_app.client.post("/v1/predict/batch", json={"items": items}).json()
        after = serve_app.stats()["model"]
    assert body["summary"]["unique"] == 10 and body["summary"]["succeeded"] == 50
    assert after["replica"] == before["replica"]
    assert after["items"] - before["items"] == 10  # the model saw each distinct item once
    scores = {r["entity_id"]: r["score"] for r in body["results"]}
    assert all(r["score"] == scores[r["entity_id"]] for r in body["results"])


def test_concurrent_single_predictions_are_batched(serve_app: ServeApp) -> None:
    with serve_app.one_replica("Model"):
        _concurrent_single_predictions_are_batched(serve_app)


def _concurrent_single_predictions_are_batched(serve_app: ServeApp) -> None:
    before = serve_app.stats()["model"]
    entities = [f"E00{i:05d}" for i in range(60_000, 60_064)]

    def call(entity: str) -> int:
        with httpx.Client(base_url=serve_app.base_url, headers=serve_app.auth, timeout=30) as c:
            # a context no other test sends: no Ingress cache can answer it
            body = {"entity_id": entity, "context": {"amount": 6006.06}}
            return c.post("/v1/predict", json=body).status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(call, entities))
    after = serve_app.stats()["model"]
    assert statuses == [200] * len(entities)
    assert after["replica"] == before["replica"]
    new_batches = after["batches"] - before["batches"]
    new_items = after["items"] - before["items"]
    assert new_items == len(entities)
    assert new_batches < len(entities)  # items shared batches
    assert max(after["recent_batch_items"][-new_batches:]) > 1
