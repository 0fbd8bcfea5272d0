"""Completion webhooks: URL policy, Standard Webhooks signing, one pinned delivery attempt.

Signing follows the Standard Webhooks spec through its reference library
(``standardwebhooks``): headers ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` (``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body``). The id is
derived from the job, so it is the same on every retry and receivers can deduplicate.

The URL policy is what stops a key holder from aiming the service at its own network
(SSRF). Why each rule:

* **Globally routable only.** Every address a name resolves to must be globally routable
  (``ipaddress``'s ``is_global``), with IPv4 wrapped in IPv6 (mapped, compatible, 6to4,
  Teredo, NAT64) unwrapped and checked too: a deny-list of private ranges always misses
  one (carrier-grade NAT ``100.64.0.0/10`` hosts cloud metadata services).
* **Pinned.** The name is resolved once per attempt, checked, and the connection goes to
  that very address (Host header and TLS SNI keep the name), on a fresh connection: a
  second resolution by the HTTP client could answer differently (DNS rebinding), and a
  pooled connection could lead anywhere.
* **Ports.** 80 and 443 (``allowed_ports``) unless an ``allowed_hosts`` entry names the
  host *and* the port: allowing ``127.0.0.1`` must not open 8265, 8404, ...
* **One deadline per attempt** covering resolution, connection, request and response, and
  a capped response read: a receiver that drips bytes or answers 200 MiB costs at most
  ``timeout_s`` and ``max_response_bytes``.
* **Short error categories** (``timeout``, ``connection_refused``, ``http_503``, ...) in
  the job's status, never raw exception text: that would let a key holder map hosts.

Retries are scheduled durably in the job queue (``webhook_next_at``), not in a sleeping
coroutine, so a delivery owed by a worker that dies is made by another one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import os
import random
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook

from serve_app.config import WebhookConfig
from serve_app.errors import ConfigError, InvalidInput
from serve_app.net_policy import is_public, parse_host_rule, valid_hostname
from serve_app.secret_files import WEBHOOK_SECRET_PREFIX, read_lines

Resolver = Callable[[str, int], Sequence[str]]
"""``(host, port) -> addresses`` as strings; :func:`system_resolver` unless a test injects one."""

SECRET_BYTES = (24, 64)  # the Standard Webhooks spec's bounds for a secret

# Callback host look-ups run on a pool of their own and are waited for at most this long.
# getaddrinfo cannot be cancelled and a hostile name server may never answer: on the
# replica's shared thread pool (5 threads for a replica under 1 CPU) a few such look-ups
# held every thread, and lease renewals and claims queued behind them. When every look-up
# thread is stuck the next one is refused at once (retryable), never queued. One API key
# (its callbacks' names, its name server) may hold at most DNS_THREADS_PER_OWNER of them:
# one key's hung name server filled the pool, and every other key's submissions with a
# callback got 503 and their deliveries were postponed.
DNS_THREADS = 8
DNS_THREADS_PER_OWNER = 2
DNS_TIMEOUT_S = 3.0


# ---- the signing secret ------------------------------------------------------------------


def read_secret(config: WebhookConfig) -> str | None:
    """The signing secret (``whsec_<base64>``) from env or the secret file, if any.

    Checked here, at start, so a bad secret stops the replica with an error naming the
    setting instead of failing every delivery later.
    """
    secret = os.environ.get(config.secret_env, "").strip()
    source = f"${config.secret_env}"
    if not secret and config.secret_file:
        secret = next(iter(read_lines(Path(config.secret_file))), "")
        source = f"jobs.webhooks.secret_file ({config.secret_file})"
    if not secret:
        return None
    check_secret(secret, source)
    return secret


def owner_secret(master: str, owner: str) -> str:
    """The secret that signs ``owner``'s webhooks: HMAC-SHA256 of the owner's id under the
    service's secret, in the same ``whsec_`` form. One secret for every API key let any
    tenant that verifies its own webhooks forge signed ones for another's receiver.
    Derived, not stored: nothing to keep in step when keys are added
    (``serve-app webhook-secret`` prints one to hand out with its key)."""
    raw = base64.b64decode(master.removeprefix(WEBHOOK_SECRET_PREFIX))
    derived = hmac.new(raw, b"serve_app webhook secret v1\0" + owner.encode(), "sha256")
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(derived.digest()).decode()


def check_secret(secret: str, source: str) -> None:
    """Raise :class:`ConfigError` naming ``source`` unless ``secret`` is a usable secret."""
    encoded = secret.removeprefix(WEBHOOK_SECRET_PREFIX)
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    low, high = SECRET_BYTES
    if not secret.startswith(WEBHOOK_SECRET_PREFIX) or not low <= len(raw) <= high:
        raise ConfigError(
            f"the webhook signing secret in {source} is not valid: expected "
            f"'{WEBHOOK_SECRET_PREFIX}' followed by the base64 of {low} to {high} random "
            "bytes (`serve-app keygen` writes one)"
        )


# ---- the URL policy ----------------------------------------------------------------------


@dataclass(frozen=True)
class CallbackTarget:
    """A callback URL taken apart, and (once resolved) the addresses it may reach."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...] = ()

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class CallbackRefused(InvalidInput):
    """A callback URL the policy refuses; ``category`` is what the job's status shows.

    ``temporary``: the name could not be looked up now (the resolver timed out or said
    "try again"), which is no fault of the URL: at submission that is a 503, not a 422.
    """

    def __init__(
        self,
        message: str,
        category: str,
        retryable: bool = False,
        detail_type: str = "",
        temporary: bool = False,
    ) -> None:
        super().__init__(message, [{"type": detail_type or category}])
        self.category = category
        self.retryable = retryable
        self.temporary = temporary


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, as the operating system answers."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class _Lookups:
    """The look-up pool and how many of its threads are taken, in all and per owner (a
    lock: callers are the threads of a replica, or of a job-parsing process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy = 0
        self.by_owner: Counter[str] = Counter()
        self.pool: ThreadPoolExecutor | None = None

    def start(self, resolver: Resolver, host: str, owner: str) -> Future[Sequence[str]] | str:
        """The look-up's future, or why it was not started."""
        with self.lock:
            if self.by_owner[owner] >= DNS_THREADS_PER_OWNER:
                return "this key's earlier look-ups are still running"
            if self.busy >= DNS_THREADS:
                return "every look-up thread is busy"
            self.busy += 1
            self.by_owner[owner] += 1
            if self.pool is None:
                self.pool = ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="callback-dns")
        future = self.pool.submit(resolver, host, 0)
        future.add_done_callback(lambda _: self._done(owner))
        return future

    def _done(self, owner: str) -> None:
        with self.lock:
            self.busy -= 1
            self.by_owner[owner] -= 1
            if self.by_owner[owner] <= 0:
                del self.by_owner[owner]


