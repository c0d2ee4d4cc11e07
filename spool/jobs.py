"""Job intake and state changes shared by the API and the sweeper.

A job row is committed before its message is sent (spool.dispatch); every state
change is one conditional UPDATE, so concurrent actors never overwrite each other.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, cast

import redis
from sqlalchemy import (
    JSON,
    Connection,
    Row,
    Table,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
)
from sqlalchemy import (
    cast as sql_cast,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import Label

from spool import bulk, db, dispatch, events, redisconn, registry, serialize, settings, users
from spool.ids import new_id
from spool.models import Job, User, queue_order
from spool.states import PRIORITIES, RETRYABLE, Status

CANCEL_KEY = "spool:cancel:{}"
CANCEL_TTL_S = 24 * 3600
JOBS = cast(Table, Job.__table__)

# The request fields a retry copies into the new job.
REQUEST_FIELDS = (
    "kind",
    "model",
    "input",
    "priority",
    "webhook",
    "webhook_events",
    "ttl_s",
    "timeout_s",
    "metadata",
)


class Conflict(Exception):
    """The job's state does not allow the action (→ 409)."""


def now() -> datetime:
    return datetime.now(UTC)


def new_row(
    user_id: str,
    req: dict[str, Any],
    *,
    batch_id: str | None = None,
    default_priority: str = "normal",
    at: datetime | None = None,
) -> dict[str, Any]:
    """The column values of a new queued job from a validated request."""
    s = settings.get()
    at = at or now()
    priority = req.get("priority") or default_priority
    ttl_s = req.get("ttl_s")
    return {
        "id": new_id("job"),
        "user_id": user_id,
        "kind": req["kind"],
        "model": req["model"],
        "queue": registry.queue_name(req["model"]),
        "status": Status.QUEUED.value,
        "priority": priority,
        "priority_rank": PRIORITIES[priority],
        "input": req["input"],
        "metadata": req.get("metadata"),
        "webhook": req.get("webhook"),
        "webhook_events": req.get("webhook_events")
        or (["completed"] if req.get("webhook") else None),
        "max_attempts": s.max_attempts,
        "attempts": 0,
        "timeout_s": req.get("timeout_s") or s.default_timeout_s,
        "ttl_s": ttl_s,
        "expires_at": at + timedelta(seconds=ttl_s) if ttl_s else None,
        "batch_id": batch_id,
        "custom_id": req.get("custom_id"),
        "retry_of": req.get("retry_of"),
        "created_at": at,
        "sent_at": at,
        "updated_at": at,
    }


# Below this, one executemany is as quick as the JSON document of spool.bulk.
BULK_MIN_ROWS = 64


