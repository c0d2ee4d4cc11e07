"""Job events through Redis: one stream per job (`spool:ev:<job_id>`).

A stream gives every event an id (SSE `id:` and `Last-Event-ID` resume for free)
and XREAD BLOCK wakes a waiting request within milliseconds of an event, with no
sleep loop. Events are a convenience: PostgreSQL holds the state, so a lost
stream (Redis flushed) only costs the intermediate progress.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, cast

import redis

from spool import redisconn
from spool.states import TERMINAL

log = logging.getLogger(__name__)

STREAM_MAXLEN = 5000
STREAM_TTL_S = 24 * 3600


def stream_key(job_id: str) -> str:
    return f"spool:ev:{job_id}"


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    data: dict[str, Any]


def publish(
    job_id: str, type_: str, data: dict[str, Any], client: redis.Redis | None = None
) -> None:
    """Append an event; never raises (Redis down must not fail a state change)."""
    r = client or redisconn.client()
    key = stream_key(job_id)
    try:
        with r.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"type": type_, "data": json.dumps(data)}, maxlen=STREAM_MAXLEN)
            pipe.expire(key, STREAM_TTL_S)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("event %s for %s not published: %s", type_, job_id, exc)


def publish_status(job_id: str, status: str, extra: dict[str, Any] | None = None) -> None:
    """A status change; a terminal one is followed by `done`, which ends SSE streams."""
    publish(job_id, "status", {"status": status, **(extra or {})})
    if status in TERMINAL:
        publish(job_id, "done", {"status": status})


def last_id(job_id: str, client: redis.Redis | None = None) -> str:
    r = client or redisconn.client()
    entries = cast(list[Any], r.xrevrange(stream_key(job_id), count=1))
    return entries[0][0] if entries else "0-0"


def _decode(entries: list[Any]) -> list[Event]:
    out = []
    for event_id, fields in entries:
        try:
            data = json.loads(fields.get("data") or "{}")
        except ValueError:
            data = {}
        out.append(Event(event_id, fields.get("type", "message"), data))
    return out


def history(job_id: str, after: str = "-", client: redis.Redis | None = None) -> list[Event]:
    r = client or redisconn.client()
    start = "-" if after in ("-", "0-0", "") else f"({after}"
    return _decode(cast(list[Any], r.xrange(stream_key(job_id), min=start)))


def wait(job_id: str, after: str, block_s: float) -> list[Event]:
    """Block until an event newer than `after` arrives, or block_s passes."""
    r = redisconn.blocking_client()
    res: Any = r.xread({stream_key(job_id): after}, block=max(1, int(block_s * 1000)), count=500)
    if not res:
        return []
    return _decode(res[0][1])
