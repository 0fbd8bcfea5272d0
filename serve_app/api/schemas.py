"""Request and response bodies. Validation at the edge, so the inside can trust its inputs.

Unknown keys are refused (``extra="forbid"``): a misspelt field is a 422 that names it,
not a silently ignored value and a wrong score.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from serve_app.config import StrictModel
from serve_app.scoring.items import ENTITY_ID_MAX_LENGTH, ENTITY_ID_PATTERN

EntityId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=ENTITY_ID_MAX_LENGTH, pattern=ENTITY_ID_PATTERN),
]


class RequestContext(StrictModel):
    """Request-time features sent by the caller; each optional (missing is allowed)."""

    amount: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False, strict=True)] | None = None
    hour: Annotated[int, Field(ge=0, le=23, strict=True)] | None = None
    channel: Literal["web", "app", "store"] | None = None


class PredictRequest(StrictModel):
    """Score one entity."""

    entity_id: EntityId
    context: RequestContext = RequestContext()

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"entity_id": "E0000042", "context": {"amount": 59.9, "channel": "web"}}]
        },
    )

    def to_item(self) -> dict[str, Any]:
        """The plain dict sent across the hop to the Model deployment.

        Built field by field: ``model_dump`` took twice as long, on every item of every
        batch. A test checks that this names every field of :class:`RequestContext`.
        """
        context = self.context
        return {
            "entity_id": self.entity_id,
            "context": {"amount": context.amount, "hour": context.hour, "channel": context.channel},
        }


PREDICT_REQUEST = TypeAdapter(PredictRequest)
PREDICT_REQUESTS = TypeAdapter(list[PredictRequest])  # a batch's items in one call


class PredictResponse(BaseModel):
    entity_id: str
    score: float = Field(description="Probability of the positive class.")
    model_version: str
    cached: bool = Field(description="Served from the prediction cache.")
    degraded: bool = Field(description="Stored features were unavailable; defaults used.")


class BatchRequest(StrictModel):
    """Score many entities. Items are validated one by one: a bad item fails alone."""

    items: list[Any] = Field(
        description="Each item has the shape of a /v1/predict body.",
        examples=[[{"entity_id": "E0000001"}, {"entity_id": "E0000002", "context": {"hour": 9}}]],
    )


class ErrorBody(BaseModel):
    """An error: of the whole request, or of one item in a batch or job."""

    code: str
    message: str
    details: Any = None


class BatchItemResult(BaseModel):
    index: int
    ok: bool
    entity_id: str | None = None
    score: float | None = None
    cached: bool | None = None
    degraded: bool | None = None
    error: ErrorBody | None = None


class BatchSummary(BaseModel):
    items: int
    unique: int = Field(description="Distinct valid items; duplicates are computed once.")
    succeeded: int
    failed: int
    cached: int


class BatchResponse(BaseModel):
    model_version: str | None
    results: list[BatchItemResult]
    summary: BatchSummary


class ErrorResponse(BaseModel):
    error: ErrorBody
    request_id: str | None = None


class JobRequest(StrictModel):
    """A queued prediction job: the batch endpoint's items, many more of them, and a callback."""

    items: list[Any] = Field(description="Each item has the shape of a /v1/predict body.")
    callback_url: str | None = Field(
        None, max_length=2_048, description="POSTed a signed Standard Webhooks event when done."
    )
