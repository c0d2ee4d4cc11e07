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


@pytest.mark.parametrize(
    ("priority", "job_id"),
    [
        (0, "job_same"),
        (3, "job_same"),
        (6, "job_same"),
        # not put into the cached template: JSON and repr() would escape it
        (3, 'job "quoted" \\ é\n'),
    ],
)
def test_a_token_is_the_message_kombu_would_write(
    app: Any, redis_client: Any, priority: int, job_id: str
) -> None:
    """dispatch.send pushes the queue's list itself: the same list and the same message
    as Celery's send_task through kombu's producer, but for the ids each one draws."""
    import json

    from spool import dispatch

    m = dispatch.Message(job_id, QUEUE, priority)
    with app.producer_or_acquire() as producer:
        args = [m.job_id, m.queue]
        task = app.amqp.create_task_message(
            "task-id", dispatch.RUN_JOB, args, {}, argsrepr=repr(args), kwargsrepr="{}"
        )
        app.amqp.send_task_message(
            producer, dispatch.RUN_JOB, task, queue=m.queue, priority=m.priority,
            retry=False, declare=[],
        )  # fmt: skip
    assert dispatch.send([m]) == 1
    lists = [k for k in (QUEUE, f"{QUEUE}:3", f"{QUEUE}:6") if redis_client.llen(k)]
    assert lists == [QUEUE + dispatch.PRIORITY_SUFFIXES[priority // 3]]
    ours, kombus = (json.loads(raw) for raw in redis_client.lrange(lists[0], 0, -1))

    def ids_blanked(message: dict[str, Any]) -> dict[str, Any]:
        for key in ("id", "root_id"):
            message["headers"][key] = "-"
        for key in ("correlation_id", "delivery_tag"):
            message["properties"][key] = "-"
        return message

    assert ids_blanked(ours) == ids_blanked(kombus)
    assert ours["properties"]["priority"] == priority


def test_a_batch_of_tokens_goes_out_whole(app: Any, redis_client: Any) -> None:
    from spool import dispatch

    sent = dispatch.send([dispatch.Message(f"job_{i}", QUEUE, 3) for i in range(2500)])
    assert sent == 2500
    assert redis_client.llen(f"{QUEUE}:3") == 2500


def test_each_token_has_its_own_job_and_ids(app: Any, redis_client: Any) -> None:
    """Tokens made from one cached template: each carries its job (body, argsrepr) and
    ids of its own, and a worker reads each as its own task."""
    import base64
    import json

    from spool import dispatch

    jobs = [f"job_{i}" for i in range(3)]
    assert dispatch.send([dispatch.Message(j, QUEUE, 3) for j in jobs]) == 3
    got = [json.loads(raw) for raw in reversed(redis_client.lrange(f"{QUEUE}:3", 0, -1))]
    for job_id, message in zip(jobs, got, strict=True):
        body = json.loads(base64.b64decode(message["body"]))
        assert body[0] == [job_id, QUEUE]
        assert message["headers"]["argsrepr"] == repr([job_id, QUEUE])
        h, p = message["headers"], message["properties"]
        assert h["id"] == h["root_id"] == p["correlation_id"]
    ids = {m["headers"]["id"] for m in got} | {m["properties"]["delivery_tag"] for m in got}
    assert len(ids) == 6
