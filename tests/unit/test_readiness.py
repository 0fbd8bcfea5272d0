"""/readyz is open to anyone: each Ingress replica checks at most once a second."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from serve_app.cache import SingleFlightCache
from serve_app.deployments.ingress import READINESS_TTL_S, Ingress


class _Ingress(Ingress.func_or_class):  # type: ignore[misc,name-defined]
    def __del__(self) -> None:
        """Serve's stop hook is not part of these tests."""


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _ingress(clock: _Clock, store_ok: list[bool]) -> tuple[Any, dict[str, int]]:
    calls = {"model": 0, "ping": 0}

    async def metadata() -> dict[str, str]:
        calls["model"] += 1
        await asyncio.sleep(0.05)  # concurrent callers arrive while it runs
        return {"version": "v1"}

    async def ping() -> bool:
        calls["ping"] += 1
        return store_ok[0]

    ingress = object.__new__(_Ingress)
    ingress._model = SimpleNamespace(metadata=SimpleNamespace(remote=metadata))
    ingress._fetcher = SimpleNamespace(ping=SimpleNamespace(remote=ping))
    ingress._readiness = SingleFlightCache(maxsize=1, ttl_s=READINESS_TTL_S, timer=clock)
    return ingress, calls


def test_a_flood_of_readiness_calls_costs_one_check_a_second() -> None:
    """Every call used to make a Model call, a FeatureFetcher call and a store ping
    (a GET on a remote feature API), and log a warning each when failing."""
    clock, store_ok = _Clock(), [True]
    ingress, calls = _ingress(clock, store_ok)

    async def flood() -> set[int]:
        answers = await asyncio.gather(*(ingress.readyz() for _ in range(50)))
        return {answer.status_code for answer in answers}

    assert asyncio.run(flood()) == {200}
    assert calls == {"model": 1, "ping": 1}
    store_ok[0] = False
    clock.now = READINESS_TTL_S / 2
    assert asyncio.run(flood()) == {200}  # still the answer of half a second ago
    assert calls == {"model": 1, "ping": 1}
    clock.now = READINESS_TTL_S * 1.5
    assert asyncio.run(flood()) == {503}  # checked again
    assert calls == {"model": 2, "ping": 2}
