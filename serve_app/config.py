"""Typed configuration, validated at start-up, and where the YAML is read.

The Serve YAML is the single source of truth; the defaults of every setting live here,
once, so a YAML says only what differs. Two kinds of settings:

* ``args`` of the application -> :class:`AppConfig`. Structural settings (paths, store,
  auth, limits); changing them redeploys the application.
* ``user_config`` of a deployment -> the ``*Tuning`` models. Knobs that replicas apply
  in place through ``reconfigure()`` without restarting (batch size and wait, cache TTLs).
  Serve calls ``reconfigure()`` only when a YAML gives a ``user_config``; otherwise a
  replica starts with the model's defaults.

Deployment options that Serve itself reads (``num_cpus``, ``autoscaling_config``,
``max_ongoing_requests``) cannot be inherited between YAML files: each YAML that starts
the app states them (a test keeps ``docker.yaml`` equal to ``config.yaml`` there).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.errors import ConfigError
from serve_app.net_policy import parse_host_rule

SQLITE_PREFIX = "sqlite:///"
# The backend of every store, queue and cache is chosen by its URL's scheme, here only.
STORE_SCHEMES = (SQLITE_PREFIX, "redis://", "rediss://", "http://", "https://")
QUEUE_SCHEMES = (SQLITE_PREFIX, "postgresql://", "postgres://")
CACHE_SCHEMES = ("redis://", "rediss://")


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in the YAML or a request body fails loudly."""

    model_config = ConfigDict(extra="forbid")


class _Settings(StrictModel):
    """Settings: errors name the setting and the reason but never echo its value, which
    may be a URL with a password (Serve's status and logs, tracebacks, show them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///path`` URL, or None for any other scheme.

    The one place that parses the prefix: ``sqlite:///var/x.db`` is relative,
    ``sqlite:////abs/x.db`` absolute.
    """
    return Path(url.removeprefix(SQLITE_PREFIX)) if url.startswith(SQLITE_PREFIX) else None


def url_scheme(url: str, schemes: tuple[str, ...], what: str) -> str:
    """The scheme prefix of ``url`` among ``schemes``, or ValueError naming them."""
    for scheme in schemes:
        if url.startswith(scheme):
            return scheme
    raise ValueError(f"{what} url must start with {', '.join(schemes)}")


def check_url(url: str, schemes: tuple[str, ...], what: str) -> str:
    """Validate a URL's scheme; a URL that is wholly ``${VAR}`` is checked when opened.

    So a YAML can say ``url: ${SERVE_APP_REDIS_URL}`` and be validated where that
    variable is not set (CI, the ``k8s`` command); the replica that opens it needs it.
    """
    expanded = os.path.expandvars(url)
    if not expanded.startswith("${"):
        url_scheme(expanded, schemes, what)
    return url


ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(url: str) -> str:
    """``${VAR}`` in a URL comes from the environment: passwords never sit in a YAML.

    Expanded where a connection is opened, in the replica, so the secret never travels in
    the deployment's arguments; validation (:func:`check_url`) only checks the scheme.
    """
    expanded = os.path.expandvars(url)
    if "${" in expanded:  # named, never the URL: the rest of it may hold a password
        unset = sorted(set(ENV_REFERENCE.findall(expanded)))
        raise ValueError(f"unset environment variable(s) in a url: {', '.join(unset)}")
    return expanded


def _resolve_url(url: str, base: Path) -> str:
    """A relative SQLite path made absolute against ``base``, after ``${VAR}``: a file
    path is no secret, and made absolute first, ``sqlite:///${DATA}/x.db`` became
    ``BASE/${DATA}/x.db``. Other URLs keep their variables (passwords) for the replica."""
    expanded = os.path.expandvars(url)
    if expanded.startswith(SQLITE_PREFIX) and "${" not in expanded:
        url = expanded
    path = sqlite_path(url)
    return url if path is None else SQLITE_PREFIX + str((base / path).resolve())


def _resolve_file(name: str | None, base: Path) -> str | None:
    return None if name is None else str((base / name).resolve())


