"""spool.broker_transport: kombu's Redis transport with one client per channel, on the
real Redis: messages go out and come back as Celery's, with no unacked records, and
publishing no longer builds a Redis client object per message."""

from __future__ import annotations

import threading
from typing import Any
from unittest import mock

import pytest
import redis

QUEUE = "spool.test.transport"


@pytest.fixture()
def app(redis_client: Any) -> Any:
    from spool import dispatch

    redis_client.delete(QUEUE, f"{QUEUE}:3", f"{QUEUE}:6")
    yield dispatch.celery_app()
    redis_client.delete(QUEUE, f"{QUEUE}:3", f"{QUEUE}:6")


def test_the_workers_and_the_api_use_it(app: Any) -> None:
    from spool.broker_transport import Transport

    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)


def test_publishing_makes_no_client_per_message(app: Any, redis_client: Any) -> None:
    from spool import dispatch

    dispatch.send([dispatch.Message("job_warm", QUEUE, 0)])  # the channel's one client
    init = redis.Redis.__init__
    with mock.patch.object(redis.Redis, "__init__", autospec=True, wraps=init) as made:
        sent = dispatch.send([dispatch.Message(f"job_{i}", QUEUE, 0) for i in range(20)])
        for i in range(10):
            dispatch.send([dispatch.Message(f"job_one_{i}", QUEUE, 0)])
    assert sent == 20
    assert made.call_count == 0
    assert redis_client.llen(QUEUE) == 31


def test_shared_across_threads_nothing_lost(app: Any, redis_client: Any) -> None:
    from spool import dispatch

    def send(t: int) -> None:
        for i in range(50):
            dispatch.send([dispatch.Message(f"job_{t}_{i}", QUEUE, 0)])

    threads = [threading.Thread(target=send, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert redis_client.llen(QUEUE) == 400


def test_a_consumer_reads_celery_messages_and_keeps_no_unacked_record(
    app: Any, redis_client: Any
) -> None:
    """Ack emulation is off (celery_config.py): taking and acking a message cost no
    Redis writes beyond the pop; the sweeper makes up a message lost with a worker."""
    from spool import dispatch

    dispatch.send([dispatch.Message("job_a", QUEUE, 0), dispatch.Message("job_b", QUEUE, 0)])
    got = []
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        for _ in range(2):
            message = channel.basic_get(QUEUE, no_ack=False)
            assert message is not None
            assert not redis_client.exists("unacked", "unacked_index")
            message.ack()
            got.append((message.headers["task"], message.payload[0]))
        assert channel.basic_get(QUEUE) is None
    assert got == [
        (dispatch.RUN_JOB, ["job_a", QUEUE]),
        (dispatch.RUN_JOB, ["job_b", QUEUE]),
    ]
