"""Submit-time SSRF check of webhook URLs (API.md: refused with 422 naming `webhook`).

Delivery checks again against the address it connects to (workers/webhook_http.py);
this early check turns an obvious mistake into a 422 instead of a silent refusal
a day later. A batch repeats one URL thousands of times, so answers are cached
briefly: DNS may change, which is why delivery checks again.
"""

from __future__ import annotations

import time

from flask import current_app, has_app_context
from marshmallow import ValidationError

from spool import netguard, settings

CACHE_TTL_S = 60.0
CACHE_MAX = 4096

_cache: dict[tuple[str, bool], tuple[float, str | None]] = {}


def allow_private() -> bool:
    if has_app_context():
        return bool(current_app.config["SPOOL"].webhook_allow_private)
    return settings.get().webhook_allow_private


def refusal(url: str, allow_private_: bool) -> str | None:
    """Why `url` may not receive webhooks, or None when it may."""
    key = (url, allow_private_)
    now = time.monotonic()
    hit = _cache.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    try:
        netguard.check_url(url, allow_private_)
        reason = None
    except netguard.UnresolvableHost:
        # Not refused: a DNS failure may be passing (or the API's resolver may not see
        # the receiver's zone). Delivery checks again and records `dns:` errors.
        reason = None
    except netguard.UnsafeURL as exc:
        reason = exc.reason
    if len(_cache) >= CACHE_MAX:
        _cache.clear()
    _cache[key] = (now + CACHE_TTL_S, reason)
    return reason


def validate_webhook_url(url: str) -> None:
    """A marshmallow validator: raises ValidationError when the URL is not allowed."""
    reason = refusal(url, allow_private())
    if reason is not None:
        raise ValidationError(f"webhook URL refused: {reason}")
