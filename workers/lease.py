"""Claiming, heartbeating and finishing a job: each one conditional UPDATE.

A worker owns a job while its lease token matches and the lease is fresh. A
duplicate message, a second worker or a late finish after the sweeper took the
job back all find no matching row and do nothing.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from spool import db, events, lifecycle, metrics, settings
from spool.states import Status


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: str
    kind: str
    model: str
    input: dict[str, Any]
    attempts: int
    timeout_s: int
    user_id: str


# The message is a token meaning "work is waiting on this queue": the worker takes the
# best queued job (priority, then submit order) with SKIP LOCKED, so priorities hold
# exactly even for messages a busy worker had already reserved, and a duplicate or
# stale message finds nothing to take.
CLAIM_SQL = text(
    """
    WITH next AS (
        SELECT id FROM jobs
        WHERE queue = :queue AND status = 'queued' AND attempts < max_attempts
          AND (expires_at IS NULL OR expires_at > now())
        ORDER BY priority_rank, seq
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    )
    UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_token = :tok,
        lease_expires_at = now() + make_interval(secs => :lease), worker = :worker,
        started_at = now(), updated_at = now(), progress = NULL
    FROM next WHERE jobs.id = next.id
    RETURNING jobs.id, kind, model, input, attempts, timeout_s, user_id,
        EXTRACT(EPOCH FROM now() - COALESCE(sent_at, created_at)) AS waited_s,
        webhook, webhook_events, batch_id
    """
)


def claim(queue: str, worker: str) -> Claim | None:
    """Take the best queued job of this queue, or None when there is none."""
    tok = uuid.uuid4().hex
    with db.transaction() as s:
        row = s.execute(
            CLAIM_SQL,
            {"queue": queue, "tok": tok, "lease": settings.get().lease_s, "worker": worker},
        ).first()
        if row is not None:
            lifecycle.job_started(s, row)  # job.started webhook, in this transaction
    if row is None:
        return None
    job_id = row.id
    events.publish_status(job_id, Status.RUNNING, {"attempt": row.attempts})
    metrics.observe_job_started(row.kind, row.model, float(row.waited_s or 0))
    return Claim(
        job_id, tok, row.kind, row.model, row.input, row.attempts, row.timeout_s, row.user_id
    )


def renew(c: Claim) -> str | None:
    """Extend the lease; returns the job's status, or None when the job is no longer ours."""
    with db.transaction() as s:
        return s.scalar(
            text(
                "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => :lease) "
                "WHERE id = :id AND lease_token = :tok AND status IN ('running', 'canceling') "
                "RETURNING status"
            ),
            {"id": c.job_id, "tok": c.token, "lease": settings.get().lease_s},
        )


def progress(c: Claim, current: int, total: int) -> None:
    with db.transaction() as s:
        row = s.execute(
            text(
                "UPDATE jobs SET progress = CAST(:p AS jsonb) "
                f"WHERE id = :id AND lease_token = :tok RETURNING {lifecycle.RETURNING}"
            ),
            {"id": c.job_id, "tok": c.token, "p": json.dumps({"current": current, "total": total})},
        ).first()
        if row is not None:
            lifecycle.job_progress(s, row)


def finish(c: Claim, status: str, output: Any = None, error: dict[str, str] | None = None) -> bool:
    """Record the outcome if the job is still ours; False when it was taken away."""
    with db.transaction() as s:
        row = s.execute(
            text(
                "UPDATE jobs SET status = :status, output = CAST(:output AS jsonb), "
                "error = CAST(:error AS jsonb), finished_at = now(), updated_at = now(), "
                "lease_expires_at = NULL "
                "WHERE id = :id AND lease_token = :tok AND status IN ('running', 'canceling') "
                "RETURNING EXTRACT(EPOCH FROM now() - started_at) AS run_s, "
                f"{lifecycle.RETURNING}"
            ),
            {
                "id": c.job_id,
                "tok": c.token,
                "status": status,
                "output": json.dumps(output) if output is not None else None,
                "error": json.dumps(error) if error is not None else None,
            },
        ).first()
        if row is not None:
            lifecycle.jobs_finished(s, [row])  # job.completed webhook, the batch's end
    if row is None:
        return False
    extra: dict[str, Any] = {"error": error} if error else {}
    events.publish_status(c.job_id, status, extra)
    metrics.observe_job_finished(c.kind, c.model, status, float(row.run_s or 0))
    return True
