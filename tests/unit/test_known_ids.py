"""The known-id set: exact membership, loading from a real SQLite store, outage behaviour."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from serve_app.known_ids import KnownIds, can_list_ids, load_ids, refresh
from serve_app.scoring.scorer import _lookup_error
from serve_app.stores.base import FeatureLookup


def make_store(path: Path, ids: list[str]) -> str:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE entities (entity_id TEXT PRIMARY KEY, x REAL)")
        db.executemany("INSERT INTO entities VALUES (?, 1.0)", [(i,) for i in ids])
    return f"sqlite:///{path}"


def test_membership_is_exact() -> None:
    known = KnownIds()
    assert known.unknown(["E1"]) is None  # nothing loaded: cannot tell
    known.replace(f"E{i:07d}" for i in range(100_000))
    assert known.size == 100_000
    assert known.nbytes == 800_000
    probe = ["E0000000", "E0099999", "E0100000", "NOPE999", "", "E00000000", "E000000"]
    assert known.unknown(probe) == {"E0100000", "NOPE999", "", "E00000000", "E000000"}
    assert known.unknown([]) == set()


def test_empty_set_knows_nothing() -> None:
    known = KnownIds()
    known.replace([])
    assert known.unknown(["E1", "E2"]) == {"E1", "E2"}


def test_loads_from_sqlite_and_keeps_the_last_set_when_the_store_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "features.db"
    url = make_store(path, ["A1", "B2", "C3"])
    assert can_list_ids(url)
    assert not can_list_ids("http://feature-api.internal")
    assert sorted(asyncio.run(load_ids(url))) == ["A1", "B2", "C3"]
    known = KnownIds()
    assert asyncio.run(refresh(known, url))
    path.unlink()  # the outage
    assert not asyncio.run(refresh(known, url))
    assert known.size == 3
    assert known.unknown(["A1", "NOPE999"]) == {"NOPE999"}


def test_degraded_lookup_gives_404_for_unknown_ids_and_scores_the_rest() -> None:
    lookup = FeatureLookup(status="degraded", reason="down", unknown=frozenset({"NOPE999"}))
    error = _lookup_error({"entity_id": "NOPE999"}, lookup)
    assert error is not None and error["error"]["code"] == "unknown_entity"
    assert _lookup_error({"entity_id": "E0000001"}, lookup) is None


def test_a_source_loads_its_known_ids_before_the_first_call(tmp_path: Path) -> None:
    """A FeatureFetcher replica knows the ids once it has started, not at its first call:
    loaded lazily, a first call during an outage found no set, and unknown ids were
    scored as if they existed."""
    from serve_app.config import FetcherTuning, StoreConfig
    from serve_app.feature_lookup import FeatureSource
    from tests.unit.test_error_detail import _Anything

    async def scenario(url: str) -> dict:
        source = FeatureSource(StoreConfig(url=url), FetcherTuning(), _Anything())
        await source.start()
        started = source.stats()
        await source.aclose()
        return started

    url = make_store(tmp_path / "features.db", ["A1", "B2", "C3"])
    assert asyncio.run(scenario(url))["known_ids"] == 3
    # A store that is down at start: the replica starts anyway, with no set ("cannot tell").
    missing = asyncio.run(scenario(f"sqlite:///{tmp_path / 'gone.db'}"))
    assert missing["known_ids"] == 0 and missing["known_ids_loaded_at"] is None


def test_a_store_that_hangs_at_start_does_not_hold_the_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first load is bounded: past FIRST_LOAD_TIMEOUT_S the replica starts without a
    set, and the refresher tries again later."""
    from serve_app import feature_lookup
    from serve_app.config import FetcherTuning, StoreConfig
    from serve_app.feature_lookup import FeatureSource
    from tests.unit.test_error_detail import _Anything

    async def hang(known: KnownIds, url: str) -> bool:
        await asyncio.Event().wait()
        return False

    monkeypatch.setattr(feature_lookup, "FIRST_LOAD_TIMEOUT_S", 0.1)
    monkeypatch.setattr(feature_lookup, "refresh_known_ids", hang)
    url = make_store(tmp_path / "features.db", ["A1"])

    async def scenario() -> tuple[float, bool]:
        source = FeatureSource(StoreConfig(url=url), FetcherTuning(), _Anything())
        started = time.monotonic()
        await asyncio.wait_for(source.start(), 5)
        took = time.monotonic() - started
        refreshing = source._known_task is not None and not source._known_task.done()
        await source.aclose()
        return took, refreshing

    took, refreshing = asyncio.run(scenario())
    assert took < 1.0
    assert refreshing


def test_a_refresh_builds_the_set_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sorting a million ids took 1.65 s on the FeatureFetcher's event loop, every
    refresh: no look-up was answered meanwhile. The set is built in a thread now, and
    look-ups use the old set until the new one is complete."""
    import threading

    from serve_app import known_ids

    url = make_store(tmp_path / "features.db", ["A1", "B2", "C3"])
    built_on: list[int] = []
    real = known_ids.sorted_ids

    def watched(ids: object) -> object:
        built_on.append(threading.get_ident())
        return real(ids)  # type: ignore[arg-type]

    monkeypatch.setattr(known_ids, "sorted_ids", watched)
    known = KnownIds()
    known.replace(["OLD1"])
    built_on.clear()

    async def scenario() -> int:
        assert await refresh(known, url)
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert len(built_on) == 1 and built_on[0] != loop_thread
    assert known.unknown(["A1", "OLD1"]) == {"OLD1"}


def test_every_entry_is_as_wide_as_the_longest_id() -> None:
    """What the docstring's memory figures assume: one long id widens them all."""
    known = KnownIds()
    known.replace(f"E{i:07d}" for i in range(1_000))
    assert known.nbytes == 8_000
    known.replace([*(f"E{i:07d}" for i in range(1_000)), "L" * 64])
    assert known.nbytes == 1_001 * 64
