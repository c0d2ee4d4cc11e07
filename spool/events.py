"""Job events through Redis: one stream per job (`spool:ev:<job_id>`).

A stream gives every event an id (SSE `id:` and `Last-Event-ID` resume for free)
and XREAD BLOCK wakes a waiting request within milliseconds of an event, with no
sleep loop. Events are a convenience: PostgreSQL holds the state, so a lost
stream (Redis flushed) only costs the intermediate progress.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.commands.core import Script

from spool import redisconn
from spool.states import TERMINAL

log = logging.getLogger(__name__)

STREAM_MAXLEN = 5000
STREAM_TTL_S = 24 * 3600


def stream_key(job_id: str) -> str:
    return f"spool:ev:{job_id}"


def end_key(job_id: str) -> str:
    return f"spool:end:{job_id}"


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    data: dict[str, Any]


def publish_many(items: Iterable[tuple[str, str, dict[str, Any]]]) -> None:
    """Append many (job_id, type, data) events in one round trip, in order; never raises.

    A status event sets its stream's expiry; progress and tokens come between a job's
    status events, so they do not set it again.
    """
    batch = list(items)
    if not batch:
        return
    try:
        with redisconn.client().pipeline(transaction=False) as pipe:
            for job_id, type_, data in batch:
                _append(pipe, job_id, type_, data)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("%d events not published: %s", len(batch), exc)


def _append(pipe: Any, job_id: str, type_: str, data: dict[str, Any]) -> None:
    key = stream_key(job_id)
    pipe.xadd(key, {"type": type_, "data": json.dumps(data)}, maxlen=STREAM_MAXLEN)
    if type_ == "status":
        pipe.expire(key, STREAM_TTL_S)


# A job's end in one command: `_append` for each of its last events and `done`, then
# `_mark_ended`: the same writes as a pipeline of them, for about half the client's CPU
# (a worker publishes one per job; BENCHMARKS.md, 2026-12-04 night).
# KEYS: the end stream, then the stream of each event in turn.
# ARGV: the streams' MAXLEN, the TTL (s), the status, its result ('' for none), then a
# (type, data) pair per event.
_END_LUA = b"""
for i = 5, #ARGV, 2 do
  local stream = KEYS[(i - 1) / 2]
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[1], '*', 'type', ARGV[i], 'data', ARGV[i + 1])
  if ARGV[i] == 'status' then
    redis.call('EXPIRE', stream, ARGV[2])
  end
end
if ARGV[4] == '' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', 1, '*', 'status', ARGV[3])
else
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', 1, '*', 'status', ARGV[3], 'result', ARGV[4])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
# Loaded on first use (and again after a Redis restart) by redis-py's Script.
_END = Script(cast(Any, None), _END_LUA)


def publish_status(
    job_id: str,
    status: str,
    extra: dict[str, Any] | None = None,
    result: str | None = None,
    before: Iterable[tuple[str, str, dict[str, Any]]] = (),
) -> None:
    """A status change; a terminal one is followed by `done`, which ends SSE streams.

    `result`: the JSON of the job's committed `{"output", "error"}`, given only by a
    writer whose change has committed; a long poll then answers from it (see `Ended`).
    `before`: (job_id, type, data) events to publish first, in the same round trip."""
    now = (job_id, "status", {"status": status, **(extra or {})})
    if status not in TERMINAL:
        publish_many([*before, now])
        return
    keys = [end_key(job_id)]
    args: list[Any] = [STREAM_MAXLEN, STREAM_TTL_S, status, result or ""]
    for ev_job, type_, data in [*before, now, (job_id, "done", {"status": status})]:
        keys.append(stream_key(ev_job))
        args += (type_, json.dumps(data))
    r = redisconn.client()
    try:
        # Every job's end: packed here and sent as is; the script's own call loads a
        # flushed script again and reconnects.
        packed = redisconn.packer(r)("EVALSHA", _END.sha, len(keys), *keys, *args)
        redisconn.send_packed(r, packed, lambda: _END(keys=keys, args=args, client=r))
    except redis.RedisError as exc:
        log.warning("event %s for %s not published: %s", status, job_id, exc)


