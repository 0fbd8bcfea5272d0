import pytest
from pydantic import ValidationError

from serve_app.api.schemas import PREDICT_REQUEST, BatchRequest


def test_minimal_and_full_requests() -> None:
    assert PREDICT_REQUEST.validate_python({"entity_id": "E0000001"}).context.amount is None
    full = PREDICT_REQUEST.validate_python(
        {"entity_id": "E1", "context": {"amount": 3.5, "hour": 23, "channel": "app"}}
    )
    assert (full.context.amount, full.context.hour, full.context.channel) == (3.5, 23, "app")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"entity_id": ""},
        {"entity_id": 12},
        {"entity_id": "x" * 65},
        {"entity_id": "bad id with spaces"},
        {"entity_id": "E1", "extra": 1},
        {"entity_id": "E1", "context": {"amount": -1}},
        {"entity_id": "E1", "context": {"amount": "NaN"}},
        {"entity_id": "E1", "context": {"hour": 24}},
        {"entity_id": "E1", "context": {"channel": "fax"}},
        {"entity_id": "E1", "context": {"colour": "red"}},
        ["E1"],
    ],
)
def test_bad_requests_are_refused(body: object) -> None:
    with pytest.raises(ValidationError):
        PREDICT_REQUEST.validate_python(body)


def test_batch_request_keeps_raw_items_for_per_item_validation() -> None:
    batch = BatchRequest.model_validate({"items": [{"entity_id": "E1"}, 42, None]})
    assert batch.items == [{"entity_id": "E1"}, 42, None]
    with pytest.raises(ValidationError):
        BatchRequest.model_validate({"items": "E1"})
    with pytest.raises(ValidationError):
        BatchRequest.model_validate({"entries": []})
