"""Long-poll waiting, woken by the job's end stream (XREAD BLOCK), not a sleep loop.

Under gunicorn's gevent workers a waiting request is a parked greenlet, so
thousands of waiters do not pin server workers.
"""

from __future__ import annotations

import time

import redis

from spool import events

# Re-read PostgreSQL at least this often while waiting, in case an event was lost
# (Redis flushed): the state in PostgreSQL is what counts.
RECHECK_S = 5.0


def wait_end(job_id: str, left_s: float, announced_before: bool) -> events.Ended | None:
    """Block until the job's end is announced, RECHECK_S passes or left_s runs out; the
    end when it is announced. The caller then re-reads the job from PostgreSQL, unless
    the end came with its committed result.

    `announced_before`: the previous call saw the end announced yet the row was not
    terminal (the sweeper announces just before its commit lands): give it a moment.
    """
    if announced_before:
        time.sleep(min(left_s, 0.02))
        return events.Ended("")
    try:
        # Wakes once, on the terminal status (a stream of its own), never on the
        # progress and token events of a running job.
        return events.wait_end(job_id, min(left_s, RECHECK_S))
    except redis.RedisError:
        time.sleep(min(left_s, 1.0))  # Redis down: degrade to a slow re-check
        return None