_LOOKUPS = _Lookups()


# The category of a delivery refused because this replica's look-up threads were all
# taken (by other callbacks' hung look-ups): not the receiver's fault, so not an attempt.
LOOKUPS_BUSY = "dns_busy"


def _temporarily_unresolved(host: str, why: str, category: str = "dns_error") -> CallbackRefused:
    return CallbackRefused(
        f"callback_url host {host!r} could not be looked up now ({why}): retry later",
        category,
        retryable=True,
        detail_type="callback_dns_unavailable",
        temporary=True,
    )


def lookup(host: str, resolver: Resolver, owner: str = "") -> Sequence[str]:
    """``resolver(host)``, on the look-up pool, waited for at most :data:`DNS_TIMEOUT_S`;
    ``owner`` (the API key's id) bounds how many threads one key's look-ups may hold."""
    future = _LOOKUPS.start(resolver, host, owner)
    if isinstance(future, str):
        raise _temporarily_unresolved(host, future, LOOKUPS_BUSY)
    try:
        return future.result(timeout=DNS_TIMEOUT_S)
    except TimeoutError as exc:  # the thread goes on; its slot frees when it ends
        raise _temporarily_unresolved(host, f"no answer within {DNS_TIMEOUT_S:g} s") from exc
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:
            raise _temporarily_unresolved(host, "the name server said try again") from exc
        raise