class ArtifactConfig(_Settings):
    """Where the example data and model live, and how to build them when missing."""

    model_dir: str = "var/model"
    build_if_missing: bool = Field(True, description="First start builds store and model.")
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="The model file's expected sha256 (`serve-app build` prints it); a "
        "mismatch refuses to start. Pinned here, not beside the model, so whoever can "
        "write the model directory cannot forge it.",
    )
    allow_unpinned: bool = Field(
        False,
        description="Load a model without a sha256 pin (its metadata.json checksum only "
        "catches corruption). A model built by this very start is accepted unpinned anyway.",
    )
    n_entities: int = Field(100_000, ge=1_000)
    seed: int = 7


class StoreConfig(_Settings):
    """The feature store behind the FeatureFetcher pool."""

    url: str = Field(
        "sqlite:///var/features.db",
        description="sqlite:///FILE, redis://[:${PASSWORD}@]HOST:PORT/DB or "
        "http(s)://feature-api; ${VAR} is read from the environment.",
    )
    timeout_s: float = Field(0.5, gt=0, le=30, description="Per look-up attempt.")
    attempts: int = Field(2, ge=1, le=5)
    on_error: Literal["degrade", "fail"] = Field(
        "degrade",
        description="degrade: score on defaults, marked degraded; fail: 503. The same for "
        "one entity whose stored row is corrupt (no flat JSON object): degrade scores it on "
        "defaults, fail gives that item alone 502 feature_row_invalid; its batch-mates are "
        "scored.",
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        return check_url(url, STORE_SCHEMES, "store")


class AuthConfig(_Settings):
    """API-key auth for the data endpoints. Keys come from env and/or a secret file."""

    enabled: bool = True
    keys_env: str = "SERVE_APP_API_KEYS"
    keys_file: str | None = Field(
        ".secrets/api_keys",
        description="`serve-app keygen [--id NAME]` creates it (mode 0600); lines are KEY or "
        "NAME:KEY, and a named key's jobs belong to NAME (rotation keeps them).",
    )
    reload_interval_s: float = Field(
        2.0,
        gt=0,
        le=300,
        description="Every replica re-reads keys_file this often (on the next request) and "
        "applies a changed content: revoked keys stop working everywhere within it.",
    )


class PredictionCacheConfig(_Settings):
    """LRU + TTL cache of finished predictions in each ingress replica, optionally shared."""

    enabled: bool = True
    maxsize: int = Field(100_000, ge=1)
    ttl_s: float = Field(300.0, gt=0)
    scope: Literal["per_key", "shared"] = Field(
        "per_key",
        description="per_key: each API key id has its own entries, so `cached: true` "
        "tells a caller only what it asked itself (the FeatureFetcher's row cache is still "
        "shared: a timing hint); shared: callers share hits, and learn which (entity, "
        "context) others scored within ttl_s.",
    )
    url: str | None = Field(
        None,
        description="redis://HOST:PORT/DB: Ingress replicas on every node share hits "
        "(keyed by model version, expiry by Redis TTL); the local LRU stays in front.",
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str | None) -> str | None:
        if url is None:
            return None
        return check_url(url, CACHE_SCHEMES, "prediction_cache")


class LimitsConfig(_Settings):
    """Input limits; anything beyond them is a 4xx, never a slow death."""

    max_batch_items: int = Field(1_000, ge=1, le=100_000)
    max_body_bytes: int = Field(
        512_000,
        ge=1_024,
        description="Of /v1/predict and /v1/predict/batch; unset, 512 KB or 400 bytes per "
        "max_batch_items if more. Parsing holds the GIL even in a thread, and so stalls "
        "the replica: a 2 MB body of empty items took 73 ms, 512 KB 22 ms. A 1,000-item "
        "batch with 64-character ids and every context field is 212-262 KB pretty-printed.",
    )
    request_timeout_s: float = Field(10.0, gt=0)
    body_read_timeout_s: float = Field(
        20.0,
        gt=0,
        le=600,
        description="A request body over 16 KiB (a job's too) must arrive whole within "
        "this, else 408 body_timeout; keep it below Serve's http_options.request_timeout_s "
        "(30 s in the shipped configs), which otherwise answers first, in plain text. "
        "Smaller bodies HAProxy holds whole before it forwards them (10 s).",
    )
    max_queue_delay_s: float = Field(
        0.4,
        gt=0,
        le=60,  # a load test may turn shedding almost off (configs/loadtest.yaml: 30 s)
        description="Admission: a request that would wait longer than this (measured per "
        "Ingress replica: in-flight / drain rate) gets 503 + Retry-After at once. 0.1 s "
        "shed 95% of a 128-connection closed-loop load whose natural queueing is ~0.2 s.",
    )
    max_inflight_requests: int = Field(
        200,
        ge=1,
        description="Per Ingress replica, a backstop behind max_queue_delay_s: past it 503 "
        "+ Retry-After at once. Keep it below the Ingress's max_ongoing_requests.",
    )
    max_uploads_per_key: int = Field(
        16,
        ge=1,
        description="Per Ingress replica and API key: request bodies arriving for over 1 s. "
        "The key's next request is a 429 for that key alone (with auth on). Admitted "
        "requests count against everyone's admission until their bodies are in, so without "
        "it one key's stalled uploads held the backstop and other keys got 503 for up to "
        "body_read_timeout_s. A burst's bodies arrive within milliseconds: not counted.",
    )

    @model_validator(mode="before")
    @classmethod
    def _body_room_for_a_full_batch(cls, data: Any) -> Any:
        """Unset, the body limit grows with max_batch_items (a raised item cap used to
        meet a 413 first)."""
        if isinstance(data, dict) and "max_body_bytes" not in data:
            items = data.get("max_batch_items")
            if isinstance(items, int) and items * 400 > 512_000:
                data = {**data, "max_body_bytes": items * 400}
        return data


class WebhookConfig(_Settings):
    """Signed completion webhooks (Standard Webhooks), their retries and URL policy."""

    secret_env: str = "SERVE_APP_WEBHOOK_SECRET"
    secret_file: str | None = Field(
        ".secrets/webhook_secret", description="`serve-app keygen` creates it."
    )
    secret_per_key: bool = Field(
        True,
        description="Sign each API key's webhooks with that key's own secret (`serve-app "
        "webhook-secret`), so one tenant cannot forge another's. false: every webhook "
        "with the service's secret, as before: for receivers not yet given theirs.",
    )
    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="Hosts allowed although not public, each with its port: HOST:PORT "
        '(a name, IP or CIDR; IPv6 as [ADDR]:PORT), e.g. ["127.0.0.1:8123"]. Without a port '
        "only allowed_ports.",
    )
    allowed_ports: tuple[int, ...] = Field(
        (80, 443), description="Ports a public callback URL may use."
    )
    timeout_s: float = Field(
        5.0, gt=0, le=60, description="One deadline per attempt: DNS, connect, send, response."
    )
    max_response_bytes: int = Field(
        65_536, ge=0, description="At most this much of a receiver's answer is read."
    )
    max_attempts: int = Field(8, ge=1, le=50)
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)

    @field_validator("allowed_hosts")
    @classmethod
    def _parseable_hosts(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        for entry in entries:
            parse_host_rule(entry)
        return entries

    @field_validator("allowed_ports")
    @classmethod
    def _valid_ports(cls, ports: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 1 <= port <= 65535 for port in ports):
            raise ValueError("ports are 1-65535")
        return ports

    @model_validator(mode="after")
    def _backoff_grows(self) -> WebhookConfig:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError("backoff_initial_s is more than backoff_max_s")
        return self


class JobsConfig(_Settings):
    """Queued predictions: the durable queue and how workers run jobs."""

    enabled: bool = True
    queue_url: str = Field(
        "sqlite:///var/jobs.db",
        description="sqlite:///FILE (WAL mode) or postgresql://USER:${PASSWORD}@HOST/DB; "
        "leases for at-least-once.",
    )
    max_items: int = Field(100_000, ge=1)
    max_body_bytes: int = Field(16_000_000, ge=1_024)
    max_concurrent_creations_per_key: int = Field(
        2,
        ge=1,
        description="Job submissions one API key may have in progress per Ingress "
        "replica (bounds memory: a body may be 16 MB); beyond it 429 + Retry-After.",
    )
    max_concurrent_creations: int = Field(
        4,
        ge=1,
        description="Job submissions in progress per Ingress replica, all keys together; "
        "past it 503 + Retry-After.",
    )
    max_queued_items_per_key: int = Field(
        300_000,
        ge=1,
        description="Items one API key may have waiting in the queue; past it 429.",
    )
    max_retained_items_per_key: int = Field(
        10_000_000,
        ge=1,
        description="Items (valid or refused) of one API key's jobs kept in the queue's "
        "database, finished ones included until result_ttl_s purges them; past it 429. "
        "The queued-items cap alone let a key store without bound: a job of refused items "
        "queues nothing, yet keeps a result row per item for a week.",
    )
    chunk_size: int = Field(500, ge=1, le=10_000, description="Items per Model call.")
    lease_s: float = Field(
        10.0,
        gt=0,
        description="A dead worker's job is claimed again after this; a live worker renews "
        "its lease every lease_s / 3 while its chunks finish within chunk_timeout_s.",
    )
    chunk_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A Model call for one chunk that takes longer fails the attempt: the "
        "worker stops renewing the lease, and the job is claimed again (max_claims).",
    )
    max_claims: int = Field(5, ge=1, description="A job claimed this often fails (poison job).")
    store_wait_max_s: float = Field(
        30.0,
        gt=0,
        description="Items the feature store could not serve (store.on_error: fail) are "
        "not stored as failed: the worker waits, doubling from 1 s up to this, and scores "
        "them again; the job waits out the outage instead of reporting it per item.",
    )
    store_wait_total_s: float = Field(
        600.0,
        ge=0,
        description="How long one claim of a job waits out such an outage; then its unserved "
        "items are stored as failed (store_unavailable) and it goes on, so a store down "
        "for good ends the job.",
    )
    poll_interval_s: float = Field(0.2, gt=0)
    result_ttl_s: float = Field(7 * 24 * 3600.0, gt=0, description="Then results are purged.")
    results_page_max: int = Field(1_000, ge=1)
    webhooks: WebhookConfig = WebhookConfig()

    @model_validator(mode="after")
    def _a_whole_job_fits_what_a_key_may_keep(self) -> JobsConfig:
        if self.max_retained_items_per_key < self.max_items:
            raise ValueError("max_retained_items_per_key is less than max_items")
        return self

    @field_validator("queue_url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        return check_url(url, QUEUE_SCHEMES, "jobs.queue")


class AppConfig(_Settings):
    """The application's ``args`` in the Serve YAML."""

    artifacts: ArtifactConfig = ArtifactConfig()
    store: StoreConfig = StoreConfig()
    auth: AuthConfig = AuthConfig()
    prediction_cache: PredictionCacheConfig = PredictionCacheConfig()
    limits: LimitsConfig = LimitsConfig()
    jobs: JobsConfig = JobsConfig()
    allow_sqlite_on_cluster: bool = Field(
        False,
        description="Start with a sqlite:/// store or queue on a Ray cluster of more than "
        "one node (each node would see its own files). Refused unless true.",
    )

    def resolved(self, base: Path) -> AppConfig:
        """Return a copy with relative paths made absolute against ``base``.

        Replicas may run in another working directory than ``serve run``; resolving once
        in the builder keeps every replica on the same files.
        """
        jobs = self.jobs
        webhooks = jobs.webhooks.model_copy(
            update={"secret_file": _resolve_file(jobs.webhooks.secret_file, base)}
        )
        return self.model_copy(
            update={
                "artifacts": self.artifacts.model_copy(
                    update={"model_dir": _resolve_file(self.artifacts.model_dir, base)}
                ),
                "store": self.store.model_copy(update={"url": _resolve_url(self.store.url, base)}),
                "auth": self.auth.model_copy(
                    update={"keys_file": _resolve_file(self.auth.keys_file, base)}
                ),
                "jobs": jobs.model_copy(
                    update={"queue_url": _resolve_url(jobs.queue_url, base), "webhooks": webhooks}
                ),
            }
        )


class FetcherTuning(_Settings):
    """``user_config`` of the FeatureFetcher: the per-entity feature cache."""

    cache_enabled: bool = True
    cache_maxsize: int = Field(200_000, ge=1)
    cache_ttl_s: float = Field(60.0, gt=0)
    known_ids_refresh_s: float = Field(
        300.0,
        gt=0,
        description="Reload the set of known entity ids (kept so that unknown ids still get "
        "404 while the store is down) this often; SQLite and Redis stores only.",
    )


class ModelTuning(_Settings):
    """``user_config`` of the Model deployment: how requests are batched."""

    max_batch_size: int = Field(64, ge=1, le=4_096)
    batch_wait_timeout_s: float = Field(
        0.001,
        ge=0,
        le=1,
        description="How long a batch waits for more calls. The Ingress already sends "
        "coalesced lists, so this only merges calls that arrive together (from several "
        "Ingress replicas or JobWorkers); 5 ms here cost every prediction 5 ms.",
    )
    local_features: FetcherTuning | None = Field(
        None,
        description="Look features up inside each Model replica (its own cache, with these "
        "settings, and its own store connection) instead of calling the FeatureFetcher: one "
        "hop fewer per batch. The FeatureFetcher still answers /readyz's store check.",
    )


class IngressTuning(_Settings):
    """``user_config`` of the Ingress: how concurrent single predictions are coalesced.

    Coalescing sends one list per hop to the Model instead of one item per hop, which is
    what keeps the Model's batches full: each hop between deployments costs more than
    scoring one item.
    """

    coalesce_max_batch_size: int = Field(
        1024,
        ge=1,
        le=4_096,
        description="Items per Ingress->Model call, at most. Large on purpose: most of a "
        "Model call's cost is fixed (the hop, the scorer's per-call work), so batch requests "
        "merged into calls of up to 1,024 items scored about 1.35x the items/s of 128 "
        "(1.19x for 128 -> 512, then 1.15x for 512 -> 1,024; loadtests/bench_tuning.py). "
        "Single predictions rarely reach it: a replica holds at most HAProxy's maxconn "
        "(96, configs/serve.env) and limits.max_inflight_requests requests.",
    )
    coalesce_wait_s: float = Field(
        0.002, ge=0, le=1, description="A free call slot waits this long for more items."
    )
    coalesce_max_in_flight: int = Field(
        2, ge=1, le=16, description="Ingress->Model calls at once; items gather meanwhile."
    )
    gc_freeze: bool = Field(
        True,
        description="Freeze the objects the replica holds once started (gc.freeze): full "
        "garbage collections then skip them. With gc_young_threshold, 4x-overload goodput "
        "rose from 51-56 % to 60-74 % of capacity (serve_app/gc_tuning.py).",
    )
    gc_young_threshold: int = Field(
        20_000,
        ge=100,
        le=1_000_000,
        description="Collect Python's young generation every this many net allocations "
        "(CPython's default: 700).",
    )


class JobWorkerTuning(_Settings):
    """``user_config`` of the JobWorker: how many jobs one replica runs at once."""

    concurrent_jobs: int = Field(2, ge=1, le=64)


TUNING_BY_DEPLOYMENT: dict[str, type[_Settings]] = {
    "Ingress": IngressTuning,
    "Model": ModelTuning,
    "FeatureFetcher": FetcherTuning,
    "JobWorker": JobWorkerTuning,
}


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of a shell env file such as ``configs/serve.env``.

    That file is the environment of the process that starts Ray (Ray Serve reads its
    throughput and HAProxy settings only from there); the README's run command sources it
    with the shell, and the tests, the benchmarks and ``serve-app k8s`` read it here.
    python-dotenv parses it as the shell does, quoted multi-line values included.
    """
    with path.open() as env_file:  # a missing file is an error, not an empty environment
        return {key: value or "" for key, value in dotenv_values(stream=env_file).items()}


def read_serve_yaml(path: Path) -> dict[str, Any]:
    """The Serve YAML as a dict, or :class:`ConfigError` naming the file."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise ConfigError(f"{path} is not a Serve config (a mapping with `applications`)")
    return document


def variables_read(serve_config: dict[str, Any]) -> list[str]:
    """Every environment variable a Serve YAML's replicas read: each ``${VAR}`` in it, and
    the API keys' and webhook secret's variables. Every node that runs replicas needs them
    (``serve-app node`` checks; ``serve-app k8s`` takes them from a Secret)."""
    names = set(ENV_REFERENCE.findall(yaml.safe_dump(serve_config)))
    for application in serve_config.get("applications", []):
        config = AppConfig.model_validate(application.get("args") or {})
        if config.auth.enabled:
            names.add(config.auth.keys_env)
        if config.jobs.enabled:
            names.add(config.jobs.webhooks.secret_env)
    return sorted(names)


def load_app_config(path: Path, app_name: str | None = None) -> AppConfig:
    """The validated ``args`` of an application in a Serve YAML (the first, by default)."""
    for application in read_serve_yaml(path).get("applications", []):
        if app_name is None or application.get("name") == app_name:
            return AppConfig.model_validate(application.get("args") or {})
    raise ConfigError(f"no application {app_name or ''} in {path}")
