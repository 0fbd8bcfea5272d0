"""The webhook URL policy and delivery, against real HTTP servers on loopback.

Hostile receivers (one that drips its answer, one that answers 200 MiB) and a name that
changes its answer between two resolutions (DNS rebinding) are real sockets; the only
thing faked is the resolver's answer, since a test cannot own public DNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from serve_app.config import WebhookConfig
from serve_app.errors import ConfigError, InvalidInput
from serve_app.jobs import webhooks
from serve_app.jobs.webhooks import (
    backoff_s,
    check_callback_url,
    deliver,
    is_public,
    read_secret,
    sign,
)
from serve_app.secret_files import new_webhook_secret as new_secret

OPEN = WebhookConfig()
SECRET = new_secret()


# ---- the URL policy ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "http:///nohost",
        "not a url",
        "http://user:pw@example.com/x",
        "http://127.0.0.1/x",
        "http://localhost/x",
        "http://api.localhost/x",
        "http://10.0.0.8/x",
        "http://192.168.1.1/x",
        "http://172.16.0.1/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x",
        "http://0.0.0.0/x",
        "http://100.100.100.200/latest/meta-data",  # carrier-grade NAT: cloud metadata
        "http://[2002:a00:1::]/x",  # 6to4 wrapping 10.0.0.1
        "http://[2002:7f00:1::]/x",  # 6to4 wrapping 127.0.0.1
        "http://[::ffff:127.0.0.1]/x",  # IPv4-mapped
        "http://[::127.0.0.1]/x",  # IPv4-compatible
        "http://[64:ff9b::a9fe:a9fe]/x",  # NAT64 of 169.254.169.254
        "http://[::ffff:0:7f00:1]/x",  # SIIT's IPv4-translated 127.0.0.1
        "http://[fe80::1]/x",
        "http://[fc00::1]/x",
        "http://224.0.0.1/x",
        "http://198.18.0.1/x",  # benchmarking range
        "http://192.0.2.1/x",  # documentation range
        "http://192.0.0.8/x",  # IETF protocol assignments: "global" in Python 3.11.7
        "http://[fec0::1]/x",  # deprecated site-local: "global" in Python 3.11.7
        "http://[3fff::1]/x",  # documentation (RFC 9637)
        "http://[::ffff:192.0.0.8]/x",
    ],
)
def test_non_public_or_odd_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidInput):
        check_callback_url(url, OPEN)


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.216.34:99999/x",  # a 500 at submission before
        "http://93.184.216.34:http/x",
        "http://" + "a" * 64 + ".example.com/x",  # a label over 63: crashed every delivery
        "http://" + ".".join(["abcdefghij"] * 24) + ".com/x",  # over 253 characters
        "http://bad_host!.example.com/x",
        "https://93.184.216.34:8265/x",  # not 80/443 and not allow-listed
        "http://[::1/x",
        "http://93.184.216.34:0/x",  # read as port 80 here, as port 0 by the sender
        "http://93.184.216.34/hook\t",  # urlsplit drops tabs and newlines, httpx refuses
        "http://93.184.216.34/hook\r\nX-Injected: 1",
        "http://93.184.216.34/ho ok",
        "http://93.184.216.34/hook\x00",
        "http://93.184.216.34/hook\x7f",
        "http://93.184.2\n16.34/x",
    ],
)
def test_bad_ports_and_labels_are_a_422_at_submission(url: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_callback_url(url, OPEN, resolver=lambda host, port: ["93.184.216.34"])
    assert caught.value.status_code == 422


def test_public_addresses_on_default_ports_pass() -> None:
    assert check_callback_url("https://93.184.216.34/hook", OPEN).addresses == ("93.184.216.34",)
    public = lambda host, port: ["93.184.216.34"]  # noqa: E731
    for url in ("https://xn--bcher-kva.de/hook", "https://EXAMPLE.com./x", "https://a.io/p@q"):
        assert check_callback_url(url, OPEN, resolver=public)  # IDN, case, a dot, '@' in path
    assert check_callback_url("http://[2606:4700::1111]:80/hook", OPEN)
    assert is_public(__import__("ipaddress").ip_address("2002:5db8:d822::"))  # 6to4 of public


def test_allowed_hosts_name_host_and_port() -> None:
    config = WebhookConfig(allowed_hosts=("127.0.0.1:8123", "10.0.0.0/8:9000", "[::1]:8123"))
    assert check_callback_url("http://127.0.0.1:8123/hook", config)
    assert check_callback_url("http://10.2.3.4:9000/hook", config)
    assert check_callback_url("http://[::1]:8123/hook", config)
    for url in (
        "http://127.0.0.1:8265/",  # the Ray dashboard: another port of an allowed host
        "http://127.0.0.1:8404/",  # HAProxy stats
        "http://127.0.0.1/",
        "http://10.2.3.4:8123/",
        "http://192.168.0.1:9000/",
    ):
        with pytest.raises(InvalidInput):
            check_callback_url(url, config)
    # an entry without a port opens the default ports only
    bare = WebhookConfig(allowed_hosts=("127.0.0.1",))
    assert check_callback_url("http://127.0.0.1/hook", bare)
    with pytest.raises(InvalidInput):
        check_callback_url("http://127.0.0.1:8265/", bare)


def test_every_resolved_address_must_pass() -> None:
    def resolver(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "127.0.0.1"]

    with pytest.raises(InvalidInput, match="not a public address"):
        check_callback_url("https://mixed.example.com/hook", OPEN, resolver)


def test_malformed_allowed_hosts_fail_at_start() -> None:
    for entry in ("127.0.0.1:99999", "host name", "[::1]x"):
        with pytest.raises(ValueError):
            WebhookConfig(allowed_hosts=(entry,))


# ---- the signing secret --------------------------------------------------------------


def test_signature_verifies_with_the_reference_library() -> None:
    body = '{"type":"job.succeeded"}'
    headers = sign(SECRET, "msg_1", body, now=datetime.now(tz=UTC))
    assert headers["webhook-id"] == "msg_1" and headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body, headers) == {"type": "job.succeeded"}
    with pytest.raises(Exception, match="signature"):
        Webhook(new_secret()).verify(body, headers)


@pytest.mark.parametrize("secret", ["whsec_not-base64!!", "whsec_c2hvcnQ=", "plain-secret-value"])
def test_a_malformed_secret_stops_start_naming_the_setting(
    secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", secret)
    config = WebhookConfig(secret_env="TEST_WEBHOOK_SECRET", secret_file=None)
    with pytest.raises(ConfigError, match=r"\$TEST_WEBHOOK_SECRET"):
        read_secret(config)
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET)
    assert read_secret(config) == SECRET


def test_backoff_grows_and_is_capped() -> None:
    config = WebhookConfig(backoff_initial_s=1, backoff_max_s=10)
    assert 0.5 <= backoff_s(1, config) <= 1
    assert 2 <= backoff_s(3, config) <= 4
    assert 5 <= backoff_s(10, config) <= 10


# ---- delivery against real sockets ---------------------------------------------------


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.request.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        while len(rest) < length:
            rest += self.request.recv(65536)
        self.server.requests.append(head.decode())
        self.server.bodies.append(rest.decode())
        with contextlib.suppress(OSError):  # the client hung up: what a capped reader does
            self.server.behaviour(self.request, self.server)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, host: str, port: int, behaviour: Callable[[socket.socket, _Server], None]
    ) -> None:
        super().__init__((host, port), _Handler)
        self.behaviour = behaviour
        self.requests: list[str] = []  # heads
        self.bodies: list[str] = []
        self.sent = 0
        self.port = self.server_address[1]


@contextmanager
def receiver(
    behaviour: Callable[[socket.socket, _Server], None], host: str = "127.0.0.1", port: int = 0
) -> Iterator[_Server]:
    server = _Server(host, port, behaviour)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def answer(status: int) -> Callable[[socket.socket, _Server], None]:
    def behave(sock: socket.socket, server: _Server) -> None:
        sock.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())

    return behave


def drip(sock: socket.socket, server: _Server) -> None:
    """Headers one byte every 0.1 s, forever: a per-read timeout never fires."""
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
        sock.sendall(bytes([byte]))
        time.sleep(0.1)


def huge(sock: socket.socket, server: _Server) -> None:
    """A 200 MiB answer, as fast as the client takes it."""
    size = 200 * 1024 * 1024
    sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
    block = b"\0" * (1 << 20)
    while server.sent < size:
        sock.sendall(block)
        server.sent += len(block)


def allowing(*servers: _Server, **settings: Any) -> WebhookConfig:
    hosts = tuple(f"{s.server_address[0]}:{s.port}" for s in servers)
    return WebhookConfig(allowed_hosts=hosts, **settings)


def send(url: str, config: WebhookConfig, **kwargs: Any) -> Any:
    return asyncio.run(deliver(url, SECRET, "msg_1", '{"a":1}', config, **kwargs))


def test_delivery_is_signed_and_2xx_is_delivered() -> None:
    with receiver(answer(204)) as server:
        attempt = send(f"http://127.0.0.1:{server.port}/hook", allowing(server))
        assert attempt.delivered and attempt.error is None
        assert "webhook-signature: v1," in server.requests[0].lower()


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (429, True), (400, False)])
def test_error_statuses_become_short_categories(status: int, retryable: bool) -> None:
    with receiver(answer(status)) as server:
        attempt = send(f"http://127.0.0.1:{server.port}/hook", allowing(server))
    assert (attempt.delivered, attempt.retryable, attempt.error) == (
        False,
        retryable,
        f"http_{status}",
    )


def test_connection_refused_and_dns_failure_are_categories_not_raw_text() -> None:
    with receiver(answer(204)) as server:
        port = server.port
        config = allowing(server)
    attempt = send(f"http://127.0.0.1:{port}/hook", config)  # nothing listens any more
    assert (attempt.retryable, attempt.error) == (True, "connection_refused")

    def nxdomain(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    attempt = send("https://hooks.example.com/x", OPEN, resolver=nxdomain)
    assert (attempt.retryable, attempt.error) == (True, "dns_error")


def test_a_dripping_receiver_is_cut_at_the_total_deadline() -> None:
    with receiver(drip) as server:
        started = time.monotonic()
        attempt = send(f"http://127.0.0.1:{server.port}/hook", allowing(server, timeout_s=1))
        elapsed = time.monotonic() - started
    assert (attempt.delivered, attempt.retryable, attempt.error) == (False, True, "timeout")
    assert elapsed < 2.5, f"the attempt took {elapsed:.1f}s with a 1s deadline"


def test_a_huge_answer_is_not_read_whole() -> None:
    with receiver(huge) as server:
        started = time.monotonic()
        attempt = send(f"http://127.0.0.1:{server.port}/hook", allowing(server, timeout_s=10))
        elapsed = time.monotonic() - started
        time.sleep(0.2)
        sent = server.sent
    assert attempt.delivered  # the status said 200; the body does not matter
    assert sent < 64 * 1024 * 1024, f"{sent / 2**20:.0f} MiB were read of a 200 MiB answer"
    assert elapsed < 5


def test_delivery_goes_to_the_address_that_was_checked_dns_rebinding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name answers an allowed address first and loopback after: nothing reaches loopback.

    ``socket.getaddrinfo`` itself is replaced, so a second resolution by the HTTP client
    (what happened before the address was pinned) would be fooled as well.
    """
    real_getaddrinfo = socket.getaddrinfo
    answers = iter(["127.0.0.2"])

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "rebind.test":
            address = next(answers, "127.0.0.1")
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with (
        receiver(answer(204), host="127.0.0.2") as allowed,
        receiver(answer(204), port=allowed.port) as internal,  # same port, on 127.0.0.1
    ):
        config = WebhookConfig(allowed_hosts=(f"127.0.0.2:{allowed.port}",))
        url = f"http://rebind.test:{allowed.port}/hook"
        attempt = send(url, config)
        assert attempt.delivered, attempt
        assert len(allowed.requests) == 1 and internal.requests == []
        assert f"host: rebind.test:{allowed.port}" in allowed.requests[0].lower()
        # the next attempt resolves to loopback and is refused before connecting
        attempt = send(url, config)
        assert (attempt.delivered, attempt.error) == (False, "refused_address")
        assert internal.requests == [] and len(allowed.requests) == 1


