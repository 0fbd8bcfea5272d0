"""Which network addresses a callback may reach: pure functions, no configuration.

Used by the config (to check ``allowed_hosts`` entries at start) and by the webhook
policy (``serve_app/jobs/webhooks.py``), so it imports neither.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# IPv6 prefixes a translator maps to the IPv4 address in their low 32 bits: NAT64's
# well-known and local-use ones, and SIIT's IPv4-translated ::ffff:0:a.b.c.d (RFC 2765).
_LOW32_IPV4 = tuple(
    ipaddress.ip_network(net) for net in ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96")
)
# Not globally routable, but ``is_global`` says they are in Python before 3.11.10 / 3.12.4
# (CVE-2024-4032) or 3.14 (the newer ranges): checked here whatever the interpreter.
_NOT_GLOBAL = tuple(
    ipaddress.ip_network(net)
    for net in (
        "192.0.0.0/24",  # IETF protocol assignments (its two anycast /32s: no webhooks there)
        "fec0::/10",  # deprecated site-local
        "3fff::/20",  # documentation (RFC 9637)
        "5f00::/16",  # SRv6 SIDs (RFC 9602)
    )
)
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


@dataclass(frozen=True)
class HostRule:
    """One ``allowed_hosts`` entry: a name, an address or a network, and its ports."""

    name: str | None
    network: IPNetwork | None
    ports: tuple[int, ...] | None  # None: the ``allowed_ports`` (80, 443 by default)

    def matches(self, host: str, address: IPAddress, port: int, default: Sequence[int]) -> bool:
        if port not in (self.ports or tuple(default)):
            return False
        if self.name is not None:
            return self.name == host
        return self.network is not None and address in self.network


def parse_host_rule(entry: str) -> HostRule:
    """``HOST``, ``HOST:PORT``, ``[IPv6]:PORT``, ``CIDR:PORT``; ValueError when malformed."""
    text = entry.strip().lower()
    port: int | None = None
    if text.startswith("["):
        inner, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"allowed_hosts entry {entry!r}: text after ']'")
        host, port_text = inner, rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"allowed_hosts entry {entry!r}: bad port {port_text!r}")
        port = int(port_text)
    ports = None if port is None else (port,)
    try:
        return HostRule(None, ipaddress.ip_network(host, strict=False), ports)
    except ValueError:
        pass
    if not valid_hostname(host):
        raise ValueError(f"allowed_hosts entry {entry!r} is not a host name, address or network")
    return HostRule(host, None, ports)


def valid_hostname(host: str) -> bool:
    if not host or len(host) > 253:
        return False
    return all(_LABEL.match(label) for label in host.removesuffix(".").split("."))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (mapped, compatible, 6to4, Teredo, NAT64,
    SIIT)."""
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo is not None:
        found.extend(address.teredo)
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if any(address in network for network in _LOW32_IPV4) or int(address) >> 32 == 0:
        found.append(low32)
    return found


def is_public(address: IPAddress) -> bool:
    """Globally routable, and so is every IPv4 address wrapped inside it."""
    if not address.is_global or address.is_multicast:
        return False
    if any(address in network for network in _NOT_GLOBAL):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return all(is_public(inner) for inner in _embedded_ipv4(address))
    return True
