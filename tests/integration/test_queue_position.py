"""`queue_position`: the jobs that will start before this one on its queue (API.md),
exact under priorities, cancels and starts, and counted from the head of the queue:
reading a job near the head costs the same however many jobs wait behind it."""

from __future__ import annotations

import json
import random
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects import postgresql

from spool import db, jobs
from spool.models import Job
from tests import support


def _queue_jobs(user_id: str, priorities: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """Jobs on a queue of their own (no worker takes them), in submit order."""
    _, queue = support.own_queue()
    rows = [
        {
            **jobs.new_row(user_id, {"kind": "echo", "model": "echo", "input": {}, "priority": p}),
            "queue": queue,
        }
        for p in priorities
    ]
    with db.transaction() as s:
        jobs.insert_rows(s, rows)
        seqs = dict(
            s.execute(text("SELECT id, seq FROM jobs WHERE queue = :q"), {"q": queue}).all()
        )
    for r in rows:
        r["seq"] = seqs[r["id"]]
    return queue, rows


def _position(job_id: str) -> int | None:
    with db.autocommit_engine().connect() as conn:
        row = jobs.view_row(conn, job_id)
    assert row is not None
    return row.queue_position


def test_positions_follow_priority_then_submit_order(database_url: str) -> None:
    rnd = random.Random(7)
    queue, rows = _queue_jobs(
        support.create_user_id(), [rnd.choice(["high", "normal", "low"]) for _ in range(40)]
    )
    gone = {r["id"] for r in rnd.sample(rows, 8)}  # canceled or started: no longer ahead
    with db.transaction() as s:
        s.execute(
            text(
                "UPDATE jobs SET status = CASE WHEN seq % 2 = 0 THEN 'canceled' ELSE 'running' END "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": list(gone)},
        )
    waiting = sorted(
        (r for r in rows if r["id"] not in gone), key=lambda r: (r["priority_rank"], r["seq"])
    )
    for expected, r in enumerate(waiting):
        assert _position(r["id"]) == expected, r["priority"]
    for job_id in gone:
        assert _position(job_id) is None


def test_reading_the_head_does_not_walk_the_queue_behind_it(database_url: str) -> None:
    """The count of the jobs ahead stops at the job (ix_jobs_queued_key): reading the head
    of a long queue reads a few pages, the last job's read walks the queue."""
    _, rows = _queue_jobs(support.create_user_id(), ["normal"] * 3000)
    with db.autocommit_engine().connect() as conn:
        conn.execute(text("VACUUM ANALYZE jobs"))  # index-only counts, as autovacuum leaves them

        def pages_read(job_id: str) -> int:
            stmt = jobs.view_select(Job.__table__.c.id == job_id)
            sql = stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
            plan = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}")).scalar_one()
            top = (plan if isinstance(plan, list) else json.loads(plan))[0]["Plan"]
            return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])

        head, last = pages_read(rows[0]["id"]), pages_read(rows[-1]["id"])
    # The last job's count walks the 2,999 index entries ahead of it; the head's reads the
    # job itself and one index page. The index this replaced (ix_jobs_queued_order) read as
    # many pages for the head as for the last.
    assert head <= 12 and head * 3 < last, (head, last)
