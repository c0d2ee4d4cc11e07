"""spool.sweep (Celery beat): the safety net that makes Redis disposable.

Each pass, in PostgreSQL's terms:
- queued jobs past their ttl → expired;
- running jobs past timeout_s → failed (timeout), even if their worker hangs;
- running jobs whose lease expired (worker died) → queued again and re-sent, or
  failed with worker_lost once attempts are used up; canceling ones → canceled;
- queues with fewer tokens in Redis than jobs waiting (Redis flushed or restarted
  empty, a publish failed, a killed worker's reserved message) → topped up.
A surplus token is harmless: the claim is a conditional UPDATE that finds nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from sqlalchemy import text

from spool import db, dispatch, events, lifecycle, metrics, redisconn, settings
from spool.states import Status
from workers import webhooks as webhook_tasks
from workers.app import app

log = logging.getLogger("spool.sweeper")

LOCK_KEY = "spool:sweep-lock"
CHUNK = 5000
TIMEOUT_GRACE_S = 10
RETIRE_CHUNK = 1000
RETURNING = "RETURNING id, kind, model, webhook, webhook_events, batch_id"


def _publish_all(rows: list[Any], status: str) -> None:
    for r in rows:
        events.publish_status(r.id, status)
        metrics.observe_job_finished(r.kind, r.model, status, None)
        if status == Status.EXPIRED:
            metrics.JOBS_EXPIRED.labels(r.model).inc()


def _terminal_updates(s) -> dict[str, int]:
    counts: dict[str, int] = {}
    expired = s.execute(
        text(
            "UPDATE jobs SET status = 'expired', finished_at = now(), updated_at = now(), "
            'error = \'{"code": "expired", "message": "ttl_s ran out before the job started"}\' '
            "WHERE status = 'queued' AND expires_at < now() " + RETURNING
        )
    ).all()
    _publish_all(expired, Status.EXPIRED)
    timed_out = s.execute(
        text(
            "UPDATE jobs SET status = 'failed', finished_at = now(), updated_at = now(), "
            "lease_expires_at = NULL, error = jsonb_build_object('code', 'timeout', 'message', "
            "'job ran past its timeout of ' || timeout_s || ' s') "
            "WHERE status IN ('running', 'canceling') "
            "AND started_at + make_interval(secs => timeout_s + :grace) < now() " + RETURNING
        ),
        {"grace": TIMEOUT_GRACE_S},
    ).all()
    _publish_all(timed_out, Status.FAILED)
    canceled = s.execute(
        text(
            "UPDATE jobs SET status = 'canceled', finished_at = now(), updated_at = now(), "
            'lease_expires_at = NULL, error = \'{"code": "canceled", "message": "canceled"}\' '
            "WHERE status = 'canceling' AND lease_expires_at < now() " + RETURNING
        )
    ).all()
    _publish_all(canceled, Status.CANCELED)
    lost = s.execute(
        text(
            "UPDATE jobs SET status = 'failed', finished_at = now(), updated_at = now(), "
            "lease_expires_at = NULL, error = jsonb_build_object('code', 'worker_lost', 'message', "
            "'the worker died ' || attempts || ' times while running this job') "
            "WHERE status = 'running' AND lease_expires_at < now() AND attempts >= max_attempts "
            + RETURNING
        )
    ).all()
    _publish_all(lost, Status.FAILED)
    # Webhooks and batch ends of these terminal changes, in their transaction.
    lifecycle.jobs_finished(s, expired + timed_out + canceled + lost)
    counts.update(
        expired=len(expired),
        timed_out=len(timed_out),
        canceled=len(canceled),
        worker_lost=len(lost),
    )
    return counts


def _requeue_lost_workers(s) -> list[dispatch.Message]:
    rows = s.execute(
        text(
            "UPDATE jobs SET status = 'queued', lease_token = NULL, lease_expires_at = NULL, "
            "worker = NULL, sent_at = now(), updated_at = now() "
            "WHERE status = 'running' AND lease_expires_at < now() AND attempts < max_attempts "
            "RETURNING id, queue, priority_rank, model"
        )
    ).all()
    for r in rows:
        events.publish_status(r.id, Status.QUEUED, {"reason": "worker_lost"})
        metrics.JOB_RETRIES.labels(r.model, "worker_lost").inc()
    return [dispatch.Message(r.id, r.queue, r.priority_rank) for r in rows]


def _top_up(s, r: redis.Redis) -> list[dispatch.Message]:
    """Tokens for queues that have fewer waiting in Redis than jobs waiting in PostgreSQL.

    Only jobs queued longer than the grace period count, so tokens still on their way
    are not doubled. Tokens reserved by busy workers are not in Redis: counting them
    as missing over-supplies by at most the workers' slots, and a surplus is a no-op.
    """
    grace = settings.get().resend_grace_s
    rows = s.execute(
        text(
            "SELECT queue, model, count(*) AS n, min(priority_rank) AS best FROM jobs "
            "WHERE status = 'queued' AND sent_at < now() - make_interval(secs => :grace) "
            "GROUP BY queue, model"
        ),
        {"grace": grace},
    ).all()
    out: list[dispatch.Message] = []
    for row in rows:
        missing = min(row.n - dispatch.queue_length(r, row.queue), CHUNK)
        if missing > 0:
            out += [dispatch.Message("sweeper", row.queue, row.best)] * missing
            metrics.JOB_RETRIES.labels(row.model, "lost_message").inc(missing)
    return out


def _retire_outputs() -> int:
    """Past SPOOL_RESULT_RETENTION_S: delete a job's artifacts and mark its output expired.

    The row stays (the record of the job); its output becomes {"expired": true}. The
    artifacts go first, so a crash in between leaves a job to retire again, never a
    live output pointing at deleted files.
    """
    from spool.artifacts import ArtifactStore

    with db.session() as s:
        ids = list(
            s.scalars(
                text(
                    "SELECT id FROM jobs WHERE finished_at < now() - make_interval(secs => :keep) "
                    "AND output IS NOT NULL AND NOT (output ? 'expired') LIMIT :n"
                ),
                {"keep": settings.get().result_retention_s, "n": RETIRE_CHUNK},
            )
        )
    if not ids:
        return 0
    store = ArtifactStore.default()
    for job_id in ids:
        store.delete_job(job_id)
    with db.transaction() as s:
        s.execute(
            text(
                "UPDATE jobs SET output = jsonb_build_object('expired', true, 'expired_at', now()) "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        )
    return len(ids)


def sweep_once() -> dict[str, int]:
    r = redisconn.client()
    with db.transaction() as s:
        counts = _terminal_updates(s)
        requeued = _requeue_lost_workers(s)
    with db.session() as s:
        topped = _top_up(s, r)
    sent = dispatch.send(requeued + topped)
    counts.update(requeued=len(requeued), topped_up=len(topped), sent=sent)
    counts.update(webhook_tasks.sweep())  # lost webhook wake-ups, missed batch ends
    with db.transaction() as s:
        s.execute(
            text("DELETE FROM idempotency_keys WHERE created_at < now() - interval '24 hours'")
        )
    counts["retired"] = _retire_outputs()
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
