"""Admission control by measured queueing delay: 503 + ``Retry-After`` instead of a queue.

A request that would wait longer than ``limits.max_queue_delay_s`` before being served is
refused at once. Answering "retry in N s" in a millisecond beats queueing until callers
time out, and it keeps the latency of the requests that are admitted bounded: goodput
stays near capacity at any offered load, and the queue never grows past what the replica
drains in ``max_queue_delay_s``.

What a new request would wait is measured, not configured as a count (a fixed in-flight
limit is right for one speed of the service only: too many when the Model slows down, too
few when the cache answers):

* **time here**: ``inflight / rate``, where ``rate`` is the requests this replica
  finished per second *while it was busy* (a sliding window). By Little's law that is
  how long a newcomer would spend in the replica. Measuring only busy time keeps the
  rate right at low load: one request every second says nothing about how fast the
  replica drains a queue.
* **less the service time**: the lowest mean latency of any quarter-second window in the
  last 30 s, which is what a request needs with no queue at all (batching waits, hops
  and the usual jitter included; the minimum of single latencies would count jitter as
  queue). What is left is waiting. Without this, a replica admitting one request at a time would measure
  that request's own service time as "queue", refuse the next, and never recover.

**Only where the rate was measured.** A batching replica drains faster the more it holds
(one ``predict`` serves the whole list), so a rate measured at a few requests in flight
says little about a burst of a hundred: right after start, or after light traffic, a
burst was refused on a rate 5-10x too low (97-126 of a cold 128-client closed loop got
503, ``Retry-After`` 2-5 s). So each rate remembers the concurrency it was measured at; while
``inflight`` is more than :data:`EXTRAPOLATION` times that, the estimate is only a
guess, and a request is refused only on evidence: the oldest request in flight has
already waited (its age less the service time) longer than ``max_queue_delay_s``. (One
slow job upload or 1,000-item batch is such evidence too; requiring 16 waiting requests
instead let test_operations' burst of slow batches in whole: most of its first wave had
ended, so the 16th oldest was new.) The windows of the burst measure the new rate within a
second, and the estimate decides again. (Waiting for evidence alone, always, would admit a burst at 4x for a whole
``max_queue_delay_s`` before refusing anything, and those requests would wait 4x as long.)

A request is measured from the moment its body has arrived, not from its headers: a slow
upload is the client's time, and measured as the replica's it lowered the drain rate and
its age looked like queueing. It counts against the next admissions from its headers on
(``pending`` until its body is in) for the in-flight backstop and floor: a burst's
bodies arrive within milliseconds, and not counting them let a burst of 100 past an
in-flight limit of 10. The estimate itself uses only the requests it measures.

The event loop's lag is measured and reported (``/v1/stats``) but does not decide: under
a storm of refusals the loop is busy answering them, and refusing more because of it
would turn a burst into a lock-out. A limit on ``inflight`` stays as a backstop
(``limits.max_inflight_requests``).

``Retry-After`` comes from the same measurement: the seconds the replica needs, at the
measured rate, to drain what is waiting now, in flight plus the requests refused during
the last second (their clients come back). It grows with the overload, which spreads the
retries out instead of sending them all back after one second.

Each replica runs one event loop, so the counters need no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api.request_id import sanitize
from serve_app.api.uploads import TooManyUploads, Upload, start_upload
from serve_app.errors import Overloaded

# The drain rate is the busy-time rate over windows of this length, smoothed.
_WINDOW_S = 0.25
_SMOOTHING = 0.5  # weight of the newest window
# Past this many times the concurrency the rate was measured at, the rate is a guess.
EXTRAPOLATION = 2.0
# A window busy for less than this says too little about the rate to be used.
_MIN_BUSY_S = 0.02
# The service time with no queue: the lowest window-mean latency of the last 30 s.
_BASE_WINDOWS = 120
_LAG_PERIOD_S = 0.02
_LAG_DECAY = 0.5
MAX_RETRY_AFTER_S = 60
# Below this many requests in flight nothing is refused: they all fit in the next list the
# coalescer sends to the Model (its lists hold far more), so none waits behind the others;
# and a measurement from a handful of requests on a noisy machine is mostly jitter.
MIN_INFLIGHT = 16


class Admission:
    """Admit a request while the measured wait ahead of it is under ``max_queue_delay_s``."""

    def __init__(
        self,
        max_queue_delay_s: float,
        max_inflight: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        monitor_loop: bool = True,
    ) -> None:
        self.max_queue_delay_s = max_queue_delay_s
        self.max_inflight = max_inflight
        self._clock = clock
        self._monitor_loop = monitor_loop
        self._lag_task: asyncio.Task[None] | None = None
        self.inflight = 0  # admitted and its body arrived: measured (rate, latency)
        self.pending = 0  # admitted, its body still arriving: counted, not measured
        self.admitted = 0
        self.refused = 0
        self.rate: float | None = None  # requests/s while busy; None until measured
        self.rate_concurrency = 0.0  # requests in flight that rate was measured at
        self.loop_lag_s = 0.0
        now = clock()
        self._last_change = now
        self._window_start = now
        self._window_busy_s = 0.0
        self._window_done = 0
        self._window_latency_s = 0.0
        # Start times of the requests in flight, oldest first (an OrderedDict: the
        # oldest is at hand and any one is removed in O(1), in whatever order they end).
        self._started: OrderedDict[object, float] = OrderedDict()
        self._recent_means: deque[float] = deque(maxlen=_BASE_WINDOWS)
        self.service_s = 0.0  # lowest recent window-mean latency: service with no queue
        self._refusals: list[float] = []  # times of refusals in the last second

    # ---- the measurement -------------------------------------------------------------

    def _account(self, now: float) -> None:
        """Busy time since the last change of ``inflight``, and the window's rate."""
        if self.inflight > 0:
            self._window_busy_s += now - self._last_change
        self._last_change = now
        if now - self._window_start >= _WINDOW_S:
            if self._window_busy_s >= _MIN_BUSY_S and self._window_done > 0:
                measured = self._window_done / self._window_busy_s
                # Little's law on the requests that ended: the concurrency this rate
                # holds for. Not the mean in flight: a window where a burst arrived and
                # nothing of it ended yet measures a low rate, not a rate at the burst.
                concurrency = measured * self._window_latency_s / self._window_done
                self.rate = _smooth(self.rate, measured)
                self.rate_concurrency = _smooth(self.rate_concurrency or None, concurrency)
            if self._window_done > 0:
                self._recent_means.append(self._window_latency_s / self._window_done)
                self.service_s = min(self._recent_means)
            self._window_start = now
            self._window_busy_s = 0.0
            self._window_done = 0
            self._window_latency_s = 0.0

    def queue_delay_s(self) -> float:
        """What a request arriving now would wait before being served (seconds).

        ``inflight / rate`` is the time it would spend here (Little's law); less the
        service time it needs even with no queue, the rest is waiting.
        """
        if self.rate is None:
            return 0.0
        return max(0.0, self.inflight / self.rate - self.service_s)

    def oldest_wait_s(self, now: float | None = None) -> float:
        """How long the oldest request in flight has waited so far: its age less the
        service time (0.0 with nothing in flight)."""
        oldest = self._oldest_start()
        if oldest is None:
            return 0.0
        now = self._clock() if now is None else now
        return max(0.0, now - oldest - self.service_s)

    def _oldest_start(self) -> float | None:
        """When the oldest request in flight was admitted (None with nothing in flight)."""
        return next(iter(self._started.values()), None)

    @property
    def load(self) -> int:
        """Requests admitted and not finished: in flight, and those whose bodies are still
        arriving. The backstop and the floor count them all (a burst's bodies arrive
        within milliseconds); the estimate counts only what it measured, in flight: its
        latencies are measured from the body on, and adding the pending requests to them
        overestimated the wait (goodput at 1x-2x fell from 82-98 % to 61-78 % of
        capacity, loadtests/bench_overload.py, 2026-12-07)."""
        return self.inflight + self.pending

    def extrapolating(self) -> bool:
        """More in flight than the rate was measured at, by far: the estimate is a guess."""
        return self.inflight > EXTRAPOLATION * self.rate_concurrency

    def retry_after_s(self, now: float | None = None) -> int:
        """Seconds until what waits now (in flight + refused in the last second) drains."""
        now = self._clock() if now is None else now
        self._forget_refusals(now)
        if self.rate is None:
            return 1
        waiting = self.inflight + len(self._refusals)
        drain = waiting / self._drain_rate(now)
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(drain)))

    def _drain_rate(self, now: float) -> float:
        """The measured rate; past the concurrency it was measured at, at least the rate
        the requests in flight arrived at (in flight / the oldest one's age).

        That is an arrival rate, not a drain rate: in a closed loop the two are equal;
        under open-loop overload it is higher than the drain, so ``Retry-After`` comes out
        short and a client retries early, to be measured again (a refusal costs ~1 ms).
        Right after start the first windows measure a cold Model (a rate of a few per
        second), and a burst refused on evidence was told to come back in 9-26 s by a
        replica that drained 400 requests a second a moment later.
        """
        rate = self.rate or 0.0
        oldest = self._oldest_start()
        if self.extrapolating() and oldest is not None and now > oldest:
            rate = max(rate, self.inflight / (now - oldest))
        return rate

    def _forget_refusals(self, now: float) -> None:
        refusals = self._refusals
        if refusals and refusals[0] < now - 1.0:
            cut = 0
            while cut < len(refusals) and refusals[cut] < now - 1.0:
                cut += 1
            del refusals[:cut]

    # ---- event-loop lag ----------------------------------------------------------------

    def _ensure_lag_monitor(self) -> None:
        if self._monitor_loop and self._lag_task is None:
            with contextlib.suppress(RuntimeError):  # no running loop (sync tests)
                self._lag_task = asyncio.get_running_loop().create_task(self._watch_lag())

    async def _watch_lag(self) -> None:
        """Sample how late a short sleep wakes up; decay towards each new sample."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(_LAG_PERIOD_S)
            lag = max(0.0, loop.time() - started - _LAG_PERIOD_S)
            self.loop_lag_s = _LAG_DECAY * lag + (1 - _LAG_DECAY) * self.loop_lag_s

    def close(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            self._lag_task = None

    # ---- admit -------------------------------------------------------------------------

    def _too_busy(self, now: float) -> bool:
        """The in-flight backstop is reached, or the measured wait is too long.

        Below :data:`MIN_INFLIGHT` requests in flight the wait is not checked: they fit in
        one coalesced list, and refusing them could starve the measurement itself. Past
        the concurrency the rate was measured at, a long estimate must be confirmed by a
        request that has really waited that long (module docstring).
        """
        if self.max_inflight is not None and self.load >= self.max_inflight:
            return True
        if self.load < MIN_INFLIGHT:
            return False
        if self.queue_delay_s() <= self.max_queue_delay_s:
            return False
        return not self.extrapolating() or self.oldest_wait_s(now) > self.max_queue_delay_s

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a slot for the body of the ``with``; :class:`Overloaded` if the wait is too long."""
        self.check()
        with self.hold():
            yield

    def check(self) -> None:
        """:class:`Overloaded` if a request arriving now would wait too long; else it is
        admitted and pending until :meth:`hold` (or :meth:`abandon`)."""
        self._ensure_lag_monitor()
        now = self._clock()
        self._account(now)
        if self._too_busy(now):
            self.refused += 1
            self._refusals.append(now)
            error = Overloaded(
                "the service is at capacity; retry after the Retry-After seconds",
                {
                    "queue_delay_ms": round(1000 * self.queue_delay_s(), 1),
                    "oldest_wait_ms": round(1000 * self.oldest_wait_s(now), 1),
                    "max_queue_delay_ms": round(1000 * self.max_queue_delay_s, 1),
                },
            )
            error.retry_after_s = self.retry_after_s(now)
            raise error
        self.admitted += 1
        self.pending += 1

    def abandon(self) -> None:
        """An admitted request that ends before its body arrived (never :meth:`hold`)."""
        self.pending -= 1

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Count an admitted request in flight (its wait, the busy time, its latency) for
        the body of the ``with``."""
        now = self._clock()
        self._account(now)
        self.pending -= 1
        self.inflight += 1
        token = object()
        self._started[token] = now
        try:
            yield
        finally:
            done = self._clock()
            self._account(done)
            self.inflight -= 1
            del self._started[token]
            self._window_done += 1
            self._window_latency_s += done - now

    def snapshot(self) -> dict[str, float | int | None]:
        """Counters and the current measurement, for ``/v1/stats``."""
        return {
            "inflight": self.inflight,
            "pending_bodies": self.pending,
            "admitted": self.admitted,
            "refused": self.refused,
            "drain_rate_per_s": None if self.rate is None else round(self.rate, 1),
            "rate_measured_at_inflight": round(self.rate_concurrency, 1),
            "oldest_wait_ms": round(1000 * self.oldest_wait_s(), 2),
            "queue_delay_ms": round(1000 * self.queue_delay_s(), 2),
            "service_ms": round(1000 * self.service_s, 2),
            "loop_lag_ms": round(1000 * self.loop_lag_s, 2),
            "max_queue_delay_ms": round(1000 * self.max_queue_delay_s, 1),
        }


def _smooth(previous: float | None, measured: float) -> float:
    """Exponential smoothing, the first measurement taken as it is."""
    if previous is None:
        return measured
    return _SMOOTHING * measured + (1 - _SMOOTHING) * previous


# ---- at the edge of the app ---------------------------------------------------------------

# The routes that do work: only they are admitted (health, status and stats stay open).
ADMITTED_ROUTES = frozenset(
    {("POST", "/v1/predict"), ("POST", "/v1/predict/batch"), ("POST", "/v1/jobs")}
)
SCOPE_KEY = "serve_app.admitted"


class AdmissionMiddleware:
    """Admission in front of routing, auth and body parsing: a refusal must be cheap.

    Measured on 2 cores: refused through FastAPI's dependency path, a 503 cost the
    ingress about 1 ms of CPU, as much as an admitted prediction, so at 4x the load the
    refusals alone needed more CPU than the machine has. Here the decision is made on the
    raw ASGI scope and the answer is a few pre-encoded bytes. The :data:`Admitted`
    dependency then sees the slot is held (``scope[SCOPE_KEY]``) and does nothing.

    The replica's :class:`Admission` is found on ``app.state.api_context`` (set by the
    Ingress when it starts), through ``scope["app"]``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) not in ADMITTED_ROUTES:
            await self.app(scope, receive, send)
            return
        context = getattr(scope["app"].state, "api_context", None)
        if context is None:  # not started yet: the routes' dependency admits
            await self.app(scope, receive, send)
            return
        try:
            upload = start_upload(
                scope, getattr(context, "uploads", None), getattr(context, "auth", None)
            )
        except TooManyUploads as refused:
            await _refuse(scope, send, refused)
            return
        try:
            context.admission.check()
        except Overloaded as refused:
            if upload is not None:
                upload.end()
            await _refuse(scope, send, refused)
            return
        scope[SCOPE_KEY] = True
        counted = _CountedOnceReceived(context.admission, receive, upload)
        try:
            await self.app(scope, counted.receive, send)
        finally:
            counted.release()


