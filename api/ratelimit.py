"""The API's rate limits: per user, one group of windows per scope ("submit", "read").

flask-limiter holds the configuration (RATELIMIT_STORAGE_URI and _OPTIONS, the on/off
switch, RATELIMIT_SWALLOW_ERRORS) and the storage it builds from it
(api/ratelimit_storage.py on Redis). Its view decorators and its header hook are not
used: on every request they resolve the endpoint's route, blueprint, default and meta
limits and their exemptions, count the windows one by one through `limits`' strategy,
then read a window back for the headers. In a throughput run of echo jobs (bench.ab,
2026-12-04) that cost 0.84 ms of the API's CPU per job (POST + GET /result) out of 4.05,
for what in Spool is always the same group of windows per scope. Here each scope's
windows are parsed once per app, and a request costs one storage call (one Redis round
trip), a few look-ups and the headers. The keys, counters, decisions and headers are the
ones flask-limiter gives: windows shortest first, stopping at the first one over its
amount, whose headers are shown (else the shortest window's).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Flask, Response, current_app, g
from limits import RateLimitItem, parse_many
from werkzeug.exceptions import TooManyRequests

from api.extensions import RATE_LIMIT_PREFIX, limiter, rate_limit_key
from api.ratelimit_storage import Planned, WindowsRedisStorage
from spool.settings import ConfigError

log = logging.getLogger(__name__)

SCOPES = "spool_ratelimit_scopes"  # app.extensions key: scope -> its windows

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Shown:
    """What the response's X-RateLimit-* headers say."""

    amount: int
    remaining: int
    reset_at: int  # Unix time, whole seconds (flask-limiter's: the window's end + 1)


def configure(app: Flask, limits: dict[str, tuple[str, str]]) -> None:
    """Parse each scope's limit once: {scope: (setting name, "50/second;2000/minute")}.
    A limit that does not parse stops the app from starting, with the setting named."""
    scopes: dict[str, tuple[RateLimitItem, ...]] = {}
    for scope, (setting, text) in limits.items():
        try:
            # flask-limiter's order, shortest window first; a repeated limit once.
            scopes[scope] = tuple(sorted(set(parse_many(text))))
        except ValueError as exc:  # "" included: a scope always has a window
            raise ConfigError(f"{setting}={text!r} is not a rate limit: {exc}") from exc
    app.extensions[SCOPES] = scopes
    app.after_request(_add_headers)


def hit(scope: str) -> None:
    """Count this request against the caller's `scope` limits: TooManyRequests (429) when
    one is over its amount. Redis down is not the client's fault: the request goes on
    (RATELIMIT_SWALLOW_ERRORS), and PostgreSQL still records every job it accepts."""
    if not limiter.enabled:
        return
    windows: tuple[RateLimitItem, ...] = current_app.extensions[SCOPES][scope]
    args = [RATE_LIMIT_PREFIX, rate_limit_key(), scope]
    try:
        over, shown = _count(windows, args)
    except Exception as exc:
        if not current_app.config.get("RATELIMIT_SWALLOW_ERRORS"):
            raise
        log.warning("rate limit not checked, storage unreachable: %s", exc)
        return
    g.spool_ratelimit = shown
    if over is not None:
        log.info("rate limit %s exceeded by %s (%s)", over, args[1], scope)
        raise TooManyRequests(description=str(over))


def _count(
    windows: tuple[RateLimitItem, ...], args: list[str]
) -> tuple[RateLimitItem | None, Shown]:
    """Count the request in each window, shortest first, up to the first one over its
    amount: that window (None if none) and the headers' figures."""
    storage = limiter.storage
    if isinstance(storage, WindowsRedisStorage):
        # [(count, seconds left)], a prefix of the windows
        counted = storage.incr_planned(_planned(storage, windows, tuple(args)))
        now = time.time()
        for w, (n, ttl) in zip(windows, counted, strict=False):
            if n > w.amount:
                return w, Shown(w.amount, 0, int(now + ttl + 1))
        n, ttl = counted[0]
        return None, Shown(windows[0].amount, windows[0].amount - n, int(now + ttl + 1))
    # Another storage (memory://): limits' strategy, a call per window and per figure.
    over = next((w for w in windows if not limiter.limiter.hit(w, *args)), None)
    w = over or windows[0]
    reset, remaining = limiter.limiter.get_window_stats(w, *args)
    return over, Shown(w.amount, remaining, int(reset + 1))


@functools.lru_cache(maxsize=4096)
def _planned(
    storage: WindowsRedisStorage, windows: tuple[RateLimitItem, ...], args: tuple[str, ...]
) -> Planned:
    """The windows of one subject and scope as the storage counts them, built on the
    subject's first request and reused: their keys, expiries and the script's call are
    the same on each (a cache miss only costs building them again)."""
    return storage.plan([(w.key_for(*args), w.get_expiry(), w.amount) for w in windows])


def _add_headers(resp: Response) -> Response:
    shown: Shown | None = g.pop("spool_ratelimit", None)
    if shown is None:  # not a limited view, or the limiter was off or unreachable
        return resp
    h = resp.headers
    h["X-RateLimit-Limit"] = str(shown.amount)
    h["X-RateLimit-Remaining"] = str(shown.remaining)
    h["X-RateLimit-Reset"] = str(shown.reset_at)
    # As flask-limiter: Retry-After on every limited response, the later of the window's
    # end and a Retry-After the view set (a 202's poll interval, a full queue's 10 s).
    now = time.time()
    reset_at = shown.reset_at
    existing = h.get("Retry-After")
    if existing is not None and existing.isdigit():
        reset_at = max(reset_at, int(now + int(existing)))
    h["Retry-After"] = str(int(reset_at - now))
    return resp


def limited(scope: str) -> Callable[[F], F]:
    """A view decorator: each call counts against the caller's `scope` limits."""

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            hit(scope)
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
