"""limits' Redis storage with one round trip per request for a group of windows, where
limits' own takes one per window and two more for the headers.

A limit such as `50/second;2000/minute` is checked window by window, shortest first:
each window's counter is incremented, stopping at the first window over its amount
(api/ratelimit.py). limits' storage does that in a round trip per window, then reads one
window's counter and TTL back for the X-RateLimit-* headers: two more round trips that
only repeat what the increment just saw. `incr_windows` runs one script for the whole
group and returns every touched window's count and TTL. The decisions and counters are
the ones limits' own storage would give; only the round trips differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import redis
from limits.storage import RedisStorage

from spool import redisconn

SCHEME = "spool+redis"

# KEYS: the windows, shortest first. ARGV: the cost, then each window's expiry and
# amount. Stops after the first window over its amount (no request is counted in a
# window it never reached). Returns count and TTL of each touched window.
INCR_WINDOWS = """
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

# A window as (key, expiry in seconds, amount).
Window = tuple[str, int, int]


@dataclass(frozen=True)
class Planned:
    """A group of windows ready to count: the script's keys and arguments, and its call
    packed once (a user's group is the same on each of their requests)."""

    keys: list[str]
    args: list[int]
    packed: redisconn.Packed


class WindowsRedisStorage(RedisStorage):
    STORAGE_SCHEME = [SCHEME, f"{SCHEME}s"]  # spool+redis://, spool+rediss://

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri.replace("spool+", "", 1), **options)

    def initialize_storage(self, uri: str) -> None:
        super().initialize_storage(uri)
        self.lua_incr_windows = self.get_connection().register_script(INCR_WINDOWS.encode())

    @property
    def _client(self) -> redis.Redis:
        return cast(redis.Redis, self.get_connection())  # limits types it as a protocol

    def plan(self, windows: list[Window], cost: int = 1) -> Planned:
        args: list[int] = [cost]
        for _, exp, limit in windows:
            args += [exp, limit]
        keys = [self.prefixed_key(k) for k, _, _ in windows]
        script = self.lua_incr_windows
        pack = redisconn.packer(self._client)
        return Planned(keys, args, pack("EVALSHA", script.sha, len(keys), *keys, *args))

    def incr_planned(self, planned: Planned) -> list[tuple[int, int]]:
        """One round trip: (count, seconds left) of the windows incremented, shortest
        first, up to and including the first one over its amount."""
        # After NOSCRIPT (Redis restarted, its scripts flushed) or a dropped connection,
        # the script's own call loads it again, reconnects and retries.
        out = redisconn.send_packed(
            self._client,
            planned.packed,
            again=lambda: self.lua_incr_windows(planned.keys, planned.args),
        )
        return [(int(n), max(int(ttl), 0)) for n, ttl in zip(out[::2], out[1::2], strict=False)]

    def incr_windows(self, windows: list[Window], cost: int = 1) -> list[tuple[int, int]]:
        return self.incr_planned(self.plan(windows, cost))

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        # limits' interface: one window.
        return self.incr_windows([(key, expiry, 0)], amount)[0][0]


def storage_uri(redis_url: str) -> str:
    """The flask-limiter storage URI for a Redis URL (memory:// without one)."""
    if redis_url.startswith(("redis://", "rediss://")):
        return "spool+" + redis_url
    return redis_url or "memory://"
