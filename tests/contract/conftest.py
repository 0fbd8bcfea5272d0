"""Real servers for the contract suites, started once per session (see tests/services.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.services import PostgresServer, RedisServer, postgres_server, redis_server


@pytest.fixture(scope="session")
def redis_srv() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_srv() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server
