import pytest

from serve_app.api.schemas import PREDICT_REQUEST, BatchRequest, RequestContext
from serve_app.api.validation import check_item_count, parse_body, parse_item, parse_items
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
