"""The HAProxy lines of ``configs/serve.env`` reach HAProxy, and do what they are there for.

Ray 2.60 has no variable for them: ``RAY_SERVE_HAPROXY_RETRY_ON`` and
``RAY_SERVE_HAPROXY_BALANCE_ALGORITHM`` are written verbatim into HAProxy's ``defaults``
section, so their extra lines become HAProxy settings. If a Ray upgrade starts quoting
those values, moves them, or HAProxy refuses them, these tests say so first:

* ``option http-buffer-request``: HAProxy holds a request whole before forwarding it, so
  it can resend it when the ingress replica dies (tests/integration/test_chaos.py kills
  one under load and allows no failed request);
* ``timeout http-request 10s``: a client that stalls inside a request gets a 408;
* ``default-server maxconn``, ``timeout queue`` and ``http-error status 503``: what does
  not fit in the ingress replicas waits in HAProxy's queue, briefly, then gets a JSON 503
  with ``Retry-After`` from HAProxy itself; the ``http-error`` line must come after Ray's
  ``errorfile 503`` (which turns it into a bare 500), so the order is checked too;
  ``http-error status 502`` / ``504`` likewise replace Ray's bare 500 for a replica that
  died twice under one request or did not answer in time;
* ``no log``: no access-log line per request (Ray's ``log global`` sends one to a syslog
  port nobody listens on); it must come after that line to act.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time

import h11
import httpx
import pytest

from tests.integration.conftest import (
    API_KEY,
    HAPROXY_DIR,
    HAPROXY_METRICS_PORT,
    OTHER_KEY,
    ServeApp,
    serve_env_file,
)

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
        shedding = serve_env_file()["RAY_SERVE_HAPROXY_BALANCE_ALGORITHM"].splitlines()
        for line in (
            "retry-on conn-failure empty-response",
            "option http-buffer-request",
            "timeout http-request 10s",
            "timeout client 20s",
            *(f"balance {shedding[0]}", *(extra.strip() for extra in shedding[1:])),
        ):
            assert line in defaults, f"{line!r} not in the defaults of {path}: {defaults}"
        for status in (408, 502, 503, 504):  # ours must come after Ray's bare error pages
            ours = next(
                i
                for i, line in enumerate(defaults)
                if line.startswith(f"http-error status {status}")
            )
            rays = [i for i, line in enumerate(defaults) if line.startswith(f"errorfile {status}")]
            assert all(i < ours for i in rays), f"Ray's errorfile {status} after ours: {defaults}"
        # `no log` must come after Ray's `log global`, or every request is logged again
        assert defaults.index("no log") > defaults.index("log global"), defaults
        # ours must be the last `timeout client` (after Ray's hour), or the hour wins
        clients = [line for line in defaults if line.startswith("timeout client ")]
        assert clients[-1] == "timeout client 20s", defaults


def test_a_body_sent_after_a_pause_is_answered(serve_app: ServeApp) -> None:
    """HAProxy waits for a body that comes in a later packet (it holds the request whole)."""
    with _connect(serve_app) as sock:
        sock.sendall(_head(len(BODY)))
        time.sleep(0.5)
        sock.sendall(BODY)
        assert _read_status_line(sock) == "HTTP/1.1 200 OK"


def test_a_request_stalled_mid_body_gets_408(serve_app: ServeApp) -> None:
    """A slow client cannot hold a connection: 408 once `timeout http-request` (10 s) ends,
    with the app's JSON error body (HAProxy's own page was plain HTML)."""
    head = _head(len(BODY)).replace(b"\r\n\r\n", b'\r\nX-Request-ID: slow-"1"\r\n\r\n')
    answer = b""
    with _connect(serve_app) as sock:
        began = time.monotonic()
        sock.sendall(head + BODY[:5])
        while chunk := sock.recv(65536):
            answer += chunk
        waited = time.monotonic() - began
    status, _, rest = answer.partition(b"\r\n")
    print(f"\nstalled request answered {status!r} after {waited:.1f} s")
    assert status.startswith(b"HTTP/1.1 408"), answer[:300]
    assert 8 <= waited <= 25, waited
    head_part, _, body = rest.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head_part.lower(), head_part
    error = json.loads(body)
    assert error["error"]["code"] == "request_timeout", error
    assert error["request_id"] == 'slow-"1"', error


def test_a_body_trickled_past_the_read_deadline_gets_408_whatever_the_client_asks(
    serve_app: ServeApp,
) -> None:
    """Past HAProxy's buffer (16 KiB) only its client timeout counts, and that is silence
    (an hour): one byte a second held a request and its slots for as long as the client
    liked, and ``X-Request-Timeout-Seconds: 0`` switched Serve's request timeout off. The
    body must arrive whole within limits.body_read_timeout_s (12 s in these tests)."""
    import select

    body = b'{"items": [' + b" " * 20_000 + b'{"entity_id": "E0000001"}]}'
    head = (
        _head(len(body))
        .replace(b"POST /v1/predict ", b"POST /v1/predict/batch ")
        .replace(b"\r\n\r\n", b"\r\nX-Request-Timeout-Seconds: 0\r\n\r\n")
    )
    answer = b""
    with _connect(serve_app) as sock:
        sock.sendall(head + body[:-90])  # HAProxy forwards a full buffer; the rest trickles
        began = time.monotonic()
        for byte in body[-90:]:  # 90 s at one byte a second, if nothing stops it
            if select.select([sock], [], [], 1.0)[0]:
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # the server answered and closed: read what it said
                break
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        waited = time.monotonic() - began
    status, _, rest = answer.partition(b"\r\n")
    print(f"\ntrickled body answered {status!r} after {waited:.1f} s")
    assert status.startswith(b"HTTP/1.1 408"), answer[:300]
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "body_timeout"
    assert 10 <= waited <= 40, waited


def _answered_mid_body(serve_app: ServeApp, head: bytes, trickle: bool) -> tuple[bytes, float]:
    """Send ``head`` and 20 KB of its body; then, answered or not, send a byte every 0.5 s
    (``trickle``) or nothing. Returns the answer and how long after it the connection
    was closed (``inf`` if it was still open after 40 s)."""
    answer = b""
    with _connect(serve_app) as sock:
        sock.sendall(head + b"{" + b" " * 20_000)  # past HAProxy's 16 KiB buffer
        sock.settimeout(0.5)
        answered = deadline = None
        while deadline is None or time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    return answer, time.monotonic() - (answered or time.monotonic())
                answer += chunk
            except TimeoutError:
                pass
            except ConnectionResetError:
                return answer, time.monotonic() - (answered or time.monotonic())
            if answered is None and b"\r\n\r\n" in answer:
                answered = time.monotonic()
                deadline = answered + 40
            if trickle:
                try:
                    sock.sendall(b" ")
                except OSError:  # closed: read what is left
                    continue
    return answer, float("inf")


def _early_head(path: str, headers: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Length: {length}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("case", "path", "headers", "status"),
    [
        ("no key", "/v1/jobs", "Content-Type: application/json\r\n", 401),
        (
            "declared too large",
            "/v1/predict/batch",
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n",
            413,
        ),
        (
            "wrong type",
            "/v1/jobs",
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: text/plain\r\n",
            415,
        ),
        ("no route", "/v1/nothing", f"Authorization: Bearer {API_KEY}\r\n", 404),
    ],
)
def test_a_body_still_coming_after_its_answer_is_cut_off(
    serve_app: ServeApp, case: str, path: str, headers: str, status: int
) -> None:
    """HAProxy keeps a request's slot of the replica until its body has arrived whole,
    even when the replica answered at once (401, 413, 415, 404): a byte now and then kept
    it for as long as the client liked, and 300 such uploads from anyone without a key
    held every slot (HAProxy answered 503 to everyone). The replica answers with
    ``Connection: close`` and closes, and HAProxy drops the client at its next byte."""
    length = 1_000_000 if status == 413 else 100_000
    answer, closed_after = _answered_mid_body(
        serve_app, _early_head(path, headers, length), trickle=True
    )
    status_line = answer.partition(b"\r\n")[0]
    print(f"\n{case}: {status_line!r}, closed {closed_after:.1f} s after the answer")
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert closed_after < 10, f"{case}: the trickling client kept its connection"


def test_a_client_silent_mid_body_is_dropped_after_timeout_client(serve_app: ServeApp) -> None:
    """A client that stops sending mid-body after its answer holds the slot until HAProxy's
    `timeout client` (20 s; Ray's is an hour)."""
    head = _early_head("/v1/jobs", "Content-Type: application/json\r\n", 100_000)
    answer, closed_after = _answered_mid_body(serve_app, head, trickle=False)
    print(f"\nsilent client dropped {closed_after:.1f} s after its 401")
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:300]
    assert 15 <= closed_after <= 30, closed_after


