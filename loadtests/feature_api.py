"""A stand-in for a remote feature API: real HTTP on loopback, with injected latency.

It serves the example SQLite store over HTTP so that benchmarks and tests put a real
network hop (and a configurable delay, like a real service's) between serve_app and its
features. Two shapes, as real feature services offer:

* ``POST /features/bulk {"ids": [...]}`` -> ``{"features": {id: row or null}}`` (one delay)
* ``GET /features/{id}`` -> row, or 404 (one delay per call: the talk's "normal" client)

Run: ``python -m loadtests.feature_api --db var/features.db --port 8900 --latency-ms 5``
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from serve_app.scoring.features import ENTITY_FEATURES


class BulkRequest(BaseModel):
    ids: list[str] = Field(max_length=10_000)


def create_app(db_path: Path, latency_ms: float) -> FastAPI:
    """The feature API over ``db_path``; every call waits ``latency_ms`` first."""
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, check_same_thread=False)
    select = f"SELECT entity_id, {', '.join(ENTITY_FEATURES)} FROM entities WHERE entity_id IN "
    app = FastAPI(title="example feature API")
    app.state.latency_s = latency_ms / 1000
    app.state.healthy = True

    def rows(ids: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            query = select + "(" + ",".join("?" * len(chunk)) + ")"
            for row in connection.execute(query, chunk):
                found[row[0]] = dict(zip(ENTITY_FEATURES, row[1:], strict=True))
        return found

    async def delay() -> None:
        if not app.state.healthy:
            raise HTTPException(503, "feature API is down")
        if app.state.latency_s:
            await asyncio.sleep(app.state.latency_s)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        if not app.state.healthy:
            raise HTTPException(503, "down")
        return {"status": "ok"}

    @app.post("/features/bulk")
    async def bulk(body: BulkRequest) -> dict[str, Any]:
        await delay()
        found = rows(body.ids)
        return {"features": {entity: found.get(entity) for entity in body.ids}}

    @app.get("/features/{entity_id}")
    async def one(entity_id: str) -> dict[str, Any]:
        await delay()
        found = rows([entity_id])
        if entity_id not in found:
            raise HTTPException(404, f"unknown entity {entity_id}")
        return found[entity_id]

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--latency-ms", type=float, default=5.0)
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.db, args.latency_ms),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
