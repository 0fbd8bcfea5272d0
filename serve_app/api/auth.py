"""API-key auth: ``Authorization: Bearer <key>``.

Keys come from an environment variable (separated by commas or newlines) and/or a secret
file (one key a line, ``#`` comments allowed). An entry is ``KEY`` or ``NAME:KEY``; the
name is the key's id (``serve-app keygen --id NAME`` writes such lines). Only SHA-256
digests are kept in memory; a presented key is hashed and compared with every stored
digest in constant time, so neither timing nor an early exit says how close a guess was.
Keys are never logged.

Identity: a key with an id acts as ``id:NAME``, so rotating it (add a new ``NAME:`` line,
then delete the old one) keeps the caller's jobs; a key without an id acts as a digest of
itself, as before.

Reloading: every replica re-reads the keys file at most every ``auth.reload_interval_s``
(on the next request after that) and swaps its key set when the content's hash changed.
All replicas watch the same file, so a revoked key stops working everywhere within that
interval, and a new key works everywhere, whichever replica started first. Keys from the
environment are fixed for the life of a process.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serve_app.config import AuthConfig
from serve_app.errors import ConfigError, Unauthorized
from serve_app.secret_files import read_lines

MIN_KEY_LENGTH = 16
KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

logger = logging.getLogger("serve_app.auth")


@dataclass(frozen=True)
class KeyEntry:
    """One configured key and its id (None: the key's identity is a digest of itself)."""

    key: str
    key_id: str | None = None

    @property
    def owner(self) -> str:
        """Who owns the jobs this key creates."""
        if self.key_id is not None:
            return f"id:{self.key_id}"
        return _digest(self.key).hex()[:32]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_entry(text: str) -> KeyEntry:
    """``KEY`` or ``NAME:KEY`` (a name of letters, digits, ``_.-``; keys hold no ``:``)."""
    name, sep, key = text.partition(":")
    if sep and KEY_ID.match(name):
        return KeyEntry(key.strip(), name)
    return KeyEntry(text)


def _checked(entries: list[KeyEntry], source: str) -> list[KeyEntry]:
    short = [e for e in entries if len(e.key) < MIN_KEY_LENGTH]
    if short:
        raise ConfigError(
            f"{len(short)} API key(s) in {source} shorter than {MIN_KEY_LENGTH} characters"
        )
    return entries


def env_entries(config: AuthConfig) -> list[KeyEntry]:
    raw = re.split(r"[,\n]", os.environ.get(config.keys_env, ""))
    entries = [parse_entry(part.strip()) for part in raw if part.strip()]
    return _checked(entries, f"${config.keys_env}")


def file_entries(path: Path) -> list[KeyEntry]:
    return _checked([parse_entry(line) for line in read_lines(path)], str(path))


def read_keys(config: AuthConfig) -> list[str]:
    """Plain keys from the configured environment variable and secret file."""
    entries = env_entries(config)
    if config.keys_file:
        entries += file_entries(Path(config.keys_file))
    return [entry.key for entry in entries]


@dataclass(frozen=True)
class _StoredKey:
    digest: bytes
    owner: str


def _stored(entries: list[KeyEntry]) -> tuple[_StoredKey, ...]:
    return tuple(_StoredKey(_digest(e.key), e.owner) for e in entries)


class KeyChecker:
    """Holds key digests; answers "is this bearer token one of ours, and whose?" in
    constant time, re-reading the keys file when it changes."""

    def __init__(self, config: AuthConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = config.enabled
        self._config = config
        self._clock = clock
        # digests only: a plain key is never held past this line
        self._env = _stored(env_entries(config)) if config.enabled else ()
        self._file = Path(config.keys_file) if config.enabled and config.keys_file else None
        self._file_hash: bytes | None = None
        self._next_check = 0.0
        self._keys: tuple[_StoredKey, ...] = ()
        if self.enabled:
            self._reload(force=True)
        if self.enabled and not self._keys:
            source = f"${config.keys_env}" + (f" or {config.keys_file}" if config.keys_file else "")
            raise ConfigError(
                f"auth is enabled but no API key is configured: set {source} "
                "(create one with `serve-app keygen`), or disable auth in the YAML"
            )

    @property
    def _digests(self) -> list[bytes]:
        return [key.digest for key in self._keys]

    def _reload(self, force: bool = False) -> None:
        """Swap in the file's keys if its content changed (at most once per interval)."""
        now = self._clock()
        if not force and (self._file is None or now < self._next_check):
            return
        self._next_check = now + self._config.reload_interval_s
        if self._file is None:
            self._keys = self._env
            return
        try:
            content = self._file.read_bytes() if self._file.is_file() else b""
        except OSError as exc:
            logger.error("cannot read the API keys file %s: %s; keeping the keys", self._file, exc)
            return
        content_hash = hashlib.sha256(content).digest()
        if content_hash == self._file_hash:
            return
        try:
            entries = file_entries(self._file)
        except ConfigError as exc:
            if force:
                raise
            logger.error("API keys file changed but is invalid (%s); keeping the keys", exc)
            return
        self._file_hash = content_hash
        self._keys = self._env + _stored(entries)
        if not force:
            logger.info("API keys reloaded from %s: %d key(s)", self._file, len(self._keys))

    def owner_of(self, presented: str | None) -> str | None:
        """The owner of ``presented`` if it is a valid key; compares with every key."""
        if not presented:
            return None
        self._reload()
        candidate = _digest(presented)
        owner: str | None = None
        for key in self._keys:  # no early exit: the time does not depend on the index
            if hmac.compare_digest(candidate, key.digest):
                owner = key.owner
        return owner

    def is_valid(self, presented: str | None) -> bool:
        if not self.enabled:
            return True
        return self.owner_of(presented) is not None

    def require(self, token: str | None) -> str:
        """The caller's identity (its key's id, or a digest of its key), or 401.

        The identity owns jobs: only keys of the same identity may read them.
        """
        if not self.enabled:
            return "anonymous"
        owner = self.owner_of(token)
        if owner is None:
            raise Unauthorized("missing or invalid API key (use 'Authorization: Bearer <key>')")
        return owner
