"""A job's end, published in one script call (spool.events.publish_status), writes what
the pipeline of its commands wrote: the same events in order, expiries and end record."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis

from spool import events


def _by_pipeline(
    r: redis.Redis, job_id: str, status: str, result: str | None, before: list
) -> None:
    with r.pipeline(transaction=False) as pipe:
        for ev in [
            *before,
            (job_id, "status", {"status": status}),
            (job_id, "done", {"status": status}),
        ]:
            events._append(pipe, *ev)
        events._mark_ended(pipe, job_id, status, result)
        pipe.execute()


def _written(r: redis.Redis, job_id: str) -> dict[str, Any]:
    stream, end = events.stream_key(job_id), events.end_key(job_id)
    return {
        "events": [fields for _, fields in r.xrange(stream)],
        "end": [fields for _, fields in r.xrange(end)],
        "ttl": (r.ttl(stream), r.ttl(end)),
    }


def test_one_call_writes_what_the_pipeline_wrote(redis_client: redis.Redis) -> None:
    result = json.dumps({"output": {"text": "é"}, "error": None})
    for status, res in (("succeeded", result), ("failed", None)):
        ours, theirs = f"job_{uuid.uuid4().hex}", f"job_{uuid.uuid4().hex}"
        progress = {"current": 1, "total": 2}
        events.publish_status(ours, status, None, res, [(ours, "progress", progress)])
        _by_pipeline(redis_client, theirs, status, res, [(theirs, "progress", progress)])
        assert _written(redis_client, ours) == _written(redis_client, theirs)
        assert [e["type"] for e in _written(redis_client, ours)["events"]] == [
            "progress",
            "status",
            "done",
        ]
        assert events.history(ours)[-1].type == "done"


def test_another_jobs_events_still_go_out_first(redis_client: redis.Redis) -> None:
    job, other = f"job_{uuid.uuid4().hex}", f"job_{uuid.uuid4().hex}"
    events.publish_status(job, "succeeded", before=[(other, "token", {"text": "x"})])
    assert [e.type for e in events.history(other)] == ["token"]
    assert [e.type for e in events.history(job)] == ["status", "done"]


def test_after_a_script_flush_the_script_is_loaded_again(redis_client: redis.Redis) -> None:
    redis_client.script_flush()
    job = f"job_{uuid.uuid4().hex}"
    events.publish_status(job, "canceled")
    assert [e.type for e in events.history(job)] == ["status", "done"]


def test_another_jobs_events_are_written_as_the_pipeline_wrote_them(
    redis_client: redis.Redis,
) -> None:
    job, other = f"job_{uuid.uuid4().hex}", f"job_{uuid.uuid4().hex}"
    twin, twin_other = f"job_{uuid.uuid4().hex}", f"job_{uuid.uuid4().hex}"
    token = {"text": "x"}
    events.publish_status(job, "succeeded", before=[(other, "token", token)])
    _by_pipeline(redis_client, twin, "succeeded", None, [(twin_other, "token", token)])
    assert _written(redis_client, job) == _written(redis_client, twin)
    # a token event sets no expiry on its stream, in either way
    assert _written(redis_client, other) == _written(redis_client, twin_other)
    assert _written(redis_client, other)["ttl"][0] == -1


def _ended_by_redis_py(r: redis.Redis, job_id: str) -> events.Ended | None:
    """wait_end as redis-py's own XREAD (its parsed reply) reads the end."""
    res: Any = r.xread({events.end_key(job_id): "0-0"}, block=1, count=1)
    if not res:
        return None
    fields = res[0][1][0][1]
    stored = json.loads(fields["result"]) if "result" in fields else None
    if stored is None:
        return events.Ended(fields["status"])
    out, err = stored.pop("output"), stored.pop("error")
    return events.Ended(fields["status"], True, out, err, stored)


def test_a_long_polls_xread_reads_what_redis_pys_reads(redis_client: redis.Redis) -> None:
    """wait_end sends its XREAD packed and reads the raw reply: the same end as redis-py's
    parsed XREAD gives, for a worker's end (with its result) and a sweeper's (without)."""
    result = {"output": {"text": "é"}, "error": None, "progress": None, "attempts": 1}
    result |= {"started_at": "2026-12-04T00:00:00Z", "finished_at": "2026-12-04T00:00:01Z"}
    for status, res in (("succeeded", json.dumps(result)), ("canceled", None)):
        job_id = f"job_{uuid.uuid4().hex[:12]}"
        assert events.wait_end(job_id, 0.01) is None  # nothing yet: the block times out
        events.publish_status(job_id, status, result=res)
        got = events.wait_end(job_id, 1.0)
        assert got is not None and got == _ended_by_redis_py(redis_client, job_id)
        assert got.committed == (res is not None)


def test_a_long_poll_survives_dropped_connections(redis_client: redis.Redis) -> None:
    """The packed XREAD on a connection Redis dropped goes again through redis-py's own,
    which reconnects; the pool keeps no dead socket."""
    from spool import redisconn

    job_id = f"job_{uuid.uuid4().hex[:12]}"
    events.publish_status(job_id, "failed")
    assert events.wait_end(job_id, 1.0) == events.Ended("failed")
    pool = redisconn.blocking_client().connection_pool
    for conn in pool._available_connections:
        conn._sock.close()  # as a Redis restart leaves them
    assert events.wait_end(job_id, 1.0) == events.Ended("failed")
    assert all(c._sock is not None and c._sock.fileno() != -1 for c in pool._available_connections)


@pytest.mark.parametrize("protocol", [2, 3])
def test_long_polls_and_streams_read_either_protocol(
    redis_client: redis.Redis, monkeypatch: Any, protocol: int
) -> None:
    """A REDIS_URL may ask for RESP3 (`?protocol=3`), whose XREAD replies are maps: the
    end of a long poll and the events of a stream read the same either way."""
    from spool import redisconn

    client = redisconn.make_client(f"{_url(redis_client)}?protocol={protocol}")
    monkeypatch.setattr(redisconn, "blocking_client", lambda: client)
    job_id = f"job_{uuid.uuid4().hex[:12]}"
    events.publish_status(job_id, "succeeded", result=json.dumps({"output": 1, "error": None}))
    assert events.wait_end(job_id, 1.0) == events.Ended("succeeded", True, 1, None, None)
    got = events.wait(job_id, "0-0", 1.0)
    assert [(e.type, e.data) for e in got] == [
        ("status", {"status": "succeeded"}),
        ("done", {"status": "succeeded"}),
    ]


def _url(r: redis.Redis) -> str:
    kw = r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"
