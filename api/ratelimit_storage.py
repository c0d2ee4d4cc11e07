"""limits' Redis storage with one round trip per limit per request instead of three.

flask-limiter increments each limit's counter (a Lua script), then, for the
X-RateLimit-* headers, reads the current limit's counter and its TTL back: two more
round trips that only repeat what the increment just saw. Here the increment script
also returns the TTL, and the request remembers both (on `flask.g`) for the headers.
The decision itself is unchanged: it rests on the increment's own result.
"""

from __future__ import annotations

import time
from typing import Any

from flask import g, has_request_context
from limits.storage import RedisStorage

SCHEME = "spool+redis"

INCR_EXPIRE_TTL = """
local current = redis.call("incrby", KEYS[1], ARGV[2])
if tonumber(current) == tonumber(ARGV[2]) then
    redis.call("expire", KEYS[1], ARGV[1])
end
return {current, redis.call("ttl", KEYS[1])}
"""


class RememberingRedisStorage(RedisStorage):
    STORAGE_SCHEME = [SCHEME, f"{SCHEME}s"]  # spool+redis://, spool+rediss://

    def __init__(self, uri: str, **options: Any) -> None:
        super().__init__(uri.replace("spool+", "", 1), **options)

    def initialize_storage(self, uri: str) -> None:
        super().initialize_storage(uri)
        self.lua_incr_expire_ttl = self.get_connection().register_script(INCR_EXPIRE_TTL.encode())

    @staticmethod
    def _seen() -> dict[str, tuple[int, float]] | None:
        if not has_request_context():
            return None
        seen: dict[str, tuple[int, float]] | None = g.get("_ratelimit_seen")
        if seen is None:
            seen = g._ratelimit_seen = {}
        return seen

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        current, ttl = self.lua_incr_expire_ttl([self.prefixed_key(key)], [expiry, amount])
        seen = self._seen()
        if seen is not None:
            seen[key] = (int(current), max(int(ttl), 0) + time.time())
        return int(current)

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
