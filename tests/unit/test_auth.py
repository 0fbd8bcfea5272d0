import os
import stat
from pathlib import Path

import pytest

from serve_app.api.auth import KeyChecker, read_keys
from serve_app.config import AuthConfig
from serve_app.errors import ConfigError, Unauthorized
from serve_app.secret_files import write_key_file

KEY_A = "a" * 32
KEY_B = "b-key-that-is-long-enough"


def test_keys_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# comment\n{KEY_B}\n\n")
    monkeypatch.setenv("TEST_KEYS", f" {KEY_A} ,")
    config = AuthConfig(keys_env="TEST_KEYS", keys_file=str(keys_file))
    assert read_keys(config) == [KEY_A, KEY_B]
    checker = KeyChecker(config)
    assert checker.is_valid(KEY_A) and checker.is_valid(KEY_B)
    assert (
        not checker.is_valid(KEY_A + "x")
        and not checker.is_valid("")
        and not checker.is_valid(None)
    )


def test_only_digests_are_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEYS", KEY_A)
    checker = KeyChecker(AuthConfig(keys_env="TEST_KEYS", keys_file=None))
    assert KEY_A not in repr(vars(checker))
    assert all(isinstance(d, bytes) and len(d) == 32 for d in checker._digests)


def test_require_raises_unauthorized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEYS", KEY_A)
    checker = KeyChecker(AuthConfig(keys_env="TEST_KEYS", keys_file=None))
    assert checker.require(KEY_A)
    with pytest.raises(Unauthorized):
        checker.require("wrong-key-wrong-key")
    with pytest.raises(Unauthorized):
        checker.require(None)


def test_refuses_to_start_open(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TEST_KEYS", raising=False)
    with pytest.raises(ConfigError, match="no API key"):
        KeyChecker(AuthConfig(keys_env="TEST_KEYS", keys_file=str(tmp_path / "none")))


def test_short_keys_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEYS", "short")
    with pytest.raises(ConfigError, match="shorter"):
        KeyChecker(AuthConfig(keys_env="TEST_KEYS", keys_file=None))


def test_disabled_auth_accepts_anything_as_one_anonymous_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TEST_KEYS", raising=False)
    checker = KeyChecker(AuthConfig(enabled=False, keys_env="TEST_KEYS", keys_file=None))
    assert checker.require(None) == "anonymous"
    assert checker.require("anything at all") == "anonymous"


def test_owner_is_stable_per_key_distinct_between_keys_and_hides_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Job isolation rests on this identity: same key, same owner, on every replica."""
    monkeypatch.setenv("TEST_KEYS", f"{KEY_A},{KEY_B}")
    config = AuthConfig(keys_env="TEST_KEYS", keys_file=None)
    replica_1, replica_2 = KeyChecker(config), KeyChecker(config)
    owner_a = replica_1.require(KEY_A)
    assert owner_a == replica_2.require(KEY_A) == replica_1.require(KEY_A)
    assert owner_a != replica_1.require(KEY_B)
    assert KEY_A not in owner_a and len(owner_a) == 32


def test_env_keys_may_be_separated_by_commas_or_newlines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_KEYS", f"{KEY_A}\n{KEY_B}\n")
    assert read_keys(AuthConfig(keys_env="TEST_KEYS", keys_file=None)) == [KEY_A, KEY_B]


def test_keygen_writes_private_file_once(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "keys"
    key = write_key_file(path)
    assert key is not None and key in path.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert write_key_file(path) is None
    assert read_keys(AuthConfig(keys_env="UNSET_VAR_X", keys_file=str(path))) == [key]
