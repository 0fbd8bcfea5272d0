import asyncio
import gzip
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from serve_app.config import StoreConfig
from serve_app.errors import StoreUnavailable
from serve_app.stores import CorruptRow, FeatureLookup, FeatureRow, StoredRow
from serve_app.stores.client import StoreClient


class ScriptedStore:
    """A store whose calls take ``delays[i]`` seconds, or fail when the delay is None."""

    def __init__(self, delays: list[float | None]) -> None:
        self.delays = delays
        self.calls = 0

    async def get_many(self, entity_ids: Sequence[str]) -> dict[str, FeatureRow]:
        delay = self.delays[min(self.calls, len(self.delays) - 1)]
        self.calls += 1
        if delay is None:
            raise StoreUnavailable("down")
        await asyncio.sleep(delay)
        return {entity: {"age": 1.0} for entity in entity_ids}

    async def ping(self) -> None:
        return None


def config(**overrides: object) -> StoreConfig:
    return StoreConfig.model_validate({"timeout_s": 0.05, "attempts": 3, **overrides})


def test_each_attempt_times_out_then_the_store_is_unavailable() -> None:
    store = ScriptedStore([0.5])
    started = time.perf_counter()
    with pytest.raises(StoreUnavailable, match="timed out"):
        asyncio.run(StoreClient(store, config()).get_many(["E1"]))
    assert store.calls == 3
    # three 50 ms timeouts and two backoffs of at most 0.2 s: about 0.6 s; 3 s is a hang
    assert time.perf_counter() - started < 3.0


def test_a_transient_failure_is_retried() -> None:
    store = ScriptedStore([None, 0.0])
    rows = asyncio.run(StoreClient(store, config()).get_many(["E1", "E2"]))
    assert set(rows) == {"E1", "E2"} and store.calls == 2


def test_one_attempt_means_no_retry() -> None:
    store = ScriptedStore([None, 0.0])
    with pytest.raises(StoreUnavailable):
        asyncio.run(StoreClient(store, config(attempts=1)).get_many(["E1"]))
    assert store.calls == 1


def test_slow_http_feature_api_times_out(small_store_path: Path) -> None:
    from loadtests.feature_api import create_app
    from serve_app.stores.http import HttpFeatureStore
    from tests.servers import serve_in_thread

    with serve_in_thread(create_app(small_store_path, latency_ms=300)) as url:
        client = StoreClient(HttpFeatureStore(url), config(attempts=2))
        with pytest.raises(StoreUnavailable, match="timed out"):
            asyncio.run(client.get_many(["E0000001"]))


def _hostile_feature_api(answers: dict[str, bytes]) -> Any:
    """A remote feature API that answers ``answers[first id asked]`` verbatim."""
    from fastapi import FastAPI, Request, Response

    app = FastAPI()

    @app.post("/features/bulk")
    async def bulk(request: Request) -> Response:
        ids = (await request.json())["ids"]
        return Response(answers[ids[0]], media_type="application/json")

    return app


# What each answer must be refused for: a closed port is a StoreUnavailable too.
MALFORMED_BECAUSE = {
    "top-list": "answered no",
    "features-null": "answered no",
    "features-list": "answered no",
    "not-json": "JSONDecodeError",
    "deep": "RecursionError",
}
MALFORMED = {
    "top-list": b"[]",
    "features-null": b'{"features": null}',
    "features-list": b'{"features": []}',
    "not-json": b"<html>oops</html>",
    "deep": b'{"features": {"deep": ' + b"[" * 3000,  # RecursionError, under the size cap
}
# One row of the wrong shape in a good answer: that id's own failure, and why.
CORRUPT_BECAUSE = {
    "row-number": "not a flat object but int",
    "row-list": "not a flat object but list",
    "row-list-value": "list in 'region'",
    "row-object-value": "dict in 'age'",
    "row-empty": "none of the model's entity features",
    "row-unknown-names": "none of the model's entity features",
    "row-all-null": "none of the model's entity features",
}
CORRUPT = {
    "row-number": b'{"features": {"row-number": 5, "E1": {"age": 2.0}}}',
    "row-list": b'{"features": {"row-list": [1, 2], "E1": {"age": 2.0}}}',
    "row-list-value": b'{"features": {"row-list-value": {"region": ["north"]}, "E1": {"age": 1}}}',
    "row-object-value": b'{"features": {"row-object-value": {"age": {"x": 1}}, "E1": {"age": 1}}}',
    "row-empty": b'{"features": {"row-empty": {}, "E1": {"age": 1}}}',
    "row-unknown-names": b'{"features": {"row-unknown-names": {"agee": 1}, "E1": {"age": 1}}}',
    "row-all-null": b'{"features": {"row-all-null": {"age": null, "region": null}, "E1": {"age": 1}}}',
}


