"""A job's end, published in one script call (spool.events.publish_status), writes what
the pipeline of its commands wrote: the same events in order, expiries and end record."""

from __future__ import annotations

import json
import uuid
from typing import Any

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
