"""The API's rate limits: per user, one group of windows per scope ("submit", "read").

flask-limiter owns the limits' storage (RATELIMIT_STORAGE_URI, api/ratelimit_storage.py),
the on/off switch, the X-RateLimit-* and Retry-After headers, and the counters' keys.
Its view decorators are not used: on every request they resolve the endpoint's route,
blueprint, default and meta limits and their exemptions, build, sort and count them
window by window through `limits`' strategy. Measured in a throughput run of echo jobs
(bench.ab, 2026-12-04), the limiter cost 0.84 ms of the API's CPU per job (POST + GET
/result) out of 4.05, most of it that resolution, for what in Spool is always the same
group of windows per scope. Here each scope's windows are parsed once per app, and a
request costs one storage call (one Redis round trip) and a few dictionary look-ups.
The counters, decisions and headers are the ones flask-limiter's own loop gives:
windows shortest first, stopping at the first one over its amount.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Flask, current_app
from flask_limiter import RequestLimit
from limits import RateLimitItem, parse_many
from werkzeug.exceptions import TooManyRequests

from api.extensions import limiter, rate_limit_key
from api.ratelimit_storage import RememberingRedisStorage
from spool.settings import ConfigError

log = logging.getLogger(__name__)

PREFIX = "spool-rl"  # every counter's key starts with it (flask-limiter's key_prefix)
SCOPES = "spool_ratelimit_scopes"  # app.extensions key: scope -> its windows

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Window:
    item: RateLimitItem
    expiry: int  # seconds
    amount: int


def configure(app: Flask, limits: dict[str, tuple[str, str]]) -> None:
    """Parse each scope's limit once: {scope: (setting name, "50/second;2000/minute")}.
    A limit that does not parse stops the app from starting, with the setting named."""
    scopes: dict[str, tuple[Window, ...]] = {}
    for scope, (setting, text) in limits.items():
        try:
            items = sorted(set(parse_many(text)))  # flask-limiter's order; a repeat once
        except ValueError as exc:
            raise ConfigError(f"{setting}={text!r} is not a rate limit: {exc}") from exc
        scopes[scope] = tuple(Window(i, i.get_expiry(), i.amount) for i in items)
    app.extensions[SCOPES] = scopes


def hit(scope: str) -> None:
    """Count this request against the caller's `scope` limits: TooManyRequests (429) when
    one is over its amount. Redis down is not the client's fault: the request goes on
    (RATELIMIT_SWALLOW_ERRORS), PostgreSQL still records every job it accepts."""
    if not limiter.enabled:
        return
    windows: tuple[Window, ...] = current_app.extensions[SCOPES][scope]
    if not windows:
        return
    args = [PREFIX, rate_limit_key(), scope]
    try:
        over = _first_over(windows, args)
    except Exception as exc:
        if not current_app.config.get("RATELIMIT_SWALLOW_ERRORS"):
            raise
        log.warning("rate limit not checked, storage unreachable: %s", exc)
        return
    # The headers show the window that refused the request, else the shortest.
    shown = over or windows[0]
    limiter.context.view_rate_limit = RequestLimit(
        limiter, shown.item, args, over is not None, True
    )
    if over is not None:
        log.info("rate limit %s exceeded by %s (%s)", over.item, args[1], scope)
        raise TooManyRequests(description=str(over.item))


def _first_over(windows: tuple[Window, ...], args: list[str]) -> Window | None:
    """Count the request in each window, shortest first; the first one over its amount."""
    storage = limiter.storage
    if isinstance(storage, RememberingRedisStorage):
        keys = [(w.item.key_for(*args), w.expiry, w.amount) for w in windows]
        counts = storage.incr_windows(keys)
        return next((w for w, n in zip(windows, counts, strict=False) if n > w.amount), None)
    for w in windows:  # another storage (memory://): limits' strategy, a call per window
        if not limiter.limiter.hit(w.item, *args):
            return w
    return None


def limited(scope: str) -> Callable[[F], F]:
    """A view decorator: each call counts against the caller's `scope` limits."""

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            hit(scope)
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
