"""``serve-app run``: serve.env set, HAProxy's admin socket where only this user can go."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from serve_app.errors import ConfigError
from serve_app.offline.run import (
    HAPROXY_FILES,
    default_haproxy_dir,
    forget_dead_cluster,
    private_dir,
    ray_address_file,
    run_environment,
)

ROOT = Path(__file__).resolve().parents[2]
SERVE_ENV = ROOT / "configs" / "serve.env"


def test_serve_env_is_set_and_haproxys_files_go_to_a_private_directory(tmp_path: Path) -> None:
    env = run_environment(SERVE_ENV, {"PATH": "/usr/bin"}, tmp_path / "h")
    assert env["PATH"] == "/usr/bin" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "option http-buffer-request" in env["RAY_SERVE_HAPROXY_RETRY_ON"]  # multi-line
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == str(tmp_path / "h" / "admin.sock")
    assert all(env[name].startswith(str(tmp_path / "h")) for name in HAPROXY_FILES)
    assert stat.S_IMODE((tmp_path / "h").stat().st_mode) == 0o700


def test_files_the_operator_placed_are_kept_and_the_others_stay_private(tmp_path: Path) -> None:
    placed = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "/srv/h/haproxy.cfg"}
    env = run_environment(SERVE_ENV, placed, tmp_path / "h")
    assert env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] == "/srv/h/haproxy.cfg"
    # naming one file must not send the admin socket back to Ray's shared default
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == str(tmp_path / "h" / "admin.sock")
    every = {name: f"/srv/h/{name}" for name in HAPROXY_FILES}
    assert run_environment(SERVE_ENV, every, tmp_path / "g").items() >= every.items()
    assert not (tmp_path / "g").exists()


def test_the_login_sessions_runtime_directory_is_preferred(tmp_path: Path) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short, as /run/user/N is
    try:
        assert default_haproxy_dir({"XDG_RUNTIME_DIR": str(runtime)}) == runtime / "serve-app"
    finally:
        runtime.rmdir()
    fallback = Path("/tmp") / f"serve-app-{os.getuid()}"
    assert default_haproxy_dir({}) == fallback
    assert default_haproxy_dir({"XDG_RUNTIME_DIR": str(tmp_path)}) == fallback  # too long


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


def test_a_dead_clusters_address_note_is_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    """``ray start --block`` stopped by a signal leaves ``ray_current_cluster`` behind, and
    ``serve run`` then waited for that dead GCS forever (seen after ``serve-app node``)."""
    import socket

    note = ray_address_file({"RAY_TMPDIR": str(tmp_path)})
    assert note == tmp_path / "ray" / "ray_current_cluster"
    assert forget_dead_cluster(note) is None  # no note: nothing to do
    note.parent.mkdir()
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        note.write_text(f"127.0.0.1:{port}")
        assert forget_dead_cluster(note) is None and note.exists()  # alive: joined, as Ray does
    with socket.socket(socket.AF_INET6) as listening:
        listening.bind(("::1", 0))
        listening.listen()
        note.write_text(f"[::1]:{listening.getsockname()[1]}")
        assert forget_dead_cluster(note) is None and note.exists()  # IPv6, bracketed
    note.write_text(f"127.0.0.1:{port}")
    said = forget_dead_cluster(note)  # the same port, closed now
    assert said is not None and f"127.0.0.1:{port}" in said and not note.exists()


def test_a_dead_note_that_cannot_be_removed_is_refused_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    note = tmp_path / "ray_current_cluster"
    note.write_text("127.0.0.1:1")  # nothing listens on port 1

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(1, "Operation not permitted")  # another user's, in /tmp/ray

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(ConfigError, match=r"cannot be removed .*remove it"):
        forget_dead_cluster(note)
