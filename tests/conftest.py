"""Shared fixtures: example artifacts built once per session into a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.config import AppConfig
from serve_app.offline.artifacts import build_artifacts


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run tests that start their own Ray first, before the session cluster exists, and
    the image test last.

    A second local cluster would share the 2 cores, and `ray.init()` inside `serve run`
    could attach to the session's cluster instead of starting its own. The image's build
    starts in the background at collection (tests/image/conftest.py): the later its test
    comes, the more of the build is done when it starts.
    """

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("own_ray"):
            return 0
        return 2 if item.get_closest_marker("slow") else 1

    items.sort(key=rank)


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
