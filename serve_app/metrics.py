"""Application metrics through ``ray.serve.metrics``: they show in the Ray dashboard and on
the Prometheus endpoint of every node, tagged with deployment and replica by Serve.

Every metric is declared once, in :data:`SPECS`: the deployments create theirs from it,
and the Grafana dashboard's test reads it to know which names Prometheus can show.
Names follow Prometheus conventions (``_total`` for counters, ``_seconds`` for durations);
tag values are bounded (route templates, status codes, outcomes), never entity ids or keys.

Prometheus shows each name with Ray's ``ray_`` prefix (:func:`prometheus_names`).
Each deployment creates only the metrics it records, once, in its constructor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ray.serve.metrics import Counter, Gauge, Histogram

# What Ray puts in front of an application metric's name in Prometheus.
PROMETHEUS_PREFIX = "ray_"

_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 10_000, 100_000)
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_JOB_SECONDS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    kind: Kind
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


SPECS: dict[str, MetricSpec] = {
    # Ingress: the HTTP edge
    "serve_app_requests_total": MetricSpec(
        "counter",
        "HTTP requests by route template, method and status.",
        ("route", "method", "status"),
    ),
    "serve_app_request_duration_seconds": MetricSpec(
        "histogram", "HTTP request latency by route template.", ("route",), _SECONDS
    ),
    "serve_app_request_items": MetricSpec(
        "histogram", "Items per scoring request (1 for /v1/predict).", ("route",), _SIZES
    ),
    "serve_app_shed_requests_total": MetricSpec(
        "counter",
        "Requests answered 503/429 + Retry-After (shed, or a dependency unavailable).",
        ("status",),
    ),
    "serve_app_prediction_cache_total": MetricSpec(
        "counter", "Prediction-cache look-ups by result (hit|miss).", ("result",)
    ),
    "serve_app_coalesced_batch_items": MetricSpec(
        "histogram", "Items of concurrent requests merged into one call to the Model.", (), _SIZES
    ),
    "serve_app_job_items_submitted_total": MetricSpec(
        "counter", "Items in newly created jobs (replays of an Idempotency-Key excluded)."
    ),
    # Model
    "serve_app_model_batch_items": MetricSpec(
        "histogram", "Items per predict_proba call (after dedupe).", (), _SIZES
    ),
    "serve_app_model_batch_requests": MetricSpec(
        "histogram", "Calls merged into one model batch.", (), _SIZES
    ),
    "serve_app_model_predict_seconds": MetricSpec(
        "histogram", "Wall time of one frame build + predict_proba.", (), _SECONDS
    ),
    "serve_app_degraded_items_total": MetricSpec(
        "counter", "Items scored on default features (store down, on_error: degrade)."
    ),
    # FeatureFetcher
    "serve_app_feature_cache_total": MetricSpec(
        "counter", "Feature-cache look-ups by result (hit|miss).", ("result",)
    ),
    "serve_app_feature_lookups_total": MetricSpec(
        "counter", "Bulk feature-store look-ups by outcome (ok|error).", ("outcome",)
    ),
    "serve_app_feature_lookup_seconds": MetricSpec(
        "histogram", "Latency of one bulk feature-store look-up, retries included.", (), _SECONDS
    ),
    # JobWorker
    "serve_app_job_queue_depth": MetricSpec("gauge", "Jobs queued or running."),
    "serve_app_job_queue_oldest_age_seconds": MetricSpec(
        "gauge", "Age of the oldest job waiting for its first claim (0 when none is queued)."
    ),
    "serve_app_job_queue_wait_seconds": MetricSpec(
        "histogram", "From submission to a worker's first claim of the job.", (), _JOB_SECONDS
    ),
    "serve_app_job_items_total": MetricSpec(
        "counter",
        "Job items scored by the workers, by outcome (succeeded|failed): job progress.",
        ("outcome",),
    ),
    "serve_app_jobs_finished_total": MetricSpec("counter", "Jobs finished by state.", ("state",)),
    "serve_app_job_duration_seconds": MetricSpec(
        "histogram", "From submission to finish.", (), _JOB_SECONDS
    ),
    "serve_app_webhook_attempts_total": MetricSpec(
        "counter", "Webhook delivery attempts by outcome.", ("outcome",)
    ),
}


def prometheus_names() -> set[str]:
    """Every series name Prometheus can show for :data:`SPECS` (with Ray's prefix)."""
    names: set[str] = set()
    for name, spec in SPECS.items():
        full = PROMETHEUS_PREFIX + name
        if spec.kind == "histogram":
            names.update(full + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(full)
    return names


def _make(name: str) -> Counter | Gauge | Histogram:
    spec = SPECS[name]
    if spec.kind == "counter":
        return Counter(name, spec.description, tag_keys=spec.tags)
    if spec.kind == "gauge":
        return Gauge(name, spec.description, tag_keys=spec.tags)
    return Histogram(name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.tags)


TagSet = tuple[tuple[str, str], ...]


class CounterBatch:
    """Increments of one counter summed in the replica, handed to Ray at most once a second.

    Why: ``Counter.inc`` merges and checks its tags in Python and records through Ray's
    C++ core on every call; for the request counter that was 6 % of an Ingress replica's
    CPU under a ``/healthz`` load. Prometheus scrapes every few seconds, so a second's
    delay changes nothing it shows. A flush is due one second after the first pending
    increment (a timer on the running loop, so the last increments of a burst are not
    held back), or at once outside an event loop. A replica that is killed loses at most
    its last second of counts.
    """

    def __init__(
        self, counter: Counter, period_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._counter = counter
        self._period_s = period_s
        self._clock = clock
        self._pending: dict[TagSet, float] = {}
        self._due: float | None = None  # when the pending increments must be recorded

    def inc(self, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        key: TagSet = tuple(sorted(tags.items())) if tags else ()
        self._pending[key] = self._pending.get(key, 0.0) + value
        if self._due is None:
            self._schedule()
        elif self._clock() >= self._due:  # the timer is late (a busy loop): do not wait
            self.flush()

    def flush(self) -> None:
        pending, self._pending, self._due = self._pending, {}, None
        for key, value in pending.items():
            self._counter.inc(value, tags=dict(key) if key else None)

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a script, a test): record at once
            self.flush()
            return
        self._due = self._clock() + self._period_s
        loop.call_later(self._period_s, self._flush_if_due)

    def _flush_if_due(self) -> None:
        if self._due is not None:
            self.flush()


class IngressMetrics:
    def __init__(self) -> None:
        self.requests = CounterBatch(_make("serve_app_requests_total"))
        self.duration = _make("serve_app_request_duration_seconds")
        self.items = _make("serve_app_request_items")
        self.shed = CounterBatch(_make("serve_app_shed_requests_total"))
        self.prediction_cache = _make("serve_app_prediction_cache_total")
        self.coalesced = _make("serve_app_coalesced_batch_items")
        self.job_items_submitted = _make("serve_app_job_items_submitted_total")
        self._cache_seen = (0, 0)

    def sync_prediction_cache(self, hits: int, misses: int) -> None:
        """Add the cache's hits and misses since the last sync: no cost per look-up."""
        seen_hits, seen_misses = self._cache_seen
        if hits > seen_hits:
            self.prediction_cache.inc(hits - seen_hits, tags={"result": "hit"})
        if misses > seen_misses:
            self.prediction_cache.inc(misses - seen_misses, tags={"result": "miss"})
        self._cache_seen = (hits, misses)

    def record_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "method": method, "status": str(status)})
        self.duration.observe(seconds, tags={"route": route})
        if status in (429, 503):
            self.shed.inc(tags={"status": str(status)})


class ModelMetrics:
    def __init__(self) -> None:
        self.batch_items = _make("serve_app_model_batch_items")
        self.batch_requests = _make("serve_app_model_batch_requests")
        self.predict_seconds = _make("serve_app_model_predict_seconds")
        self.degraded_items = _make("serve_app_degraded_items_total")

    def record_predict(self, rows: int, seconds: float) -> None:
        self.predict_seconds.observe(seconds)


class FetcherMetrics:
    def __init__(self) -> None:
        self.cache = _make("serve_app_feature_cache_total")
        self.lookups = _make("serve_app_feature_lookups_total")
        self.lookup_seconds = _make("serve_app_feature_lookup_seconds")


def item_outcomes(results: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Stored job results counted by outcome, as the queue counts ``failed`` (an error)."""
    failed = succeeded = 0
    for result in results:
        if "error" in result:
            failed += 1
        else:
            succeeded += 1
    return {"succeeded": succeeded, "failed": failed}


class JobMetrics:
    def __init__(self) -> None:
        self.queue_depth = _make("serve_app_job_queue_depth")
        self.oldest_queued_age = _make("serve_app_job_queue_oldest_age_seconds")
        self.queue_wait = _make("serve_app_job_queue_wait_seconds")
        self.items = _make("serve_app_job_items_total")
        self.jobs = _make("serve_app_jobs_finished_total")
        self.duration = _make("serve_app_job_duration_seconds")
        self.webhooks = _make("serve_app_webhook_attempts_total")

    def record_items(self, results: Iterable[Mapping[str, Any]]) -> None:
        """Job progress: a chunk's stored results by outcome (no zero increments)."""
        for outcome, count in item_outcomes(results).items():
            if count:
                self.items.inc(count, tags={"outcome": outcome})
