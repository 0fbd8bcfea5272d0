"""Real redis-server and PostgreSQL processes for tests, from Debian's packages.

Each starts on a free loopback port in its own temporary directory and is stopped (and
the directory removed) afterwards. A missing binary is a failure, never a skip: CI
installs ``redis-server`` and ``postgresql`` (see ``.ci/run``).

PostgreSQL's ``initdb`` and ``postgres`` refuse to run as root; as root they run as the
``postgres`` user through ``runuser``. The server requires a password (SCRAM) even on
loopback, like a real deployment.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis

from tests.servers import free_port


def _pg_bin() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian 12 has 15, Debian 13 has
    17); ``SERVE_APP_PG_BIN`` overrides it."""
    if "SERVE_APP_PG_BIN" in os.environ:
        return Path(os.environ["SERVE_APP_PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


def _binary(path: Path | str, package: str) -> str:
    found = shutil.which(str(path))
    if found is None:
        pytest.fail(f"{path} not found: install the Debian package {package!r} (see .ci/run)")
    return found


def _wait_until(check: object, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not start within {timeout_s}s: {last!r}")


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@dataclass(frozen=True)
class RedisServer:
    url: str
    port: int
    pid: int

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A redis-server on a free loopback port, no persistence, in a temp dir."""
    binary = _binary("redis-server", "redis-server")
    workdir = Path(tempfile.mkdtemp(prefix="serve_app_redis_"))
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(workdir),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str(workdir / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server = RedisServer(url=f"redis://127.0.0.1:{port}/0", port=port, pid=process.pid)
    try:
        client = server.client()
        _wait_until(lambda: process.poll() is None and client.ping(), "redis-server")
        client.close()
        yield server
    finally:
        _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    pid: int

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A fresh empty database; its URL."""
        name = f"{prefix}_{secrets.token_hex(6)}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_postgres(command: list[str]) -> list[str]:
    """Run as the ``postgres`` user when we are root (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return command
    return [_binary("runuser", "util-linux"), "-u", "postgres", "--", *command]


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL 15 cluster on a free loopback port, password auth, in a temp dir."""
    initdb = _binary(PG_BIN / "initdb", "postgresql")
    postgres = _binary(PG_BIN / "postgres", "postgresql")
    workdir = Path(tempfile.mkdtemp(prefix="serve_app_pg_"))
    workdir.chmod(0o755)
    data, sockets = workdir / "data", workdir / "run"
    sockets.mkdir()
    password = secrets.token_urlsafe(18)
    pwfile = workdir / "pw"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        shutil.chown(sockets, "postgres")
        shutil.chown(pwfile, "postgres")
    pwfile.chmod(0o600)
    port = free_port()
    subprocess.run(
        _as_postgres(
            [initdb, "-D", str(data), "-U", "serve_app", "--pwfile", str(pwfile),
             "-A", "scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions"]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    pwfile.unlink()
    process = subprocess.Popen(
        _as_postgres(
            [postgres, "-D", str(data), "-p", str(port), "-k", str(sockets),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200", "-c", "logging_collector=off"]
        ),
        stdout=subprocess.DEVNULL,
        stderr=(workdir / "postgres.log").open("wb"),
    )  # fmt: skip
    server = PostgresServer("127.0.0.1", port, "serve_app", password, process.pid)

    def ready() -> bool:
        if process.poll() is not None:
            log = (workdir / "postgres.log").read_text(errors="replace")
            raise RuntimeError(f"postgres exited: {log[-2000:]}")
        with psycopg.connect(server.url(), connect_timeout=2) as db:
            return db.execute("SELECT 1").fetchone() == (1,)

    try:
        _wait_until(ready, "postgres")
        yield server
    finally:
        if process.poll() is None:  # a fast shutdown that waits for every backend
            pg_ctl = [str(PG_BIN / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w"]
            subprocess.run(_as_postgres(pg_ctl), check=False, capture_output=True, timeout=60)
        _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)
