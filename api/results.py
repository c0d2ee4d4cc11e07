"""Results and live events: GET /result/<id>, /v1/jobs/<id>/result, /v1/jobs/<id>/events."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis
from flask import Response, stream_with_context
from flask_jwt_extended import jwt_required

from api import dbsession, errors, serialize
from api.auth import key_checked_in_query
from api.jobs import blp as jobs_blp
from api.jobs import load_visible, read_limited, wait_for_result
from api.parsing import Blueprint
from api.schemas import ResultSchema, WaitQuerySchema
from spool import db, events, jobs
from spool.states import Status, is_terminal

blp = Blueprint("results", __name__, description="Results")

KEEPALIVE_S = 15.0


def result_response(job_id: str, wait_s: float) -> Response:
    job = load_visible(job_id, result_only=True)
    if wait_s:
        ended = wait_for_result(job, wait_s)
        if isinstance(ended, events.Ended):  # the worker's committed result, as stored
            return _ended(job.id, ended.status, ended.output, ended.error)
        job = ended
    if is_terminal(job.status):
        return _ended(job.id, job.status, job.output, job.error)
    retry_after = "1" if job.status != Status.QUEUED else "2"
    return serialize.json_response(
        {"id": job.id, "status": job.status, "progress": serialize.progress(job.progress)},
        202,
        {"Retry-After": retry_after},
    )


def _ended(job_id: str, status: str, output: Any, error: Any) -> Response:
    if status == Status.SUCCEEDED:
        return serialize.json_response({"id": job_id, "status": status, "output": output})
    return serialize.json_response({"id": job_id, "status": status, "error": error}, 409)


@blp.route("/result/<job_id>")
@jwt_required()
@read_limited
@blp.arguments(WaitQuerySchema(), location="query")
@blp.response(200, ResultSchema)
@blp.alt_response(202, schema=ResultSchema, description="queued or running")
@blp.alt_response(409, schema=ResultSchema, description="failed, canceled or expired")
@key_checked_in_query
def result(q: dict[str, Any], job_id: str):
    """The job's result: 202 while running, 200 when done, 409 if it failed (`?wait=N`)."""
    return result_response(job_id, q["wait"])


@jobs_blp.route("/<job_id>/result")
@jwt_required()
@read_limited
@jobs_blp.arguments(WaitQuerySchema(), location="query")
@jobs_blp.response(200, ResultSchema)
@jobs_blp.alt_response(202, schema=ResultSchema, description="queued or running")
@jobs_blp.alt_response(409, schema=ResultSchema, description="failed, canceled or expired")
@key_checked_in_query
def job_result(q: dict[str, Any], job_id: str):
    """The job's result (same as /result/<id>)."""
    return result_response(job_id, q["wait"])


def _sse(event_id: str, type_: str, data: Any) -> str:
    return f"id: {event_id}\nevent: {type_}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _current(job_id: str) -> dict[str, Any]:
    # A short connection of its own (autocommit: one round trip, no Session): a stream
    # must not hold a connection while it waits.
    with db.autocommit_engine().connect() as conn:
        row = jobs.view_row(conn, job_id)
        assert row is not None
        return serialize.job(row, row.queue_position)


def _stream(job_id: str, last_event_id: str | None) -> Iterator[str]:
    try:
        head = events.last_id(job_id)
    except redis.RedisError:
        head = None
    if last_event_id:
        after = last_event_id
        backlog = events.history(job_id, after) if head else []
    else:
        # A late client first gets the current state, then what comes next.
        state = _current(job_id)
        yield _sse(head or "0-0", "status", state)
        if is_terminal(state["status"]):
            yield _sse(head or "0-0", "done", {"status": state["status"]})
            return
        after, backlog = head or "0-0", []
    while True:
        for ev in backlog:
            yield _sse(ev.id, ev.type, ev.data)
            after = ev.id
            if ev.type == "done":
                return
        try:
            if head is None:
                time.sleep(1.0)  # Redis down: degrade to a slow re-check of PostgreSQL
                backlog = []
            else:
                backlog = events.wait(job_id, after, KEEPALIVE_S)
        except redis.RedisError:
            backlog, head = [], None
        if not backlog:
            state = _current(job_id)  # events may be gone (Redis flushed): trust PostgreSQL
            if is_terminal(state["status"]):
                yield _sse(after, "status", state)
                yield _sse(after, "done", {"status": state["status"]})
                return
            yield ": keep-alive\n\n"


@jobs_blp.route("/<job_id>/events")
@jwt_required()
@read_limited
@jobs_blp.response(200, description="text/event-stream: status, progress, token, done")
def job_events(job_id: str):
    """Stream the job's events (SSE); resumes after `Last-Event-ID`."""
    from flask import request

    load_visible(job_id)
    dbsession.release()
    last = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    resp = Response(stream_with_context(_stream(job_id, last)), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return resp


__all__ = ["blp", "errors"]
