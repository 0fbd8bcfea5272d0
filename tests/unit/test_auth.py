import hashlib
import os
import stat
from pathlib import Path

import pytest

from serve_app.api.auth import KeyChecker, read_keys
from serve_app.config import AuthConfig
from serve_app.errors import ConfigError, Unauthorized
from serve_app.secret_files import append_key, read_lines, write_key_file

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


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_every_replica_applies_a_changed_keys_file_within_the_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas started before and after a change agree: revoked is revoked everywhere."""
    monkeypatch.delenv("TEST_KEYS", raising=False)
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{KEY_A}\n")
    config = AuthConfig(keys_env="TEST_KEYS", keys_file=str(keys_file), reload_interval_s=2)
    clock = Clock()
    old_replica = KeyChecker(config, clock=clock)
    keys_file.write_text(f"{KEY_B}\n")  # KEY_A revoked, KEY_B added
    new_replica = KeyChecker(config, clock=clock)
    clock.now = 2.5
    for replica in (old_replica, new_replica):
        assert replica.is_valid(KEY_B) and not replica.is_valid(KEY_A)
        with pytest.raises(Unauthorized):
            replica.require(KEY_A)


def test_a_keys_file_is_re_read_at_most_once_per_interval_and_on_content_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_KEYS", raising=False)
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{KEY_A}\n")
    clock = Clock()
    config = AuthConfig(keys_env="TEST_KEYS", keys_file=str(keys_file), reload_interval_s=2)
    checker = KeyChecker(config, clock=clock)
    keys_file.write_text(f"{KEY_B}\n")
    clock.now = 1.0
    assert checker.is_valid(KEY_A)  # within the interval: not re-read yet
    clock.now = 2.1
    assert checker.is_valid(KEY_B) and not checker.is_valid(KEY_A)
    keys_file.write_text("short\n")  # an invalid edit keeps the last good set
    clock.now = 5.0
    assert checker.is_valid(KEY_B)


def test_adding_a_key_to_a_file_without_a_last_newline_keeps_the_last_key(
    tmp_path: Path,
) -> None:
    """`printf KEY > file` and `kubectl create secret --from-literal` write no newline:
    the added line must not glue itself onto the last key (which silently revoked it)."""
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# keys\n{KEY_A}")
    added = append_key(keys_file, "alice")
    config = AuthConfig(keys_env="NO_SUCH_ENV", keys_file=str(keys_file))
    checker = KeyChecker(config)
    assert checker.require(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()[:32]
    assert checker.require(added) == "id:alice"
    assert keys_file.read_text() == f"# keys\n{KEY_A}\nalice:{added}\n"
    append_key(keys_file, "bob")  # with a last newline: no blank line added
    assert "\n\n" not in keys_file.read_text()


def test_adding_a_key_never_lands_in_a_readable_or_symlinked_file(tmp_path: Path) -> None:
    """keygen --id appended to a 0644 file (and said "mode 0600"), and followed a
    symlink to wherever it pointed."""
    import os
    import stat

    loose = tmp_path / "loose"
    loose.write_text(f"{KEY_A}\n")
    loose.chmod(0o644)
    added = append_key(loose, "alice")
    assert stat.S_IMODE(loose.stat().st_mode) == 0o640  # others out; the group keeps it
    assert loose.read_text() == f"{KEY_A}\nalice:{added}\n"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not a key file\n")
    linked = tmp_path / "linked"
    linked.symlink_to(elsewhere)
    with pytest.raises(OSError):
        append_key(linked, "mallory")
    assert elsewhere.read_text() == "not a key file\n"
    assert os.path.islink(linked)


def test_named_keys_own_jobs_by_name_so_rotation_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_KEYS", f"{KEY_A},ci.bot:{KEY_B}")
    keys_file = tmp_path / "keys"
    old = append_key(keys_file, "alice")
    config = AuthConfig(keys_env="TEST_KEYS", keys_file=str(keys_file), reload_interval_s=1)
    clock = Clock()
    checker = KeyChecker(config, clock=clock)
    assert checker.require(old) == "id:alice"
    assert checker.require(KEY_B) == "id:ci.bot"
    assert checker.require(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()[:32]
    new = append_key(keys_file, "alice")  # rotate: a second key with the same id ...
    lines = keys_file.read_text().splitlines()
    keys_file.write_text(
        "\n".join(line for line in lines if old not in line) + "\n"
    )  # ... drop the old
    clock.now = 2
    assert checker.require(new) == "id:alice"
    with pytest.raises(Unauthorized):
        checker.require(old)
    assert stat.S_IMODE(os.stat(keys_file).st_mode) == 0o600


def test_keygen_with_an_id_appends_a_named_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from serve_app.offline.cli import main

    keys_file = tmp_path / "keys"
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(
        '{"applications": [{"args": {"jobs": {"webhooks": {"secret_file": null}}}}]}'
    )
    assert main(["keygen", "--config", str(config_file), "--file", str(keys_file)]) == 0
    assert (
        main(["keygen", "--config", str(config_file), "--file", str(keys_file), "--id", "bob"]) == 0
    )
    assert (
        main(["keygen", "--config", str(config_file), "--file", str(keys_file), "--id", "b o"]) == 2
    )
    entries = read_lines(keys_file)
    assert len(entries) == 2 and entries[1].startswith("bob:")
    monkeypatch_free = AuthConfig(keys_env="UNSET_VAR_X", keys_file=str(keys_file))
    assert KeyChecker(monkeypatch_free).require(entries[1].split(":", 1)[1]) == "id:bob"


def test_the_dockerfile_recipe_for_several_keys_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Dockerfile's ``-e SERVE_APP_API_KEYS="$(...)"`` line, run by a real shell."""
    import re
    import subprocess

    dockerfile = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    recipe = re.search(r'SERVE_APP_API_KEYS="(\$\(.*\))"', dockerfile)
    assert recipe is not None, "the Dockerfile no longer shows how to pass several keys"
    secrets_dir = tmp_path / ".secrets"
    write_key_file(secrets_dir / "api_keys")
    append_key(secrets_dir / "api_keys", "bob")
    with (secrets_dir / "api_keys").open("a") as handle:
        handle.write("\n# a comment\n" + KEY_A + "\n")
    value = subprocess.run(
        ["bash", "-c", f'printf %s "{recipe.group(1)}"'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    monkeypatch.setenv("TEST_KEYS", value)
    checker = KeyChecker(AuthConfig(keys_env="TEST_KEYS", keys_file=None))
    keys = [line.split(":", 1)[-1] for line in read_lines(secrets_dir / "api_keys")]
    assert len(keys) == 3
    assert all(checker.is_valid(key) for key in keys)
    assert checker.require(keys[1]) == "id:bob"
