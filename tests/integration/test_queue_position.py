"""`queue_position`: the jobs that will start before this one on its queue (API.md),
exact under priorities, cancels and starts."""

from __future__ import annotations

import random
from typing import Any

from sqlalchemy import text

from spool import db, jobs
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
