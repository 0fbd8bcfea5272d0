"""CPU cost of the Ingress's own Python per scoring request, step by step, in-process.

Why: end to end, a change of 100 us per request is below this shared machine's noise
(the same build drifts 30-50 % within minutes), yet the Ingress is the largest user of
CPU. This measures each step of a request's path through serve_app's own code on fixed
inputs, as CPU time (``time.process_time``, the best of several rounds), next to what the
replaced alternatives cost::

    python loadtests/bench_ingress_steps.py [--items 32] [--requests 500] [--rounds 7]

No Ray, no HTTP: uvicorn, Ray's ingress wrapper and FastAPI's routing are not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python loadtests/<this>.py

from cachetools import TTLCache
from pydantic import TypeAdapter

from serve_app.api.body import parse_json
from serve_app.api.responses import ScoreResponse
from serve_app.api.schemas import PREDICT_REQUEST, BatchResponse
from serve_app.api.validation import parse_items
from serve_app.cache import PredictionCache
from serve_app.errors import InvalidInput
from serve_app.scoring.answers import Answers, score_batch
from serve_app.scoring.items import Item


def _bodies(requests: int, items: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    channels = ["web", "app", "store"]
    return [
        json.dumps(
            {
                "items": [
                    {
                        "entity_id": f"E{rng.randrange(100_000):07d}",
                        "context": {
                            "amount": round(rng.random() * 100, 2),
                            "hour": rng.randrange(24),
                            "channel": rng.choice(channels),
                        },
                    }
                    for _ in range(items)
                ]
            }
        ).encode()
        for _ in range(requests)
    ]


def _per_request_us(step: Callable[[int], Any], requests: int, rounds: int) -> float:
    """The best round's CPU microseconds per call of ``step(i)`` for i in range(requests)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for index in range(requests):
            step(index)
        best = min(best, (time.process_time() - started) / requests * 1e6)
    return best


class _TTLCacheBefore(PredictionCache):
    """The prediction cache as it was: cachetools' TTLCache (for comparison only)."""

    def __init__(self, maxsize: int, ttl_s: float) -> None:
        super().__init__(maxsize, ttl_s)
        self._ttl_cache: TTLCache[Any, dict[str, Any]] = TTLCache(maxsize, ttl_s)

    def get(self, key: Any) -> dict[str, Any] | None:
        value = self._ttl_cache.get(key)
        self.misses += value is None
        self.hits += value is not None
        return value

    def _store(self, key: Any, value: dict[str, Any]) -> None:
        self._ttl_cache[key] = value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32, help="items per request")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    n, rounds = args.requests, args.rounds
    bodies = _bodies(n, args.items)
    raws = [parse_json(body)["items"] for body in bodies]
    entries = [parse_items(raw) for raw in raws]

    async def model(items: list[Item]) -> dict[str, Any]:  # the Model's answer, no hop
        return {"model_version": "v1", "results": [{"score": 0.5, "degraded": False}] * len(items)}

    loop = asyncio.new_event_loop()
    answers: list[dict[str, Any]] = []

    def scoring(cache: PredictionCache) -> Callable[[int], Any]:
        shared = Answers(cache)
        return lambda i: answers.append(
            loop.run_until_complete(score_batch(entries[i], shared, model))
        )

    def one_by_one(i: int) -> list[Any]:  # validation as it was: a pydantic call per item
        out: list[Item | InvalidInput] = []
        for raw in raws[i]:
            request = PREDICT_REQUEST.validate_python(raw)
            out.append({"entity_id": request.entity_id, "context": request.context.model_dump()})
        return out

    response_model = TypeAdapter(BatchResponse)
    rows = [
        ("parse the JSON body", lambda i: parse_json(bodies[i]), ""),
        ("validate the items", lambda i: parse_items(raws[i]), "one list, to_item()"),
        ("  before: one by one, model_dump", one_by_one, ""),
        ("score: dedupe, cache, answers", scoring(PredictionCache(100_000, 600)), "LRU + deadline"),
        ("  before: TTLCache", scoring(_TTLCacheBefore(100_000, 600)), ""),
        ("  cache off", scoring(PredictionCache(100_000, 600, enabled=False)), ""),
        ("render the response", lambda i: ScoreResponse(answers[i]), "pydantic-core"),
        (
            "  before: FastAPI's response_model",
            lambda i: response_model.dump_json(
                response_model.validate_python(answers[i]), exclude_none=True
            ),
            "",
        ),
    ]
    print(f"{args.items} items per request, {n} requests, best of {rounds} rounds (CPU us)")
    print("| step | us per request | us per item | note |\n|---|---|---|---|")
    for label, step, note in rows:
        us = _per_request_us(step, n, rounds)
        print(f"| {label} | {us:,.1f} | {us / args.items:,.2f} | {note} |")


if __name__ == "__main__":
    main()
