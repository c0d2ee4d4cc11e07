"""/v1/jobs: submit, read, list, cancel, retry."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from flask import current_app, request
from flask.views import MethodView
from flask_jwt_extended import jwt_required
from sqlalchemy import Row
from sqlalchemy.exc import SQLAlchemyError

from api import dbsession, errors, idempotency, pagination, ratelimit, serialize, waiting
from api.auth import claimed, key_checked_in_query, principal, verified
from api.parsing import Blueprint
from api.schemas import JobCreateSchema, JobListQuerySchema, JobPageSchema, JobSchema
from spool import dispatch, events, jobs, metrics, users
from spool.states import is_terminal

log = logging.getLogger(__name__)

blp = Blueprint("jobs", __name__, url_prefix="/v1/jobs", description="Jobs")


# Per user: submits, cancels and retries share one limit; reads another (api/ratelimit.py).
submit_limited = ratelimit.limited("submit")
read_limited = ratelimit.limited("read")


def prefer_wait() -> float:
    """`Prefer: wait=N` (RFC 7240), capped at 60 s."""
    for part in request.headers.get("Prefer", "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                return max(0.0, min(60.0, float(value)))
            except ValueError:
                return 0.0
    return 0.0


def load_visible(job_id: str, result_only: bool = False) -> Row:
    """The job as its owner (or an admin) sees it, on the request's session; else 404.
    In a `key_checked_in_query` view, the same query checks the token's key.
    `result_only`: only what GET /result shows (spool.jobs.view_row)."""
    conn = dbsession.connection()
    token = claimed()
    if token is not None:
        found, row = jobs.visible_row_for_key(conn, job_id, token.key_id, result_only)
        verified(found)
    else:
        p = principal()
        row = jobs.visible_row(conn, job_id, p.user_id, p.is_admin, result_only)
    if row is None:
        raise errors.not_found("job")
    return row


def job_response(job_id: str) -> dict[str, Any]:
    row = load_visible(job_id)
    return serialize.job(row, row.queue_position)


def wait_for_result(row: Row, wait_s: float) -> Row | events.Ended:
    """Long-poll for a caller that needs only the status, output and error: the job
    once it has ended, or as it is after wait_s; an end announced with its committed
    result (a worker's finish) is returned as it is, without reading the row again.
    `row` and the rows it re-reads hold what GET /result shows (`result_only`)."""
    return _wait(row, wait_s, lambda e: True, result_only=True)


def ended_view(body: dict[str, Any], ended: events.Ended) -> dict[str, Any]:
    """The job `body` (as submitted) with what its committed end changed: the same
    object a read of the finished row shows."""
    assert ended.changed is not None
    changed = ended.changed
    return {
        **body,
        "status": ended.status,
        "output": ended.output,
        "error": ended.error,
        "progress": serialize.progress(changed["progress"]),
        "queue_position": None,
        "attempts": changed["attempts"],
        "started_at": changed["started_at"],
        "finished_at": changed["finished_at"],
    }


def _wait(
    row: Row, wait_s: float, enough: Callable[[events.Ended], bool], result_only: bool = False
) -> Row | events.Ended:
    """The job once it has ended, or as it is after wait_s; or its end as announced
    with the committed result when that is `enough` for the caller.

    The request's connection goes back to the pool while it waits (a parked greenlet
    holds nothing), and the row is read again only when the job's end is announced or
    at the periodic re-check.
    """
    deadline = time.monotonic() + wait_s
    announced = False
    while not is_terminal(row.status):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        dbsession.release()
        ended = waiting.wait_end(row.id, left, announced)
        if ended is not None and ended.committed and enough(ended):
            return ended
        announced = ended is not None
        row = load_visible(row.id, result_only)
    return row


def _too_many_queued(cap: int) -> errors.ApiError:
    return errors.ApiError(
        429,
        f"you have {cap} queued jobs, the most allowed; wait for some to finish",
        "too_many_queued",
        headers={"Retry-After": "10"},
    )


def _create_idempotently(
    req: dict[str, Any], key: str | None, cap: int
) -> tuple[dict[str, Any], dict[str, Any], Row] | str:
    """The job's body, its row and its view; or the id of the job the Idempotency-Key
    already made."""
    p = principal()
    if key is not None:
        existing = idempotency.claim(
            p.user_id, key, idempotency.request_hash(request.path, request.get_data()), "job"
        )
        if existing:
            return existing
    try:
        # Without an Idempotency-Key the INSERT is the only write: it commits on its own.
        with dbsession.transaction(atomic=key is not None) as s:
            if jobs.queued_count(s, p.user_id) >= cap:
                raise _too_many_queued(cap)
            row = jobs.new_row(p.user_id, req)
            job = jobs.insert_one(s, row)
            if key is not None:
                idempotency.complete(s, p.user_id, key, row["id"])
            # Built before the commit: once committed, nothing may turn this into an error
            # (a client told 503 "nothing accepted" would retry and run the job twice).
            body = serialize.job(job, job.queue_position)
    except Exception:
        if key is not None:
            idempotency.release(p.user_id, key)
        raise
    return body, row, job


def create(req: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Record the job (idempotently), send its message, optionally wait for it."""
    cap = current_app.config["SPOOL"].max_queued_per_user
    key = request.headers.get("Idempotency-Key")
    token = claimed() if key is None else None
    if token is not None:
        # The common submit: one INSERT that also checks the token's key and the cap,
        # and commits on its own.
        row = jobs.new_row(token.user_id, req)
        job = jobs.insert_checked(dbsession.connection(), row, token.key_id, cap)
        if job is None:
            # 401 if the key was revoked or its user deleted, else the cap refused it.
            verified(users.principal_for_key(dbsession.connection(), token.key_id))
            raise _too_many_queued(cap)
        # The INSERT found the key valid for this user; the rest of the request needs
        # only the user's id (the job is theirs, whatever their name or role).
        verified(users.Principal(token.user_id, "", False, token.key_id))
        body = serialize.job(job, job.queue_position)
    else:
        made = _create_idempotently(req, key, cap)
        if isinstance(made, str):
            return job_response(made), 202, {"Location": f"/v1/jobs/{made}"}
        body, row, job = made
    dispatch.send(jobs.messages([row]))
    metrics.JOBS_SUBMITTED.labels(row["kind"], row["model"]).inc()
    headers = {"Location": f"/v1/jobs/{row['id']}"}
    wait_s = prefer_wait()
    if wait_s:
        try:
            ended = _wait(job, wait_s, lambda e: e.changed is not None)
            if isinstance(ended, events.Ended):
                return ended_view(body, ended), 200, headers
            if is_terminal(ended.status):
                return serialize.job(ended, ended.queue_position), 200, headers
        except (SQLAlchemyError, redis.RedisError) as exc:  # accepted all the same: say so
            log.warning("Prefer: wait cut short for %s: %s", row["id"], exc)
    return body, 202, headers


