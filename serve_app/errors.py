"""The exception hierarchy, modelled on httpx's: catch broad or narrow as you need.

::

    ServeAppError
    ├── ArtifactError           the model artifact is missing or fails verification
    ├── ConfigError             the YAML or the environment is unusable (start-up only)
    ├── ClientError             the caller's mistake -> 4xx (400 for MalformedJson)
    │   ├── UnsupportedMediaType 415
    │   ├── InvalidInput        422
    │   ├── PayloadTooLarge     413
    │   ├── BodyTimeout         408, the body did not arrive in time
    │   ├── Unauthorized        401
    │   ├── NotFound            404 (UnknownEntity is a NotFound)
    │   └── Conflict            409
    └── ServiceError            ours or a dependency's -> 5xx, with Retry-After
        ├── StoreUnavailable    503, the feature store failed and fallback is off
        ├── FeatureRowInvalid   502, the store's row of this entity is corrupt (fallback off)
        ├── Overloaded          503, a deployment is saturated or timed out
        ├── QueueBusy           503, the job queue's database is locked; retry shortly
        ├── JobWorkerLost       503, the process parsing a large job body died
        ├── CallbackLookupUnavailable 503, a job's callback host cannot be looked up now
        └── TooManyRequests     429, this API key's share of the job queue is in use
            └── RetainedItemsFull 429, its kept jobs hold too many items (Retry-After 1 h)

Every error has a stable machine-readable ``code``; the ingress turns any of them into
``{"error": {"code", "message", "details"}}`` with the right status.
"""

from __future__ import annotations

from typing import Any


class ServeAppError(Exception):
    code = "internal_error"
    status_code = 500

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        """Picklable whatever the subclass's signature: jobs are created in worker
        processes, and their errors must reach the Ingress whole (message, details)."""
        return (_rebuild, (type(self), self.message, self.details))

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            body["details"] = self.details
        return body


class ArtifactError(ServeAppError):
    code = "artifact_error"


class ConfigError(ServeAppError):
    code = "config_error"


class ClientError(ServeAppError):
    status_code = 400
    code = "bad_request"


class MalformedJson(ClientError):
    code = "malformed_json"


class UnsupportedMediaType(ClientError):
    status_code = 415
    code = "unsupported_media_type"


class InvalidInput(ClientError):
    status_code = 422
    code = "invalid_input"


class BodyTimeout(ClientError):
    """The body did not arrive whole within ``limits.body_read_timeout_s``."""

    status_code = 408
    code = "body_timeout"


class PayloadTooLarge(ClientError):
    status_code = 413
    code = "payload_too_large"


class Unauthorized(ClientError):
    status_code = 401
    code = "unauthorized"


class NotFound(ClientError):
    status_code = 404
    code = "not_found"


class UnknownEntity(NotFound):
    code = "unknown_entity"


class Conflict(ClientError):
    status_code = 409
    code = "conflict"


class ServiceError(ServeAppError):
    status_code = 503
    code = "service_unavailable"
    retry_after_s = 1


class StoreUnavailable(ServiceError):
    code = "store_unavailable"


class FeatureRowInvalid(ServiceError):
    """The feature store answered, but this entity's row is no flat object (someone else
    wrote it): a bad answer from upstream, hence 502; retrying helps only once the row is
    fixed and the cached copy expires."""

    status_code = 502
    code = "feature_row_invalid"
    retry_after_s = 60


class Overloaded(ServiceError):
    code = "overloaded"


class QueueBusy(ServiceError):
    code = "queue_busy"


class JobWorkersBusy(Overloaded):
    """A large job body while the replica's parsing worker is busy: parsing takes seconds,
    so a retry sooner than that would be refused again."""

    retry_after_s = 5


class JobWorkerLost(ServiceError):
    """The process parsing a large job body died (the OOM killer, a signal): the pool is
    rebuilt for the next request, and a resend with the same ``Idempotency-Key`` returns
    the job if the worker had stored it before it died."""

    code = "job_worker_lost"


class CallbackLookupUnavailable(ServiceError):
    """A job's callback host could not be looked up now (resolver timeout or "try
    again"): not the caller's mistake, so not a 422."""

    code = "callback_lookup_unavailable"
    retry_after_s = 5


class TooManyRequests(ServiceError):
    """429 with ``Retry-After``: a per-key cap, not an outage (hence no 503)."""

    status_code = 429
    code = "too_many_requests"
    retry_after_s = 5


class RetainedItemsFull(TooManyRequests):
    """429 for a key whose kept jobs hold too many items: room comes back only as finished
    jobs are purged (``jobs.result_ttl_s``), so a retry in seconds would not help."""

    retry_after_s = 3600


def _rebuild(cls: type[ServeAppError], message: str, details: Any) -> ServeAppError:
    error = cls.__new__(cls)
    ServeAppError.__init__(error, message, details)
    return error


def error_for_item(error: dict[str, Any]) -> ServeAppError:
    """The exception for a per-item error dict, when that item was the whole request."""
    code, message = error.get("code"), str(error.get("message", ""))
    if code == "unknown_entity":
        return UnknownEntity(message)
    if code == "store_unavailable":
        return StoreUnavailable(message)
    if code == "feature_row_invalid":
        return FeatureRowInvalid(message)
    return ServiceError(message)
