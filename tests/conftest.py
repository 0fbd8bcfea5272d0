"""Shared fixtures: example artifacts built once per session into a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.build import build_artifacts
from serve_app.config import AppConfig


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the load test first: it starts its own Ray, before the session cluster exists."""
    items.sort(key=lambda item: 0 if "tests/loadtests/" in str(item.path) else 1)


@pytest.fixture(scope="session")
def small_config(tmp_path_factory: pytest.TempPathFactory) -> AppConfig:
    """A config whose artifacts (2,000 entities) are built in a session temp dir."""
    base = tmp_path_factory.mktemp("small")
    config = AppConfig.model_validate({"artifacts": {"n_entities": 2_000}}).resolved(base)
    build_artifacts(config)
    return config


@pytest.fixture(scope="session")
def small_store_path(small_config: AppConfig) -> Path:
    return Path(small_config.store.url.removeprefix("sqlite:///"))
