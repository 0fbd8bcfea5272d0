"""The HAProxy lines of ``configs/serve.env`` reach HAProxy, and do what they are there for.

Ray 2.60 has no variable for them: ``RAY_SERVE_HAPROXY_RETRY_ON`` is written verbatim
into HAProxy's ``defaults`` section, so its extra lines become HAProxy settings. If a Ray
upgrade starts quoting that value (or HAProxy refuses it), these tests say so first:

* ``option http-buffer-request``: HAProxy holds a request whole before forwarding it, so
  it can resend it when the ingress replica dies (tests/integration/test_chaos.py kills
  one under load and allows no failed request);
* ``timeout http-request 10s``: a client that stalls inside a request gets a 408.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.integration.conftest import API_KEY, HAPROXY_DIR, ServeApp

pytestmark = pytest.mark.integration

BODY = b'{"entity_id": "E0000001"}'


def _defaults_section(config: str) -> list[str]:
    lines = config.splitlines()
    start = lines.index("defaults") + 1
    end = next(i for i in range(start, len(lines)) if lines[i] and not lines[i][0].isspace())
    return [line.strip() for line in lines[start:end]]


def _head(length: int) -> bytes:
    return (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _connect(serve_app: ServeApp) -> socket.socket:
    port = serve_app.config["http_options"]["port"]
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_status_line(sock: socket.socket) -> str:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def test_serve_env_haproxy_lines_are_in_haproxys_defaults(serve_app: ServeApp) -> None:
    configs = sorted(HAPROXY_DIR.glob("*/haproxy.cfg"))
    assert configs, f"no haproxy.cfg under {HAPROXY_DIR}"
    for path in configs:
        defaults = _defaults_section(path.read_text())
        for line in (
            "retry-on conn-failure empty-response",
            "option http-buffer-request",
            "timeout http-request 10s",
        ):
            assert line in defaults, f"{line!r} not in the defaults of {path}: {defaults}"


def test_a_body_sent_after_a_pause_is_answered(serve_app: ServeApp) -> None:
    """HAProxy waits for a body that comes in a later packet (it holds the request whole)."""
    with _connect(serve_app) as sock:
        sock.sendall(_head(len(BODY)))
        time.sleep(0.5)
        sock.sendall(BODY)
        assert _read_status_line(sock) == "HTTP/1.1 200 OK"


def test_a_request_stalled_mid_body_gets_408(serve_app: ServeApp) -> None:
    """A slow client cannot hold a connection: 408 once `timeout http-request` (10 s) ends."""
    with _connect(serve_app) as sock:
        began = time.monotonic()
        sock.sendall(_head(len(BODY)) + BODY[:5])
        status = _read_status_line(sock)
        waited = time.monotonic() - began
    print(f"\nstalled request answered {status!r} after {waited:.1f} s")
    assert status.startswith("HTTP/1.1 408"), status
    assert 8 <= waited <= 25, waited
