"""Sending work tokens to the workers by task name (the API never imports workers).

A message means "one more job is waiting on this queue"; the worker that gets it
claims the best queued job of that queue from PostgreSQL (workers/lease.py). So a
message lost (Redis flushed, a killed worker's reserved message) only leaves the
queue short of tokens, which the sweeper tops up; a surplus token is a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import redis
from celery import Celery
from kombu.exceptions import KombuError

log = logging.getLogger(__name__)

RUN_JOB = "spool.run_job"
# Celery's Redis transport keeps one list per priority step (celery_config.py).
PRIORITY_SUFFIXES = ("", ":3", ":6")


@dataclass(frozen=True)
class Message:
    job_id: str  # the job whose submission sends the token (logs, tracing)
    queue: str
    priority: int


@lru_cache(maxsize=1)
def celery_app() -> Celery:
    app = Celery("spool", set_as_current=False)
    app.config_from_object("celery_config")
    return app


def send(messages: Iterable[Message]) -> int:
    """Send tokens; returns how many went. Never raises: the sweeper makes up the rest."""
    app = celery_app()
    sent = 0
    messages = list(messages)
    try:
        with app.producer_or_acquire() as producer:
            for m in messages:
                app.send_task(
                    RUN_JOB,
                    args=[m.job_id, m.queue],
                    queue=m.queue,
                    priority=m.priority,  # a high job's token jumps ahead of a backlog
                    producer=producer,
                    retry=False,
                )
                sent += 1
    except (redis.RedisError, KombuError, OSError) as exc:
        log.warning(
            "sent %d of %d job messages, the sweeper sends the rest: %s",
            sent,
            len(messages),
            exc,
        )
    return sent


def queue_length(client: redis.Redis, queue: str) -> int:
    """Tokens waiting in Redis for this queue (all priority lists)."""
    with client.pipeline(transaction=False) as pipe:
        for suffix in PRIORITY_SUFFIXES:
            pipe.llen(queue + suffix)
        return sum(int(n) for n in pipe.execute())
