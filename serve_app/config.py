"""Typed configuration, validated at start-up.

The Serve YAML is the single source of truth. Two kinds of settings live there:

* ``args`` of the application -> :class:`AppConfig`. Structural settings (paths, store,
  auth, limits); changing them redeploys the application.
* ``user_config`` of a deployment -> the ``*Tuning`` models. Knobs that replicas apply
  in place through ``reconfigure()`` without restarting (batch size and wait, cache TTLs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in the YAML must fail start-up, not be ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ArtifactConfig(_Strict):
    """Where the example data and model live, and how to build them when missing."""

    model_dir: str = "var/model"
    build_if_missing: bool = True
    n_entities: int = Field(100_000, ge=1_000)
    seed: int = 7


class StoreConfig(_Strict):
    """The feature store behind the FeatureFetcher pool."""

    url: str = "sqlite:///var/features.db"
    timeout_s: float = Field(0.5, gt=0, le=30)
    attempts: int = Field(2, ge=1, le=5)
    on_error: Literal["degrade", "fail"] = "degrade"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("sqlite:///", "http://", "https://")):
            raise ValueError("store url must start with sqlite:///, http:// or https://")
        return url


class AuthConfig(_Strict):
    """API-key auth for the data endpoints. Keys come from env and/or a secret file."""

    enabled: bool = True
    keys_env: str = "SERVE_APP_API_KEYS"
    keys_file: str | None = ".secrets/api_keys"


class PredictionCacheConfig(_Strict):
    """LRU + TTL cache of finished predictions, in each ingress replica."""

    enabled: bool = True
    maxsize: int = Field(100_000, ge=1)
    ttl_s: float = Field(300.0, gt=0)


class LimitsConfig(_Strict):
    """Input limits; anything beyond them is a 4xx, never a slow death."""

    max_batch_items: int = Field(1_000, ge=1, le=100_000)
    max_body_bytes: int = Field(2_000_000, ge=1_024)
    request_timeout_s: float = Field(10.0, gt=0)
    # per Ingress replica; keep it below the Ingress's max_ongoing_requests
    max_inflight_requests: int = Field(200, ge=1)


class WebhookConfig(_Strict):
    """Signed completion webhooks (Standard Webhooks), their retries and URL policy."""

    secret_env: str = "SERVE_APP_WEBHOOK_SECRET"
    secret_file: str | None = ".secrets/webhook_secret"
    # Hosts (names, IPs or CIDRs) allowed even though they are loopback/private.
    allowed_hosts: tuple[str, ...] = ()
    timeout_s: float = Field(5.0, gt=0, le=60)
    max_attempts: int = Field(8, ge=1, le=50)
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)


class JobsConfig(_Strict):
    """Queued predictions: the durable queue and how workers run jobs."""

    enabled: bool = True
    queue_url: str = "sqlite:///var/jobs.db"
    max_items: int = Field(100_000, ge=1)
    max_body_bytes: int = Field(16_000_000, ge=1_024)
    chunk_size: int = Field(500, ge=1, le=10_000)
    lease_s: float = Field(30.0, gt=0)
    max_claims: int = Field(5, ge=1)
    poll_interval_s: float = Field(0.2, gt=0)
    result_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)
    results_page_max: int = Field(1_000, ge=1)
    webhooks: WebhookConfig = WebhookConfig()


class AppConfig(_Strict):
    """The application's ``args`` in the Serve YAML."""

    artifacts: ArtifactConfig = ArtifactConfig()
    store: StoreConfig = StoreConfig()
    auth: AuthConfig = AuthConfig()
    prediction_cache: PredictionCacheConfig = PredictionCacheConfig()
    limits: LimitsConfig = LimitsConfig()
    jobs: JobsConfig = JobsConfig()

    def resolved(self, base: Path) -> AppConfig:
        """Return a copy with relative paths made absolute against ``base``.

        Replicas may run in another working directory than ``serve run``; resolving once
        in the builder keeps every replica on the same files.
        """
        model_dir = str((base / self.artifacts.model_dir).resolve())
        url = self.store.url
        if url.startswith("sqlite:///"):
            url = "sqlite:///" + str((base / url.removeprefix("sqlite:///")).resolve())
        keys_file = self.auth.keys_file
        if keys_file is not None:
            keys_file = str((base / keys_file).resolve())
        queue_url = self.jobs.queue_url
        if queue_url.startswith("sqlite:///"):
            queue_url = "sqlite:///" + str((base / queue_url.removeprefix("sqlite:///")).resolve())
        secret_file = self.jobs.webhooks.secret_file
        if secret_file is not None:
            secret_file = str((base / secret_file).resolve())
        webhooks = self.jobs.webhooks.model_copy(update={"secret_file": secret_file})
        return self.model_copy(
            update={
                "artifacts": self.artifacts.model_copy(update={"model_dir": model_dir}),
                "store": self.store.model_copy(update={"url": url}),
                "auth": self.auth.model_copy(update={"keys_file": keys_file}),
                "jobs": self.jobs.model_copy(update={"queue_url": queue_url, "webhooks": webhooks}),
            }
        )


class ModelTuning(_Strict):
    """``user_config`` of the Model deployment: how requests are batched."""

    max_batch_size: int = Field(64, ge=1, le=4_096)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1)


class IngressTuning(_Strict):
    """``user_config`` of the Ingress: how concurrent single predictions are coalesced.

    Coalescing sends one list per hop to the Model instead of one item per hop, which is
    what keeps the Model's batches full (see shared/design.md: hops are the cost).
    """

    coalesce_max_batch_size: int = Field(256, ge=1, le=4_096)
    coalesce_wait_s: float = Field(0.002, ge=0, le=1)
    # calls to the Model in flight at once; more items gather while they run
    coalesce_max_in_flight: int = Field(2, ge=1, le=16)


class JobWorkerTuning(_Strict):
    """``user_config`` of the JobWorker: how many jobs one replica runs at once."""

    concurrent_jobs: int = Field(2, ge=1, le=64)


class FetcherTuning(_Strict):
    """``user_config`` of the FeatureFetcher: the per-entity feature cache."""

    cache_enabled: bool = True
    cache_maxsize: int = Field(200_000, ge=1)
    cache_ttl_s: float = Field(60.0, gt=0)
