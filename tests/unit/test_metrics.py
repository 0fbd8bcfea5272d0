"""Metric names and labels, the Grafana dashboard's queries, Server-Timing and request ids."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from serve_app.api.observability import ObservabilityMiddleware, Timing, current_timing
from serve_app.api.request_id import HEADER, EdgeRequestIdMiddleware, sanitize
from serve_app.metrics import PROMETHEUS_PREFIX, SPECS, CounterBatch, prometheus_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "serve_app_dashboard.json"
# Labels whose values could grow without bound (or leak): never allowed.
UNBOUNDED = {"entity_id", "key", "api_key", "owner", "job_id", "request_id", "path", "url"}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_names_and_labels_follow_prometheus_conventions(name: str) -> None:
    spec = SPECS[name]
    assert re.fullmatch(r"serve_app_[a-z_]+", name)
    assert (spec.kind == "counter") == name.endswith("_total"), name
    assert not name.endswith(("_ms", "_s", "_latency")), "durations are _seconds"
    if "duration" in name or "latency" in name or "wait" in name or "_predict_" in name:
        assert name.endswith("_seconds"), name
    assert not set(spec.tags) & UNBOUNDED, spec.tags
    if spec.kind == "histogram":
        assert list(spec.boundaries) == sorted(spec.boundaries)


def _panel_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def test_every_dashboard_query_names_an_exported_metric() -> None:
    exported = prometheus_names()
    used: set[str] = set()
    for title, expr in _panel_exprs():
        names = set(re.findall(rf"\b{PROMETHEUS_PREFIX}serve_app_[a-z_]+", expr))
        assert names, f"panel {title!r} queries no app metric: {expr}"
        unknown = names - exported
        assert not unknown, f"panel {title!r} uses {unknown}, not exported by metrics.py"
        used |= {n.removeprefix(PROMETHEUS_PREFIX) for n in names}
    bare = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert bare == set(SPECS), f"metrics on no panel: {set(SPECS) - bare}"


def test_dashboard_uses_the_datasource_variable_like_rays_dashboards() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"


def test_server_timing_header() -> None:
    timing = Timing(started=10.0)
    timing.add("admission", 0.001)
    timing.add_model({"model-queue": 0.002, "features": 0.003, "predict": 0.004}, 0.010)
    header = timing.header(now=10.020).decode()
    assert header == (
        "admission;dur=1.00, model-queue;dur=2.00, features;dur=3.00, predict;dur=4.00, "
        "hop;dur=1.00, total;dur=20.00"
    )


def _run_asgi(app: Any, headers: list[tuple[bytes, bytes]]) -> tuple[dict[str, Any], list]:
    sent: list[dict[str, Any]] = []
    scope: dict[str, Any] = {"type": "http", "method": "POST", "headers": headers}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return scope, sent


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ([b"abc-123"], True),
        ([b"bad id with spaces"], False),
        ([b"x" * 65], False),
        ([b"a", b"b"], False),  # two headers: one fresh id
        ([], False),
    ],
)
def test_edge_middleware_leaves_exactly_one_sane_request_id(given: list, kept: bool) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        pass

    headers = [(b"host", b"x"), *((HEADER, value) for value in given)]
    scope, _ = _run_asgi(EdgeRequestIdMiddleware(app), headers)
    ids = [value for key, value in scope["headers"] if key == HEADER]
    assert len(ids) == 1
    assert sanitize(ids[0]) == ids[0].decode()
    assert (ids == given) is kept


def test_edge_middleware_drops_serve_control_headers_from_the_public() -> None:
    """``X-Request-Timeout-Seconds: 0`` (or ``-1``, ``nan``) turned Serve's request
    timeout off for that request; the others steer Serve's own handling and routing."""
    from ray.serve._private.http_util import (
        parse_disconnect_disabled_header,
        parse_request_timeout_header,
        parse_session_id_header,
    )

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        pass

    controls = [
        (b"x-request-timeout-seconds", b"0"),
        (b"X-Request-Timeout-Seconds", b"-1"),
        (b"x_request_timeout_seconds", b"nan"),
        (b"x-request-disconnect-disabled", b"?1"),
        (b"serve_multiplexed_model_id", b"other-model"),
        (b"Serve-Multiplexed-Model-Id", b"other-model"),
        (b"x-session-id", b"pinned"),
    ]
    kept = [(b"host", b"x"), (b"authorization", b"Bearer k"), (b"x-request-timeout", b"1")]
    scope, _ = _run_asgi(EdgeRequestIdMiddleware(app), [*kept, *controls])
    assert [h for h in scope["headers"] if h[0] != HEADER] == kept
    headers = dict(scope["headers"])
    assert parse_request_timeout_header(headers, 30.0) == 30.0  # the operator's timeout
    assert parse_disconnect_disabled_header(headers) is False
    assert parse_session_id_header(headers) in ("", None)


def test_observability_middleware_adds_server_timing_only_when_a_route_timed() -> None:
    async def timed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        timing = current_timing()
        assert timing is not None
        timing.admitted()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def untimed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    class _App:
        state = object()

    for app, expected in ((timed, True), (untimed, False)):
        middleware = ObservabilityMiddleware(app)
        middleware.metrics = None
        sent: list[dict[str, Any]] = []

        async def go(middleware: Any = middleware, sent: list = sent) -> None:
            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {"type": "http", "headers": [], "app": _App()}
            await middleware(scope, None, send)

        asyncio.run(go())
        names = [key for key, _ in sent[0]["headers"]]
        assert (b"server-timing" in names) is expected
        assert current_timing() is None


class _RecordingCounter:
    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str] | None]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.calls.append((value, tags))


def test_counter_batch_sums_per_tag_set_and_records_once_a_period() -> None:
    counter = _RecordingCounter()

    async def scenario() -> list[tuple[float, dict[str, str] | None]]:
        batch = CounterBatch(counter, period_s=0.05)  # type: ignore[arg-type]
        for status in ("200", "200", "503", "200"):
            batch.inc(tags={"route": "/v1/predict", "status": status})
        batch.inc(2)
        assert counter.calls == []  # nothing recorded yet: one call per tag set later
        await asyncio.sleep(0.2)
        first = list(counter.calls)
        batch.inc(tags={"route": "/v1/predict", "status": "200"})
        await asyncio.sleep(0.2)  # the last increment of a burst is not held back
        return first

    first = asyncio.run(scenario())
    assert sorted(first, key=str) == sorted(
        [
            (3.0, {"route": "/v1/predict", "status": "200"}),
            (1.0, {"route": "/v1/predict", "status": "503"}),
            (2.0, None),
        ],
        key=str,
    )
    assert counter.calls[len(first) :] == [(1.0, {"route": "/v1/predict", "status": "200"})]


def test_counter_batch_records_at_once_outside_an_event_loop_and_when_its_timer_is_late() -> None:
    counter = _RecordingCounter()
    CounterBatch(counter).inc(tags={"status": "200"})  # type: ignore[arg-type]
    assert counter.calls == [(1.0, {"status": "200"})]

    now = [0.0]
    late = _RecordingCounter()

    async def scenario() -> None:
        batch = CounterBatch(late, period_s=1.0, clock=lambda: now[0])  # type: ignore[arg-type]
        batch.inc()
        now[0] = 1.5  # a loop too busy to run the timer: the next increment records
        batch.inc()

    asyncio.run(scenario())
    assert late.calls == [(2.0, None)]
