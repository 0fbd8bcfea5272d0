"""The no-Ray baseline for ``bench_predict.py``: plain FastAPI + uvicorn, one worker.

It does the same work per request as serve_app, without Ray and without any cache:

* ``POST /v1/predict``: one SQLite look-up and one ``predict_proba`` on one row;
* ``POST /v1/predict/batch``: one bulk SQLite look-up and one ``predict_proba`` for
  the whole request.

Same artifact (checksum-verified by :func:`serve_app.scoring.artifact.load_artifact`), same
store class (:class:`serve_app.stores.sqlite.SQLiteFeatureStore`, a connection per call),
same request schemas and the same scoring code
(:meth:`serve_app.scoring.scorer.Scorer.predict`, with the numpy encoding serve_app's
Model uses).
There is NO prediction cache and NO feature cache here, and no API-key check (a
constant-time compare, negligible next to the model). scikit-learn's OpenMP threads are
pinned to 1 with threadpoolctl, as serve_app pins them per replica; unpinned they
oversubscribe the cores (see shared/design.md).

    python loadtests/baseline_app.py --model-dir DIR --sqlite FILE [--port 8100]

``BASELINE_MODEL_DIR`` and ``BASELINE_SQLITE`` are read when the flags are left out.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import ValidationError
from threadpoolctl import threadpool_info, threadpool_limits

from serve_app.api.schemas import PREDICT_REQUEST, BatchRequest, PredictRequest
from serve_app.scoring.artifact import LoadedModel, load_artifact
from serve_app.scoring.scorer import Scorer
from serve_app.stores.sqlite import SQLiteFeatureStore


def create_app(model_dir: Path, sqlite_path: Path) -> FastAPI:
    """The baseline app; call it in the thread that will run the event loop."""
    threadpool_limits(limits=1)
    model: LoadedModel = load_artifact(model_dir)
    store = SQLiteFeatureStore(sqlite_path)
    app = FastAPI(title="serve_app baseline (no Ray, no cache)")

    scorer = Scorer(model)

    def score(rows: list[dict[str, Any]], items: list[PredictRequest]) -> list[float]:
        return scorer.predict(rows, [item.context.model_dump() for item in items])

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        threads = {info["internal_api"]: info["num_threads"] for info in threadpool_info()}
        return {"status": "ok", "model_version": model.version, "threads": threads}

    @app.post("/v1/predict")
    async def predict(item: PredictRequest) -> dict[str, Any]:
        rows = await store.get_many([item.entity_id])
        row = rows.get(item.entity_id)
        if row is None:
            raise HTTPException(404, f"no features stored for entity {item.entity_id!r}")
        [probability] = score([row], [item])
        return {"entity_id": item.entity_id, "score": probability, "model_version": model.version}

    @app.post("/v1/predict/batch")
    async def predict_batch(body: BatchRequest) -> dict[str, Any]:
        results: list[dict[str, Any] | None] = [None] * len(body.items)
        valid: list[tuple[int, PredictRequest]] = []
        for index, raw in enumerate(body.items):
            try:
                valid.append((index, PREDICT_REQUEST.validate_python(raw)))
            except ValidationError as exc:
                results[index] = {"index": index, "ok": False, "error": str(exc)}
        rows = await store.get_many(list(dict.fromkeys(item.entity_id for _, item in valid)))
        known = [(index, item) for index, item in valid if item.entity_id in rows]
        for index, item in valid:
            if item.entity_id not in rows:
                results[index] = {"index": index, "ok": False, "error": "unknown_entity"}
        if known:
            items = [item for _, item in known]
            scores = score([rows[item.entity_id] for item in items], items)
            for (index, item), probability in zip(known, scores, strict=True):
                results[index] = {
                    "index": index,
                    "ok": True,
                    "entity_id": item.entity_id,
                    "score": probability,
                }
        return {"model_version": model.version, "results": results}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.environ.get("BASELINE_MODEL_DIR"))
    parser.add_argument("--sqlite", default=os.environ.get("BASELINE_SQLITE"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    if not args.model_dir or not args.sqlite:
        parser.error("--model-dir and --sqlite (or BASELINE_MODEL_DIR, BASELINE_SQLITE) needed")
    app = create_app(Path(args.model_dir), Path(args.sqlite))
    uvicorn.run(
        app, host=args.host, port=args.port, workers=1, access_log=False, log_level="warning"
    )


if __name__ == "__main__":
    main()