def parse_callback_url(url: str, config: WebhookConfig) -> CallbackTarget:
    """Syntax and port policy, no DNS: a malformed URL or a closed port is a 422 at once.

    What is accepted here must be what the sender (httpx) later reads the same way:
    ``urlsplit`` drops tabs and newlines that httpx refuses, and reads port 0 as no port.
    """
    if any(ch <= " " or ch == "\x7f" for ch in url):
        raise CallbackRefused(
            "callback_url must not contain spaces or control characters", "bad_callback_url"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
        sent_to = httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:  # port 99999, bad IPv6 literal, ...
        raise CallbackRefused(
            "callback_url has an invalid host or port", "bad_callback_url"
        ) from exc
    if port == 0:
        raise CallbackRefused("callback_url port must be 1-65535", "bad_callback_url")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused("callback_url must be an absolute http(s) URL", "bad_callback_url")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("callback_url must not carry credentials", "bad_callback_url")
    host = parts.hostname.lower()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not valid_hostname(host):
            raise CallbackRefused(
                "callback_url host is not a valid DNS name (labels of 1-63 letters, digits "
                "or hyphens, 253 characters at most)",
                "bad_callback_url",
            ) from None
    port = port or (443 if parts.scheme == "https" else 80)
    if sent_to.raw_host.decode("ascii").lower() != host or (sent_to.port or port) != port:
        raise CallbackRefused(
            "callback_url is read differently by URL parsers; write it plainly",
            "bad_callback_url",
        )
    return CallbackTarget(url=url, scheme=parts.scheme, host=host, port=port)


def check_callback_url(
    url: str, config: WebhookConfig, resolver: Resolver = system_resolver, owner: str = ""
) -> CallbackTarget:
    """Resolve and check a callback URL; the target carries the addresses to connect to.

    Called at submission (a refusal is a 422) and at every delivery attempt, whose
    connection then goes to exactly these addresses. ``owner``: the job's key (look-ups
    per key are bounded).
    """
    target = parse_callback_url(url, config)
    try:
        addresses = [ipaddress.ip_address(target.host)]
    except ValueError:
        try:
            found = lookup(target.host, resolver, owner)
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in found]
        except CallbackRefused:
            raise
        except (OSError, UnicodeError, ValueError) as exc:
            raise CallbackRefused(
                f"callback_url host {target.host!r} does not resolve", "dns_error", True
            ) from exc
    if not addresses:
        raise CallbackRefused(f"callback_url host {target.host!r} does not resolve", "dns_error")
    rules = [parse_host_rule(entry) for entry in config.allowed_hosts]
    for address in addresses:
        if any(
            rule.matches(target.host, address, target.port, config.allowed_ports) for rule in rules
        ):
            continue
        if not is_public(address) or _is_local_name(target.host):
            raise CallbackRefused(
                f"callback_url host {target.host!r} is not a public address; allow it with "
                f"its port ({target.host}:{target.port}) in jobs.webhooks.allowed_hosts",
                "refused_address",
                detail_type="callback_host_not_allowed",
            )
        if target.port not in config.allowed_ports:
            raise CallbackRefused(
                f"callback_url port {target.port} is not allowed (allowed: "
                f"{', '.join(map(str, config.allowed_ports))}, or a host:port in "
                "jobs.webhooks.allowed_hosts)",
                "port_not_allowed",
            )
    return CallbackTarget(
        url=url,
        scheme=target.scheme,
        host=target.host,
        port=target.port,
        addresses=tuple(str(a) for a in addresses),
    )


def _is_local_name(host: str) -> bool:
    host = host.removesuffix(".")
    return host == "localhost" or host.endswith(".localhost")


# ---- signing -----------------------------------------------------------------------------


