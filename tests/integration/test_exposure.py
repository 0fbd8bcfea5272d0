"""What listens, where, once the app runs: compared with the list in README, Security.

Every listening TCP socket of the processes this test session started (Ray's and
HAProxy's) is read from ``/proc/net/tcp{,6}`` and ``/proc/*/fd``, given a role, and
checked against the README's table: a role documented as ``127.0.0.1`` must listen on
loopback only, and every role seen must be documented. HAProxy's admin socket must sit in
a directory only this user can enter.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import (
    HAPROXY_DIR,
    HAPROXY_METRICS_PORT,
    HAPROXY_STATS_PORT,
    ROOT,
    ServeApp,
)

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Listener:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    process: str

    @property
    def loopback(self) -> bool:
        mapped = getattr(self.address, "ipv4_mapped", None)
        return (mapped or self.address).is_loopback


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return ipaddress.IPv6Address(words)


def _listening_inodes() -> dict[str, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            found[fields[9]] = (_address(hex_address), int(hex_port, 16))
    return found


def _descendants(root: int) -> dict[int, str]:
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
            names[int(entry.name)] = (entry / "comm").read_text().strip()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat_line.rsplit(")", 1)[1].split()[1])
    ours = {root}
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                changed = True
    return {pid: names[pid] for pid in ours if pid in names}


# Servers that other tests' fixtures start in this session (contract suites, the Prometheus
# test) when the whole suite runs: they are the test bench, not the app. The app itself never
# starts a server process of its own.
FIXTURE_SERVERS = frozenset({"redis-server", "postgres", "prometheus"})


def listeners() -> list[Listener]:
    """Listening sockets of this process and everything it started (Ray, HAProxy), apart
    from the test fixtures' own servers."""
    inodes = _listening_inodes()
    seen = []
    for pid, name in _descendants(os.getpid()).items():
        if name in FIXTURE_SERVERS:
            continue
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for link in links:
            match = re.fullmatch(r"socket:\[(\d+)\]", link)
            if match and match.group(1) in inodes:
                address, port = inodes[match.group(1)]
                seen.append(Listener(address, port, name))
    return seen


def role(listener: Listener, api_port: int) -> str:
    if listener.port == api_port:
        return "the API (HAProxy)"
    if listener.process == "haproxy":
        return {HAPROXY_STATS_PORT: "HAProxy stats", HAPROXY_METRICS_PORT: "HAProxy metrics"}.get(
            listener.port, "HAProxy, other"
        )
    if listener.process in ("gcs_server", "raylet", "python") or listener.process.startswith(
        "ray::"
    ):
        return "Ray and Serve internals"
    return f"unknown: {listener.process}"


def documented() -> dict[str, str]:
    """The README's table of listeners: role -> where it binds."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- listeners -->")[1]
    rows = [line.split("|")[1:-1] for line in block.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): cells[1].strip() for cells in rows[1:] if len(cells) >= 2}


def test_listening_sockets_match_the_readme(serve_app: ServeApp) -> None:
    api_port = serve_app.config["http_options"]["port"]
    table = documented()
    seen = listeners()
    roles = {role(listener, api_port) for listener in seen}
    assert {"the API (HAProxy)", "HAProxy stats", "HAProxy metrics"} <= roles, seen
    undocumented = roles - set(table)
    assert not undocumented, f"listening but not in README, Security: {undocumented}"
    for listener in seen:
        where = table[role(listener, api_port)]
        if where.startswith("127.0.0.1"):
            assert listener.loopback, f"{listener} is documented as {where}"


def test_haproxy_admin_socket_is_in_a_private_directory(serve_app: ServeApp) -> None:
    sockets = list(HAPROXY_DIR.rglob("admin.sock"))
    assert sockets, f"no admin socket under {HAPROXY_DIR}"
    assert stat.S_IMODE(HAPROXY_DIR.stat().st_mode) == 0o700
    for socket_path in sockets:
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
        assert HAPROXY_DIR in socket_path.parents
