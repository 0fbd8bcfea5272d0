"""Completion webhooks: URL policy, Standard Webhooks signing, one delivery attempt.

Signing follows the Standard Webhooks spec through its reference library
(``standardwebhooks``): headers ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature`` (``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body``). The id is
derived from the job, so it is the same on every retry and receivers can deduplicate.

Retries are scheduled durably in the job queue (``webhook_next_at``), not in a sleeping
coroutine, so a delivery owed by a worker that dies is made by another one.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook

from serve_app.config import WebhookConfig
from serve_app.errors import InvalidInput
from serve_app.secret_files import read_lines


def read_secret(config: WebhookConfig) -> str | None:
    """The signing secret (``whsec_<base64>``) from env or the secret file, if any."""
    secret = os.environ.get(config.secret_env, "").strip()
    if not secret and config.secret_file:
        secret = next(iter(read_lines(Path(config.secret_file))), "")
    return secret or None


def _host_allowed(
    host: str, addresses: list[ipaddress._BaseAddress], allowed: tuple[str, ...]
) -> bool:
    for rule in allowed:
        if rule == host:
            return True
        try:
            network = ipaddress.ip_network(rule, strict=False)
        except ValueError:
            continue
        if addresses and all(address in network for address in addresses):
            return True
    return False


def _is_internal(address: ipaddress._BaseAddress) -> bool:
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
    )


def check_callback_url(url: str, config: WebhookConfig, resolve: bool = True) -> str:
    """Refuse URLs that would aim the service at internal addresses, unless allow-listed.

    Checked when a job is submitted and again before each delivery (DNS may change).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(
            "callback_url must be an absolute http(s) URL", [{"type": "bad_callback_url"}]
        )
    if parts.username or parts.password:
        raise InvalidInput(
            "callback_url must not carry credentials", [{"type": "bad_callback_url"}]
        )
    host = parts.hostname
    addresses: list[ipaddress._BaseAddress] = []
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        if resolve:
            try:
                infos = socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)
            except OSError as exc:
                raise InvalidInput(
                    f"callback_url host {host!r} does not resolve", [{"type": "bad_callback_url"}]
                ) from exc
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if _host_allowed(host, addresses, config.allowed_hosts):
        return url
    if host.lower() == "localhost" or any(_is_internal(a) for a in addresses):
        raise InvalidInput(
            f"callback_url host {host!r} is internal; allow it in jobs.webhooks.allowed_hosts",
            [{"type": "callback_host_not_allowed"}],
        )
    return url


def sign(secret: str, webhook_id: str, body: str, now: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers for ``body``."""
    timestamp = now or datetime.now(tz=timezone.utc)
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


async def deliver(
    client: httpx.AsyncClient,
    url: str,
    secret: str,
    webhook_id: str,
    body: str,
    config: WebhookConfig,
) -> tuple[bool, bool, str | None]:
    """One attempt. Returns (delivered, retryable, error)."""
    try:
        check_callback_url(url, config)
        response = await client.post(
            url,
            content=body,
            headers=sign(secret, webhook_id, body),
            timeout=config.timeout_s,
            follow_redirects=False,
        )
    except InvalidInput as exc:
        return False, False, exc.message
    except httpx.HTTPError as exc:  # timeouts and network errors: retry
        return False, True, f"{type(exc).__name__}: {exc}"
    if 200 <= response.status_code < 300:
        return True, False, None
    retryable = response.status_code >= 500 or response.status_code in (408, 429)
    return False, retryable, f"HTTP {response.status_code}"


def event_body(job: dict[str, Any]) -> dict[str, Any]:
    """The webhook payload: what happened to which job, and where to read the results."""
    return {"type": f"job.{job['state']}", "timestamp": job["finished_at"], "data": job}
