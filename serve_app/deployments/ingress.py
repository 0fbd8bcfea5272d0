"""The Ingress deployment: the HTTP routes, wired to the scoring core and the job queue.

Request path of one item, and its hops:

    client -> Ingress  (auth, validate, prediction cache; a hit ends here: 0 hops)
           -> Model    (1 hop per *coalesced list*, not per item)
           -> FeatureFetcher (1 hop per *model batch*)

Concurrent single predictions are coalesced here (``scoring/coalescer.py``) and cross the
hop to the Model as one list; a batch request crosses it as one list of its unique misses.
The logic lives in ``serve_app/scoring`` and ``serve_app/api``; this module only wires
handles, the coalescer and the config to it.
"""

# No `from __future__ import annotations` here: FastAPI must see real types on routes.

import asyncio
import logging
import os
import time
from typing import Annotated, Any

from fastapi import FastAPI, Header, Path, Query
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from serve_app.api.admission import Admission, AdmissionMiddleware
from serve_app.api.auth import KeyChecker
from serve_app.api.body import CloseAfterUnreadBody
from serve_app.api.deps import (
    Admitted,
    ApiContext,
    JsonBody,
    Owner,
    install_context,
)
from serve_app.api.docs import install_offline_docs
from serve_app.api.errors import install_error_handlers
from serve_app.api.job_input import JobCreator, JobRawBody
from serve_app.api.methods import install_method_not_allowed
from serve_app.api.observability import (
    ModelTiming,
    ObservabilityMiddleware,
    current_timing,
    install_metrics,
)
from serve_app.api.openapi import inline_schema
from serve_app.api.quotas import CreationSlot, CreationSlots, install_creation_slots
from serve_app.api.request_id import RequestIdMiddleware
from serve_app.api.responses import ScoreResponse
from serve_app.api.schemas import (
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    JobRequest,
    PredictRequest,
    PredictResponse,
)
from serve_app.api.uploads import UploadSlots
from serve_app.api.validation import check_item_count, parse_body, parse_item, parse_items
from serve_app.cache import PredictionCache, SharedPredictionCache, SingleFlightCache
from serve_app.config import AppConfig, IngressTuning, PredictionCacheConfig, expand_env
from serve_app.errors import Conflict, InvalidInput, NotFound, Overloaded, ServiceError
from serve_app.gc_tuning import tune_gc
from serve_app.jobs import JobQueue, open_job_queue
from serve_app.jobs.webhooks import read_secret
from serve_app.logs import current_request_id, route_to_serve_logs, tag_request_ids
from serve_app.metrics import IngressMetrics
from serve_app.scoring.answers import Answers, score_batch, score_one
from serve_app.scoring.coalescer import Coalescer
from serve_app.scoring.items import Item, ItemResult, ModelAnswer, item_key

logger = logging.getLogger("serve_app.ingress")
READINESS_TTL_S = 1.0

app = FastAPI(
    title="serve_app",
    summary="Score entities with a scikit-learn model: one, thousands, or later.",
    version="0.1.0",
    docs_url=None,  # served from local assets: /docs works without internet
    redoc_url=None,
    # A trailing slash is a 404, not a 307 to a Location built from the Host header:
    # anyone could make the service redirect to a host of theirs (and to http://).
    redirect_slashes=False,
)
app.add_middleware(RequestIdMiddleware)
app.add_middleware(AdmissionMiddleware)  # before routing and auth: a refusal is cheap
app.add_middleware(ObservabilityMiddleware)  # times and counts everything
app.add_middleware(CloseAfterUnreadBody)  # outermost: sees every answer, refusals too
install_offline_docs(app)
install_error_handlers(app)
install_method_not_allowed(app)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 409, 413, 415, 422, 502, 503)
}
# The scoring routes: one key with limits.max_uploads_per_key bodies arriving gets 429.
_SCORING_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    429: {"model": ErrorResponse, "description": "This key has too many bodies arriving."},
}
JobId = Annotated[str, Path(description="The id returned by POST /v1/jobs.")]
# Printable ASCII, spaces only inside: an empty key (a client template whose variable
# was unset) would otherwise become one idempotency slot shared by every such job.
_IDEMPOTENCY_KEY = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$"
# OpenAPI links: what a client (or a stateful fuzzer) does next with a new job's id.
_JOB_LINKS = {
    "GetJob": {
        "operationRef": "#/paths/~1v1~1jobs~1{job_id}/get",
        "parameters": {"job_id": "$response.body#/id"},
    },
    "CancelJob": {
        "operationRef": "#/paths/~1v1~1jobs~1{job_id}~1cancel/post",
        "parameters": {"job_id": "$response.body#/id"},
    },
}
# Bounds of a results page request: past them a 422, never an integer overflow (500).
MAX_RESULT_OFFSET = 10_000_000
MAX_RESULT_LIMIT = 100_000


