"""Application metrics through ``ray.serve.metrics``: they show in the Ray dashboard and on
the Prometheus endpoint of every node, tagged with deployment and replica by Serve.

Each deployment creates only the metrics it records, once, in its constructor.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

_BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
_LATENCY_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


class ModelMetrics:
    def __init__(self) -> None:
        self.batch_items = Histogram(
            "serve_app_model_batch_items",
            "Items per predict_proba call (after dedupe).",
            boundaries=_BATCH_BOUNDARIES,
        )
        self.batch_requests = Histogram(
            "serve_app_model_batch_requests",
            "Requests merged into one model batch.",
            boundaries=_BATCH_BOUNDARIES,
        )
        self.predict_ms = Histogram(
            "serve_app_model_predict_ms",
            "Wall time of one predict_proba call.",
            boundaries=_LATENCY_MS_BOUNDARIES,
        )
        self.degraded_items = Counter(
            "serve_app_degraded_items", "Items scored on default features."
        )

    def record_predict(self, rows: int, seconds: float) -> None:
        self.predict_ms.observe(seconds * 1000)


class FetcherMetrics:
    def __init__(self) -> None:
        self.cache = Counter(
            "serve_app_feature_cache", "Feature cache look-ups.", tag_keys=("result",)
        )
        self.store_calls = Counter(
            "serve_app_store_calls", "Bulk store look-ups by outcome.", tag_keys=("outcome",)
        )
        self.store_ms = Histogram(
            "serve_app_store_latency_ms",
            "Latency of one bulk store look-up.",
            boundaries=_LATENCY_MS_BOUNDARIES,
        )


class JobMetrics:
    def __init__(self) -> None:
        self.queue_depth = Gauge("serve_app_job_queue_depth", "Jobs queued or running.")
        self.items = Counter("serve_app_job_items", "Job items scored.")
        self.jobs = Counter(
            "serve_app_jobs_finished", "Jobs finished by state.", tag_keys=("state",)
        )
        self.latency_s = Histogram(
            "serve_app_job_latency_s",
            "From submission to finish.",
            boundaries=[0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600],
        )
        self.webhooks = Counter(
            "serve_app_webhook_attempts", "Webhook attempts by outcome.", tag_keys=("outcome",)
        )