def insert_rows(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    if len(rows) >= BULK_MIN_ROWS:
        bulk.insert(session, JOBS, rows)  # a batch: no per-row params
    elif rows:
        # Core insert: one executemany, no ORM object per row.
        session.execute(insert(JOBS), list(rows))


def messages(rows: Sequence[dict[str, Any]]) -> list[dispatch.Message]:
    return [dispatch.Message(r["id"], r["queue"], r["priority_rank"]) for r in rows]


# On the partial index ix_jobs_user_queued: the cost does not grow with the user's
# finished jobs.
_QUEUED_OF_USER = (
    select(func.count())
    .select_from(JOBS)
    .where(JOBS.c.user_id == bindparam("user_id"), JOBS.c.status == Status.QUEUED.value)
)


def queued_count(session: Session, user_id: str) -> int:
    return session.connection().scalar(_QUEUED_OF_USER, {"user_id": user_id}) or 0


# Jobs that start before this `jobs` row on its queue, counted on ix_jobs_queued_key
# (an index-only scan that stops at this row: the cost is the jobs ahead, not the whole
# queue); only for a queued row (CASE evaluates its branches lazily). It names the outer
# row `jobs`, so it serves a SELECT from jobs and an INSERT's RETURNING.
QUEUE_POSITION: Label[int] = literal_column(
    "CASE WHEN jobs.status = 'queued' THEN ("
    "SELECT count(*) FROM jobs AS ahead WHERE ahead.status = 'queued' "
    f"AND ahead.queue = jobs.queue AND {queue_order('ahead')} < {queue_order('jobs')}) END"
).label("queue_position")
# The columns under the ORM attribute names, so a row reads like a Job (`metadata_`).
VIEW_COLUMNS = [c.label("metadata_") if c.name == "metadata" else c for c in JOBS.c]


def view_select(*where: Any) -> Any:
    """The jobs as the API shows them, with their queue position: one round trip, no ORM."""
    return select(*VIEW_COLUMNS, QUEUE_POSITION).where(*where)


_INSERT_ONE = insert(JOBS).returning(*VIEW_COLUMNS, QUEUE_POSITION)


def insert_one(session: Session, row: dict[str, Any]) -> Row:
    """Insert one job; returns it as `view_select` shows it, in the same round trip."""
    return session.connection().execute(_INSERT_ONE, row).one()


_JSON_COLUMNS = frozenset(c.name for c in JOBS.c if isinstance(c.type, JSON))


@lru_cache(maxsize=4)
def _insert_checked(columns: tuple[str, ...]) -> Any:
    # INSERT … SELECT, so that a WHERE can refuse the row. Each value is cast to its
    # column's type: PostgreSQL would read an untyped JSON or text literal as text.
    values = select(
        *[sql_cast(bindparam(c, type_=JOBS.c[c].type), JOBS.c[c].type) for c in columns]
    ).where(
        exists(users.PRINCIPAL.where(User.id == bindparam("user_id"))),
        _QUEUED_OF_USER.scalar_subquery() < bindparam("max_queued"),
    )
    stmt = insert(JOBS).from_select(list(columns), values)
    return db.prepared(stmt.returning(*VIEW_COLUMNS, QUEUE_POSITION), "job_insert")


def insert_checked(
    conn: Connection, row: dict[str, Any], key_id: str, max_queued: int
) -> db.RowLike | None:
    """`insert_one` in the same round trip as two checks: the token's key `key_id` is
    still valid for the row's user, and the user has fewer than `max_queued` queued jobs.
    None when either fails (the caller tells which, off the hot path)."""
    stmt = _insert_checked(tuple(row))
    # On the driver's cursor (db.rows): JSON goes in dumped, as SQLAlchemy's JSONB type
    # would bind it (None as JSON null, as it does).
    params = {k: json.dumps(v) if k in _JSON_COLUMNS else v for k, v in row.items()}
    return db.first(conn, stmt, {**params, "key_id": key_id, "max_queued": max_queued})


@dataclass(frozen=True)
class _Reads:
    """The reads of one job by id, built once (SQLAlchemy then only looks their
    compiled form up in its cache), for one set of columns."""

    by_id: Any
    of_user: Any
    # The token's principal, and the job if that principal may see it: one round trip
    # for what would be the user look-up and the read.
    for_key: Any


def _reads(columns: list[Any], name: str) -> _Reads:
    by_id = select(*columns).where(JOBS.c.id == bindparam("job_id"))
    p = users.PRINCIPAL.subquery("p")
    for_key = select(
        p.c.id.label("p_user_id"), p.c.name.label("p_name"), p.c.is_admin.label("p_is_admin"),
        *columns,
    ).select_from(
        p.outerjoin(
            JOBS,
            and_(JOBS.c.id == bindparam("job_id"), or_(JOBS.c.user_id == p.c.id, p.c.is_admin)),
        )
    )  # fmt: skip
    return _Reads(
        db.prepared(by_id, name),
        db.prepared(by_id.where(JOBS.c.user_id == bindparam("user_id")), f"{name}_of_user"),
        db.prepared(for_key, f"{name}_for_key"),
    )


# The job as the API shows it; and only what GET /result shows (no queue position to
# count, no input or metadata to send and decode), for the long polls.
_VIEW = _reads([*VIEW_COLUMNS, QUEUE_POSITION], "job")
_RESULT = _reads([JOBS.c.id, JOBS.c.status, JOBS.c.output, JOBS.c.error, JOBS.c.progress], "result")


def view_row(conn: Connection, job_id: str, result_only: bool = False) -> db.RowLike | None:
    """The job as `view_select` shows it, whoever owns it; `result_only`: its id, status,
    output, error and progress.

    Core statements run on the request's connection's driver cursor (db.rows), here and
    in the other per-request queries."""
    reads = _RESULT if result_only else _VIEW
    return db.first(conn, reads.by_id, {"job_id": job_id})


def visible_row(
    conn: Connection, job_id: str, user_id: str, is_admin: bool = False, result_only: bool = False
) -> db.RowLike | None:
    """`visible`, as a plain row that carries its `queue_position` (`view_row`)."""
    if is_admin:
        return view_row(conn, job_id, result_only)
    params = {"job_id": job_id, "user_id": user_id}
    return db.first(conn, (_RESULT if result_only else _VIEW).of_user, params)


def visible_row_for_key(
    conn: Connection, job_id: str, key_id: str, result_only: bool = False
) -> tuple[users.Principal | None, db.RowLike | None]:
    """The principal of the token's key `key_id` (None: revoked key or deleted user) and
    `visible_row` for that principal, in one round trip."""
    reads = _RESULT if result_only else _VIEW
    row = db.first(conn, reads.for_key, {"job_id": job_id, "key_id": key_id})
    if row is None:
        return None, None
    p = users.Principal(row.p_user_id, row.p_name, row.p_is_admin, key_id)
    return p, (row if row.id is not None else None)


def visible(session: Session, job_id: str, user_id: str, is_admin: bool = False) -> Job | None:
    """The job if this user may see it; another user's job is indistinguishable from none."""
    job = session.get(Job, job_id)
    if job is None or (job.user_id != user_id and not is_admin):
        return None
    return job


def cancel(session: Session, job: Job) -> Job:
    """Queued → canceled at once; running → canceling (the worker stops at its next step)."""
    row = session.execute(
        text(
            "UPDATE jobs SET "
            "status = CASE WHEN status = 'queued' THEN 'canceled' ELSE 'canceling' END, "
            "finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END, "
            "updated_at = now() "
            "WHERE id = :id AND status IN ('queued', 'running') "
            "RETURNING status, id, webhook, webhook_events, batch_id"
        ),
        {"id": job.id},
    ).first()
    if row is not None and row.status == Status.CANCELED:
        from spool import lifecycle  # it imports this module (via spool.batches)

        lifecycle.jobs_finished(session, [row])  # job.completed webhook, the batch's end
    session.refresh(job)
    if row is None and job.status != Status.CANCELING:
        raise Conflict(f"job {job.id} is already {job.status}")
    return job


def announce_cancel(job: Job) -> None:
    """After commit: tell the worker (flag checked every step) and the listeners."""
    if job.status == Status.CANCELING:
        # Redis down: the worker's heartbeat still sees `canceling` in PostgreSQL.
        with contextlib.suppress(redis.RedisError):
            redisconn.client().set(CANCEL_KEY.format(job.id), "1", ex=CANCEL_TTL_S)
    events.publish_status(job.id, job.status)


def retry_request(job: serialize.JobLike) -> dict[str, Any]:
    if job.status not in RETRYABLE:
        raise Conflict(
            f"only failed, canceled or expired jobs can be retried; this one is {job.status}"
        )
    req = {f: getattr(job, "metadata_" if f == "metadata" else f) for f in REQUEST_FIELDS}
    req["retry_of"] = job.id
    return req
