"""The talk's two FastAPI services, written faithfully, as baselines for the benchmark.

* ``normal`` ("A normal example"): an ``async`` endpoint that fetches each item's
  features one after the other with a *blocking* HTTP call (which also blocks the event
  loop, as in the talk), then predicts.
* ``fast`` ("A faster example" + caching + the batch endpoint): features fetched in a
  ``ThreadPoolExecutor(max_workers=5)``, the fetch wrapped in ``functools.lru_cache``, and
  a batch endpoint that dedupes, validates and calls ``predict`` once.

Both use the same model artifact, the same pre-processing and the same feature API as
serve_app, and answer the same routes and bodies, so one load generator drives all three:

    python -m loadtests.talk_baselines --mode fast --model-dir var/model \
        --feature-api http://127.0.0.1:8900 --port 8101
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import ValidationError
from threadpoolctl import threadpool_limits

from serve_app.api.schemas import PREDICT_REQUEST, BatchRequest, PredictRequest
from serve_app.scoring.artifact import load_artifact
from serve_app.scoring.features import build_frame
from serve_app.scoring.items import item_key


def create_app(mode: str, model_dir: Path, feature_api: str) -> FastAPI:
    model = load_artifact(model_dir)
    http = httpx.Client(base_url=feature_api, timeout=10)  # blocking, like `requests`

    def fetch_item_data(entity_id: str) -> dict[str, Any] | None:  # <- IO BOUND TASK
        response = http.get(f"/features/{entity_id}")
        return None if response.status_code == 404 else response.raise_for_status().json()

    cached_fetch = functools.lru_cache(maxsize=100_000)(fetch_item_data)

    def predict(rows: list[dict[str, Any] | None], items: list[PredictRequest]) -> list[float]:
        frame = build_frame(rows, [item.context.model_dump() for item in items])
        return [float(p) for p in model.pipeline.predict_proba(frame)[:, 1]]

    async def fetch_concurrently(entity_ids: list[str]) -> list[dict[str, Any] | None]:
        # the talk's "faster example": less readable, but significantly faster
        with concurrent.futures.ThreadPoolExecutor(max_workers=5) as executor:
            loop = asyncio.get_event_loop()
            futures = [
                loop.run_in_executor(executor, functools.partial(cached_fetch, entity))
                for entity in entity_ids
            ]
            return list(await asyncio.gather(*futures))

    app = FastAPI(title=f"talk baseline: {mode}")

    def answer(item: PredictRequest, row: dict[str, Any] | None, score: float) -> dict[str, Any]:
        if row is None:
            return {"entity_id": item.entity_id, "ok": False, "error": "unknown_entity"}
        return {"entity_id": item.entity_id, "ok": True, "score": score}

    @app.post("/v1/predict")
    async def predict_one(body: PredictRequest) -> dict[str, Any]:
        if mode == "normal":
            row = fetch_item_data(body.entity_id)
        else:
            row = (await fetch_concurrently([body.entity_id]))[0]
        if row is None:
            raise HTTPException(404, "unknown entity")
        return answer(body, row, predict([row], [body])[0])

    @app.post("/v1/predict/batch")
    async def predict_batch(body: BatchRequest) -> dict[str, Any]:
        items: list[PredictRequest] = []
        for raw in body.items:  # validate
            try:
                items.append(PREDICT_REQUEST.validate_python(raw))
            except ValidationError as exc:
                raise HTTPException(422, str(exc)) from exc
        if mode == "normal":
            rows = [fetch_item_data(item.entity_id) for item in items]  # one after the other
            scores = predict(rows, items)
            return {
                "results": [answer(i, r, s) for i, r, s in zip(items, rows, scores, strict=True)]
            }
        unique = list({item_key(item.to_item()): item for item in items}.values())  # dedupe
        rows = await fetch_concurrently([item.entity_id for item in unique])
        scores = predict(rows, unique)  # one predict for the whole request
        by_key = {
            item_key(item.to_item()): answer(item, row, score)
            for item, row, score in zip(unique, rows, scores, strict=True)
        }
        return {"results": [by_key[item_key(item.to_item())] for item in items]}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["normal", "fast"], required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--feature-api", required=True)
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args()
    threadpool_limits(1)  # one process, one core's worth of OpenMP: no oversubscription
    app = create_app(args.mode, args.model_dir, args.feature_api)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