def _look_up(url: str, ids: list[str]) -> dict[str, StoredRow]:
    from serve_app.stores.http import HttpFeatureStore

    async def look_up() -> dict[str, StoredRow]:
        store = HttpFeatureStore(url)
        try:
            return await StoreClient(store, config(attempts=1, timeout_s=5)).get_many(ids)
        finally:
            await store.aclose()

    return asyncio.run(look_up())


@pytest.mark.parametrize("entity", sorted(MALFORMED))
def test_a_malformed_feature_api_answer_is_the_store_failing(entity: str) -> None:
    """A wrong envelope escaped the retries as a TypeError; now it is the store failing."""
    from tests.servers import serve_in_thread

    with (
        serve_in_thread(_hostile_feature_api(MALFORMED)) as url,
        pytest.raises(StoreUnavailable, match=MALFORMED_BECAUSE[entity]),
    ):
        _look_up(url, [entity])


@pytest.mark.parametrize("entity", sorted(CORRUPT))
def test_a_corrupt_row_is_that_ids_own_failure(entity: str) -> None:
    """A row of the wrong shape failed the whole Model batch (a 500 for every caller in
    it), then the whole look-up; now only its id is marked, and E1 is served."""
    from tests.servers import serve_in_thread

    with serve_in_thread(_hostile_feature_api(CORRUPT)) as url:
        rows = _look_up(url, [entity, "E1"])
    assert set(rows) == {entity, "E1"}
    assert isinstance(rows[entity], CorruptRow)
    assert CORRUPT_BECAUSE[entity] in rows[entity].reason
    assert isinstance(rows["E1"], dict)


def _mixed_feature_api(calls: list[list[str]]) -> Any:
    """A feature API holding a good E1 and a corrupt BAD row; records what it is asked."""
    from fastapi import FastAPI, Request

    app = FastAPI()

    @app.post("/features/bulk")
    async def bulk(request: Request) -> dict[str, Any]:
        ids = (await request.json())["ids"]
        calls.append(ids)
        held = {"E1": {"age": 40.0, "region": "north"}, "BAD": {"region": ["north"]}}
        return {"features": {entity: held.get(entity) for entity in ids}}

    return app


