"""The benchmark peers answer: a peer that fails every request makes every ratio a lie."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.config import AppConfig

KEY = "peer-key-" + "k" * 32


def test_the_fastapi_peer_scores_a_prediction_and_a_batch(
    small_config: AppConfig, small_store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from loadtests.peers.fastapi_peer import create_app

    monkeypatch.setenv("PEER_MODEL_DIR", small_config.artifacts.model_dir)
    monkeypatch.setenv("PEER_SQLITE", str(small_store_path))
    monkeypatch.setenv("SERVE_APP_API_KEYS", KEY)
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app()) as client:
        one = client.post("/v1/predict", json={"entity_id": "E0000001"}, headers=auth)
        many = client.post(
            "/v1/predict/batch",
            json={"items": [{"entity_id": "E0000001"}, {"entity_id": "NOPE"}]},
            headers=auth,
        )
    assert one.status_code == 200, one.text
    assert 0.0 <= one.json()["score"] <= 1.0
    assert many.status_code == 200, many.text
    assert [r["ok"] for r in many.json()["results"]] == [True, False]
