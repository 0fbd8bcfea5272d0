"""OpenAPI for bodies the routes read themselves: self-contained schemas, no dangling refs.

Pydantic's ``model_json_schema()`` puts nested models under ``$defs`` and points at them
with ``#/$defs/...``; embedded in an operation of the OpenAPI document, such a reference
resolves against the document's root, where there is no ``$defs``, so tools (Swagger UI's
validator, schemathesis, client generators) cannot read the body. The schemas here are
small and not recursive, so the definitions are inlined.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

_REF_PREFIX = "#/$defs/"


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with every ``#/$defs/`` reference replaced by its target.

    A top-level ``items`` array (batch and job bodies) also says ``minItems: 1``: an empty
    list is a 422, and the document should say so.
    """
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})
    inlined = _inline(schema, definitions, ())
    items = inlined.get("properties", {}).get("items")
    if isinstance(items, dict) and items.get("type") == "array":
        items["minItems"] = 1
    return inlined


def _inline(node: Any, definitions: dict[str, Any], trail: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_inline(value, definitions, trail) for value in node]
    if not isinstance(node, dict):
        return node
    reference = node.get("$ref")
    if isinstance(reference, str) and reference.startswith(_REF_PREFIX):
        name = reference.removeprefix(_REF_PREFIX)
        if name in trail:
            raise ValueError(f"recursive schema {name!r} cannot be inlined")
        target = copy.deepcopy(definitions[name])
        siblings = {key: value for key, value in node.items() if key != "$ref"}
        return _inline({**target, **siblings}, definitions, (*trail, name))
    return {key: _inline(value, definitions, trail) for key, value in node.items()}
