"""What follows a job's status change, inside the transaction that made it.

Every place that changes a job's status (workers/lease.py, workers/sweeper.py,
spool/jobs.py, spool/batches.py) calls one of these with the rows its
`UPDATE … RETURNING id, webhook, webhook_events, batch_id` gave, so the webhook
deliveries and the batch's end commit (or roll back) with the change itself: a
crash or a Redis loss between the two cannot lose an event.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from spool import batches, webhooks

# Columns a status UPDATE returns for these functions.
RETURNING = "id, webhook, webhook_events, batch_id"


def job_started(s: Session, row: Any) -> None:
    """queued → running (each attempt)."""
    webhooks.record_job_event(s, [row], "job.started")


def job_progress(s: Session, row: Any) -> None:
    """A progress write (throttled to one job.progress per job every few seconds)."""
    webhooks.record_job_event(s, [row], "job.progress")


def jobs_finished(s: Session, rows: Sequence[Any]) -> None:
    """Jobs that reached a terminal status: job.completed, and maybe their batch's end."""
    if not rows:
        return
    webhooks.record_job_event(s, rows, "job.completed")
    batches.finish_if_done(s, [getattr(r, "batch_id", None) for r in rows])