def test_a_large_body_sent_whole_keeps_the_connection(serve_app: ServeApp) -> None:
    """The close above is only for answers sent before the body arrived: a large body
    read whole leaves the connection open for the next request."""
    body = b'{"items": [' + b" " * 20_000 + b'{"entity_id": "E0000001"}]}'
    head = _head(len(body)).replace(b"POST /v1/predict ", b"POST /v1/predict/batch ")
    with _connect(serve_app) as sock:
        for _ in range(2):
            sock.sendall(head + body)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                assert chunk, f"closed after {answer[:200]!r}"
                answer += chunk
            head_part, _, rest = answer.partition(b"\r\n\r\n")
            fields = dict(line.split(b":", 1) for line in head_part.lower().split(b"\r\n")[1:])
            length = int(fields[b"content-length"])
            while len(rest) < length:
                chunk = sock.recv(65536)
                assert chunk, "closed mid-answer"
                rest += chunk
            assert head_part.startswith(b"HTTP/1.1 200 "), answer[:300]
            assert b"connection: close" not in head_part.lower(), head_part


def _answers_within(socks: list[socket.socket], quiet_s: float) -> dict[int, bytes]:
    """What the server sent on each socket that got anything, until ``quiet_s`` without
    news (an answer sent before the body arrived keeps its connection open for HAProxy's
    `timeout client`, unless the client sends on)."""
    import select

    received = {i: b"" for i in range(len(socks))}
    closed: set[int] = set()
    while True:
        open_ = [sock for i, sock in enumerate(socks) if i not in closed]
        readable = select.select(open_, [], [], quiet_s)[0] if open_ else []
        if not readable:
            return {i: data for i, data in received.items() if data}
        for sock in readable:
            i = socks.index(sock)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            received[i] += chunk
            if not chunk:
                closed.add(i)


