"""Claiming, heartbeating and finishing a job: each one conditional UPDATE.

A worker owns a job while its lease token matches and the lease is fresh. A
duplicate message, a second worker or a late finish after the sweeper took the
job back all find no matching row and do nothing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from spool import db, events, lifecycle, metrics, settings
from spool.models import queue_order
from spool.serialize import iso


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
    # What follows the job's status changes in their transaction (spool/lifecycle.py):
    # a job with neither has nothing to write but its own row.
    webhook: bool = False
    batch_id: str | None = None

    @property
    def plain(self) -> bool:
        return not self.webhook and self.batch_id is None


def _write(
    stmt: Any,
    params: dict[str, Any],
    atomic: bool,
    then: Callable[[Session, Sequence[Any]], None] | None = None,
) -> Sequence[Any]:
    """Run one writing statement; returns its rows.

    `atomic`: in a transaction, with `then(session, rows)` (what follows the change,
    spool/lifecycle.py) inside it. Otherwise the statement commits on its own on a bare
    connection: one round trip instead of three (psycopg2's BEGIN, the statement,
    COMMIT), no ORM Session made (~150 µs of CPU) and the statement run on the driver's
    cursor (`db.rows`)."""
    if not atomic:
        with db.autocommit_engine().connect() as conn:
            return db.rows(conn, stmt, params)
    with db.transaction() as s:
        rows = s.connection().execute(stmt, params).all()
        if then is not None and rows:
            then(s, rows)
        return rows


# Claims, renewals and progress commit without waiting for their WAL flush (in the same
# round trip: a RETURNING column, evaluated only when a row changed). A crash may lose
# the last few hundred ms of them: a lost claim leaves the job queued (its worker's
# renewal or finish then finds the job not theirs and drops it), a lost renewal only
# shortens a lease, lost progress is advisory. Intake and finish stay durable.
NO_WAL_WAIT = "set_config('synchronous_commit', 'off', true) AS no_wal_wait"

# The message is a token meaning "work is waiting on this queue": the worker takes the
# best queued job (priority, then submit order) with SKIP LOCKED, so priorities hold
# exactly even for messages a busy worker had already reserved, and a duplicate or
# stale message finds nothing to take.
CLAIM_SQL = db.prepared(
    text(
        f"""
    WITH next AS (
        SELECT id, webhook IS NOT NULL AND webhook <> '' AS told FROM jobs
        WHERE queue = :queue AND status = 'queued' AND attempts < max_attempts
          AND (expires_at IS NULL OR expires_at > now())
        ORDER BY {queue_order()}
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    ), taken AS (
        UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_token = :tok,
            lease_expires_at = now() + make_interval(secs => :lease), worker = :worker,
            started_at = now(), updated_at = now(), progress = NULL
        FROM next WHERE jobs.id = next.id AND (:in_tx OR NOT next.told)
        RETURNING jobs.id, kind, model, input, attempts, timeout_s, user_id,
            EXTRACT(EPOCH FROM now() - COALESCE(sent_at, created_at)) AS waited_s,
            webhook, webhook_events, batch_id, {NO_WAL_WAIT}
    )
    SELECT next.told, taken.* FROM next LEFT JOIN taken ON true
    """
    ),
    "claim",
)


def claim(queue: str, worker: str) -> Claim | None:
    """Take the best queued job of this queue, or None when there is none. Its `running`
    status is the caller's to publish: a worker's job context sends it with the job's
    first events or its end (workers/context.py, `announce_running`).

    One statement in autocommit takes a job with no webhook. A job with one must record
    its job.started delivery in the claim's transaction: the statement leaves it queued
    (`told`), and the claim is made again in a transaction."""
    tok = uuid.uuid4().hex
    params = {"queue": queue, "tok": tok, "lease": settings.get().lease_s, "worker": worker}
    rows = _write(CLAIM_SQL, {**params, "in_tx": False}, atomic=False)
    if rows and rows[0].told:

        def started(s: Session, rows: Sequence[Any]) -> None:
            if rows[0].id is not None:
                lifecycle.job_started(s, rows[0])  # job.started webhook, in this transaction

        rows = _write(CLAIM_SQL, {**params, "in_tx": True}, atomic=True, then=started)
    row = rows[0] if rows else None
    if row is None or row.id is None:
        return None
    job_id = row.id
    metrics.observe_job_started(row.kind, row.model, float(row.waited_s or 0))
    return Claim(
        job_id,
        tok,
        row.kind,
        row.model,
        row.input,
        row.attempts,
        row.timeout_s,
        row.user_id,
        webhook=bool(row.webhook),
        batch_id=row.batch_id,
    )


RENEW_SQL = db.prepared(
    text(
        "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => :lease) "
        "FROM unnest(CAST(:ids AS text[]), CAST(:toks AS text[])) AS mine(id, tok) "
        "WHERE jobs.id = mine.id AND jobs.lease_token = mine.tok "
        "AND jobs.status IN ('running', 'canceling') "
        f"RETURNING jobs.id, jobs.status, {NO_WAL_WAIT}"
    ),
    "renew",
)


def renew(claims: Sequence[Claim]) -> dict[str, str]:
    """Extend the leases of many jobs in one statement; returns the status of each job
    still ours (a job missing from it was taken back)."""
    if not claims:
        return {}
    params = {
        "ids": [c.job_id for c in claims],
        "toks": [c.token for c in claims],
        "lease": settings.get().lease_s,
    }
    return {r.id: r.status for r in _write(RENEW_SQL, params, atomic=False)}


GIVE_BACK_SQL = text(
    "UPDATE jobs SET lease_expires_at = now() WHERE worker = :worker AND status = 'running' "
    "RETURNING id"
)


def give_back(worker: str) -> int:
    """End the leases of every job `worker` runs now, as if they had run out: the sweeper
    queues them again at its next round (attempts permitting). Returns how many."""
    return len(_write(GIVE_BACK_SQL, {"worker": worker}, atomic=False))


PROGRESS_SQL = db.prepared(
    text(
        "UPDATE jobs SET progress = CAST(:p AS jsonb) WHERE id = :id AND lease_token = :tok "
        f"RETURNING {lifecycle.RETURNING}, {NO_WAL_WAIT}"
    ),
    "progress",
)


def progress(c: Claim, current: int, total: int) -> None:
    params = {"id": c.job_id, "tok": c.token, "p": json.dumps({"current": current, "total": total})}
    # job.progress webhook, in its transaction
    _write(
        PROGRESS_SQL,
        params,
        atomic=c.webhook,
        then=lambda s, rows: lifecycle.job_progress(s, rows[0]),
    )


FINISH_SQL = db.prepared(
    text(
        "UPDATE jobs SET status = :status, output = CAST(:output AS jsonb), "
        "error = CAST(:error AS jsonb), finished_at = now(), updated_at = now(), "
        "lease_expires_at = NULL, progress = COALESCE(CAST(:progress AS jsonb), progress) "
        "WHERE id = :id AND lease_token = :tok AND status IN ('running', 'canceling') "
        "RETURNING EXTRACT(EPOCH FROM now() - started_at) AS run_s, output, error, "
        f"progress, attempts, started_at, finished_at, {lifecycle.RETURNING}"
    ),
    "finish",
)

# A finish announces its stored result with the job's end, up to this size (JSON bytes),
# so that long polls answer without reading the row again (spool.events.Ended). A
# larger one is left to that read rather than kept in Redis for the stream's lifetime.
RESULT_INLINE_MAX = 16 * 1024


def _stored_result(row: Any) -> str | None:
    # From RETURNING, not from the arguments: exactly what PostgreSQL holds (jsonb
    # reorders keys), so both ways of answering give the same bytes. With the other
    # fields the end changed, so a submit's `Prefer: wait` can show the whole job too.
    result = json.dumps(
        {
            "output": row.output,
            "error": row.error,
            "progress": row.progress,
            "attempts": row.attempts,
            "started_at": iso(row.started_at),
            "finished_at": iso(row.finished_at),
        }
    )
    return result if len(result) <= RESULT_INLINE_MAX else None


def finish(
    c: Claim,
    status: str,
    output: Any = None,
    error: dict[str, str] | None = None,
    progress: tuple[int, int] | None = None,
    unsent: Sequence[tuple[str, str, dict[str, Any]]] = (),
) -> bool:
    """Record the outcome (and the last progress the job reported) if the job is still
    ours; False when it was taken away. `unsent`: the job's events not published yet,
    published just before its end, in the same round trip."""
    last = {"current": progress[0], "total": progress[1]} if progress else None
    params = {
        "id": c.job_id,
        "tok": c.token,
        "status": status,
        "output": json.dumps(output) if output is not None else None,
        "error": json.dumps(error) if error is not None else None,
        "progress": json.dumps(last) if last is not None else None,
    }
    # job.completed webhook and the batch's end, in the finish's transaction
    rows = _write(FINISH_SQL, params, atomic=not c.plain, then=lifecycle.jobs_finished)
    row = rows[0] if rows else None
    if row is None:
        return False
    extra: dict[str, Any] = {"error": error} if error else {}
    # After the commit: what the announcement carries is already stored.
    events.publish_status(c.job_id, status, extra, _stored_result(row), unsent)
    metrics.observe_job_finished(c.kind, c.model, status, float(row.run_s or 0))
    return True
