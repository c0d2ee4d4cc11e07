"""a partial index for each user's queued jobs (the per-user cap checked on every submit)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Without it the count scans every job the user ever submitted (ix_jobs_user_seq).
    op.create_index(
        "ix_jobs_user_queued",
        "jobs",
        ["user_id"],
        postgresql_where="status = 'queued'",
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_user_queued", table_name="jobs")
