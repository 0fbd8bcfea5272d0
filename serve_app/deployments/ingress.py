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
import hashlib
import json
import logging
from typing import Annotated, Any

from fastapi import FastAPI, Header, Path, Query
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from serve_app.api.admission import Admission
from serve_app.api.auth import KeyChecker
from serve_app.api.deps import (
    Admitted,
    ApiContext,
    JobJsonBody,
    JsonBody,
    Owner,
    install_context,
)
from serve_app.api.errors import install_error_handlers
from serve_app.api.request_id import RequestIdMiddleware
from serve_app.api.schemas import (
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    JobRequest,
    PredictRequest,
    PredictResponse,
)
from serve_app.api.validation import check_item_count, parse_body, parse_item, parse_items
from serve_app.cache import PredictionCache
from serve_app.config import AppConfig, IngressTuning
from serve_app.errors import Conflict, InvalidInput, NotFound, Overloaded, ServiceError
from serve_app.jobs import IdempotencyConflict, JobQueue, open_job_queue
from serve_app.jobs.webhooks import check_callback_url, read_secret
from serve_app.scoring.answers import Answers, score_batch, score_one
from serve_app.scoring.coalescer import Coalescer
from serve_app.scoring.items import Item, ItemResult
from serve_app.scoring.scorer import ModelAnswer

logger = logging.getLogger("serve_app.ingress")

app = FastAPI(
    title="serve_app",
    summary="Score entities with a scikit-learn model: one, thousands, or later.",
    version="0.1.0",
)
app.add_middleware(RequestIdMiddleware)
install_error_handlers(app)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 503)
}
JobId = Annotated[str, Path(description="The id returned by POST /v1/jobs.")]