@blp.route("")
class Jobs(MethodView):
    decorators = [jwt_required()]

    @submit_limited
    @blp.arguments(JobCreateSchema())
    @blp.response(202, JobSchema)
    @blp.alt_response(200, schema=JobSchema, description="finished within `Prefer: wait=N`")
    @key_checked_in_query
    def post(self, req: dict[str, Any]):
        """Submit a job."""
        return serialize.json_response(*create(req))

    @read_limited
    @blp.arguments(JobListQuerySchema(), location="query")
    @blp.response(200, JobPageSchema)
    def get(self, q: dict[str, Any]):
        """List your jobs, newest first."""
        stmt = pagination.newest_first(jobs.view_select(), jobs.JOBS.c, q, principal())
        for f in ("status", "kind", "model", "batch_id"):
            if q.get(f):
                stmt = stmt.where(jobs.JOBS.c[f] == q[f])
        rows, cursor = pagination.split(list(dbsession.get().execute(stmt)), q["limit"])
        return {"data": [serialize.job(j, j.queue_position) for j in rows], "next_cursor": cursor}


@blp.route("/<job_id>")
class JobById(MethodView):
    decorators = [jwt_required()]

    @read_limited
    @blp.response(200, JobSchema)
    @key_checked_in_query
    def get(self, job_id: str):
        """Get a job."""
        return serialize.json_response(job_response(job_id))


@blp.route("/<job_id>/cancel", methods=["POST"])
@jwt_required()
@submit_limited
@blp.response(202, JobSchema)
def cancel(job_id: str):
    """Cancel a job: queued → canceled at once, running → canceling → canceled."""
    p = principal()
    with dbsession.transaction() as s:
        job = jobs.visible(s, job_id, p.user_id, p.is_admin)
        if job is None:
            raise errors.not_found("job")
        stage = job.status
        try:
            job = jobs.cancel(s, job)
        except jobs.Conflict as exc:
            raise errors.ApiError(409, str(exc), "job_finished") from exc
    jobs.announce_cancel(job)
    if stage in ("queued", "running"):
        metrics.JOBS_CANCELED.labels(job.model, stage).inc()
        if job.status == "canceled":
            metrics.observe_job_finished(job.kind, job.model, "canceled", None)
    return job_response(job_id)


@blp.route("/<job_id>/retry", methods=["POST"])
@jwt_required()
@submit_limited
@blp.response(202, JobSchema)
def retry(job_id: str):
    """Submit a failed, canceled or expired job again as a new job."""
    job = load_visible(job_id)
    try:
        req = jobs.retry_request(job)
    except jobs.Conflict as exc:
        raise errors.ApiError(409, str(exc), "not_retryable") from exc
    return create(req)