def _mark_ended(pipe: Any, job_id: str, status: str, result: str | None = None) -> None:
    # A stream of its own that only a terminal status writes: long polls block on it and
    # wake once, not on each of a text job's progress and token events.
    fields = {"status": status} if result is None else {"status": status, "result": result}
    pipe.xadd(end_key(job_id), fields, maxlen=1)
    pipe.expire(end_key(job_id), STREAM_TTL_S)


def publish_status_many(changes: Iterable[tuple[str, str]], chunk: int = 1000) -> None:
    """publish_status for many (job_id, status) pairs, pipelined (a batch cancel)."""
    r = redisconn.client()
    items = list(changes)
    try:
        for start in range(0, len(items), chunk):
            with r.pipeline(transaction=False) as pipe:
                for job_id, status in items[start : start + chunk]:
                    key = stream_key(job_id)
                    types = ("status", "done") if status in TERMINAL else ("status",)
                    for type_ in types:
                        data = json.dumps({"status": status})
                        pipe.xadd(key, {"type": type_, "data": data}, maxlen=STREAM_MAXLEN)
                    pipe.expire(key, STREAM_TTL_S)
                    if status in TERMINAL:
                        _mark_ended(pipe, job_id, status)
                pipe.execute()
    except redis.RedisError as exc:
        log.warning("status events of %d jobs not all published: %s", len(items), exc)


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
    return _decode(_read_entries(res))


def _read_entries(res: Any) -> list[tuple[str, dict[str, str]]]:
    """The entries of a one-stream XREAD reply, each (id, fields): as redis-py parses it
    or raw, over RESP2 (a list of [stream, entries]) or RESP3 (a map of stream to
    entries); raw fields come as a flat list."""
    if not res:
        return []
    entries = next(iter(res.values())) if isinstance(res, dict) else res[0][1]
    if entries and isinstance(entries[0], list) and entries[0] and isinstance(entries[0][0], tuple):
        entries = entries[0]  # redis-py's RESP3 parse nests them one level deeper
    return [
        (entry_id, dict(zip(f[::2], f[1::2], strict=True)) if isinstance(f, list) else f)
        for entry_id, f in entries
    ]


@dataclass(frozen=True)
class Ended:
    """A job's end, as announced. `output`/`error` are set only when the announcer had
    committed the end first and sent the stored result along (a worker's finish): then
    they are exactly what PostgreSQL holds. The sweeper announces just before its
    commit, without them: a reader must re-read the row."""

    status: str
    committed: bool = False
    output: Any = None
    error: Any = None
    # The job's other fields as the end left them (progress, attempts, started_at and
    # finished_at as API.md shows them); None from an announcer that did not send them.
    changed: dict[str, Any] | None = None


def wait_end(job_id: str, block_s: float) -> Ended | None:
    """Block until the job has ended (at once if it already had), or block_s passes."""
    r = redisconn.blocking_client()
    key, block_ms = end_key(job_id), max(1, int(block_s * 1000))
    # Every long poll sends this: packed here and sent as is; redis-py's own XREAD
    # reconnects and retries.
    packed = redisconn.packer(r)("XREAD", "BLOCK", block_ms, "COUNT", 1, "STREAMS", key, "0-0")
    res = redisconn.send_packed(r, packed, lambda: r.xread({key: "0-0"}, block=block_ms, count=1))
    entries = _read_entries(res)
    if not entries:
        return None
    fields = entries[0][1]
    if "result" not in fields:
        return Ended(fields.get("status", ""))
    stored = json.loads(fields["result"])
    output, error = stored.pop("output", None), stored.pop("error", None)
    return Ended(fields["status"], True, output, error, stored if "finished_at" in stored else None)