@pytest.mark.parametrize(("on_error", "field"), [("fail", "invalid"), ("degrade", "fallback")])
def test_a_corrupt_row_is_cached_and_told_apart_in_the_lookup(
    on_error: str, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The FeatureFetcher's answer: E1's row, BAD named apart (invalid or fallback, as
    store.on_error says), NOPE absent; a second look-up is served from the cache and
    the corrupt row is logged once, by id, without its values."""
    from serve_app.config import FetcherTuning
    from serve_app.feature_lookup import FeatureSource
    from tests.servers import serve_in_thread

    calls: list[list[str]] = []
    with serve_in_thread(_mixed_feature_api(calls)) as url, caplog.at_level("WARNING"):
        store = StoreConfig(url=url, on_error=on_error, attempts=1, timeout_s=5)

        async def twice() -> list[FeatureLookup]:
            source = FeatureSource(store, FetcherTuning(), _Anything())
            try:
                return [await source.get_many(["E1", "BAD", "NOPE"]) for _ in range(2)]
            finally:
                await source.aclose()

        first, second = asyncio.run(twice())
    assert first == second
    assert first.status == "ok" and set(first.rows) == {"E1"}
    assert getattr(first, field) == frozenset({"BAD"})
    other = "fallback" if field == "invalid" else "invalid"
    assert getattr(first, other) == frozenset()
    assert calls == [["E1", "BAD", "NOPE"]]
    corrupt_logs = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(corrupt_logs) == 1 and "'BAD'" in corrupt_logs[0]
    assert "north" not in corrupt_logs[0]


class _Anything:
    """A metrics stand-in: every attribute is a no-op recorder."""

    def __getattr__(self, name: str) -> Any:
        if name in ("inc", "observe", "set"):
            return lambda *args, **kwargs: None
        return self


def test_rows_nobody_asked_for_are_dropped_and_a_huge_answer_is_refused() -> None:
    """The remote decides how much it sends; a replica holds at most 4 KiB per id asked."""
    from serve_app.stores.http import MAX_BYTES_PER_ID, HttpFeatureStore
    from tests.servers import serve_in_thread

    extra = {f"X{i}": {"age": 1.0} for i in range(10)}
    huge = {f"H{i:06d}": {"age": 1.0, "region": "north"} for i in range(200_000)}
    answers = {
        "E1": json.dumps({"features": {"E1": {"age": 2.0}, **extra}}).encode(),
        "H000000": json.dumps({"features": huge}).encode(),  # ~7 MB for one id
    }
    with serve_in_thread(_hostile_feature_api(answers)) as url:

        async def look_up(ids: list[str]) -> dict[str, FeatureRow]:
            store = HttpFeatureStore(url)
            try:
                return await StoreClient(store, config(attempts=1, timeout_s=5)).get_many(ids)
            finally:
                await store.aclose()

        assert asyncio.run(look_up(["E1"])) == {"E1": {"age": 2.0}}
        started = time.perf_counter()
        with pytest.raises(StoreUnavailable, match=f"over {MAX_BYTES_PER_ID + 1_024} bytes"):
            asyncio.run(look_up(["H000000"]))
        assert time.perf_counter() - started < 5  # generous: stops reading at the cap


def test_the_feature_api_password_never_reaches_the_logs() -> None:
    """store.url may carry a user and password from the environment; httpx quotes the
    URL in its errors, and those go to the FeatureFetcher's log on every failure."""
    from fastapi import FastAPI, Response

    from serve_app.stores.http import HttpFeatureStore
    from tests.servers import serve_in_thread

    app = FastAPI()

    @app.post("/features/bulk")
    async def broken() -> Response:
        return Response(status_code=500)

    with serve_in_thread(app) as url:
        with_password = url.replace("http://", "http://svc:s3cr3t-token@")

        async def look_up() -> str:
            store = HttpFeatureStore(with_password)
            try:
                await StoreClient(store, config(attempts=1, timeout_s=5)).get_many(["E1"])
            except StoreUnavailable as exc:
                return exc.message
            finally:
                await store.aclose()
            return "no error"

        message = asyncio.run(look_up())
    assert "500" in message and "s3cr3t-token" not in message and "***@" in message


def _bomb() -> bytes:
    """128 MiB of zeros, gzip inside gzip: 1.7 KB on the wire."""
    inner = gzip.compress(b"\0" * (128 << 20), compresslevel=1)
    return gzip.compress(inner, compresslevel=9)


def _bombing_feature_api(seen: list[str]) -> Any:
    """A feature API whose every answer is a compression bomb (status 200 included)."""
    from fastapi import FastAPI, Request, Response

    app = FastAPI()
    bomb = _bomb()
    headers = {"content-encoding": "gzip, gzip"}

    @app.post("/features/bulk")
    async def bulk(request: Request) -> Response:
        seen.append(request.headers.get("accept-encoding", ""))
        return Response(bomb, media_type="application/json", headers=headers)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(bomb, media_type="text/plain", headers=headers)

    return app


def test_a_compressed_answer_is_refused_before_it_is_inflated() -> None:
    """httpx inflates gzip (twice, for "gzip, gzip") with no bound before our byte cap
    sees a byte: a 980-byte answer cost the replica 1.5 GB in a helper's test, with the
    event loop blocked past the timeout (this one held 271 MiB in ping alone). The store asks for identity and refuses any
    other encoding unread; ping reads the status alone."""
    import tracemalloc

    from serve_app.stores.http import HttpFeatureStore
    from tests.servers import serve_in_thread

    seen: list[str] = []
    with serve_in_thread(_bombing_feature_api(seen)) as url:

        async def look_up_then_ping() -> str:
            store = HttpFeatureStore(url)
            try:
                with pytest.raises(StoreUnavailable) as refused:
                    await StoreClient(store, config(attempts=1, timeout_s=5)).get_many(["E1"])
                await store.ping()  # answered 200: ready, and the body is not our business
                return refused.value.message
            finally:
                await store.aclose()

        tracemalloc.start()
        try:
            message = asyncio.run(look_up_then_ping())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert "Content-Encoding 'gzip, gzip'" in message
    assert seen == ["identity"]
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB held: the bomb was inflated"


def test_an_integer_no_float_can_hold_is_a_missing_value_not_a_failed_answer() -> None:
    """Python refuses to parse an integer of over 4,300 digits: one such value made the
    whole answer a StoreUnavailable (every id in it degraded or 503). Now the value is
    missing (NaN), as the scoring reads any value that is no number, and E1 is served."""
    import math

    from tests.servers import serve_in_thread

    big_row = '{"age": ' + "9" * 4_301 + ', "region": "north"}'
    answer = '{"features": {"BIG": ' + big_row + ', "E1": {"age": 1}}}'

    with serve_in_thread(_hostile_feature_api({"BIG": answer.encode()})) as url:
        rows = _look_up(url, ["BIG", "E1"])
    assert rows["E1"] == {"age": 1}
    big = rows["BIG"]
    assert isinstance(big, dict) and big["region"] == "north" and math.isnan(big["age"])
