"""serve_app's work per request, without Ray and without caches: what both peers run.

Everything that decides a score or an answer is serve_app's own code, imported, so that
the peers differ from serve_app only in how requests reach the model:

* the bearer check: :class:`serve_app.api.auth.KeyChecker` (keys from
  ``SERVE_APP_API_KEYS``, as serve_app reads them);
* validation: :func:`serve_app.api.validation.parse_item` / ``parse_items`` / ``parse_body``
  / ``check_item_count``, with serve_app's default limits;
* the look-up: :class:`serve_app.stores.sqlite.SQLiteFeatureStore` on serve_app's file,
  ONE bulk ``get_many`` per model call (a worker thread, as in serve_app's FeatureFetcher);
* the model: serve_app's artifact (checksum-verified by ``load_artifact``), ONE
  :meth:`serve_app.scoring.scorer.Scorer.predict` per model call on the unique items
  (the same numpy encoding serve_app's Model uses, scores rounded to 6 places),
  scikit-learn pinned to 1 thread;
* the bodies: serve_app's ``/v1/predict`` and ``/v1/predict/batch`` answers, field for
  field (``cached`` is always false: there is no cache here).

The paths come from ``PEER_MODEL_DIR`` and ``PEER_SQLITE``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from serve_app.api.auth import KeyChecker
from serve_app.api.schemas import BatchRequest
from serve_app.api.validation import check_item_count, parse_body, parse_items
from serve_app.config import AuthConfig, LimitsConfig
from serve_app.errors import InvalidInput, ServeAppError, error_for_item
from serve_app.scoring.artifact import LoadedModel, load_artifact
from serve_app.scoring.items import Item, ItemKey, ItemResult, error_result, item_key, unique_items
from serve_app.scoring.scorer import Scorer
from serve_app.stores.base import FeatureRow
from serve_app.stores.sqlite import SQLiteFeatureStore

ENV_MODEL_DIR = "PEER_MODEL_DIR"
ENV_SQLITE = "PEER_SQLITE"
Entry = Item | InvalidInput


def key_checker() -> KeyChecker:
    """serve_app's checker with its default key source (the env var), no key file."""
    return KeyChecker(AuthConfig(keys_file=None))


@dataclass(frozen=True)
class PeerWork:
    """The model, the store and the limits one peer process works with."""

    model: LoadedModel
    store: SQLiteFeatureStore
    limits: LimitsConfig
    scorer: Scorer

    @classmethod
    def from_env(cls) -> PeerWork:
        """Load in the process that will score: 1 sklearn thread, as serve_app pins it."""
        threadpool_limits(limits=1)
        model = load_artifact(Path(os.environ[ENV_MODEL_DIR]))
        return cls(
            model=model,
            store=SQLiteFeatureStore(Path(os.environ[ENV_SQLITE])),
            limits=LimitsConfig(),
            scorer=Scorer(model),
        )

    @property
    def version(self) -> str:
        return self.model.version

    def parse_batch(self, body: Any) -> list[Entry]:
        """A ``/v1/predict/batch`` body as serve_app's Ingress validates it."""
        raw_items = parse_body(BatchRequest, body).items
        check_item_count(len(raw_items), self.limits.max_batch_items, " (use /v1/jobs for more)")
        return parse_items(raw_items)

    def score(
        self, items: Sequence[Item], rows: Mapping[str, FeatureRow]
    ) -> dict[ItemKey, ItemResult]:
        """A result per item key: a score, or ``unknown_entity``; ONE predict_proba."""
        results: dict[ItemKey, ItemResult] = {}
        known: list[Item] = []
        for item in items:
            if item["entity_id"] in rows:
                known.append(item)
            else:
                message = f"no features stored for entity {item['entity_id']!r}"
                results[item_key(item)] = error_result("unknown_entity", message)
        if known:
            scores = self.scorer.predict(
                [rows[item["entity_id"]] for item in known],
                [item.get("context") or {} for item in known],
            )
            for item, score in zip(known, scores, strict=True):
                results[item_key(item)] = {"score": score, "degraded": False}
        return results


def valid_unique(entries: Sequence[Entry]) -> list[Item]:
    """The distinct valid items, in order of first appearance (serve_app dedupes too)."""
    return unique_items(entry for entry in entries if not isinstance(entry, InvalidInput))


def entity_ids(items: Sequence[Item]) -> list[str]:
    return list(dict.fromkeys(item["entity_id"] for item in items))


def predict_body(item: Item, result: ItemResult, version: str) -> dict[str, Any]:
    """serve_app's ``/v1/predict`` answer, or the exception its error maps to (404...)."""
    if "error" in result:
        raise error_for_item(result["error"])
    return {
        "entity_id": item["entity_id"],
        "score": result["score"],
        "model_version": version,
        "cached": False,
        "degraded": result["degraded"],
    }


def batch_body(
    entries: Sequence[Entry], by_key: Mapping[ItemKey, ItemResult], version: str
) -> dict[str, Any]:
    """serve_app's ``/v1/predict/batch`` answer: a result per entry, in order, a summary."""
    results: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, InvalidInput):
            results.append({"index": index, "ok": False, "error": entry.to_dict()})
            continue
        result = by_key[item_key(entry)]
        if "error" in result:
            results.append({"index": index, "ok": False, "entity_id": entry["entity_id"], **result})
            continue
        results.append(
            {
                "index": index,
                "ok": True,
                "entity_id": entry["entity_id"],
                "score": result["score"],
                "cached": False,
                "degraded": result["degraded"],
            }
        )
    failed = sum(1 for result in results if not result["ok"])
    return {
        "model_version": version,
        "results": results,
        "summary": {
            "items": len(results),
            "unique": len(valid_unique(entries)),
            "succeeded": len(results) - failed,
            "failed": failed,
            "cached": 0,
        },
    }


def error_body(exc: ServeAppError) -> dict[str, Any]:
    """serve_app's error envelope."""
    return {"error": exc.to_dict()}