class _CountedOnceReceived:
    """Measures a request from the moment its body has arrived, not from its headers (it
    is ``pending`` until then): a slow upload is the client's time, not the replica's
    queue. Measured from the headers, one request uploading for 10 s at 50 req/s halved
    the measured drain rate (the replica looked busy) and made its age the evidence of
    waiting: bursts of 30 and 100 that the replica could serve were a third and four
    fifths refused. Until then its key also counts it as an upload (``upload``)."""

    def __init__(self, admission: Admission, receive: Receive, upload: Upload | None) -> None:
        self._admission = admission
        self._receive = receive
        self._slot: contextlib.AbstractContextManager[None] | None = None
        self._upload = upload

    async def receive(self) -> Message:
        message = await self._receive()
        body_done = message["type"] == "http.request" and not message.get("more_body", False)
        if body_done and self._slot is None:
            if self._upload is not None:
                self._upload.end()
            self._slot = self._admission.hold()
            self._slot.__enter__()
        return message

    def release(self) -> None:
        if self._upload is not None:
            self._upload.end()
        if self._slot is not None:
            self._slot.__exit__(None, None, None)
        else:
            self._admission.abandon()


async def _refuse(scope: Scope, send: Send, refused: Overloaded | TooManyUploads) -> None:
    """The same ``{"error": ..., "request_id"}`` body as every error, without FastAPI."""
    raw = next((value for key, value in scope["headers"] if key == b"x-request-id"), None)
    body = json.dumps(
        {"error": refused.to_dict(), "request_id": sanitize(raw)}, separators=(",", ":")
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(refused.retry_after_s).encode()),
    ]
    status = refused.status_code
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
