"""Standard Webhooks signatures: our own checks, then interop with the official library."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime

import pytest

from spool import webhook_signing as ws
from spool.webhook_signing import WebhookVerificationError

BODY = b'{"type":"job.completed","timestamp":"2024-01-01T00:00:00Z","data":{"id":"job_1"}}'
NOW = 1_700_000_000


def test_new_secret_shape() -> None:
    secret = ws.new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert ws.new_secret() != secret
    with pytest.raises(ValueError):
        ws.new_secret(16)


def test_sign_matches_the_spec_formula() -> None:
    key = bytes(range(32))
    secret = "whsec_" + base64.b64encode(key).decode()
    expected = hmac.new(key, f"msg_1.{NOW}.".encode() + BODY, hashlib.sha256).digest()
    assert ws.sign(secret, "msg_1", NOW, BODY) == "v1," + base64.b64encode(expected).decode()
    assert ws.sign(secret, "msg_1", NOW, BODY.decode()) == ws.sign(secret, "msg_1", NOW, BODY)


def test_sign_rejects_ambiguous_ids_and_bad_timestamps() -> None:
    secret = ws.new_secret()
    with pytest.raises(ValueError):
        ws.sign(secret, "msg.1", NOW, BODY)
    with pytest.raises(TypeError):
        ws.sign(secret, "msg_1", 1.5, BODY)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ws.sign("whsec_not*base64", "msg_1", NOW, BODY)


def test_headers_roundtrip() -> None:
    secret = ws.new_secret()
    headers = ws.headers(secret, "msg_1", BODY, timestamp=NOW)
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-timestamp"] == str(NOW)
    assert headers["content-type"] == "application/json"
    ws.verify(secret, headers, BODY, now=NOW)
    # Header names are case-insensitive on the wire.
    ws.verify(secret, {k.upper(): v for k, v in headers.items()}, BODY, now=NOW)
    # The current time is the default.
    ws.verify(secret, ws.headers(secret, "msg_2", BODY), BODY)


def test_tampering_is_detected() -> None:
    secret = ws.new_secret()
    headers = ws.headers(secret, "msg_1", BODY, timestamp=NOW)
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        ws.verify(secret, headers, BODY + b" ", now=NOW)
    with pytest.raises(WebhookVerificationError):
        ws.verify(secret, {**headers, "webhook-id": "msg_2"}, BODY, now=NOW)
    with pytest.raises(WebhookVerificationError):
        ws.verify(ws.new_secret(), headers, BODY, now=NOW)
    forged_ts = {**headers, "webhook-timestamp": str(NOW + 1)}
    with pytest.raises(WebhookVerificationError):
        ws.verify(secret, forged_ts, BODY, now=NOW)


def test_timestamp_tolerance() -> None:
    secret = ws.new_secret()
    headers = ws.headers(secret, "msg_1", BODY, timestamp=NOW)
    ws.verify(secret, headers, BODY, now=NOW + 299)
    ws.verify(secret, headers, BODY, now=NOW - 299)
    with pytest.raises(WebhookVerificationError, match="too old"):
        ws.verify(secret, headers, BODY, now=NOW + 301)
    with pytest.raises(WebhookVerificationError, match="future"):
        ws.verify(secret, headers, BODY, now=NOW - 301)
    ws.verify(secret, headers, BODY, tolerance_s=3600, now=NOW + 3000)


@pytest.mark.parametrize(
    "broken",
    [
        {"webhook-id": ""},
        {"webhook-timestamp": "soon"},
        {"webhook-timestamp": "-5"},
        {"webhook-signature": "v1,!!!notbase64"},
        {"webhook-signature": "v2,AAAA"},
        {"webhook-signature": "garbage"},
    ],
)
def test_malformed_headers(broken: dict[str, str]) -> None:
    secret = ws.new_secret()
    headers = {**ws.headers(secret, "msg_1", BODY, timestamp=NOW), **broken}
    with pytest.raises(WebhookVerificationError):
        ws.verify(secret, headers, BODY, now=NOW)


def test_missing_headers() -> None:
    with pytest.raises(WebhookVerificationError, match="missing"):
        ws.verify(ws.new_secret(), {}, BODY, now=NOW)


def test_several_signatures_allow_rotation() -> None:
    old, new = ws.new_secret(), ws.new_secret()
    headers = ws.headers([new, old], "msg_1", BODY, timestamp=NOW)
    assert len(headers["webhook-signature"].split(" ")) == 2
    ws.verify(old, headers, BODY, now=NOW)
    ws.verify(new, headers, BODY, now=NOW)
    # Unknown schemes (v1a is the asymmetric one) are skipped, not fatal.
    mixed = {**headers, "webhook-signature": "v1a,AAAA " + headers["webhook-signature"]}
    ws.verify(new, mixed, BODY, now=NOW)


def test_unpadded_secret_accepted() -> None:
    key = b"k" * 25  # base64 of 25 bytes ends in padding
    padded = "whsec_" + base64.b64encode(key).decode()
    unpadded = padded.rstrip("=")
    assert ws.sign(padded, "m", NOW, BODY) == ws.sign(unpadded, "m", NOW, BODY)


# --- interop with the official `standardwebhooks` package ---


def test_ours_verified_by_the_official_library() -> None:
    standardwebhooks = pytest.importorskip("standardwebhooks")
    secret = ws.new_secret()
    headers = ws.headers(secret, "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", BODY)
    payload = standardwebhooks.Webhook(secret).verify(BODY, headers)
    assert payload["data"]["id"] == "job_1"


def test_theirs_verified_by_ours() -> None:
    standardwebhooks = pytest.importorskip("standardwebhooks")
    secret = ws.new_secret()
    now = int(time.time())
    signature = standardwebhooks.Webhook(secret).sign(
        "msg_abc", datetime.fromtimestamp(now, tz=UTC), BODY.decode()
    )
    assert signature == ws.sign(secret, "msg_abc", now, BODY)
    headers = {
        "webhook-id": "msg_abc",
        "webhook-timestamp": str(now),
        "webhook-signature": signature,
    }
    ws.verify(secret, headers, BODY)


def test_official_library_rejects_our_tampered_body() -> None:
    standardwebhooks = pytest.importorskip("standardwebhooks")
    secret = ws.new_secret()
    headers = ws.headers(secret, "msg_1", BODY)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(BODY + b"x", headers)
