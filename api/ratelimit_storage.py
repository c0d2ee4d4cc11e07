"""limits' Redis storage with one round trip per request for a group of windows, where
limits' own takes one per window and two more for the headers.

flask-limiter checks a limit such as `50/second;2000/minute` window by window, shortest
first: it increments each window's counter (a Lua script, one round trip each) and stops
at the first window over its amount. Then, for the X-RateLimit-* headers, it reads one
window's counter and TTL back: two more round trips that only repeat what the increment
just saw.

Here the app registers its limit groups (`set_groups`). The increment of a group's
first window runs one script that increments that window and the following ones in the
same order, stopping after the first window over its amount, exactly as flask-limiter
would, and returns every touched window's count and TTL. The request remembers them (on
`flask.g`): flask-limiter's increments of the other windows, next, take their counts
from there, and the headers read from there too. Any other key is one script per call,
which also returns the TTL for the headers. The decisions and counters are the same as
limits' own storage would give; only the round trips differ.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, current_app, g, has_request_context
from limits import RateLimitItem, parse_many
from limits.storage import RedisStorage

SCHEME = "spool+redis"
GROUPS = "spool_ratelimit_groups"  # app.extensions key: scope -> windows, shortest first

# KEYS: the windows, in flask-limiter's order. ARGV: the cost, then each window's expiry
# and amount. Stops after the first window over its amount (flask-limiter checks no
# further, so it increments no further). Returns count and TTL of each touched window.
INCR_GROUP = """
local cost = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
    local current = redis.call("incrby", key, cost)
    if current == cost then
        redis.call("expire", key, ARGV[2 * i])
    end
    out[#out + 1] = current
    out[#out + 1] = redis.call("ttl", key)
    if current > tonumber(ARGV[2 * i + 1]) then
        break
    end
end
return out
"""

# A window as (key, expiry, amount); registered groups hold the key's last three parts,
# "amount/multiples/granularity" (RateLimitItem.key_for).
Window = tuple[str, int, int]


def _suffix(item: RateLimitItem) -> str:
    return f"{item.amount}/{item.multiples}/{item.GRANULARITY.name}"


def set_groups(app: Flask, limits: dict[str, str]) -> None:
    """Register the app's shared limits, {scope: "50/second;2000/minute"}.

    Per app, not per storage: the limiter (and its storage) is one per process, and
    apps in one process may be configured differently.
    """
    groups: dict[str, list[Window]] = {}
    for scope, limit in limits.items():
        try:
            items = sorted(parse_many(limit))  # flask-limiter's order (a stable sort)
        except ValueError:
            continue  # flask-limiter reports it at request time
        windows = [(_suffix(i), i.get_expiry(), i.amount) for i in items]
        if len(windows) > 1 and len({w[0] for w in windows}) == len(windows):
            groups[scope] = windows  # a repeated window would be one key twice: left alone
    app.extensions[GROUPS] = groups


class RememberingRedisStorage(RedisStorage):
    STORAGE_SCHEME = [SCHEME, f"{SCHEME}s"]  # spool+redis://, spool+rediss://

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri.replace("spool+", "", 1), **options)

    def initialize_storage(self, uri: str) -> None:
        super().initialize_storage(uri)
        self.lua_incr_group = self.get_connection().register_script(INCR_GROUP.encode())

    @staticmethod
    def _seen() -> dict[str, tuple[int, float]] | None:
        if not has_request_context():
            return None
        seen: dict[str, tuple[int, float]] | None = g.get("_ratelimit_seen")
        if seen is None:
            seen = g._ratelimit_seen = {}
        return seen

    @staticmethod
    def _group(key: str, expiry: int) -> list[Window] | None:
        """The group's windows, keyed like `key`, when `key` is a group's first window."""
        parts = key.rsplit("/", 4)
        if len(parts) != 5:
            return None
        base, scope = parts[0], parts[1]
        windows = current_app.extensions.get(GROUPS, {}).get(scope)
        if not windows or "/".join(parts[2:]) != windows[0][0] or expiry != windows[0][1]:
            return None
        return [(f"{base}/{scope}/{suffix}", exp, amount) for suffix, exp, amount in windows]

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        seen = self._seen()
        if seen is None:
            return self._incr([(key, expiry, 0)], amount)[0]
        # Counts of windows this request's group script already incremented, each owed to
        # exactly one incr of its key: a second incr of the same key must hit Redis.
        pending: dict[str, tuple[int, int, int]] = g.setdefault("_ratelimit_pending", {})
        owed = pending.pop(key, None)
        if owed is not None and owed[:2] == (expiry, amount):
            return owed[2]
        windows = self._group(key, expiry) or [(key, expiry, 0)]
        counts = self._incr(windows, amount)
        for (k, exp, _), count in list(zip(windows, counts, strict=False))[1:]:
            pending[k] = (exp, amount, count)
        return counts[0]

    def _incr(self, windows: list[Window], amount: int) -> list[int]:
        """One round trip: the counts of the windows incremented (a prefix of them)."""
        args: list[int] = [amount]
        for _, exp, limit in windows:
            args += [exp, limit]
        out = self.lua_incr_group([self.prefixed_key(k) for k, _, _ in windows], args)
        seen, now = self._seen(), time.time()
        counts = []
        for (k, _, _), current, ttl in zip(windows, out[::2], out[1::2], strict=False):
            counts.append(int(current))
            if seen is not None:
                seen[k] = (int(current), max(int(ttl), 0) + now)
        return counts

    def get(self, key: str) -> int:
        seen = self._seen()
        if seen is not None and key in seen:
            return seen[key][0]
        return super().get(key)

    def get_expiry(self, key: str) -> float:
        seen = self._seen()
        if seen is not None and key in seen:
            return seen[key][1]
        return super().get_expiry(key)


def storage_uri(redis_url: str) -> str:
    """The flask-limiter storage URI for a Redis URL (memory:// without one)."""
    if redis_url.startswith(("redis://", "rediss://")):
        return "spool+" + redis_url
    return redis_url or "memory://"
