"""Per-request observability at the HTTP edge: request metrics and ``Server-Timing``.

:class:`ObservabilityMiddleware` is a pure ASGI middleware (Starlette's
BaseHTTPMiddleware costs a task per request). For every request it records the count by
route *template* (``/v1/jobs/{job_id}``, never the raw path: bounded label values), method
and status, and the latency by route. For the scoring routes it answers a
``Server-Timing`` header that says where the time went:

* ``admission``: auth, admission control, reading and validating the body;
* ``coalesce``: waiting in the ingress's coalescer for a call slot (single predictions);
* ``model-queue``: waiting in the Model replica's ``@serve.batch`` queue;
* ``features``: the batch's bulk feature look-up;
* ``predict``: building the frame and ``predict_proba``;
* ``total``: everything in this replica.

The route fills a :class:`Timing` found through :func:`current_timing` (a ContextVar set
here): no dict per request unless a route asks for one, a few ``perf_counter`` calls.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:  # the HTTP edge imports no Ray; the Ingress passes its metrics in
    from serve_app.metrics import IngressMetrics

# Model-side durations in seconds, as the Model returns them beside its results.
ModelTiming = dict[str, float]

_timing: ContextVar[Timing | None] = ContextVar("serve_app_timing", default=None)


class Timing:
    """Durations of one request's phases, in seconds, in the order they happened."""

    __slots__ = ("phases", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.phases: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + max(0.0, seconds)

    def admitted(self) -> None:
        """The route's own work starts now: what came before was admission."""
        self.add("admission", time.perf_counter() - self.started)

    def add_model(self, timing: ModelTiming | None, rpc_seconds: float) -> None:
        """The Model's own phases, and the hop's overhead (round trip minus them)."""
        if not timing:
            return
        inside = 0.0
        for name in ("model-queue", "features", "predict"):
            seconds = timing.get(name, 0.0)
            inside += seconds
            self.add(name, seconds)
        self.add("hop", rpc_seconds - inside)

    def header(self, now: float) -> bytes:
        parts = [f"{name};dur={seconds * 1000:.2f}" for name, seconds in self.phases.items()]
        parts.append(f"total;dur={(now - self.started) * 1000:.2f}")
        return ", ".join(parts).encode("latin-1")


def current_timing() -> Timing | None:
    """The running request's :class:`Timing` (None outside a request)."""
    return _timing.get()


def timed_phase(name: str, started: float) -> None:
    """Add ``now - started`` to the current request's phase ``name``, if any."""
    timing = _timing.get()
    if timing is not None:
        timing.add(name, time.perf_counter() - started)


def route_template(scope: Scope) -> str:
    """The matched route's path template, or ``unmatched``: a bounded label value."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class ObservabilityMiddleware:
    """Request metrics for every HTTP request; ``Server-Timing`` where a route timed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.metrics: IngressMetrics | None = None  # found on app.state at first request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.metrics is None:
            self.metrics = getattr(scope["app"].state, "ingress_metrics", None)
        started = time.perf_counter()
        timing = Timing(started)
        token = _timing.set(timing)
        status = 500

        async def send_timed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if timing.phases:
                    headers = message.setdefault("headers", [])
                    headers.append((b"server-timing", timing.header(time.perf_counter())))
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            _timing.reset(token)
            if self.metrics is not None:
                self.metrics.record_request(
                    route_template(scope),
                    scope.get("method", ""),
                    status,
                    time.perf_counter() - started,
                )


def install_metrics(app: Any, metrics: IngressMetrics) -> None:
    """Give the middleware its replica's metrics: created in the replica, not at import."""
    app.state.ingress_metrics = metrics