def _json_body_doc(model: type) -> dict[str, Any]:
    """OpenAPI for a body we read ourselves (to bound its size and validate per item)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(model)}},
        }
    }


# What a coalesced caller gets: version, its results (one per item it sent, in order), and
# the call's (start, round trip, Model timings) for its Server-Timing.
_Coalesced = tuple[str, list[ItemResult], tuple[float, float, ModelTiming | None]]


def _mark_admitted() -> None:
    """Auth, admission and body validation are done: their time is "admission"."""
    timing = current_timing()
    if timing is not None:
        timing.admitted()


# Predictions are idempotent: a call whose Model replica died is sent once more.
_RETRIES_ON_REPLICA_DEATH = 1


def _prediction_cache(config: PredictionCacheConfig) -> PredictionCache:
    """The local LRU, or the local LRU in front of Redis when ``url`` is set."""
    if config.enabled and config.url:
        return SharedPredictionCache(expand_env(config.url), config.maxsize, config.ttl_s)
    return PredictionCache(config.maxsize, config.ttl_s, config.enabled)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        model: DeploymentHandle,
        fetcher: DeploymentHandle,
        config: dict[str, Any],
        job_worker: DeploymentHandle | None = None,
    ) -> None:
        route_to_serve_logs()
        self._metrics = IngressMetrics()
        install_metrics(app, self._metrics)
        self._config = AppConfig.model_validate(config)
        install_context(
            app,
            ApiContext(
                config=self._config,
                auth=KeyChecker(self._config.auth),
                admission=Admission(
                    self._config.limits.max_queue_delay_s,
                    self._config.limits.max_inflight_requests,
                ),
                uploads=(
                    UploadSlots(self._config.limits.max_uploads_per_key)
                    if self._config.auth.enabled
                    else None
                ),
            ),
        )
        self._model = model
        self._fetcher = fetcher
        self._job_worker = job_worker
        jobs = self._config.jobs
        install_creation_slots(
            app.state,
            CreationSlots(jobs.max_concurrent_creations_per_key, jobs.max_concurrent_creations),
        )
        self._webhook_secret = read_secret(jobs.webhooks)  # a bad one stops start: before opening
        self._jobs: JobQueue | None = open_job_queue(jobs.queue_url) if jobs.enabled else None
        self._job_creator = (
            JobCreator(jobs, self._jobs, self._webhook_secret is not None) if self._jobs else None
        )
        cache = self._config.prediction_cache
        self._answers = Answers(_prediction_cache(cache), per_key=cache.scope == "per_key")
        self._background: set[asyncio.Task[None]] = set()
        # /readyz is open: at most one check (a Model call, a FeatureFetcher call and a
        # store ping) per replica a second however often anyone asks, shared by callers.
        self._readiness: SingleFlightCache[str, dict[str, Any]] = SingleFlightCache(
            maxsize=1, ttl_s=READINESS_TTL_S
        )
        tuning = IngressTuning()
        # Entries are (items, request id): one item for /v1/predict, a request's cache
        # misses for /v1/predict/batch; calls carry up to coalesce_max_batch_size items.
        self._coalescer: Coalescer[tuple[list[Item], str], _Coalesced] = Coalescer(
            self._score_lists,
            tuning.coalesce_max_batch_size,
            tuning.coalesce_wait_s,
            tuning.coalesce_max_in_flight,
            size=lambda entry: len(entry[0]),
        )
        tune_gc(tuning.gc_freeze, tuning.gc_young_threshold)  # last: freeze what start made

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        tuning = IngressTuning.model_validate(user_config or {})
        self._coalescer.configure(
            tuning.coalesce_max_batch_size, tuning.coalesce_wait_s, tuning.coalesce_max_in_flight
        )
        tune_gc(tuning.gc_freeze, tuning.gc_young_threshold)

    # ---- the hop to the Model -------------------------------------------------------

    async def _call_model(self, items: list[Item]) -> ModelAnswer:
        """One call to the Model with a list of items; Ray failures become 503s.

        When the replica that took the call dies (its node was lost, or a replica it
        called), the call is sent once more within the same deadline: predictions are
        idempotent, and Serve's router has by then dropped the dead replica, so the retry
        goes to a live one. A second death is a 503.
        """
        timeout = self._config.limits.request_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for attempt in range(1 + _RETRIES_ON_REPLICA_DEATH):
            response = self._model.score.remote(items)
            try:
                return await asyncio.wait_for(response, max(deadline - loop.time(), 0.001))
            except TimeoutError as exc:
                response.cancel()
                raise Overloaded(f"the model did not answer within {timeout}s") from exc
            except BackPressureError as exc:
                raise Overloaded("the model deployment is at capacity; retry shortly") from exc
            except RayActorError as exc:  # ActorDiedError, ActorUnavailableError
                if attempt == _RETRIES_ON_REPLICA_DEATH or loop.time() >= deadline:
                    raise ServiceError("the model deployment is restarting; retry shortly") from exc
                logger.warning("model replica died during a call; retrying once: %r", exc)
            except DeploymentUnavailableError as exc:
                raise ServiceError("the model deployment is restarting; retry shortly") from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _score_lists(self, entries: list[tuple[list[Item], str]]) -> list[_Coalesced]:
        """One hop for the items of many concurrent requests (called by the coalescer).

        The call carries the request ids of every request in it (for the Model's and the
        FeatureFetcher's log lines), and each caller gets its own results and the call's
        timings back.
        """
        tag_request_ids(request_id for _, request_id in entries)
        flat = [item for items, _ in entries for item in items]
        self._metrics.coalesced.observe(len(flat))
        started = time.perf_counter()
        answer = await self._call_model(flat)
        call = (started, time.perf_counter() - started, answer.get("timing"))
        results, version = answer["results"], answer["model_version"]
        coalesced: list[_Coalesced] = []
        offset = 0
        for items, _ in entries:
            coalesced.append((version, results[offset : offset + len(items)], call))
            offset += len(items)
        return coalesced

    async def _submit_many(self, items: list[Item]) -> ModelAnswer:
        """Items through the coalescer; its waits go to the request's Server-Timing."""
        queued = time.perf_counter()
        version, results, (started, rpc_s, model_timing) = await self._coalescer.submit(
            (items, current_request_id())
        )
        timing = current_timing()
        if timing is not None:
            timing.add("coalesce", started - queued)
            timing.add_model(model_timing, rpc_s)
        return {"model_version": version, "results": results}

    async def _submit(self, item: Item) -> tuple[str, ItemResult]:
        answer = await self._submit_many([item])
        return answer["model_version"], answer["results"][0]

    def _count_scoring(self, route: str, items: int) -> None:
        """Items per request, and the prediction cache's new hits and misses."""
        self._metrics.items.observe(items, tags={"route": route})
        cache = self._answers.cache
        self._metrics.sync_prediction_cache(cache.hits, cache.misses)

    async def _shared_prefetch(self, entries: list[Item | InvalidInput], owner: str) -> None:
        """With a shared cache: copy other replicas' answers for these items first.

        Invalid entries are skipped; duplicates cost nothing (one MGET of distinct keys).
        """
        cache = self._answers.cache
        version = self._answers.version
        if isinstance(cache, SharedPredictionCache) and version is not None:
            await cache.prefetch(
                [
                    self._answers.cache_key(item_key(entry), owner, version)
                    for entry in entries
                    if not isinstance(entry, InvalidInput)
                ]
            )

    def _shared_flush(self) -> None:
        """With a shared cache: publish new answers in the background, off the request."""
        cache = self._answers.cache
        if isinstance(cache, SharedPredictionCache):
            task = asyncio.get_running_loop().create_task(cache.flush())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def __del__(self) -> None:
        """Serve calls this when the replica stops: release the queue and cache pools.

        Also after a failed ``__init__``: what it never made is skipped, or an
        AttributeError here buried the start-up error in the replica's log."""
        job_creator: JobCreator | None = getattr(self, "_job_creator", None)
        if job_creator is not None:
            job_creator.close()  # its worker processes end with it
        jobs: JobQueue | None = getattr(self, "_jobs", None)
        if jobs is not None:
            await asyncio.to_thread(jobs.close)
        answers: Answers | None = getattr(self, "_answers", None)
        cache = answers.cache if answers is not None else None
        if isinstance(cache, SharedPredictionCache):
            await cache.flush()
            await cache.aclose()

    def _job_queue(self) -> JobQueue:
        if self._jobs is None:
            raise NotFound("queued jobs are disabled in this deployment (jobs.enabled)")
        return self._jobs

    # ---- health ----------------------------------------------------------------------

    @app.get("/healthz", tags=["health"])
    async def healthz(self) -> dict[str, str]:
        """Liveness: the process answers. Open, no key needed."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def readyz(self) -> JSONResponse:
        """Readiness: the model is loaded and the feature store answers. Open, so checked
        at most once a second per replica (``READINESS_TTL_S``)."""
        found, _ = await self._readiness.get_many(["readyz"], self._check_ready)
        body = found["readyz"]
        ready = body["status"] == "ready"
        headers = {} if ready else {"Retry-After": "2"}
        return JSONResponse(body, status_code=200 if ready else 503, headers=headers)

    async def _check_ready(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        try:
            metadata, store_ok = await asyncio.wait_for(
                asyncio.gather(self._model.metadata.remote(), self._fetcher.ping.remote()), 5.0
            )
        except Exception as exc:  # any failure here means "not ready", never a 500
            logger.warning("readiness check failed: %r", exc)
            metadata, store_ok = None, False
        ready = metadata is not None and store_ok
        body = {
            "status": "ready" if ready else "not_ready",
            "model_loaded": metadata is not None,
            "model_version": metadata["version"] if metadata else None,
            "store_reachable": store_ok,
        }
        return dict.fromkeys(keys, body)

    # ---- scoring ---------------------------------------------------------------------

    @app.get("/v1/model", tags=["model"], responses=_ERRORS)
    async def model_metadata(self, _owner: Owner) -> dict[str, Any]:
        """The served model's metadata: version, features, training metrics, checksum."""
        return await self._model.metadata.remote()

    @app.post(
        "/v1/predict",
        tags=["predict"],
        response_model=PredictResponse,
        responses=_SCORING_ERRORS,
        openapi_extra=_json_body_doc(PredictRequest),
    )
    async def predict(self, owner: Owner, _admitted: Admitted, body: JsonBody) -> ScoreResponse:
        """Score one entity, with optional request-time context."""
        item = parse_item(body)
        _mark_admitted()
        await self._shared_prefetch([item], owner)
        try:
            return ScoreResponse(await score_one(item, owner, self._answers, self._submit))
        finally:
            self._shared_flush()
            self._count_scoring("/v1/predict", 1)

    @app.post(
        "/v1/predict/batch",
        tags=["predict"],
        response_model=BatchResponse,
        responses=_SCORING_ERRORS,
        openapi_extra=_json_body_doc(BatchRequest),
    )
    async def predict_batch(
        self, owner: Owner, _admitted: Admitted, body: JsonBody
    ) -> ScoreResponse:
        """Score many items. Results come in input order; each is a score or an error."""
        raw_items = parse_body(BatchRequest, body).items
        limit = self._config.limits.max_batch_items
        check_item_count(len(raw_items), limit, " (use /v1/jobs for more)")
        entries = parse_items(raw_items)
        _mark_admitted()
        await self._shared_prefetch(entries, owner)
        try:
            answer = await score_batch(entries, owner, self._answers, self._submit_many)
            return ScoreResponse(answer)
        finally:
            self._shared_flush()
            self._count_scoring("/v1/predict/batch", len(entries))

    # ---- queued jobs -------------------------------------------------------------------

    @app.post(
        "/v1/jobs",
        tags=["jobs"],
        status_code=202,
        responses={
            **_ERRORS,
            202: {"description": "Queued.", "links": _JOB_LINKS},
            429: {"model": ErrorResponse, "description": "This key's job quota is in use."},
        },
        openapi_extra=_json_body_doc(JobRequest),
    )
    async def create_job(
        self,
        owner: Owner,
        _admitted: Admitted,
        slot: CreationSlot,
        body: JobRawBody,
        idempotency_key: Annotated[
            str | None, Header(max_length=128, pattern=_IDEMPOTENCY_KEY)
        ] = None,
    ) -> JSONResponse:
        """Queue items for scoring now, read results later (poll or webhook).

        One key may have a few submissions in progress and a bounded number of items
        queued (429 + Retry-After beyond); the body is parsed, validated and stored away
        from the event loop (a large one in a worker process).
        """
        self._job_queue()  # 404 when jobs are disabled
        assert self._job_creator is not None
        work = asyncio.ensure_future(self._job_creator.create(body, owner, idempotency_key))
        slot.until_done(work)  # a caller that goes away leaves the creation running
        job, created = await asyncio.shield(work)
        headers = {"Location": f"/v1/jobs/{job.id}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        else:
            self._metrics.job_items_submitted.inc(job.total)
            self._metrics.items.observe(job.total, tags={"route": "/v1/jobs"})
        return JSONResponse(job.public(), status_code=202, headers=headers)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], responses=_ERRORS)
    async def get_job(
        self,
        job_id: JobId,
        owner: Owner,
        offset: Annotated[int, Query(ge=0, le=MAX_RESULT_OFFSET)] = 0,
        limit: Annotated[int | None, Query(ge=1, le=MAX_RESULT_LIMIT)] = None,
    ) -> dict[str, Any]:
        """State, progress, webhook delivery; the results (paged) once the job has ended.

        A failed or cancelled job shows the items it scored before it ended (their
        indexes may have gaps): scoring them again would cost the caller a resubmission.
        ``next_offset`` is the index after the page's last, or None at the end.
        """
        queue = self._job_queue()
        job = await asyncio.to_thread(queue.get, job_id, owner)
        if job is None:
            raise NotFound(f"no job {job_id!r} for this API key")
        answer = job.public()
        if job.state in ("succeeded", "failed", "cancelled"):
            page_max = self._config.jobs.results_page_max
            page = min(limit or page_max, page_max)
            results = await asyncio.to_thread(queue.results, job.id, offset, page)
            answer["results"] = results
            after = results[-1]["index"] + 1 if len(results) == page else job.total
            answer["next_offset"] = after if after < job.total else None
        return answer

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"], responses=_ERRORS)
    async def cancel_job(self, job_id: JobId, owner: Owner) -> dict[str, Any]:
        """Cancel a job that has not finished yet."""
        queue = self._job_queue()
        result_ttl_s = self._config.jobs.result_ttl_s
        job, cancelled = await asyncio.to_thread(queue.cancel, job_id, owner, result_ttl_s)
        if job is None:
            raise NotFound(f"no job {job_id!r} for this API key")
        if not cancelled:
            raise Conflict(f"job is already {job.state}", [{"type": "job_finished"}])
        return job.public()

    # ---- operations ------------------------------------------------------------------

    @app.get("/v1/stats", tags=["operations"], responses=_ERRORS)
    async def stats(self, _owner: Owner) -> dict[str, Any]:
        """Counters of this ingress replica and of one Model and one FeatureFetcher replica."""
        model_stats, fetcher_stats = await asyncio.gather(
            self._model.stats.remote(), self._fetcher.stats.remote()
        )
        jobs_stats = await self._job_worker.stats.remote() if self._job_worker else None
        cache = self._answers.cache
        uploads = app.state.api_context.uploads
        return {
            "ingress": {
                "prediction_cache_hits": cache.hits,
                "prediction_cache_misses": cache.misses,
                "prediction_cache_shared_hits": getattr(cache, "shared_hits", None),
                "coalesced_calls": self._coalescer.batches,
                "coalesced_items": self._coalescer.items,
                "pid": os.getpid(),
                "admission": app.state.api_context.admission.snapshot(),
                "uploads_refused": None if uploads is None else uploads.refused,
            },
            "model": model_stats,
            "fetcher": fetcher_stats,
            "job_worker": jobs_stats,
        }
