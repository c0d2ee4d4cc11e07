"""batches, webhook deliveries and their attempts

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
UNFINISHED = "status IN ('queued', 'running', 'canceling')"


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("seq", sa.BigInteger, sa.Identity(always=False), nullable=False, unique=True),
        sa.Column(
            "user_id", sa.String(40), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("webhook", sa.Text),
        sa.Column("metadata", JSONB),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("finished_at", TS),
        sa.Column("canceled_at", TS),
    )
    op.create_index("ix_batches_user_seq", "batches", ["user_id", "seq"])
    op.create_index(
        "ix_batches_open",
        "batches",
        ["created_at"],
        postgresql_where=sa.text("finished_at IS NULL"),
    )
    # "Is any job of this batch unfinished?" is asked at every job end of a batch: an
    # index probe here, where ix_jobs_batch would scan the batch's finished jobs.
    op.create_index(
        "ix_jobs_batch_unfinished",
        "jobs",
        ["batch_id"],
        postgresql_where=sa.text(f"batch_id IS NOT NULL AND {UNFINISHED}"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "user_id", sa.String(40), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("job_id", sa.String(40)),
        sa.Column("batch_id", sa.String(40)),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", TS),
        sa.Column("claim_token", sa.String(40)),
        sa.Column("sent_at", TS),
        sa.Column("last_status", sa.SmallInteger),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("delivered_at", TS),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["state", "next_attempt_at"])
    op.create_index(
        "ix_webhook_deliveries_job",
        "webhook_deliveries",
        ["job_id", "created_at"],
        postgresql_where=sa.text("job_id IS NOT NULL"),
    )
    op.create_index("ix_webhook_deliveries_created", "webhook_deliveries", ["created_at"])
    op.create_index(
        "ix_webhook_deliveries_batch",
        "webhook_deliveries",
        ["batch_id"],
        postgresql_where=sa.text("batch_id IS NOT NULL"),
    )
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column(
            "delivery_id",
            sa.String(40),
            sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("status_code", sa.SmallInteger),
        sa.Column("error", sa.Text),
        sa.Column("duration_ms", sa.Integer, nullable=False),
    )
    op.create_index("ix_webhook_attempts_delivery", "webhook_attempts", ["delivery_id", "id"])


def downgrade() -> None:
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_jobs_batch_unfinished", table_name="jobs")
    op.drop_table("batches")
