"""Sending job messages to the workers by task name (the API never imports workers).

A message carries only the job id. Before sending, the job id is recorded in the
`spool:sent` hash; a worker removes it when it receives the message. A queued job
that was sent but is in neither the hash nor a worker (Redis flushed, message
lost) is found by the sweeper and sent again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import redis
from celery import Celery
from kombu.exceptions import KombuError

from spool import redisconn

log = logging.getLogger(__name__)

RUN_JOB = "spool.run_job"
SENT_KEY = "spool:sent"
# Extra seconds beyond timeout_s before Celery's hard limit kills a stuck process.
HARD_LIMIT_GRACE_S = 60


@dataclass(frozen=True)
class Message:
    job_id: str
    queue: str
    priority: int
    timeout_s: int


@lru_cache(maxsize=1)
def celery_app() -> Celery:
    app = Celery("spool", set_as_current=False)
    app.config_from_object("celery_config")
    return app


def send(messages: Iterable[Message]) -> list[str]:
    """Send messages; returns the ids sent. Never raises: unsent jobs are the sweeper's."""
    messages = list(messages)
    if not messages:
        return []
    app = celery_app()
    sent: list[str] = []
    try:
        r = redisconn.client()
        now = str(time.time())
        with r.pipeline(transaction=False) as pipe:
            for m in messages:
                pipe.hset(SENT_KEY, m.job_id, now)
            pipe.execute()
        with app.producer_or_acquire() as producer:
            for m in messages:
                app.send_task(
                    RUN_JOB,
                    args=[m.job_id],
                    queue=m.queue,
                    priority=m.priority,
                    time_limit=m.timeout_s + HARD_LIMIT_GRACE_S,
                    producer=producer,
                    retry=False,
                )
                sent.append(m.job_id)
    except (redis.RedisError, KombuError, OSError) as exc:
        log.warning(
            "sent %d of %d job messages, the sweeper sends the rest: %s",
            len(sent),
            len(messages),
            exc,
        )
    return sent
