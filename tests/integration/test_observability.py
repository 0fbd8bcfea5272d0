"""On the session's app: Server-Timing on prediction answers, exactly one sane
X-Request-ID, and ``/docs`` rendered by a real headless Chromium with no internet."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ServeApp

pytestmark = pytest.mark.integration

TIMING = re.compile(r"([a-z-]+);dur=([0-9.]+)")


def _phases(response: httpx.Response) -> dict[str, float]:
    values = response.headers.get_list("server-timing")
    assert len(values) == 1, values
    return {name: float(ms) for name, ms in TIMING.findall(values[0])}


def test_server_timing_on_a_coalesced_single_prediction(serve_app: ServeApp) -> None:
    response = serve_app.client.post("/v1/predict", json={"entity_id": "E0090001"})
    assert response.status_code == 200 and response.json()["cached"] is False
    phases = _phases(response)
    wanted = {"admission", "coalesce", "model-queue", "features", "predict", "hop", "total"}
    assert set(phases) == wanted, phases
    inside = sum(ms for name, ms in phases.items() if name != "total")
    assert phases["total"] >= inside - 0.05 * len(phases)  # rounding of each to 0.01 ms
    assert phases["predict"] > 0 and phases["features"] > 0


def test_server_timing_on_a_batch_and_a_cache_hit(serve_app: ServeApp) -> None:
    body = {"items": [{"entity_id": "E0090002"}, {"entity_id": "E0090003"}]}
    batch = serve_app.client.post("/v1/predict/batch", json=body)
    assert batch.status_code == 200
    assert set(_phases(batch)) == {
        "admission",
        "coalesce",
        "model-queue",
        "features",
        "predict",
        "hop",
        "total",
    }
    serve_app.client.post("/v1/predict", json={"entity_id": "E0090004"})
    # The cache is per Ingress replica: with N replicas, N more calls cannot all miss.
    for _ in range(serve_app.stable_replicas("Ingress")):
        hit = serve_app.client.post("/v1/predict", json={"entity_id": "E0090004"})
        if hit.json()["cached"]:
            break
    assert hit.json()["cached"] is True, hit.text
    assert set(_phases(hit)) == {"admission", "total"}


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        ("client-id-123", "client-id-123"),
        ("bad id\twith tab", None),
        ("x" * 65, None),
        ("ümlaut", None),
    ],
)
def test_exactly_one_sanitised_request_id(
    serve_app: ServeApp, sent: str, echoed: str | None
) -> None:
    headers = {"X-Request-ID": sent.encode("utf-8")}
    for path in ("/healthz", "/v1/predict"):
        response = serve_app.client.post(path, json={"entity_id": 7}, headers=headers)
        ids = response.headers.get_list("x-request-id")
        assert len(ids) == 1, ids
        assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", ids[0])
        if echoed is not None:
            assert ids[0] == echoed
        if response.status_code >= 400 and response.status_code != 405:
            assert response.json()["request_id"] == ids[0]


def test_two_request_id_headers_get_one_back(serve_app: ServeApp) -> None:
    request = serve_app.client.build_request("GET", "/healthz")
    request.headers.update({"X-Request-ID": "first"})
    raw = [(k, v) for k, v in request.headers.raw if k.lower() != b"x-request-id"]
    request.headers = httpx.Headers([*raw, (b"X-Request-ID", b"one"), (b"X-Request-ID", b"two")])
    response = serve_app.client.send(request)
    assert len(response.headers.get_list("x-request-id")) == 1


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "headless Chromium is needed: apt-get install chromium"
    return binary


def chromium_dump_dom(url: str, profile: Path) -> str:
    """The DOM after scripts ran, in a headless Chromium that can reach only loopback."""
    out = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            # No internet: every host but loopback fails to resolve (a CDN would too).
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_docs_render_offline_in_a_real_browser(serve_app: ServeApp, tmp_path: Path) -> None:
    page = httpx.get(f"{serve_app.base_url}/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "/docs-assets/swagger-ui-bundle.js" in page.text
    dom = chromium_dump_dom(f"{serve_app.base_url}/docs", tmp_path / "profile")
    assert 'class="swagger-ui' in dom, dom[:2000]
    for path in ("/v1/predict", "/v1/predict/batch", "/v1/jobs", "/healthz"):
        assert f'data-path="{path}"' in dom, f"{path} not rendered"
    assert "Unable to render this definition" not in dom
