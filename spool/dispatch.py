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
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import KombuError
from kombu.utils.uuid import uuid

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
    if len(messages) >= BATCHED_MIN:
        return _send_batched(app, messages)
    try:
        with app.producer_or_acquire() as producer:
            for m in messages:
                _publish(app, producer, m)
                sent += 1
    except (redis.RedisError, KombuError, OSError) as exc:
        log.warning(
            "sent %d of %d job messages, the sweeper sends the rest: %s",
            sent,
            len(messages),
            exc,
        )
    return sent


def _publish(app: Celery, producer: Any, m: Message) -> None:
    """Celery's task message, published as `send_task` would, without its per-call
    routing, option and repr work: `declare=[]` because the workers declare their
    queues, and an anonymous-exchange publish needs no binding lookup."""
    args = [m.job_id, m.queue]
    message = app.amqp.create_task_message(
        uuid(), RUN_JOB, args, {}, argsrepr=repr(args), kwargsrepr="{}"
    )
    app.amqp.send_task_message(
        producer, RUN_JOB, message, queue=m.queue,
        priority=m.priority,  # a high job's token jumps ahead of a backlog
        retry=False, declare=[],
    )  # fmt: skip


# A batch's tokens go out in Redis pipelines of this many (kombu's Producer.batch):
# one round trip per chunk instead of one (plus a Redis client object) per message.
BATCHED_MIN = 32
BATCH_CHUNK = 1000


def _send_batched(app: Celery, messages: list[Message]) -> int:
    """`_publish`, batched: 50,000 tokens in seconds, not minutes.

    kombu batches Redis publishes only on a connection without `retry_on_timeout` (a
    replayed pipeline could send twice), so this uses a connection of its own without
    it: a timeout mid-chunk can only lose tokens, which the sweeper tops up.
    """
    options = {**app.conf.broker_transport_options, "retry_on_timeout": False}
    sent = 0
    try:
        with app.connection_for_write(transport_options=options) as conn:
            producer = app.amqp.Producer(conn)
            with producer.batch(BATCH_CHUNK) as batch:
                for start in range(0, len(messages), BATCH_CHUNK):
                    chunk = messages[start : start + BATCH_CHUNK]
                    for m in chunk:
                        _publish(app, producer, m)
                    batch.flush()
                    sent += len(chunk)
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
