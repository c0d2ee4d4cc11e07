"""Long-poll waiting, woken by the job's event stream (XREAD BLOCK), not a sleep loop.

Under gunicorn's gevent workers a waiting request is a parked greenlet, so
thousands of waiters do not pin server workers.
"""

from __future__ import annotations

import time

import redis
from sqlalchemy import select

from spool import db, events
from spool.models import Job
from spool.states import is_terminal

# Re-read PostgreSQL at least this often while waiting, in case an event was lost
# (Redis flushed): the state in PostgreSQL is what counts.
RECHECK_S = 5.0


def _status(job_id: str) -> str | None:
    with db.session() as s:
        return s.scalar(select(Job.status).where(Job.id == job_id))


def wait_terminal(job_id: str, timeout_s: float) -> bool:
    """Block up to timeout_s for the job to end; True when it has."""
    deadline = time.monotonic() + timeout_s
    ended = False
    while True:
        status = _status(job_id)
        if status is None or is_terminal(status):
            return status is not None
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if ended:  # announced before its commit landed (the sweeper does so): let it land
            time.sleep(min(left, 0.02))
        try:
            # Wakes once, on the terminal status (a stream of its own), never on the
            # progress and token events of a running job.
            ended = events.wait_end(job_id, min(left, RECHECK_S))
        except redis.RedisError:
            time.sleep(min(left, 1.0))  # Redis down: degrade to a slow re-check
