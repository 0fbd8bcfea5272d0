"""The OpenAPI document is self-contained: every ``$ref`` resolves, bodies say minItems."""

from __future__ import annotations

from typing import Any

from serve_app.api.openapi import inline_schema
from serve_app.api.schemas import BatchRequest, JobRequest, PredictRequest
from serve_app.deployments.ingress import app


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"unresolvable $ref {ref}"
        node = node[part]
    return node


def test_every_ref_of_the_document_resolves() -> None:
    document = app.openapi()
    refs = _refs(document)
    assert refs  # the response models are referenced through components
    for ref in refs:
        _resolve(document, ref)


def test_the_predict_body_is_inlined_and_item_lists_need_one_item() -> None:
    document = app.openapi()
    body = document["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    schema = body["application/json"]["schema"]
    assert "$defs" not in str(schema) and schema["properties"]["context"]["type"] == "object"
    for path in ("/v1/predict/batch", "/v1/jobs"):
        content = document["paths"][path]["post"]["requestBody"]["content"]
        assert content["application/json"]["schema"]["properties"]["items"]["minItems"] == 1
    for model in (PredictRequest, BatchRequest, JobRequest):
        assert "$ref" not in str(inline_schema(model))


def test_405_answers_say_which_methods_are_allowed() -> None:
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        response = client.delete("/healthz")
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_a_trailing_slash_is_404_never_a_redirect_to_the_callers_host() -> None:
    """Starlette answered ``POST /v1/predict/`` with 307 and ``Location:
    http://evil.example/v1/predict`` from the Host header, key or no key."""
    from fastapi.testclient import TestClient

    with TestClient(app, follow_redirects=False) as client:
        for method, path in [
            ("POST", "/v1/predict/"),
            ("GET", "/healthz/"),
            ("GET", "/v1/jobs/abc/"),
        ]:
            response = client.request(method, path, headers={"Host": "evil.example"})
            assert response.status_code == 404, (path, response.status_code)
            assert "location" not in response.headers, path
            assert "evil.example" not in response.text
            assert response.json()["error"]["code"] == "not_found"
