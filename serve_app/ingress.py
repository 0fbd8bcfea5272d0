"""The Ingress deployment: HTTP routes, auth, validation, the prediction cache, coalescing.

Request path of one item, and its hops:

    client -> Ingress  (auth, validate, prediction cache; a hit ends here: 0 hops)
           -> Model    (1 hop per *coalesced list*, not per item)
           -> FeatureFetcher (1 hop per *model batch*)

Concurrent single predictions are coalesced here (``serve_app/coalescer.py``) and cross
the hop to the Model as one list; a batch request crosses it as one list of its unique
misses.
"""

# No `from __future__ import annotations` here: FastAPI must see real types on routes.

import asyncio
import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from serve_app.auth import KeyChecker
from serve_app.cache import PredictionCache
from serve_app.coalescer import Coalescer
from serve_app.config import AppConfig, IngressTuning
from serve_app.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    Overloaded,
    ServeAppError,
    ServiceError,
    StoreUnavailable,
    UnknownEntity,
)
from serve_app.http_errors import (
    RequestIdMiddleware,
    install_error_handlers,
    read_json_body,
    validation_details,
)
from serve_app.job_queue import IdempotencyConflict, SQLiteJobQueue, open_job_queue
from serve_app.schemas import (
    PREDICT_REQUEST,
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    JobRequest,
    PredictRequest,
    PredictResponse,
)
from serve_app.webhooks import check_callback_url, read_secret

logger = logging.getLogger("serve_app.ingress")

Item = dict[str, Any]
ItemResult = dict[str, Any]

app = FastAPI(
    title="serve_app",
    summary="Score entities with a scikit-learn model: one, thousands, or later.",
    version="0.1.0",
)
app.add_middleware(RequestIdMiddleware)
install_error_handlers(app)

