"""API-key auth: ``Authorization: Bearer <key>``.

Keys come from an environment variable (separated by commas or newlines) and/or a secret
file (one key a line, ``#`` comments allowed). Only their SHA-256 digests are kept in memory; a presented
key is hashed and compared with every stored digest in constant time, so neither timing
nor an early exit says how close a guess was. Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path

from serve_app.config import AuthConfig
from serve_app.errors import ConfigError, Unauthorized
from serve_app.secret_files import read_lines

MIN_KEY_LENGTH = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def read_keys(config: AuthConfig) -> list[str]:
    """Plain keys from the configured environment variable and secret file."""
    from_env = re.split(r"[,\n]", os.environ.get(config.keys_env, ""))
    keys = [key.strip() for key in from_env if key.strip()]
    if config.keys_file:
        keys += read_lines(Path(config.keys_file))
    short = [k for k in keys if len(k) < MIN_KEY_LENGTH]
    if short:
        raise ConfigError(f"{len(short)} API key(s) shorter than {MIN_KEY_LENGTH} characters")
    return keys


class KeyChecker:
    """Holds key digests; answers "is this bearer token one of ours?" in constant time."""

    def __init__(self, config: AuthConfig) -> None:
        self.enabled = config.enabled
        self._digests = [_digest(key) for key in read_keys(config)] if config.enabled else []
        if self.enabled and not self._digests:
            source = f"${config.keys_env}" + (f" or {config.keys_file}" if config.keys_file else "")
            raise ConfigError(
                f"auth is enabled but no API key is configured: set {source} "
                "(create one with `serve-app keygen`), or disable auth in the YAML"
            )

    def is_valid(self, presented: str | None) -> bool:
        if not self.enabled:
            return True
        if not presented:
            return False
        candidate = _digest(presented)
        matched = False
        for digest in self._digests:  # no early exit: the time does not depend on the index
            matched |= hmac.compare_digest(candidate, digest)
        return matched

    def require(self, token: str | None) -> str:
        """The caller's identity (a digest of its key), or :class:`Unauthorized`.

        The identity owns jobs: only the key that created a job may read it.
        """
        if not self.is_valid(token):
            raise Unauthorized("missing or invalid API key (use 'Authorization: Bearer <key>')")
        return _digest(token).hex()[:32] if self.enabled and token else "anonymous"
