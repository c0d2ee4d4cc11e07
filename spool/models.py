"""SQLAlchemy models: PostgreSQL is the source of truth for users, keys, jobs, batches
and webhook deliveries.

The schema only changes through Alembic migrations (migrations/versions).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    webhook_secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# A queued job's place in its queue as one number: priority first, then submit order (seq
# stays far below the step). Indexed with the queue (ix_jobs_queued_key), it bounds the
# index scans of the claim (the best job first) and of the queue-position count (the jobs
# ahead, and no further): PostgreSQL does not bound a scan by a row comparison such as
# `(priority_rank, seq) < (r, s)` past its first column.
QUEUE_ORDER_STEP = 10**15


def queue_order(alias: str = "") -> str:
    """The SQL of the order key, on the `jobs` row named `alias` (or unqualified)."""
    p = f"{alias}." if alias else ""
    return f"({p}priority_rank::bigint * {QUEUE_ORDER_STEP} + {p}seq)"


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # Monotonic submit order: cursor pagination and queue position use it.
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=False), unique=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    queue: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[str] = mapped_column(String(8), default="normal")
    priority_rank: Mapped[int] = mapped_column(SmallInteger, default=3)
    input: Mapped[Any] = mapped_column(JSONB)
    output: Mapped[Any | None] = mapped_column(JSONB)
    error: Mapped[Any | None] = mapped_column(JSONB)
    progress: Mapped[Any | None] = mapped_column(JSONB)
    metadata_: Mapped[Any | None] = mapped_column("metadata", JSONB)
    webhook: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[Any | None] = mapped_column(JSONB)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    timeout_s: Mapped[int] = mapped_column(Integer)
    ttl_s: Mapped[int | None] = mapped_column(Integer)
    lease_token: Mapped[str | None] = mapped_column(String(40))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(200))
    batch_id: Mapped[str | None] = mapped_column(String(40))
    custom_id: Mapped[str | None] = mapped_column(String(200))
    retry_of: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    __table_args__ = (
        Index("ix_jobs_user_seq", "user_id", "seq"),
        Index("ix_jobs_batch", "batch_id", "seq"),
        Index(
            "ix_jobs_queued_key",
            "queue",
            text(queue_order()),
            postgresql_include=["priority_rank", "seq"],  # index-only counts
            postgresql_where=text("status = 'queued'"),
        ),
        Index("ix_jobs_user_queued", "user_id", postgresql_where=text("status = 'queued'")),
        Index(
            "ix_jobs_active_lease",
            "lease_expires_at",
            postgresql_where=text("status IN ('running', 'canceling')"),
        ),
    )


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    resource_type: Mapped[str] = mapped_column(String(16))
    # NULL while the first request is still being processed (→ 409 for a concurrent twin).
    resource_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )


# Asked at every job end of a batch ("is any job of it unfinished?"): an index probe,
# where ix_jobs_batch would walk the batch's finished jobs. Defined beside the class
# so that Job itself stays as migration 0001 made it; 0002 creates it.
Index(
    "ix_jobs_batch_unfinished",
    Job.batch_id,
    postgresql_where=text("batch_id IS NOT NULL AND status IN ('queued', 'running', 'canceling')"),
)


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # Submit order, for cursor pagination (as jobs.seq).
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=False), unique=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    # queued until it ends (running is derived from its jobs' live counts); then
    # completed, or canceled (set at the cancel; finished_at when its last job ends).
    status: Mapped[str] = mapped_column(String(16), default="queued")
    webhook: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[Any | None] = mapped_column("metadata", JSONB)
    total: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    canceled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_batches_user_seq", "user_id", "seq"),
        Index("ix_batches_open", "created_at", postgresql_where=text("finished_at IS NULL")),
    )


class WebhookDelivery(Base):
    """One event for one URL. Its id is the Standard Webhooks `webhook-id`, the same on
    every attempt; the row, not a Celery message, is what guarantees delivery."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(String(40))
    batch_id: Mapped[str | None] = mapped_column(String(40))
    event: Mapped[str] = mapped_column(String(32))
    # The job or batch object as it was when the event happened.
    payload: Mapped[Any] = mapped_column(JSONB)
    url: Mapped[str] = mapped_column(Text)
    # pending → delivered | given_up | gone (410) | refused (SSRF at delivery)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set by the attempt that holds the delivery; its outcome is recorded only if it still does.
    claim_token: Mapped[str | None] = mapped_column(String(40))
    # When its wake-up message was last sent: the sweeper re-sends only stale ones.
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status: Mapped[int | None] = mapped_column(SmallInteger)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    __table_args__ = (
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
        Index("ix_webhook_deliveries_created", "created_at"),  # retention
        Index(
            "ix_webhook_deliveries_job",
            "job_id",
            "created_at",
            postgresql_where=text("job_id IS NOT NULL"),
        ),
        Index(
            "ix_webhook_deliveries_batch",
            "batch_id",
            postgresql_where=text("batch_id IS NOT NULL"),
        ),
    )


class WebhookAttempt(Base):
    """Every HTTP attempt of a delivery: when, the status or the error, how long."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE")
    )
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    status_code: Mapped[int | None] = mapped_column(SmallInteger)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer)

    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_id", "id"),)