_bearer = HTTPBearer(auto_error=False, description="An API key from SERVE_APP_API_KEYS.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

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


def item_error(error: dict[str, Any]) -> ServeAppError:
    """The exception for a per-item error from the Model, when the item is the request."""
    if error["code"] == "unknown_entity":
        return UnknownEntity(error["message"])
    if error["code"] == "store_unavailable":
        return StoreUnavailable(error["message"])
    return ServiceError(error["message"])


def parse_item(raw: Any) -> PredictRequest:
    try:
        return PREDICT_REQUEST.validate_python(raw)
    except ValidationError as exc:
        raise InvalidInput("item is not valid", validation_details(exc)) from exc


def _batch_result(
    index: int, item: PredictRequest | InvalidInput, answers: dict[tuple[Any, ...], dict[str, Any]]
) -> dict[str, Any]:
    if isinstance(item, InvalidInput):
        return {"index": index, "ok": False, "error": item.to_dict()}
    answer = answers[item.cache_key()]
    if "error" in answer:
        return {"index": index, "ok": False, "entity_id": item.entity_id, "error": answer["error"]}
    return {
        "index": index,
        "ok": True,
        "entity_id": item.entity_id,
        "score": answer["score"],
        "cached": answer["cached"],
        "degraded": answer["degraded"],
    }


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25})
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
        self._auth = KeyChecker(self._config.auth)
        self._model = model
        self._fetcher = fetcher
        self._job_worker = job_worker
        jobs = self._config.jobs
        self._jobs: SQLiteJobQueue | None = open_job_queue(jobs.queue_url) if jobs.enabled else None
        self._webhook_secret = read_secret(jobs.webhooks)
        cache = self._config.prediction_cache
        self._cache = PredictionCache(cache.maxsize, cache.ttl_s, enabled=cache.enabled)
        self._version: str | None = None
        self._inflight = 0
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

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        """Admission control: past ``limits.max_inflight_requests`` answer 503 at once.

        Shedding load early with ``Retry-After`` beats queueing until every caller times out.
        """
        if self._inflight >= self._config.limits.max_inflight_requests:
            raise Overloaded("too many requests in progress; retry shortly")
        self._inflight += 1
        try:
            yield
        finally:
            self._inflight -= 1

    # ---- the hop to the Model -------------------------------------------------------

    async def _call_model(self, items: list[Item]) -> dict[str, Any]:
        """One call to the Model with a list of items; Ray failures become 503s."""
        response = self._model.score.remote(items)
        timeout = self._config.limits.request_timeout_s
        try:
            result = await asyncio.wait_for(response, timeout)
        except TimeoutError as exc:
            response.cancel()
            raise Overloaded(f"the model did not answer within {timeout}s") from exc
        except BackPressureError as exc:
            raise Overloaded("the model deployment is at capacity; retry shortly") from exc
        except (RayActorError, DeploymentUnavailableError) as exc:
            raise ServiceError("the model deployment is restarting; retry shortly") from exc
        self._version = result["model_version"]
        return result

    async def _score_list(self, items: list[Item]) -> list[tuple[str, ItemResult]]:
        """One hop for many concurrent single predictions (called by the coalescer)."""
        result = await self._call_model(items)
        return [(result["model_version"], r) for r in result["results"]]

    # ---- routes ----------------------------------------------------------------------

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

    @app.get("/v1/model", tags=["model"], responses=_ERRORS)
    async def model_metadata(self, credentials: Credentials) -> dict[str, Any]:
        """The served model's metadata: version, features, training metrics, checksum."""
        self._auth.require(credentials.credentials if credentials else None)
        return await self._model.metadata.remote()

    @app.post(
        "/v1/predict",
        tags=["predict"],
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra=_json_body_doc(PredictRequest),
    )
    async def predict(self, request: Request, credentials: Credentials) -> dict[str, Any]:
        """Score one entity, with optional request-time context."""
        self._auth.require(credentials.credentials if credentials else None)
        with self._admitted():
            body = await read_json_body(request, self._config.limits.max_body_bytes)
            item = parse_item(body)
            hit = self._cache.get((self._version, *item.cache_key()))
            if hit is not None:
                return {**hit, "cached": True}
            version, result = await self._coalescer.submit(item.to_item())
            if "error" in result:
                raise item_error(result["error"])
            answer = {
                "entity_id": item.entity_id,
                "model_version": version,
                "cached": False,
                **result,
            }
            self._cache.put((version, *item.cache_key()), answer)
            return answer

    @app.post(
        "/v1/predict/batch",
        tags=["predict"],
        response_model=BatchResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
        openapi_extra=_json_body_doc(BatchRequest),
    )
    async def predict_batch(self, request: Request, credentials: Credentials) -> dict[str, Any]:
        """Score many items. Results come in input order; each is a score or an error."""
        self._auth.require(credentials.credentials if credentials else None)
        with self._admitted():
            body = await read_json_body(request, self._config.limits.max_body_bytes)
            try:
                raw_items = BatchRequest.model_validate(body).items
            except ValidationError as exc:
                raise InvalidInput(
                    'body must be {"items": [...]}', validation_details(exc)
                ) from exc
            limit = self._config.limits.max_batch_items
            if not raw_items:
                raise InvalidInput(
                    "items is empty; send at least one item", [{"type": "empty_batch"}]
                )
            if len(raw_items) > limit:
                raise InvalidInput(
                    f"{len(raw_items)} items exceed the limit of {limit} per request "
                    "(use /v1/jobs for more)",
                    [{"type": "too_many_items", "limit": limit}],
                )
            return await self._score_batch(raw_items)

    async def _score_batch(self, raw_items: list[Any]) -> dict[str, Any]:
        """Validate each item, dedupe, serve cache hits, send the misses in one hop."""
        parsed: list[PredictRequest | InvalidInput] = []
        for raw in raw_items:
            try:
                parsed.append(parse_item(raw))
            except InvalidInput as exc:
                parsed.append(exc)
        unique: dict[tuple[Any, ...], PredictRequest] = {}
        for item in parsed:
            if isinstance(item, PredictRequest):
                unique.setdefault(item.cache_key(), item)
        answers: dict[tuple[Any, ...], dict[str, Any]] = {}
        misses: list[PredictRequest] = []
        for key, item in unique.items():
            hit = self._cache.get((self._version, *key))
            if hit is not None:
                answers[key] = {**hit, "cached": True}
            else:
                misses.append(item)
        version = self._version
        if misses:
            result = await self._call_model([item.to_item() for item in misses])
            version = result["model_version"]
            for item, item_result in zip(misses, result["results"], strict=True):
                answers[item.cache_key()] = self._answer(item, version, item_result)
        results = [_batch_result(index, item, answers) for index, item in enumerate(parsed)]
        failed = sum(1 for r in results if not r["ok"])
        return {
            "model_version": version,
            "results": results,
            "summary": {
                "items": len(results),
                "unique": len(unique),
                "succeeded": len(results) - failed,
                "failed": failed,
                "cached": sum(1 for r in results if r.get("cached")),
            },
        }

    # ---- queued jobs -------------------------------------------------------------------

    def _job_queue(self) -> SQLiteJobQueue:
        if self._jobs is None:
            raise NotFound("queued jobs are disabled in this deployment (jobs.enabled)")
        return self._jobs

    @app.post(
        "/v1/jobs",
        tags=["jobs"],
        status_code=202,
        responses=_ERRORS,
        openapi_extra=_json_body_doc(JobRequest),
    )
    async def create_job(
        self,
        request: Request,
        credentials: Credentials,
        idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
    ) -> JSONResponse:
        """Queue items for scoring now, read results later (poll or webhook)."""
        owner = self._auth.require(credentials.credentials if credentials else None)
        with self._admitted():
            queue = self._job_queue()
            jobs = self._config.jobs
            body = await read_json_body(request, jobs.max_body_bytes)
            try:
                job_request = JobRequest.model_validate(body)
            except ValidationError as exc:
                raise InvalidInput(
                    'body must be {"items": [...]}', validation_details(exc)
                ) from exc
            raw_items = job_request.items
            if not raw_items:
                raise InvalidInput(
                    "items is empty; send at least one item", [{"type": "empty_batch"}]
                )
            if len(raw_items) > jobs.max_items:
                raise InvalidInput(
                    f"{len(raw_items)} items exceed the job limit of {jobs.max_items}",
                    [{"type": "too_many_items", "limit": jobs.max_items}],
                )
            callback = job_request.callback_url
            if callback is not None:
                await asyncio.to_thread(check_callback_url, callback, jobs.webhooks)
                if self._webhook_secret is None:
                    raise InvalidInput(
                        "webhooks are not configured on this service (no signing secret)",
                        [{"type": "webhooks_not_configured"}],
                    )
            items: list[dict[str, Any] | None] = []
            rejected: dict[int, dict[str, Any]] = {}
            for index, raw in enumerate(raw_items):
                try:
                    items.append(parse_item(raw).to_item())
                except InvalidInput as exc:
                    items.append(None)
                    rejected[index] = {"ok": False, "error": exc.to_dict()}
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
        credentials: Credentials,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int | None, Query(ge=1)] = None,
    ) -> dict[str, Any]:
        """State, progress, webhook delivery; the results (paged) once the job is done."""
        owner = self._auth.require(credentials.credentials if credentials else None)
        queue = self._job_queue()
        job = await asyncio.to_thread(queue.get, job_id, owner)
        if job is None:
            raise NotFound(f"no job {job_id!r} for this API key")
        answer = job.public()
        if job.state == "succeeded":
            page = min(
                limit or self._config.jobs.results_page_max, self._config.jobs.results_page_max
            )
            results = await asyncio.to_thread(queue.results, job.id, offset, page)
            answer["results"] = results
            end = offset + len(results)
            answer["next_offset"] = end if end < job.total else None
        return answer

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"], responses=_ERRORS)
    async def cancel_job(self, job_id: JobId, credentials: Credentials) -> dict[str, Any]:
        """Cancel a job that has not finished yet."""
        owner = self._auth.require(credentials.credentials if credentials else None)
        queue = self._job_queue()
        before = await asyncio.to_thread(queue.get, job_id, owner)
        if before is None:
            raise NotFound(f"no job {job_id!r} for this API key")
        if before.finished:
            raise Conflict(f"job is already {before.state}", [{"type": "job_finished"}])
        job = await asyncio.to_thread(queue.cancel, job_id, owner)
        assert job is not None
        return job.public()

    def _answer(self, item: PredictRequest, version: str, result: ItemResult) -> dict[str, Any]:
        if "error" in result:
            return result
        answer = {"entity_id": item.entity_id, "model_version": version, "cached": False, **result}
        self._cache.put((version, *item.cache_key()), answer)
        return answer

    @app.get("/v1/stats", tags=["operations"], responses=_ERRORS)
    async def stats(self, credentials: Credentials) -> dict[str, Any]:
        """Counters of this ingress replica and of one Model and one FeatureFetcher replica."""
        self._auth.require(credentials.credentials if credentials else None)
        model_stats, fetcher_stats = await asyncio.gather(
            self._model.stats.remote(), self._fetcher.stats.remote()
        )
        jobs_stats = await self._job_worker.stats.remote() if self._job_worker else None
        cache = self._cache
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
