"""Webhook deliveries as rows: created in the transaction of the change they announce.

A delivery row (`webhook_deliveries`) is the promise to deliver; the Celery message
`spool.deliver_webhook(delivery_id)` is only a wake-up, sent after the commit. A
wake-up lost with Redis or with a killed worker is made up by the sweeper, which
sends every pending delivery that is due and was not woken recently
(workers/webhooks.py). The delivery task itself lives in workers/webhooks.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import redis
from kombu.exceptions import KombuError
from sqlalchemy import event, insert, select, text
from sqlalchemy.orm import Session

from spool import dispatch, serialize, settings
from spool.ids import new_id
from spool.models import Job, WebhookDelivery

log = logging.getLogger(__name__)

DELIVER_TASK = "spool.deliver_webhook"
QUEUE = "spool.cpu"  # never a GPU worker's queue (celery_config.task_routes agrees)

# Job event type → the name a job lists in `webhook_events`.
JOB_EVENTS = {"job.started": "started", "job.progress": "progress", "job.completed": "completed"}
DEFAULT_JOB_EVENTS = ("completed",)
BATCH_COMPLETED = "batch.completed"
# job.progress is sent at most this often per job (the final state comes as job.completed).
PROGRESS_EVERY_S = 2.0

_WAKE_KEY = "spool_webhook_wakeups"


class JobChange(Protocol):
    """What a status UPDATE … RETURNING gives: enough to decide who is told."""

    id: str
    webhook: str | None
    webhook_events: Any


def wants(webhook: str | None, events: Any, event_type: str) -> bool:
    """Whether a job with this `webhook` and `webhook_events` is told of `event_type`."""
    if not webhook:
        return False
    return JOB_EVENTS[event_type] in (events or DEFAULT_JOB_EVENTS)


def add(
    s: Session,
    *,
    user_id: str,
    url: str,
    event_type: str,
    payload: dict[str, Any],
    job_id: str | None = None,
    batch_id: str | None = None,
) -> str:
    """One delivery row, due now; woken after the transaction commits."""
    delivery_id = new_id("msg")
    s.execute(
        insert(WebhookDelivery).values(
            id=delivery_id,
            user_id=user_id,
            job_id=job_id,
            batch_id=batch_id,
            event=event_type,
            payload=payload,
            url=url,
            state="pending",
            attempts=0,
            next_attempt_at=text("now()"),
            sent_at=text("now()"),
        )
    )
    wake_after_commit(s, [delivery_id])
    return delivery_id


def record_job_event(s: Session, changes: Sequence[JobChange], event_type: str) -> list[str]:
    """Deliveries of `event_type` for the changed jobs that asked for it.

    Call inside the transaction of the status change: the payload is the job as
    that transaction sees it, and a rollback takes the deliveries with it.
    """
    ids = [c.id for c in changes if wants(c.webhook, c.webhook_events, event_type)]
    if not ids:
        return []
    if event_type == "job.progress":
        ids = _not_recently_told(s, ids)
    base = settings.get().base_url
    out = []
    rows = s.scalars(select(Job).where(Job.id.in_(ids)).execution_options(populate_existing=True))
    for job in rows:
        out.append(
            add(
                s,
                user_id=job.user_id,
                url=job.webhook or "",
                event_type=event_type,
                payload=serialize.job(job, None, base),
                job_id=job.id,
                batch_id=job.batch_id,
            )
        )
    return out


def _not_recently_told(s: Session, job_ids: list[str]) -> list[str]:
    recent = set(
        s.scalars(
            text(
                "SELECT DISTINCT job_id FROM webhook_deliveries WHERE job_id = ANY(:ids) "
                "AND event = 'job.progress' "
                "AND created_at > now() - make_interval(secs => :every)"
            ),
            {"ids": job_ids, "every": PROGRESS_EVERY_S},
        )
    )
    return [i for i in job_ids if i not in recent]


# --- wake-ups ------------------------------------------------------------------------------


def wake_after_commit(s: Session, delivery_ids: Iterable[str]) -> None:
    """Send the wake-ups once the session commits (nothing if it rolls back)."""
    if _WAKE_KEY not in s.info:
        s.info[_WAKE_KEY] = []
        event.listen(s, "after_commit", _send_pending)
        event.listen(s, "after_rollback", _drop_pending)
    s.info[_WAKE_KEY].extend(delivery_ids)


def _send_pending(s: Session) -> None:
    ids, s.info[_WAKE_KEY] = s.info[_WAKE_KEY], []
    if ids:
        wake(ids)


def _drop_pending(s: Session) -> None:
    s.info[_WAKE_KEY] = []


def wake(delivery_ids: Sequence[str], countdown: float | None = None) -> int:
    """Send `spool.deliver_webhook` messages; never raises (the sweeper makes up losses)."""
    app = dispatch.celery_app()
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for delivery_id in delivery_ids:
                app.send_task(
                    DELIVER_TASK,
                    args=[delivery_id],
                    queue=QUEUE,
                    countdown=countdown,
                    producer=producer,
                    retry=False,
                )
                sent += 1
    except (redis.RedisError, KombuError, OSError) as exc:
        log.warning(
            "woke %d of %d webhook deliveries; the sweeper wakes the rest: %s",
            sent,
            len(delivery_ids),
            exc,
        )
    return sent
