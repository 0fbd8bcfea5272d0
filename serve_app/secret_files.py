"""Secret files: API keys and the webhook signing secret, created 0600 and read back.

Kept free of Ray, FastAPI and scikit-learn so that ``serve-app keygen`` starts at once.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
from pathlib import Path

WEBHOOK_SECRET_PREFIX = "whsec_"


def new_api_key() -> str:
    return secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 32 random bytes."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode()


def write_secret_file(path: Path, content: str) -> bool:
    """Create ``path`` readable by its owner only (0600) unless it exists."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    return True


def write_key_file(path: Path) -> str | None:
    """Create ``path`` with one new key unless it exists; return the new key."""
    key = new_api_key()
    if not write_secret_file(path, "# serve_app API keys, one a line\n" + key + "\n"):
        return None
    return key


def append_key(path: Path, key_id: str) -> str:
    """Add a ``NAME:KEY`` line to ``path`` (created 0600 if missing); return the new key.

    Rotation: add a key with the same name, move callers over, delete the old line; the
    jobs belong to the name, so none is orphaned.
    """
    key = new_api_key()
    line = f"{key_id}:{key}\n"
    if write_secret_file(path, "# serve_app API keys, one a line: KEY or NAME:KEY\n" + line):
        return key
    # Not through a symlink (it could point anywhere this user may write), only to a file
    # of ours, and never readable by others whatever mode it had: a new key must not land
    # in a world-readable file. Group bits are kept (a 0640 file read by the service's
    # group is a deliberate set-up).
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW)
    with os.fdopen(fd, "r+b") as handle:
        held = os.fstat(fd)
        if not stat.S_ISREG(held.st_mode) or held.st_uid != os.geteuid():
            raise PermissionError(f"{path} is not a regular file of this user: no key added")
        if held.st_mode & 0o007:
            os.fchmod(fd, stat.S_IMODE(held.st_mode) & ~0o007)
        if held.st_size > 0:  # a file written without a last newline (printf, kubectl)
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = "\n" + line  # else the new line would extend the last key
        handle.write(line.encode())
    return key


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a secret file, ``#`` comments skipped; [] if it does not exist."""
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]