def _json_body_doc(model: type) -> dict[str, Any]:
    """OpenAPI for a body we read ourselves (to bound its size and validate per item)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


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
        self._config = AppConfig.model_validate(config)
        install_context(
            app,
            ApiContext(
                config=self._config,
                auth=KeyChecker(self._config.auth),
                admission=Admission(self._config.limits.max_inflight_requests),
            ),
        )
        self._model = model
        self._fetcher = fetcher
        self._job_worker = job_worker
        jobs = self._config.jobs
        self._jobs: JobQueue | None = open_job_queue(jobs.queue_url) if jobs.enabled else None
        self._webhook_secret = read_secret(jobs.webhooks)
        cache = self._config.prediction_cache
        self._answers = Answers(PredictionCache(cache.maxsize, cache.ttl_s, cache.enabled))
        tuning = IngressTuning()
        self._coalescer: Coalescer[Item, tuple[str, ItemResult]] = Coalescer(
            self._score_list,
            tuning.coalesce_max_batch_size,
            tuning.coalesce_wait_s,
            tuning.coalesce_max_in_flight,
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        tuning = IngressTuning.model_validate(user_config or {})
        self._coalescer.configure(
            tuning.coalesce_max_batch_size, tuning.coalesce_wait_s, tuning.coalesce_max_in_flight
        )

    # ---- the hop to the Model -------------------------------------------------------

    async def _call_model(self, items: list[Item]) -> ModelAnswer:
        """One call to the Model with a list of items; Ray failures become 503s."""
        response = self._model.score.remote(items)
        timeout = self._config.limits.request_timeout_s
        try:
            return await asyncio.wait_for(response, timeout)
        except TimeoutError as exc:
            response.cancel()
            raise Overloaded(f"the model did not answer within {timeout}s") from exc
        except BackPressureError as exc:
            raise Overloaded("the model deployment is at capacity; retry shortly") from exc
        except (RayActorError, DeploymentUnavailableError) as exc:
            raise ServiceError("the model deployment is restarting; retry shortly") from exc

    async def _score_list(self, items: list[Item]) -> list[tuple[str, ItemResult]]:
        """One hop for many concurrent single predictions (called by the coalescer)."""
        answer = await self._call_model(items)
        return [(answer["model_version"], result) for result in answer["results"]]

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
        """Readiness: the model is loaded and the feature store answers. Open."""
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
        headers = {} if ready else {"Retry-After": "2"}
        return JSONResponse(body, status_code=200 if ready else 503, headers=headers)

    # ---- scoring ---------------------------------------------------------------------

    @app.get("/v1/model", tags=["model"], responses=_ERRORS)
    async def model_metadata(self, _owner: Owner) -> dict[str, Any]:
        """The served model's metadata: version, features, training metrics, checksum."""
        return await self._model.metadata.remote()

    @app.post(
        "/v1/predict",
        tags=["predict"],
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra=_json_body_doc(PredictRequest),
    )
    async def predict(self, _owner: Owner, _admitted: Admitted, body: JsonBody) -> dict[str, Any]:
        """Score one entity, with optional request-time context."""
        return await score_one(parse_item(body), self._answers, self._coalescer.submit)

    @app.post(
        "/v1/predict/batch",
        tags=["predict"],
        response_model=BatchResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
        openapi_extra=_json_body_doc(BatchRequest),
    )
    async def predict_batch(
        self, _owner: Owner, _admitted: Admitted, body: JsonBody
    ) -> dict[str, Any]:
        """Score many items. Results come in input order; each is a score or an error."""
        raw_items = parse_body(BatchRequest, body).items
        limit = self._config.limits.max_batch_items
        check_item_count(len(raw_items), limit, " (use /v1/jobs for more)")
        return await score_batch(parse_items(raw_items), self._answers, self._call_model)

    # ---- queued jobs -------------------------------------------------------------------

    @app.post(
        "/v1/jobs",
        tags=["jobs"],
        status_code=202,
        responses=_ERRORS,
        openapi_extra=_json_body_doc(JobRequest),
    )
    async def create_job(
        self,
        owner: Owner,
        _admitted: Admitted,
        body: JobJsonBody,
        idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
    ) -> JSONResponse:
        """Queue items for scoring now, read results later (poll or webhook)."""
        queue = self._job_queue()
        jobs = self._config.jobs
        job_request = parse_body(JobRequest, body)
        check_item_count(len(job_request.items), jobs.max_items)
        callback = job_request.callback_url
        if callback is not None:
            await asyncio.to_thread(check_callback_url, callback, jobs.webhooks)
            if self._webhook_secret is None:
                raise InvalidInput(
                    "webhooks are not configured on this service (no signing secret)",
                    [{"type": "webhooks_not_configured"}],
                )
        parsed = parse_items(job_request.items)
        items = [None if isinstance(entry, InvalidInput) else entry for entry in parsed]
        rejected = {
            index: {"ok": False, "error": entry.to_dict()}
            for index, entry in enumerate(parsed)
            if isinstance(entry, InvalidInput)
        }
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        try:
            job, created = await asyncio.to_thread(
                queue.create, owner, items, rejected, callback, idempotency_key, digest
            )
        except IdempotencyConflict as exc:
            raise Conflict(
                "this Idempotency-Key was already used with a different body",
                [{"type": "idempotency_key_reused"}],
            ) from exc
        headers = {"Location": f"/v1/jobs/{job.id}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(job.public(), status_code=202, headers=headers)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], responses=_ERRORS)
    async def get_job(
        self,
        job_id: JobId,
        owner: Owner,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int | None, Query(ge=1)] = None,
    ) -> dict[str, Any]:
        """State, progress, webhook delivery; the results (paged) once the job is done."""
        queue = self._job_queue()
        job = await asyncio.to_thread(queue.get, job_id, owner)
        if job is None:
            raise NotFound(f"no job {job_id!r} for this API key")
        answer = job.public()
        if job.state == "succeeded":
            page_max = self._config.jobs.results_page_max
            page = min(limit or page_max, page_max)
            results = await asyncio.to_thread(queue.results, job.id, offset, page)
            answer["results"] = results
            end = offset + len(results)
            answer["next_offset"] = end if end < job.total else None
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
        return {
            "ingress": {
                "prediction_cache_hits": cache.hits,
                "prediction_cache_misses": cache.misses,
                "coalesced_calls": self._coalescer.batches,
                "coalesced_items": self._coalescer.items,
            },
            "model": model_stats,
            "fetcher": fetcher_stats,
            "job_worker": jobs_stats,
        }
