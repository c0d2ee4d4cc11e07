"""Webhook signatures as the Standard Webhooks specification defines them.

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}``, the MAC is
HMAC-SHA256 keyed with the base64-decoded part of a ``whsec_…`` secret, and the
``webhook-signature`` header is a space-separated list of ``v1,<base64>``
entries (several during a secret rotation). Receivers verify with
:func:`verify`, or with any Standard Webhooks library.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping, Sequence

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300
# The spec asks for at least 24 random bytes; 32 matches the HMAC-SHA256 block strength.
SECRET_BYTES = 32

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


class WebhookVerificationError(Exception):
    """The headers or the signature of a webhook do not check out."""


def new_secret(nbytes: int = SECRET_BYTES) -> str:
    """A fresh signing secret, ``whsec_`` + base64 of ``nbytes`` random bytes."""
    if nbytes < 24:
        raise ValueError("a webhook secret needs at least 24 random bytes")
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(nbytes)).decode("ascii")


def _key(secret: str) -> bytes:
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        # Padding is added because some providers hand out unpadded base64.
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("webhook secret is not valid base64 after 'whsec_'") from exc
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode("utf-8") if isinstance(body, str) else body


def _mac(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return hmac.new(key, signed, hashlib.sha256).digest()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The ``v1,<base64>`` signature of one delivery."""
    # A '.' in the id would make "{id}.{ts}.{body}" ambiguous (the spec forbids it).
    if not msg_id or "." in msg_id:
        raise ValueError("webhook id must be non-empty and contain no '.'")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise TypeError("timestamp must be integer Unix seconds")
    digest = _mac(_key(secret), msg_id, timestamp, _as_bytes(body))
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def headers(
    secret: str | Sequence[str],
    msg_id: str,
    body: bytes | str,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The headers of one delivery attempt.

    ``secret`` may be a list (new secret first, then the old one) so that
    receivers keep verifying while a secret is rotated.
    """
    ts = int(time.time()) if timestamp is None else timestamp
    keys = [secret] if isinstance(secret, str) else list(secret)
    if not keys:
        raise ValueError("at least one secret is needed")
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: " ".join(sign(key, msg_id, ts, body) for key in keys),
        "content-type": "application/json",
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    *,
    now: float | None = None,
) -> None:
    """Check a received webhook; raise :class:`WebhookVerificationError` if it fails.

    ``body`` must be the raw request body, not JSON parsed and serialized again.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get(ID_HEADER, "")
    raw_ts = lowered.get(TIMESTAMP_HEADER, "").strip()
    signatures = lowered.get(SIGNATURE_HEADER, "")
    if not (msg_id and raw_ts and signatures):
        raise WebhookVerificationError(
            f"missing header: {ID_HEADER}, {TIMESTAMP_HEADER} and {SIGNATURE_HEADER} are required"
        )
    if not raw_ts.isdigit():
        raise WebhookVerificationError(f"{TIMESTAMP_HEADER} is not integer Unix seconds")
    timestamp = int(raw_ts)
    current = time.time() if now is None else now
    if timestamp < current - tolerance_s:
        raise WebhookVerificationError("webhook timestamp is too old")
    if timestamp > current + tolerance_s:
        raise WebhookVerificationError("webhook timestamp is too far in the future")

    try:
        key = _key(secret)
    except ValueError as exc:
        raise WebhookVerificationError(str(exc)) from exc
    expected = _mac(key, msg_id, timestamp, _as_bytes(body))
    for entry in signatures.split():
        version, _, encoded = entry.partition(",")
        if version != SIGNATURE_VERSION:
            continue  # v1a (asymmetric) or a future scheme: not ours to check
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        if hmac.compare_digest(candidate, expected):
            return
    raise WebhookVerificationError("no matching signature")
