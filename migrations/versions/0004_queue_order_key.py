"""the queued jobs' index on one order key, so that counting the jobs ahead stops at the job

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# spool.models.queue_order(), as it was when this revision was written.
KEY = "(priority_rank::bigint * 1000000000000000 + seq)"
QUEUED = "status = 'queued'"


def upgrade() -> None:
    # PostgreSQL bounded the scans of ix_jobs_queued_order (queue, priority_rank, seq) by
    # `(priority_rank, seq) < (r, s)` on priority_rank alone: a job's queue position
    # walked every queued job of its rank, behind it too. Built concurrently: intake and
    # claims go on meanwhile on a live database. A concurrent build that was interrupted
    # leaves an invalid index behind; the revision is not recorded then, so a rerun drops
    # it and builds again.
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_jobs_queued_key")
        op.create_index(
            "ix_jobs_queued_key",
            "jobs",
            ["queue", sa.text(KEY)],
            postgresql_include=["priority_rank", "seq"],
            postgresql_where=sa.text(QUEUED),
            postgresql_concurrently=True,
        )
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_jobs_queued_order")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_jobs_queued_order")
        op.create_index(
            "ix_jobs_queued_order",
            "jobs",
            ["queue", "priority_rank", "seq"],
            postgresql_where=sa.text(QUEUED),
            postgresql_concurrently=True,
        )
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_jobs_queued_key")
