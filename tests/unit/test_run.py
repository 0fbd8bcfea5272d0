"""``serve-app run``: serve.env set, HAProxy's admin socket where only this user can go."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from serve_app.errors import ConfigError
from serve_app.offline.run import HAPROXY_FILES, private_dir, run_environment

ROOT = Path(__file__).resolve().parents[2]
SERVE_ENV = ROOT / "configs" / "serve.env"


def test_serve_env_is_set_and_haproxys_files_go_to_a_private_directory(tmp_path: Path) -> None:
    env = run_environment(SERVE_ENV, {"PATH": "/usr/bin"}, tmp_path / "h")
    assert env["PATH"] == "/usr/bin" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "option http-buffer-request" in env["RAY_SERVE_HAPROXY_RETRY_ON"]  # multi-line
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == str(tmp_path / "h" / "admin.sock")
    assert all(env[name].startswith(str(tmp_path / "h")) for name in HAPROXY_FILES)
    assert stat.S_IMODE((tmp_path / "h").stat().st_mode) == 0o700


def test_files_the_operator_placed_are_kept(tmp_path: Path) -> None:
    placed = {"RAY_SERVE_HAPROXY_SOCKET_PATH": "/srv/h/admin.sock"}
    env = run_environment(SERVE_ENV, placed, tmp_path / "h")
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == "/srv/h/admin.sock"
    assert "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC" not in env and not (tmp_path / "h").exists()


def test_a_directory_others_can_enter_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ConfigError, match="open to other users"):
        private_dir(shared)


def test_a_symlink_planted_by_someone_else_is_refused(tmp_path: Path) -> None:
    (tmp_path / "theirs").mkdir(mode=0o700)
    planted = tmp_path / "planted"
    planted.symlink_to(tmp_path / "theirs")
    with pytest.raises(ConfigError, match="symlink"):
        private_dir(planted)


def test_a_directory_of_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = private_dir(tmp_path / "h")
    assert private_dir(made) == made  # ours, 0700: used again
    monkeypatch.setattr(os, "getuid", lambda: made.stat().st_uid + 1)  # as another user
    with pytest.raises(ConfigError, match="belongs to uid"):
        private_dir(made)
