"""Which workers serve which model: each worker refreshes a score in a Redis sorted set."""

from __future__ import annotations

import time
from typing import cast

import redis

from spool import redisconn

KEY = "spool:workers:{}"
# A worker missing this many seconds of heartbeats is offline.
STALE_S = 30.0


def beat(worker: str, models: list[str], client: redis.Redis | None = None) -> None:
    r = client or redisconn.client()
    now = time.time()
    with r.pipeline(transaction=False) as pipe:
        for m in models:
            pipe.zadd(KEY.format(m), {worker: now})
            pipe.zremrangebyscore(KEY.format(m), 0, now - STALE_S)
        pipe.execute()


def leave(worker: str, models: list[str]) -> None:
    r = redisconn.client()
    with r.pipeline(transaction=False) as pipe:
        for m in models:
            pipe.zrem(KEY.format(m), worker)
        pipe.execute()


def counts(models: list[str], now: float | None = None) -> dict[str, int]:
    now = now or time.time()
    try:
        r = redisconn.client()
        with r.pipeline(transaction=False) as pipe:
            for m in models:
                pipe.zcount(KEY.format(m), now - STALE_S, "+inf")
            res = pipe.execute()
    except redis.RedisError:
        return {}
    return dict(zip(models, (int(x) for x in res), strict=True))


def alive(worker: str, model: str, now: float | None = None) -> bool:
    score = cast(float | None, redisconn.client().zscore(KEY.format(model), worker))
    return score is not None and score > (now or time.time()) - STALE_S
