from datetime import datetime, timezone

import pytest
from standardwebhooks.webhooks import Webhook

from serve_app.config import WebhookConfig
from serve_app.errors import InvalidInput
from serve_app.jobs.webhooks import backoff_s, check_callback_url, sign
from serve_app.secret_files import new_webhook_secret as new_secret

OPEN = WebhookConfig()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "http:///nohost",
        "not a url",
        "http://user:pw@example.com/x",
        "http://127.0.0.1/x",
        "http://localhost/x",
        "http://10.0.0.8/x",
        "http://192.168.1.1/x",
        "http://172.16.0.1/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x",
        "http://0.0.0.0/x",
    ],
)
def test_internal_or_odd_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidInput):
        check_callback_url(url, OPEN)


def test_public_address_is_accepted_and_allow_list_opens_internal() -> None:
    assert check_callback_url("https://93.184.216.34/hook", OPEN)
    allowed = WebhookConfig(allowed_hosts=("127.0.0.1", "10.0.0.0/8"))
    assert check_callback_url("http://127.0.0.1:9000/hook", allowed)
    assert check_callback_url("http://10.2.3.4/hook", allowed)
    with pytest.raises(InvalidInput):
        check_callback_url("http://192.168.0.1/hook", allowed)


def test_signature_verifies_with_the_reference_library() -> None:
    secret = new_secret()
    body = '{"type":"job.succeeded"}'
    headers = sign(secret, "msg_1", body, now=datetime.now(tz=timezone.utc))
    assert headers["webhook-id"] == "msg_1" and headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(body, headers) == {"type": "job.succeeded"}
    with pytest.raises(Exception, match="signature"):
        Webhook(new_secret()).verify(body, headers)


def test_backoff_grows_and_is_capped() -> None:
    config = WebhookConfig(backoff_initial_s=1, backoff_max_s=10)
    assert 0.5 <= backoff_s(1, config) <= 1
    assert 2 <= backoff_s(3, config) <= 4
    assert 5 <= backoff_s(10, config) <= 10