def test_one_keys_stalled_uploads_are_capped_and_other_keys_get_in(serve_app: ServeApp) -> None:
    """A body still arriving counts against every caller's admission. One key's uploads
    stalled after 20 KB: a first wave is let in whole (a burst is no flood), and once
    they have stalled for over a second each Ingress replica refuses that key's next
    uploads with 429 ``uploads_per_key``; another key is served meanwhile, and the
    slots come back when the uploads go away."""
    replicas = serve_app.stable_replicas("Ingress")
    cap = serve_app.settings.limits.max_uploads_per_key
    first_wave, second_wave = replicas * (cap + 2), 12  # HAProxy's leastconn spreads them
    head = _head(100_000).replace(b"POST /v1/predict ", b"POST /v1/predict/batch ")
    socks: list[socket.socket] = []

    def stall(count: int) -> None:
        for _ in range(count):
            socks.append(_connect(serve_app))
            socks[-1].sendall(head + b"{" + b" " * 20_000)  # past HAProxy's 16 KiB buffer

    try:
        stall(first_wave)
        burst_refused = _answers_within(socks, quiet_s=1.5)  # and now they are slow
        stall(second_wave)
        refused = _answers_within(socks[first_wave:], quiet_s=3.0)
        other = httpx.post(
            f"{serve_app.base_url}/v1/predict",
            json={"entity_id": "E0000007"},
            headers={"Authorization": f"Bearer {OTHER_KEY}"},
            timeout=10,
        )
    finally:
        for sock in socks:
            sock.close()
    print(
        f"\n{first_wave} + {second_wave} stalled uploads of one key, {replicas} replicas: "
        f"{len(burst_refused)} and {len(refused)} refused"
    )
    assert burst_refused == {}, burst_refused
    assert len(refused) == second_wave, refused
    for answer in refused.values():
        assert answer.startswith(b"HTTP/1.1 429 "), answer[:300]
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["details"] == [{"type": "uploads_per_key", "limit": cap}]
    assert other.status_code == 200, other.text
    deadline = time.monotonic() + 10  # the stalled ones' slots come back once they are gone
    while (mine := serve_app.client.post("/v1/predict", json=json.loads(BODY))).status_code != 200:
        assert time.monotonic() < deadline, mine.text
        time.sleep(0.2)


