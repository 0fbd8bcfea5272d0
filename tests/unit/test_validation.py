import time

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from serve_app.api.errors import MAX_ERROR_DETAILS, validation_details
from serve_app.api.schemas import PREDICT_REQUEST, BatchRequest, RequestContext
from serve_app.api.validation import (
    MAX_OBJECT_KEYS,
    check_item_count,
    parse_body,
    parse_item,
    parse_items,
)
from serve_app.errors import InvalidInput
from serve_app.scoring.items import item_key


def test_parse_item_gives_the_plain_item_that_crosses_hops() -> None:
    item = parse_item({"entity_id": "E1", "context": {"amount": 3.5, "hour": 23}})
    assert item == {"entity_id": "E1", "context": {"amount": 3.5, "hour": 23, "channel": None}}
    assert item_key(item) == ("E1", 3.5, 23, None)


def test_item_key_distinguishes_context() -> None:
    plain = parse_item({"entity_id": "E1"})
    with_hour = parse_item({"entity_id": "E1", "context": {"hour": 1}})
    assert item_key(plain) != item_key(with_hour)


def test_a_bad_item_is_kept_as_its_own_error_in_place() -> None:
    parsed = parse_items([{"entity_id": "E1"}, {"entity_id": 7}, "x", {"entity_id": "E2"}])
    assert [type(entry).__name__ for entry in parsed] == [
        "dict",
        "InvalidInput",
        "InvalidInput",
        "dict",
    ]
    error = parsed[1]
    assert isinstance(error, InvalidInput)
    assert error.to_dict()["details"][0]["loc"] == ["entity_id"]


def test_the_envelope_and_the_count_are_checked() -> None:
    with pytest.raises(InvalidInput, match="items"):
        parse_body(BatchRequest, {"entries": []})
    with pytest.raises(InvalidInput) as empty:
        check_item_count(0, 10)
    assert empty.value.details == [{"type": "empty_batch"}]
    with pytest.raises(InvalidInput, match=r"use /v1/jobs") as many:
        check_item_count(11, 10, " (use /v1/jobs for more)")
    assert many.value.details == [{"type": "too_many_items", "limit": 10}]
    check_item_count(10, 10)


def test_to_item_carries_every_context_field_as_model_dump_would() -> None:
    full = {"entity_id": "E1", "context": {"amount": 2.5, "hour": 7, "channel": "web"}}
    request = PREDICT_REQUEST.validate_python(full)
    assert request.to_item() == {"entity_id": "E1", "context": request.context.model_dump()}
    assert set(request.to_item()["context"]) == set(RequestContext.model_fields)


def test_a_batch_validated_as_one_list_equals_item_by_item() -> None:
    good = [{"entity_id": f"E{i}", "context": {"hour": i % 24}} for i in range(40)]
    assert parse_items(good) == [parse_item(raw) for raw in good]
    bad = [*good[:3], {"entity_id": "E9", "context": {"hour": 99}}, *good[3:6]]
    parsed = parse_items(bad)
    assert parsed[:3] == good_items(good[:3]) and parsed[4:] == good_items(good[3:6])
    error = parsed[3]
    assert isinstance(error, InvalidInput)  # its own error, without the list's index
    assert error.to_dict()["details"][0]["loc"] == ["context", "hour"]


def good_items(raws: list[dict[str, object]]) -> list[object]:
    return [parse_item(raw) for raw in raws]


def _wide(keys: int) -> dict[str, int]:
    return {f"k{i}": 0 for i in range(keys)}


def test_an_object_of_many_keys_is_refused_before_pydantic_and_alone() -> None:
    """A 2 MB item of ~240,000 unknown keys made pydantic build one error per key: 1.9 s
    on the event loop and a 19 MB answer. Refused at once now, alone in its batch."""
    huge = {"entity_id": "E1", **_wide(240_000)}
    started = time.perf_counter()
    parsed = parse_items([{"entity_id": "E0"}, huge, {"entity_id": "E1", "context": _wide(17)}])
    took = time.perf_counter() - started
    assert parsed[0] == parse_item({"entity_id": "E0"})
    for error in parsed[1:]:
        assert isinstance(error, InvalidInput)
        assert error.details == [{"type": "too_many_fields", "limit": MAX_OBJECT_KEYS}]
    assert took < 0.5, took  # generous: about 0.01 s here, 1.9 s before
    with pytest.raises(InvalidInput, match="more than 16 fields"):
        parse_body(BatchRequest, {"items": [], **_wide(16)})
    assert parse_item({"entity_id": "E1", "context": {"hour": 3}})  # the ordinary case passes


def test_error_details_are_capped_and_say_how_many_more() -> None:
    """Below the key limit every error is listed; beyond 20, the rest is a count."""
    with pytest.raises(InvalidInput) as caught:
        parse_item({"entity_id": "E1", **_wide(15)})
    assert [d["loc"] for d in caught.value.details or []] == [[f"k{i}"] for i in range(15)]
    with pytest.raises(ValidationError) as thirty:
        TypeAdapter(list[int]).validate_python(["x"] * 30)
    details = validation_details(thirty.value)
    assert len(details) == MAX_ERROR_DETAILS + 1
    assert details[-1] == {"type": "more_errors", "count": 10, "msg": "and 10 more"}


def test_validation_details_cap() -> None:
    errors = [{"loc": ("items", i), "type": "string_type", "msg": "bad"} for i in range(45)]
    exc = RequestValidationError(errors)
    details = validation_details(exc)
    assert len(details) == MAX_ERROR_DETAILS + 1
    assert details[-1] == {"type": "more_errors", "count": 25, "msg": "and 25 more"}
    assert details[0] == {"loc": ["items", 0], "type": "string_type", "msg": "bad"}