def sign(secret: str, webhook_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers for ``body``."""
    timestamp = now or datetime.now(tz=UTC)
    signature = Webhook(secret).sign(webhook_id, timestamp, body)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def backoff_s(attempt: int, config: WebhookConfig) -> float:
    """Exponential backoff with equal jitter (half fixed, half random) before ``attempt + 1``."""
    ceiling = min(config.backoff_max_s, config.backoff_initial_s * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


# ---- one delivery attempt ----------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """The outcome of one delivery attempt; ``error`` is a short category, never raw text."""

    delivered: bool
    retryable: bool
    error: str | None


def classify(exc: BaseException) -> tuple[str, bool]:
    """(category, retryable) of an exception raised while delivering."""
    if isinstance(exc, CallbackRefused):
        return exc.category, exc.retryable
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return "timeout", True
    causes: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(causes) < 8:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return "connection_refused", True
    if any(isinstance(c, ssl.SSLError) for c in causes):
        return "tls_error", True
    if isinstance(exc, httpx.ConnectError):
        return "connect_error", True
    if isinstance(exc, httpx.RemoteProtocolError):
        return "protocol_error", True
    if isinstance(exc, httpx.TransportError):
        return "network_error", True
    return "internal_error", True


async def deliver(
    url: str,
    secret: str,
    webhook_id: str,
    body: str,
    config: WebhookConfig,
    resolver: Resolver = system_resolver,
    owner: str = "",
) -> Attempt:
    """One attempt, within ``config.timeout_s`` all told; every failure becomes a category."""
    headers = sign(secret, webhook_id, body)
    try:
        status = await asyncio.wait_for(
            _resolve_and_post(url, headers, body, config, resolver, owner), config.timeout_s
        )
    except Exception as exc:  # every failure is an attempt, with a short category
        category, retryable = classify(exc)
        return Attempt(False, retryable, category)
    if 200 <= status < 300:
        return Attempt(True, False, None)
    retryable = status >= 500 or status in (408, 429)
    return Attempt(False, retryable, f"http_{status}")


async def _resolve_and_post(
    url: str,
    headers: dict[str, str],
    body: str,
    config: WebhookConfig,
    resolver: Resolver,
    owner: str,
) -> int:
    target = await asyncio.to_thread(check_callback_url, url, config, resolver, owner)
    return await _post_pinned(target, headers, body, config)


async def _post_pinned(
    target: CallbackTarget, headers: dict[str, str], body: str, config: WebhookConfig
) -> int:
    """POST to the checked addresses in turn (first that connects), on fresh connections."""
    last: Exception | None = None
    for address in target.addresses:
        try:
            return await _post_to(address, target, headers, body, config.max_response_bytes)
        except httpx.ConnectError as exc:  # try the next address of the name
            last = exc
    assert last is not None
    raise last


async def _post_to(
    address: str, target: CallbackTarget, headers: dict[str, str], body: str, max_bytes: int
) -> int:
    """One POST to ``address`` with the name in Host and SNI; reads at most ``max_bytes``."""
    url = httpx.URL(target.url).copy_with(host=address)
    extensions: dict[str, Any] = {}
    if target.scheme == "https" and target.host != address:
        extensions["sni_hostname"] = target.host
    request_headers = {**headers, "host": target.host_header, "accept-encoding": "identity"}
    # A client per attempt: no pooled connection outlives the address it was checked for;
    # trust_env=False: a proxy from the environment would resolve the name again.
    async with (
        httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=None) as client,
        client.stream(
            "POST", url, content=body, headers=request_headers, extensions=extensions
        ) as response,
    ):
        read = 0
        async for chunk in response.aiter_raw():
            read += len(chunk)
            if read >= max_bytes:  # the status decides; the rest is not read
                break
        return response.status_code


def event_body(job: dict[str, Any]) -> dict[str, Any]:
    """The webhook payload: what happened to which job, and where to read the results."""
    return {"type": f"job.{job['state']}", "timestamp": job["finished_at"], "data": job}
