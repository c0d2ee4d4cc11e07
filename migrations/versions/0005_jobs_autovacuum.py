"""jobs: vacuumed after a few thousand dead rows, not after a fifth of the table

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Every job leaves two dead row versions behind it (its claim and its finish each write a
# new one), and the claimed ones stay in the queued jobs' index (ix_jobs_queued_key)
# until a vacuum removes them: each claim and queue-position count walks past them, at
# the head of the queue. PostgreSQL's default waits for 50 + 20 % of the table to be
# dead, hundreds of thousands of rows on a busy platform. Measured (BENCHMARKS.md): a
# claim took 2.4-2.7 ms with 2,000-12,000 dead rows behind it and 1.7 ms after a VACUUM.
SETTINGS = {"autovacuum_vacuum_threshold": "2000", "autovacuum_vacuum_scale_factor": "0.02"}


def upgrade() -> None:
    pairs = ", ".join(f"{k} = {v}" for k, v in SETTINGS.items())
    op.execute(f"ALTER TABLE jobs SET ({pairs})")


def downgrade() -> None:
    op.execute(f"ALTER TABLE jobs RESET ({', '.join(SETTINGS)})")