def _request_id(i: int) -> str:
    """Every other caller sends a hostile id: quotes and braces that would break a JSON body
    copied in raw, and more than the 64 bytes HAProxy keeps."""
    return f"burst-{i}" if i % 2 else f'burst-{i}-"}}{{\\' + "x" * 100


async def _burst(serve_app: ServeApp, requests: int) -> list[tuple[int, httpx.Response, float]]:
    """``requests`` predictions on their own connections, all opened first and then sent at
    the same moment, so that each time is the server's (send to last byte), not the
    client's connection set-up."""
    port = int(serve_app.base_url.rsplit(":", 1)[1])
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(requests)]

    async def one(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        body = json.dumps({"entity_id": f"E{(7_919 * i) % 100_000:07d}"}).encode()
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"Authorization: {serve_app.auth['Authorization']}\r\n"
            f"X-Request-ID: {_request_id(i)}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        began = time.perf_counter()
        writer.write(head + body)
        raw = await reader.read()  # Connection: close, so the answer ends at EOF
        took = time.perf_counter() - began
        writer.close()
        return i, _parse(raw), took

    return await asyncio.gather(*(one(i, *pair) for i, pair in enumerate(connections)))


def _parse(raw: bytes) -> httpx.Response:
    """An HTTP/1.1 answer read off a socket (by h11, httpx's own parser)."""
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="POST", target="/", headers=[("Host", "127.0.0.1")]))
    parser.receive_data(raw)
    parser.receive_data(b"")
    head, body = parser.next_event(), b""
    while isinstance(event := parser.next_event(), h11.Data):
        body += event.data
    assert isinstance(head, h11.Response) and isinstance(event, h11.EndOfMessage), event
    return httpx.Response(head.status_code, headers=head.headers, content=body)


def _haproxy_refusals_counted() -> float:
    """5xx answers HAProxy's frontend sent, from its Prometheus exporter."""
    text = httpx.get(f"http://127.0.0.1:{HAPROXY_METRICS_PORT}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("haproxy_frontend_http_responses_total{")
        and 'proxy="http_frontend"' in line
        and 'code="5xx"' in line
    )


def test_haproxy_refuses_what_does_not_fit_with_a_json_503(serve_app: ServeApp) -> None:
    """A burst far above the ingress replicas' slots: the excess waits in HAProxy's queue,
    then gets HAProxy's own 503 (no Python ran for it), JSON like the app's, with
    ``Retry-After``, within about ``timeout queue``; everything else is answered."""
    refused_before = _haproxy_refusals_counted()
    answers = asyncio.run(_burst(serve_app, 600))
    statuses = sorted({response.status_code for _, response, _ in answers})
    assert statuses == [200, 503], statuses
    by_balancer = [
        (i, response, took)
        for i, response, took in answers
        if response.status_code == 503
        and response.json()["error"].get("details", {}).get("refused_by") == "load balancer"
    ]
    shed = [response for _, response, _ in answers if response.status_code == 503]
    print(f"\nburst of 600: {len(answers) - len(shed)} answered, {len(shed)} refused, "
          f"{len(by_balancer)} of them by HAProxy, slowest such refusal "
          f"{max((took for *_, took in by_balancer), default=0) * 1000:.0f} ms")  # fmt: skip
    assert by_balancer, "HAProxy refused nothing: its queue limit did not act"
    for response in shed:
        assert response.headers["Retry-After"].isdigit(), response.headers
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "overloaded", response.text
    for i, response, _ in by_balancer:  # the caller's id, cut to 64 bytes, JSON-escaped
        kept = _request_id(i)[:64]
        assert response.json()["request_id"] == kept, response.text
        assert response.headers["X-Request-ID"] == json.dumps(kept)[1:-1], response.headers
    # `timeout queue` is 40 ms; one client event loop reads all 600 answers, so the bound
    # is on the median and generous: it catches a 10x regression, not a few ms.
    assert statistics.median(took for *_, took in by_balancer) < 0.5
    # Ray's per-request HAProxy metrics are off (configs/serve.env): HAProxy's own
    # exporter is where its refusals are counted.
    assert _haproxy_refusals_counted() - refused_before >= len(by_balancer)
    after = serve_app.client.post("/v1/predict", json={"entity_id": "E0090001"})
    assert after.status_code == 200, after.text
