"""spool.sweep (Celery beat): the safety net that makes Redis disposable.

Each pass, in PostgreSQL's terms:
- queued jobs past their ttl → expired;
- running jobs past timeout_s → failed (timeout), even if their worker hangs;
- running jobs whose lease expired (worker died) → queued again and re-sent, or
  failed with worker_lost once attempts are used up; canceling ones → canceled;
- queued jobs whose message is neither in Redis' sent-marker hash nor taken by a
  worker (Redis flushed or restarted empty, publish failed) → sent again.
A duplicate message is harmless: the claim is a conditional UPDATE.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from sqlalchemy import text

from spool import db, dispatch, events, metrics, redisconn, settings
from spool.states import Status
from workers.app import app

log = logging.getLogger("spool.sweeper")

LOCK_KEY = "spool:sweep-lock"
CHUNK = 5000
# A marker this old for a job still queued is presumed stale (its message lost
# while Redis kept the marker); re-sending costs at most a no-op duplicate.
STALE_MARKER_S = 3600.0
TIMEOUT_GRACE_S = 10


def _publish_all(rows: list[Any], status: str) -> None:
    for r in rows:
        events.publish_status(r.id, status)
        metrics.observe_job_finished(r.kind, r.model, status, None)
        if status == Status.EXPIRED:
            metrics.JOBS_EXPIRED.labels(r.model).inc()


def _terminal_updates(s) -> dict[str, int]:
    counts: dict[str, int] = {}
    expired = s.execute(text(
        "UPDATE jobs SET status = 'expired', finished_at = now(), updated_at = now(), "
        "error = '{\"code\": \"expired\", \"message\": \"ttl_s ran out before the job started\"}' "
        "WHERE status = 'queued' AND expires_at < now() RETURNING id, kind, model"
    )).all()
    _publish_all(expired, Status.EXPIRED)
    timed_out = s.execute(text(
        "UPDATE jobs SET status = 'failed', finished_at = now(), updated_at = now(), "
        "lease_expires_at = NULL, error = jsonb_build_object('code', 'timeout', 'message', "
        "'job ran past its timeout of ' || timeout_s || ' s') "
        "WHERE status IN ('running', 'canceling') "
        "AND started_at + make_interval(secs => timeout_s + :grace) < now() RETURNING id, kind, model"
    ), {"grace": TIMEOUT_GRACE_S}).all()
    _publish_all(timed_out, Status.FAILED)
    canceled = s.execute(text(
        "UPDATE jobs SET status = 'canceled', finished_at = now(), updated_at = now(), "
        "lease_expires_at = NULL, error = '{\"code\": \"canceled\", \"message\": \"canceled\"}' "
        "WHERE status = 'canceling' AND lease_expires_at < now() RETURNING id, kind, model"
    )).all()
    _publish_all(canceled, Status.CANCELED)
    lost = s.execute(text(
        "UPDATE jobs SET status = 'failed', finished_at = now(), updated_at = now(), "
        "lease_expires_at = NULL, error = jsonb_build_object('code', 'worker_lost', 'message', "
        "'the worker died ' || attempts || ' times while running this job') "
        "WHERE status = 'running' AND lease_expires_at < now() AND attempts >= max_attempts "
        "RETURNING id, kind, model"
    )).all()
    _publish_all(lost, Status.FAILED)
    counts.update(expired=len(expired), timed_out=len(timed_out), canceled=len(canceled),
                  worker_lost=len(lost))
    return counts


def _requeue_lost_workers(s) -> list[dispatch.Message]:
    rows = s.execute(text(
        "UPDATE jobs SET status = 'queued', lease_token = NULL, lease_expires_at = NULL, "
        "worker = NULL, sent_at = now(), updated_at = now() "
        "WHERE status = 'running' AND lease_expires_at < now() AND attempts < max_attempts "
        "RETURNING id, queue, priority_rank, timeout_s, model"
    )).all()
    for r in rows:
        events.publish_status(r.id, Status.QUEUED, {"reason": "worker_lost"})
        metrics.JOB_RETRIES.labels(r.model, "worker_lost").inc()
    return [dispatch.Message(r.id, r.queue, r.priority_rank, r.timeout_s) for r in rows]


def _unsent(s, r: redis.Redis) -> list[dispatch.Message]:
    """Queued jobs whose message is gone from Redis (or was never sent)."""
    grace = settings.get().resend_grace_s
    rows = s.execute(text(
        "SELECT id, queue, priority_rank, timeout_s, model FROM jobs "
        "WHERE status = 'queued' AND sent_at < now() - make_interval(secs => :grace) "
        "ORDER BY sent_at LIMIT :n"
    ), {"grace": grace, "n": CHUNK}).all()
    if not rows:
        return []
    markers = r.hmget(dispatch.SENT_KEY, [row.id for row in rows])
    now = time.time()
    out = []
    for row, mark in zip(rows, markers, strict=True):
        if mark is None or now - float(mark) > STALE_MARKER_S:
            out.append(dispatch.Message(row.id, row.queue, row.priority_rank, row.timeout_s))
            metrics.JOB_RETRIES.labels(row.model, "lost_message").inc()
    return out


def sweep_once() -> dict[str, int]:
    r = redisconn.client()
    with db.transaction() as s:
        counts = _terminal_updates(s)
        requeued = _requeue_lost_workers(s)
    with db.transaction() as s:
        unsent = _unsent(s, r)
        if unsent:
            s.execute(text("UPDATE jobs SET sent_at = now() WHERE id = ANY(:ids)"),
                      {"ids": [m.job_id for m in unsent]})
    sent = dispatch.send(requeued + unsent)
    counts.update(requeued=len(requeued), resent=len(unsent), sent=len(sent))
    with db.transaction() as s:
        s.execute(text("DELETE FROM idempotency_keys WHERE created_at < now() - interval '24 hours'"))
    if any(counts.values()):
        log.info("sweep: %s", counts)
    return counts


@app.task(name="spool.sweep", ignore_result=True)
def sweep() -> dict[str, int] | None:
    r = redisconn.client()
    interval = settings.get().sweep_interval_s
    token = str(time.time())
    # One sweeper at a time, even with two beats or a slow pass.
    if not r.set(LOCK_KEY, token, nx=True, ex=max(5, int(interval * 6))):
        return None
    try:
        return sweep_once()
    finally:
        if r.get(LOCK_KEY) == token:
            r.delete(LOCK_KEY)
