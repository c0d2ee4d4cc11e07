"""Sending work tokens to the workers by task name (the API never imports workers).

A message means "one more job is waiting on this queue"; the worker that gets it
claims the best queued job of that queue from PostgreSQL (workers/lease.py). So a
message lost (Redis flushed, a killed worker's reserved message) only leaves the
queue short of tokens, which the sweeper tops up; a surplus token is a no-op.
"""

from __future__ import annotations

import base64
import bisect
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import redis
from celery import Celery
from kombu import serialization
from kombu.entity import PERSISTENT_DELIVERY_MODE
from kombu.exceptions import KombuError
from kombu.utils import json as kombu_json
from kombu.utils.uuid import uuid

from spool import redisconn

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


# Tokens go out in Redis pipelines of this many: 50,000 in seconds, not minutes.
CHUNK = 1000


def send(messages: Iterable[Message]) -> int:
    """Send tokens; returns how many went. Never raises: the sweeper makes up the rest.

    Celery builds each task message (`create_task_message`: its headers, properties
    and body) and kombu serializes it; the message is then pushed onto the queue's
    Redis list here, as kombu's Redis transport would push it (`envelope`), with a
    client of the broker's timeouts (redisconn.broker_client). Through kombu's producer
    a publish cost ~3x the LPUSH itself in CPU (a producer from the pool, its channel
    and connection checks, per message); the submit path pays it once per job
    (BENCHMARKS.md). A repeated chunk after a timeout only sends surplus tokens, which
    a worker drops.
    """
    app = celery_app()
    messages = list(messages)
    sent = 0
    try:
        client = redisconn.broker_client()
        for start in range(0, len(messages), CHUNK):
            chunk = messages[start : start + CHUNK]
            if len(chunk) == 1:
                client.lpush(*envelope(app, chunk[0]))
            else:
                with client.pipeline(transaction=False) as pipe:
                    for m in chunk:
                        pipe.lpush(*envelope(app, m))
                    pipe.execute()
            sent += len(chunk)
    except (redis.RedisError, KombuError, OSError) as exc:
        log.warning(
            "sent %d of %d job messages, the sweeper sends the rest: %s",
            sent,
            len(messages),
            exc,
        )
    return sent


def envelope(app: Celery, m: Message) -> tuple[str, str]:
    """(the Redis list, the message) for `m`'s `spool.run_job` task, as kombu's Redis
    transport writes what `send_task` publishes on an anonymous exchange.
    tests/integration/test_broker_transport.py holds it equal to kombu's own.

    Celery builds the message of a queue and priority once per process (`_template`);
    each token then only gets its job id and fresh ids put in (~8 µs of CPU against
    ~33 µs for Celery's create_task_message and two JSON dumps in a quiet loop, several
    times both in a busy API process, BENCHMARKS.md)."""
    if not _PLAIN.fullmatch(m.job_id):
        list_, message, _ = _built(app, m, uuid(), uuid())  # an id JSON or repr() escapes
        return list_, message
    t = _template(app, m.queue, m.priority, os.getpid())  # origin names the process
    body = base64.b64encode(t.body.replace(_JOB, m.job_id).encode()).decode()
    task_id = uuid()
    message = (
        t.message.replace(_BODY, body)
        .replace(_JOB, m.job_id)
        .replace(_TASK_ID, task_id)
        .replace(_TAG, uuid())
    )
    return t.list, message


# Stand-ins the template carries where a token's own values go: letters, digits and
# underscores only, which repr() and JSON leave as they are (so does a job id).
_PLAIN = re.compile(r"[A-Za-z0-9_]+")
_JOB, _TASK_ID, _TAG, _BODY = (f"SPOOLx{k}x3f9c1e" for k in ("JOB", "TASKID", "TAG", "BODY"))


@dataclass(frozen=True)
class _Template:
    list: str
    body: str  # the task body's JSON, before base64
    message: str


@lru_cache(maxsize=256)
def _template(app: Celery, queue: str, priority: int, _pid: int) -> _Template:
    list_, message, body = _built(app, Message(_JOB, queue, priority), _TASK_ID, _TAG, _BODY)
    return _Template(list_, body.decode(), message)


def _built(
    app: Celery, m: Message, task_id: str, tag: str, body_as: str | None = None
) -> tuple[str, str, bytes]:
    """The token as Celery and kombu build it (its list, its message, and its task body
    before base64); `body_as`: this in the message instead of the body."""
    args = [m.job_id, m.queue]
    task = app.amqp.create_task_message(
        task_id, RUN_JOB, args, {}, argsrepr=repr(args), kwargsrepr="{}"
    )
    content_type, encoding, body = serialization.dumps(task.body, app.conf.task_serializer)
    body = body.encode() if isinstance(body, str) else body
    properties = {
        **task.properties,
        "delivery_mode": PERSISTENT_DELIVERY_MODE,
        "priority": m.priority,  # a high job's token jumps ahead of a backlog
        "delivery_info": {"exchange": "", "routing_key": m.queue},
        "body_encoding": "base64",
        "delivery_tag": tag,
    }
    message = {
        "body": body_as or base64.b64encode(body).decode(),
        "content-encoding": encoding,
        "content-type": content_type,
        "headers": task.headers,
        "properties": properties,
    }
    return _list_for(app, m.queue, m.priority), kombu_json.dumps(message), body


def _list_for(app: Celery, queue: str, priority: int) -> str:
    """The queue's Redis list for this priority: kombu keeps one per priority step."""
    options = app.conf.broker_transport_options
    steps = options["priority_steps"]
    step = steps[bisect.bisect(steps, max(0, min(priority, 9))) - 1]  # kombu's 0-9
    return f"{queue}{options['sep']}{step}" if step else queue


def queue_length(client: redis.Redis, queue: str) -> int:
    """Tokens waiting in Redis for this queue (all priority lists)."""
    with client.pipeline(transaction=False) as pipe:
        for suffix in PRIORITY_SUFFIXES:
            pipe.llen(queue + suffix)
        return sum(int(n) for n in pipe.execute())
