"""Batches: live counts, completion and cancel, shared by the API and the workers.

A batch ends when its last job does. That is noticed in the transaction of that
job's last status change (`finish_if_done`), which is also where its
`batch.completed` delivery is created; the sweeper repeats the check for open
batches as a safety net.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from spool import events, jobs, redisconn, serialize, settings, webhooks
from spool.models import Batch

log = logging.getLogger(__name__)

UNFINISHED = ("queued", "running", "canceling")

COUNTS_SQL = text("SELECT status, count(*) AS n FROM jobs WHERE batch_id = :b GROUP BY status")

# Each job end of a batch takes the batch row's lock before asking whether any job is
# left: two last jobs ending at once then see each other's commit, and the batch is
# completed exactly once. The question is an index probe (ix_jobs_batch_unfinished).
LOCK_SQL = text(
    "SELECT id FROM batches WHERE id = ANY(:ids) AND finished_at IS NULL "
    "ORDER BY id FOR NO KEY UPDATE"
)
FINISH_SQL = text(
    """
    UPDATE batches b SET finished_at = now(),
        status = CASE WHEN b.status = 'canceled' THEN 'canceled' ELSE 'completed' END
    WHERE b.id = ANY(:ids) AND b.finished_at IS NULL AND NOT EXISTS (
        SELECT 1 FROM jobs j
        WHERE j.batch_id = b.id AND j.status IN ('queued', 'running', 'canceling'))
    RETURNING b.id
    """
)


def counts_by_status(s: Session, batch_id: str) -> dict[str, int]:
    return {row.status: row.n for row in s.execute(COUNTS_SQL, {"b": batch_id})}


def to_object(s: Session, b: Batch, base: str = "") -> dict[str, Any]:
    """The batch object of API.md with live counts (one GROUP BY over its jobs)."""
    return serialize.batch(b, counts_by_status(s, b.id), base)


def finish_if_done(s: Session, batch_ids: Iterable[str | None]) -> list[str]:
    """Mark the batches whose jobs have all ended; create their batch.completed deliveries."""
    ids = sorted({b for b in batch_ids if b})
    if not ids:
        return []
    if not s.execute(LOCK_SQL, {"ids": ids}).first():
        return []
    done = list(s.scalars(FINISH_SQL, {"ids": ids}))
    if not done:
        return done
    base = settings.get().base_url
    finished = s.scalars(
        select(Batch).where(Batch.id.in_(done)).execution_options(populate_existing=True)
    )
    for b in finished:
        if b.webhook:
            webhooks.add(
                s,
                user_id=b.user_id,
                url=b.webhook,
                event_type=webhooks.BATCH_COMPLETED,
                payload=to_object(s, b, base),
                batch_id=b.id,
            )
    return done


def visible(s: Session, batch_id: str, user_id: str, is_admin: bool = False) -> Batch | None:
    """The batch if this user may see it; another user's is indistinguishable from none."""
    b = s.get(Batch, batch_id)
    if b is None or (b.user_id != user_id and not is_admin):
        return None
    return b


CANCEL_JOBS_SQL = text(
    """
    UPDATE jobs SET status = CASE WHEN status = 'queued' THEN 'canceled' ELSE 'canceling' END,
        finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END,
        updated_at = now()
    WHERE batch_id = :b AND status IN ('queued', 'running')
    RETURNING id, status, kind, model, webhook, webhook_events, batch_id
    """
)


def cancel(s: Session, b: Batch) -> Sequence[Any]:
    """Every unfinished job: queued → canceled, running → canceling; the batch → canceled.

    Jobs are updated before the batch row is locked, the order a worker's job end
    takes too, so the two never deadlock. Returns the changed jobs (id, status, …):
    the caller raises the cancel flag of the canceling ones after the commit.
    """
    from spool import lifecycle  # imports this module

    changed = s.execute(CANCEL_JOBS_SQL, {"b": b.id}).all()
    s.execute(
        text(
            "UPDATE batches SET status = 'canceled', canceled_at = now() "
            "WHERE id = :b AND status NOT IN ('completed', 'canceled')"
        ),
        {"b": b.id},
    )
    lifecycle.jobs_finished(s, [c for c in changed if c.status == "canceled"])
    finish_if_done(s, [b.id])  # no job was running: the batch ends now
    s.refresh(b)
    return changed


def announce_cancel(changed: Sequence[Any]) -> None:
    """After the commit of `cancel`: raise the cancel flag of the running jobs (checked
    at every step) and tell the listeners, all pipelined; never raises."""
    running = [c.id for c in changed if c.status == "canceling"]
    try:
        with redisconn.client().pipeline(transaction=False) as pipe:
            for job_id in running:
                pipe.set(jobs.CANCEL_KEY.format(job_id), "1", ex=jobs.CANCEL_TTL_S)
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("cancel flags of %d jobs not set: %s", len(running), exc)
    events.publish_status_many((c.id, c.status) for c in changed)
