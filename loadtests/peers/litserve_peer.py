"""Peer 2 for ``bench_peers.py``: LitServe with dynamic batching, set up as its docs say
for CPU.

LitServe's settings, from its documentation (``LitServer`` / ``LitAPI`` / ``run``):

* dynamic batching on ``LitAPI``: ``max_batch_size=64``, ``batch_timeout=0.005``;
* ``accelerator="cpu"``, ``workers_per_device`` = the number of cores ("for CPU, set to
  the number of cores available on the machine"): 2 inference worker processes per API;
* ``fast_queue=True`` (ZeroMQ between the HTTP servers and the workers, "for
  high-throughput scenarios (>100 RPS)");
* ``num_api_servers`` left at its documented default (None: "same count as inference
  workers (recommended)"), unless ``--api-servers`` says otherwise;
* ``OMP_NUM_THREADS=1`` from the environment and scikit-learn pinned to 1 thread per worker.

Two ``LitAPI`` s, one per route. Each batch of requests is scored as serve_app scores a
Model batch (:mod:`loadtests.peers.common`): the valid items of all its requests deduped,
ONE bulk SQLite look-up, ONE ``predict_proba``, serve_app's answers. Auth
(:class:`~serve_app.api.auth.KeyChecker`) runs in the HTTP servers (LitAPI.authorize);
validation (serve_app's ``parse_item`` / ``parse_items``) in ``decode_request``, on the
workers. A bad or unknown item never fails its batch-mates: LitServe fails a whole batch
on an exception, so the error goes back as that request's own response (422/404 in
serve_app's envelope) instead.

    PEER_MODEL_DIR=... PEER_SQLITE=... SERVE_APP_API_KEYS=... OMP_NUM_THREADS=1 \\
        python loadtests/peers/litserve_peer.py --port 8102

Readiness: ``GET /readyz`` (LitServe's health check, renamed): 200 once every worker is set up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import litserve as ls
from fastapi import Depends, HTTPException
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

if __name__ == "__main__":  # python loadtests/peers/<this>.py: the repository root first
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from loadtests.peers.common import (
    Entry,
    PeerWork,
    batch_body,
    entity_ids,
    error_body,
    key_checker,
    predict_body,
    valid_unique,
)
from serve_app.api.validation import parse_item
from serve_app.errors import InvalidInput, ServeAppError, Unauthorized
from serve_app.scoring.items import item_key

MAX_BATCH_SIZE = 64
BATCH_TIMEOUT_S = 0.005
_bearer = HTTPBearer(auto_error=False)


class _ScoringAPI(ls.LitAPI):
    """What both routes share: setup, auth, and scoring one LitServe batch."""

    def __init__(self, api_path: str) -> None:
        super().__init__(
            max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path=api_path
        )
        self.keys = key_checker()  # built here: the HTTP server processes check the key

    def setup(self, device: str) -> None:
        self.work = PeerWork.from_env()
        # One loop per worker, kept: the store's async look-up (a worker thread) runs on it.
        self.loop = asyncio.new_event_loop()

    def authorize(
        self, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> None:
        try:
            self.keys.require(credentials.credentials if credentials else None)
        except Unauthorized as exc:
            raise HTTPException(exc.status_code, error_body(exc)) from exc

    def batch(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def score_entries(self, entries: list[Entry]) -> dict[Any, Any]:
        """Results by item key for the valid items of a whole LitServe batch."""
        unique = valid_unique(entries)
        if not unique:
            return {}
        rows = self.loop.run_until_complete(self.work.store.get_many(entity_ids(unique)))
        return self.work.score(unique, rows)


def _error_response(exc: ServeAppError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status_code)


class PredictAPI(_ScoringAPI):
    """``POST /v1/predict``: one item per request, requests batched by LitServe."""

    def __init__(self) -> None:
        super().__init__("/v1/predict")

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe reads the JSON body
        try:
            return parse_item(request)
        except InvalidInput as exc:
            return exc

    def predict(self, x: list[Entry]) -> list[Any]:
        by_key = self.score_entries(x)
        return [
            entry if isinstance(entry, InvalidInput) else (entry, by_key[item_key(entry)])
            for entry in x
        ]

    def encode_response(self, output: Any) -> Any:
        if isinstance(output, InvalidInput):
            return _error_response(output)
        item, result = output
        try:
            return predict_body(item, result, self.work.version)
        except ServeAppError as exc:
            return _error_response(exc)


class BatchAPI(_ScoringAPI):
    """``POST /v1/predict/batch``: a list per request; the lists of a LitServe batch are
    scored together."""

    def __init__(self) -> None:
        super().__init__("/v1/predict/batch")

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: see PredictAPI
        try:
            return self.work.parse_batch(request)
        except InvalidInput as exc:
            return exc

    def predict(self, x: list[list[Entry] | InvalidInput]) -> list[Any]:
        bodies = [entries for entries in x if not isinstance(entries, InvalidInput)]
        by_key = self.score_entries([entry for entries in bodies for entry in entries])
        return [
            entries
            if isinstance(entries, InvalidInput)
            else batch_body(entries, by_key, self.work.version)
            for entries in x
        ]

    def encode_response(self, output: Any) -> Any:
        return _error_response(output) if isinstance(output, InvalidInput) else output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8102)
    parser.add_argument("--workers-per-device", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--api-servers", type=int, default=None, help="default: LitServe's (= inference workers)"
    )
    args = parser.parse_args(argv)
    server = ls.LitServer(
        [PredictAPI(), BatchAPI()],
        accelerator="cpu",
        workers_per_device=args.workers_per_device,
        fast_queue=True,
        healthcheck_path="/readyz",
        disable_openapi_url=True,
    )
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=args.api_servers,
        generate_client_file=False,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
