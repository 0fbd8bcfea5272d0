"""Under ``store.on_error: fail`` clients learn that the store failed, not where it lives.

The FeatureFetcher's look-up (``FeatureSource``, no Ray) runs on a real HTTP feature store whose
server on loopback fails; what it hands on, and so what reaches a client, is generic.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from serve_app.config import AppConfig, FetcherTuning, StoreConfig
from serve_app.feature_lookup import FeatureSource
from serve_app.scoring.artifact import load_artifact
from serve_app.scoring.items import item_key
from serve_app.scoring.scorer import Scorer
from tests.servers import serve_in_thread


class _Anything:
    """A metrics stand-in: every attribute is a no-op recorder."""

    def __getattr__(self, name: str) -> Any:
        if name in ("inc", "observe", "set"):
            return lambda *args, **kwargs: None
        return self


def fetcher(url: str) -> FeatureSource:
    config = StoreConfig(url=url, on_error="fail", attempts=1, timeout_s=2)
    return FeatureSource(config, FetcherTuning(), _Anything())


def test_the_store_error_detail_never_reaches_a_client(
    small_config: AppConfig, caplog: pytest.LogCaptureFixture
) -> None:
    broken = FastAPI()

    @broken.post("/internal-feature-api/features/bulk")
    async def bulk() -> JSONResponse:
        return JSONResponse({"detail": "db-7.internal.corp:5432 refused"}, status_code=500)

    with serve_in_thread(broken) as url, caplog.at_level("WARNING"):
        lookup = asyncio.run(fetcher(f"{url}/internal-feature-api").get_many(["E1"]))
    assert lookup.status == "unavailable"
    assert "internal" not in (lookup.reason or "") and "127.0.0.1" not in (lookup.reason or "")
    assert "internal-feature-api" in caplog.text  # the detail goes to the log
    scorer = Scorer(load_artifact(Path(small_config.artifacts.model_dir)))
    item = {"entity_id": "E1", "context": {"amount": None, "hour": None, "channel": None}}
    error = scorer.score([item], lookup)[item_key(item)]["error"]
    assert error["code"] == "store_unavailable"
    assert "internal" not in str(error) and "127.0.0.1" not in str(error)
