"""The baseline: bare Celery doing a no-op round trip on the same Redis.

A client calls `noop.delay(x).get()`: the message goes through the Redis broker, a
worker runs the no-op, the return value goes to the Redis result backend and the
client is woken by Redis pub/sub. That is the least a Celery-based job service can
do; Spool adds HTTP, auth, validation, a PostgreSQL row per job, a lease and events.

The worker runs as Spool's does: thread pool, same concurrency, prefetch 1, early acks.

    celery -A bench.bare_celery worker -P threads -c 2   (BENCH_REDIS_URL names the Redis)
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

app = Celery("bench_bare", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,  # as Spool's workers
    task_acks_late=False,
    task_default_queue="bench.bare",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
)


@app.task(name="bench.noop")
def noop(x: Any) -> Any:
    return x
