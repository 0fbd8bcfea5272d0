"""Peer 1 for ``bench_peers.py``: plain FastAPI + uvicorn, 2 worker processes, no Ray.

What a user would write who puts serve_app's model behind FastAPI: per request ONE
look-up and ONE ``predict_proba`` (:mod:`loadtests.peers.common` does the work, with
serve_app's own auth, validation, store and artifact); no batching across requests, no
cache. Two uvicorn workers (one per core) with ``OMP_NUM_THREADS=1``, so that the two
processes do not oversubscribe the cores.

    PEER_MODEL_DIR=... PEER_SQLITE=... SERVE_APP_API_KEYS=... \\
        python loadtests/peers/fastapi_peer.py --port 8101 [--workers 2]

Routes: ``GET /readyz`` (the model is loaded and the store answers), ``POST /v1/predict``,
``POST /v1/predict/batch``; errors in serve_app's envelope and status codes.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the routes.

import argparse
import sys
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

if __name__ == "__main__":  # python loadtests/peers/<this>.py: the repository root first
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from loadtests.peers.common import (
    PeerWork,
    batch_body,
    entity_ids,
    error_body,
    key_checker,
    predict_body,
    valid_unique,
)
from serve_app.api.body import read_json_body
from serve_app.api.validation import parse_item
from serve_app.errors import ServeAppError, StoreUnavailable

APP_IMPORT = "loadtests.peers.fastapi_peer:create_app"
_bearer = HTTPBearer(auto_error=False)


def create_app() -> FastAPI:
    """The app of one uvicorn worker (uvicorn calls this in each worker process)."""
    work = PeerWork.from_env()
    keys = key_checker()
    app = FastAPI(title="FastAPI peer", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ServeAppError)
    async def service_error(_request: Request, exc: ServeAppError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=exc.status_code)

    async def owner(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> str:
        return keys.require(credentials.credentials if credentials else None)

    Owner = Annotated[str, Depends(owner)]

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            await work.store.ping()
        except StoreUnavailable:
            return JSONResponse({"status": "not_ready"}, status_code=503)
        return JSONResponse({"status": "ready", "model_version": work.version})

    @app.post("/v1/predict")
    async def predict(request: Request, _owner: Owner) -> dict[str, Any]:
        item = parse_item(
            await read_json_body(
                request, work.limits.max_body_bytes, work.limits.body_read_timeout_s
            )
        )
        rows = await work.store.get_many([item["entity_id"]])
        [result] = work.score([item], rows).values()
        return predict_body(item, result, work.version)

    @app.post("/v1/predict/batch")
    async def predict_batch(request: Request, _owner: Owner) -> dict[str, Any]:
        entries = work.parse_batch(
            await read_json_body(
                request, work.limits.max_body_bytes, work.limits.body_read_timeout_s
            )
        )
        unique = valid_unique(entries)
        rows = await work.store.get_many(entity_ids(unique))
        return batch_body(entries, work.score(unique, rows), work.version)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    uvicorn.run(
        APP_IMPORT,
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_level="warning",
        # uvicorn restarts a worker that does not answer its supervisor's ping within 5 s
        # by default; loading the model on a busy machine can take longer than that.
        timeout_worker_healthcheck=120,
    )


if __name__ == "__main__":
    main()
