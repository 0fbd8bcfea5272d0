"""Ray's token for its own token auth: where Ray finds it, and that only this user can read it.

With ``RAY_AUTH_MODE=token`` every Ray process (GCS, raylets, dashboard, the ``ray`` and
``serve`` commands) reads one shared token: ``RAY_AUTH_TOKEN``, else the file
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. Whoever holds it can run code on
every node. Ray writes that file with the umask's mode (0644 here), readable by every
local user wherever the home directory is open to them; so the file is made here, mode
0600, before Ray would make it, and an existing one of this user's is narrowed to 0600.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from serve_app.errors import ConfigError

TOKEN_ENV = "RAY_AUTH_TOKEN"  # Ray's own variables, in its order of precedence
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
AUTH_MODE_ENV = "RAY_AUTH_MODE"


def token_path(env: dict[str, str]) -> Path:
    """Where Ray looks for its token when ``RAY_AUTH_TOKEN`` is not set."""
    if env.get(TOKEN_PATH_ENV):
        return Path(env[TOKEN_PATH_ENV])
    return Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"


def ensure_token(env: dict[str, str], create: bool) -> str:
    """Make sure Ray will find a token only this user can read; say what was done.

    ``create``: write a new one when there is none (the head; ``serve-app run``'s local
    cluster). Otherwise a missing token is refused: a node with a token of its own would
    be turned away by the head after its start-up.
    """
    if env.get(TOKEN_ENV):
        return f"Ray's token from {TOKEN_ENV}"
    path = token_path(env)
    if not path.exists():
        if not create:
            raise ConfigError(
                f"no Ray token at {path}: copy the head's token file there (mode 0600), "
                f"or set {TOKEN_ENV} to its contents"
            )
        _write_token(path)
        return f"created Ray's token in {path} (mode 0600): copy it to every other node"
    return _make_private(path)


def _write_token(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # O_EXCL: never write through a file or link someone placed there meanwhile.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as token_file:
        token_file.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` makes


def _make_private(path: Path) -> str:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"Ray's token {path} is not a plain file (a symlink?): replace it")
    if info.st_uid != os.getuid():
        raise ConfigError(f"Ray's token {path} belongs to uid {info.st_uid}, not to you")
    if info.st_mode & 0o077:
        path.chmod(0o600)
        return f"Ray's token in {path}, made 0600 (it was {stat.S_IMODE(info.st_mode):o})"
    return f"Ray's token in {path}"
