"""``serve-app node``: a node is refused before ``ray start`` when its replicas would fail.

And Ray's token: made private on the head, required on every other node.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from serve_app.config import read_serve_yaml
from serve_app.errors import ConfigError
from serve_app.offline.cli import main
from serve_app.offline.node import (
    check_node_variables,
    missing_variables,
    node_environment,
    ray_start_command,
    role,
)
from serve_app.offline.ray_token import ensure_token, token_path
from serve_app.secret_files import new_webhook_secret

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "configs" / "cluster.yaml"
SERVE_ENV = ROOT / "configs" / "serve.env"
NODE_VARIABLES = {
    "SERVE_APP_REDIS_URL": "redis://:pw@10.0.0.5:6379/0",
    "SERVE_APP_POSTGRES_URL": "postgresql://serve_app:pw@10.0.0.6:5432/serve_app",
    "SERVE_APP_API_KEYS": "k-" + "x" * 30,
    "SERVE_APP_WEBHOOK_SECRET": new_webhook_secret(),
}


def _base(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": "", **NODE_VARIABLES, **extra}


def test_the_cluster_configs_variables_are_each_required() -> None:
    config = read_serve_yaml(CLUSTER)
    assert missing_variables(config, NODE_VARIABLES) == []
    for name in NODE_VARIABLES:
        unset = {**NODE_VARIABLES, name: ""}  # set but empty is as bad as unset
        assert missing_variables(config, unset) == [name]


def test_a_node_without_a_variable_is_refused_by_name_never_by_value(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in {**NODE_VARIABLES, "SERVE_APP_REDIS_URL": "", "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    code = main(["node", "--config", str(CLUSTER), "--", "--head"])
    err = capsys.readouterr().err
    assert code == 2
    assert "SERVE_APP_REDIS_URL" in err and "not set here" in err
    assert all(value not in err for value in NODE_VARIABLES.values() if value)
    assert not (tmp_path / ".ray").exists()  # refused before anything was made


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("SERVE_APP_WEBHOOK_SECRET", "not-a-secret-at-all", "webhook signing secret"),
        ("SERVE_APP_API_KEYS", "k3y-0f-9", "shorter than"),
    ],
)
def test_a_malformed_key_or_secret_is_refused_before_ray_starts(
    name: str,
    value: str,
    says: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for variable, good in {**NODE_VARIABLES, "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(variable, good)
    assert check_node_variables(read_serve_yaml(CLUSTER)) is None  # the good ones pass
    monkeypatch.setenv(name, value)
    code = main(["node", "--config", str(CLUSTER), "--", "--head"])
    err = capsys.readouterr().err
    assert code == 2 and says in err and value not in err


def test_ray_start_gets_exactly_one_of_head_and_address() -> None:
    assert role(["--head", "--port", "6379"]) == "head"
    assert role(["--address", "10.0.0.1:6379"]) == "worker"
    assert role(["--address=10.0.0.1:6379", "--num-cpus", "4"]) == "worker"
    for wrong in ([], ["--num-cpus", "2"], ["--head", "--address", "10.0.0.1:6379"]):
        with pytest.raises(ConfigError, match="either --head"):
            role(wrong)


def test_ray_start_blocks_so_a_signal_stops_the_node() -> None:
    command = ray_start_command(["--head"])
    assert Path(command[0]).name == "ray" and command[1:] == ["start", "--block", "--head"]
    assert ray_start_command(["--block", "--head"]).count("--block") == 1


def test_the_head_gets_serve_env_private_haproxy_files_and_a_private_token(
    tmp_path: Path,
) -> None:
    env, notes = node_environment(SERVE_ENV, _base(tmp_path), head=True)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_AUTH_MODE"] == "token"
    haproxy_dir = Path(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
    assert stat.S_IMODE(haproxy_dir.stat().st_mode) == 0o700
    token = tmp_path / "home" / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text()) == 64  # 256 bits, as `ray get-auth-token --generate`
    assert any("copy it to every other node" in note for note in notes)
    first = token.read_text()
    _, notes = node_environment(SERVE_ENV, _base(tmp_path), head=True)
    assert token.read_text() == first and notes[-1] == f"Ray's token in {token}"  # kept


def test_another_node_without_the_heads_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="copy the head's token"):
        node_environment(SERVE_ENV, _base(tmp_path), head=False)
    assert not token_path(_base(tmp_path)).exists()  # never made up on a worker
    env, notes = node_environment(SERVE_ENV, _base(tmp_path, RAY_AUTH_TOKEN="t" * 64), head=False)
    assert env["RAY_AUTH_TOKEN"] == "t" * 64 and "from RAY_AUTH_TOKEN" in notes[-1]


def test_a_token_others_can_read_is_narrowed_and_one_of_another_user_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("a" * 64)
    token.chmod(0o644)  # as Ray writes it with a 022 umask
    env = {"RAY_AUTH_TOKEN_PATH": str(token)}
    assert "made 0600 (it was 644)" in ensure_token(env, create=False)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    link = tmp_path / "link"
    link.symlink_to(token)
    with pytest.raises(ConfigError, match="not a plain file"):
        ensure_token({"RAY_AUTH_TOKEN_PATH": str(link)}, create=False)
    monkeypatch.setattr(os, "getuid", lambda: token.stat().st_uid + 1)  # as another user
    with pytest.raises(ConfigError, match="belongs to uid"):
        ensure_token(env, create=False)


def test_an_explicit_opt_out_of_token_auth_is_kept_and_said(tmp_path: Path) -> None:
    env, notes = node_environment(SERVE_ENV, _base(tmp_path, RAY_AUTH_MODE="disabled"), head=True)
    assert env["RAY_AUTH_MODE"] == "disabled" and "token auth is OFF" in notes[-1]
    assert not token_path(env).exists()