# ---- look-ups that never answer --------------------------------------------------------


def test_a_name_server_that_never_answers_cannot_take_the_replicas_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Eight deliveries to a host whose look-up hangs: before, each held a thread of the
    replica's shared pool for as long as the look-up hung, and the lease renewals that
    run on that pool (asyncio.to_thread) waited behind them."""
    monkeypatch.setattr(webhooks, "DNS_TIMEOUT_S", 0.3, raising=False)
    release = threading.Event()

    def hanging(host: str, port: int) -> list[str]:
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    async def scenario() -> tuple[list[Any], float]:
        config = WebhookConfig(timeout_s=5)
        attempts = await asyncio.gather(
            *(
                deliver("https://hooks.example.com/x", SECRET, f"m{i}", "{}", config, hanging)
                for i in range(8)
            )
        )
        started = time.monotonic()
        await asyncio.wait_for(asyncio.to_thread(lambda: None), 5)  # a lease renewal
        return attempts, time.monotonic() - started

    try:
        attempts, renewal_s = asyncio.run(scenario())
    finally:
        release.set()
    # each gave up after 0.3 s, or was refused at once once every look-up thread was stuck
    assert {(a.delivered, a.retryable) for a in attempts} == {(False, True)}
    assert {a.error for a in attempts} <= {"dns_error", "dns_busy"}
    assert sum(a.error == "dns_busy" for a in attempts) >= 8 - webhooks.DNS_THREADS
    assert renewal_s < 1.0  # shared threads free; the stuck look-ups hold their own


def test_a_look_up_that_says_try_again_is_a_503_at_submission_not_a_422(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serve_app.api.job_input import create_job
    from serve_app.config import JobsConfig
    from serve_app.errors import CallbackLookupUnavailable

    def try_again(*args: Any, **kwargs: Any) -> list[Any]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    def no_such_name(*args: Any, **kwargs: Any) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    jobs = JobsConfig(queue_url=f"sqlite:///{tmp_path / 'jobs.db'}").model_dump()
    raw = b'{"items": [{"entity_id": "E1"}], "callback_url": "https://hooks.example.com/x"}'
    monkeypatch.setattr(socket, "getaddrinfo", try_again)  # what system_resolver calls
    with pytest.raises(CallbackLookupUnavailable) as caught:
        create_job(raw, "alice", None, jobs, webhooks_configured=True)
    assert caught.value.status_code == 503 and caught.value.retry_after_s >= 1
    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    with pytest.raises(InvalidInput) as refused:
        create_job(raw, "alice", None, jobs, webhooks_configured=True)
    assert refused.value.status_code == 422


# ---- one secret per API key ------------------------------------------------------------


def test_each_owner_signs_with_its_own_secret_and_cannot_forge_anothers() -> None:
    from serve_app.jobs.webhooks import check_secret, owner_secret

    alice, bob = owner_secret(SECRET, "id:alice"), owner_secret(SECRET, "id:bob")
    assert alice == owner_secret(SECRET, "id:alice") != bob  # derived, stable
    assert SECRET not in (alice, bob) and alice != owner_secret(new_secret(), "id:alice")
    check_secret(alice, "derived")  # a valid Standard Webhooks secret
    body = '{"type":"job.succeeded"}'
    forged = sign(bob, "msg_1", body)  # bob holds his own secret only
    Webhook(bob).verify(body, forged)
    with pytest.raises(WebhookVerificationError):
        Webhook(alice).verify(body, forged)  # alice's receiver refuses bob's signature


def test_the_cli_prints_a_keys_webhook_secret(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    from serve_app.api.auth import parse_entry
    from serve_app.jobs.webhooks import owner_secret
    from serve_app.offline.cli import main

    monkeypatch.setenv("SERVE_APP_WEBHOOK_SECRET", SECRET)
    assert main(["webhook-secret", "--id", "alice"]) == 0
    assert capsys.readouterr().out.strip() == owner_secret(SECRET, "id:alice")
    key = "k" * 32
    monkeypatch.setattr("sys.stdin", io.StringIO(key + "\n"))
    assert main(["webhook-secret"]) == 0
    assert capsys.readouterr().out.strip() == owner_secret(SECRET, parse_entry(key).owner)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"alice:{key}\n"))  # a key-file line
    assert main(["webhook-secret"]) == 0
    assert capsys.readouterr().out.strip() == owner_secret(SECRET, "id:alice")
    assert main(["webhook-secret", "--id", "no such/name"]) == 2


def test_one_keys_hung_name_server_leaves_the_others_their_look_ups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four submissions of one key whose callback names hang filled the whole pool: every
    other key's submission with a callback was a 503 and its deliveries postponed. Now a
    key holds at most DNS_THREADS_PER_OWNER threads; the others still resolve at once."""
    monkeypatch.setattr(webhooks, "DNS_TIMEOUT_S", 0.2, raising=False)
    release = threading.Event()

    def resolver(host: str, port: int) -> list[str]:
        if host.endswith(".blackhole.example"):
            release.wait(30)
        return ["93.184.216.34"]

    config = WebhookConfig()
    refusals: list[str] = []
    try:
        for i in range(webhooks.DNS_THREADS):  # mallory tries to take every thread
            with pytest.raises(webhooks.CallbackRefused) as refused:
                url = f"https://n{i}.blackhole.example/hook"
                check_callback_url(url, config, resolver, owner="mallory")
            assert refused.value.temporary
            refusals.append(refused.value.message)
        for owner in ("alice", "bob"):
            target = check_callback_url("https://hooks.example.com/x", config, resolver, owner)
            assert [str(a) for a in target.addresses] == ["93.184.216.34"]
    finally:
        release.set()
    held = webhooks.DNS_THREADS_PER_OWNER
    assert all("no answer within" in message for message in refusals[:held])
    assert all("still running" in message for message in refusals[held:]), refusals
