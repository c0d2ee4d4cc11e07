"""Webhook deliveries survive a dead receiver, a SIGKILLed worker and an emptied Redis:
the PostgreSQL row is the guarantee, the Celery message only a wake-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import support
from tests.e2e.conftest import HOOKS_ENV, new_user
from tests.webhook_receiver import Receiver


@pytest.fixture()
def fault_platform(
    services: support.Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[support.IsolatedPlatform]:
    p = support.IsolatedPlatform(services, tmp_path_factory.mktemp("whfault"), HOOKS_ENV)
    try:
        p.start_api()
        p.start_worker("echo", queues="spool.cpu")
        p.start_beat()
        yield p
    finally:
        p.close()


def test_delivered_once_the_receiver_is_back_after_a_worker_restart(
    fault_platform: support.IsolatedPlatform,
) -> None:
    platform = fault_platform
    port = support.free_port()  # nothing listens here yet: connections are refused
    api = support.Api(platform.url, new_user(platform))
    url = f"http://127.0.0.1:{port}/late"
    ids = [api.submit({"value": i}, webhook=url)["id"] for i in range(5)]
    for job_id in ids:
        assert api.wait(job_id)["status"] == "succeeded"

    def tried_twice() -> bool:
        rows = platform.sql(
            "SELECT count(*) FROM webhook_deliveries WHERE job_id = ANY(:ids) AND attempts >= 2",
            ids=ids,
        )
        return rows[0][0] == len(ids)

    support.wait_until(tried_twice, timeout=30, what="two refused attempts per delivery")
    refused = api.get(f"/v1/jobs/{ids[0]}/webhooks").json()["data"][0]["attempts"][0]
    assert refused["status_code"] is None and "refused" in refused["error"]

    # The worker dies with its countdown wake-ups, and Redis loses every message.
    (worker,) = platform.workers
    worker.kill()
    platform.workers.clear()
    platform.redis_client().flushall()
    receiver = Receiver(port)
    try:
        platform.start_worker("echo", queues="spool.cpu")
        got = receiver.wait_for(lambda r: r.json["type"] == "job.completed", count=5, timeout=90)
        by_job: dict[str, set[str]] = {}
        for r in receiver.received():
            by_job.setdefault(r.json["data"]["id"], set()).add(r.webhook_id)
        assert set(by_job) == set(ids) and all(len(v) == 1 for v in by_job.values())
        assert len({r.webhook_id for r in got}) == 5
        support.wait_until(
            lambda: all(
                s == "delivered"
                for (s,) in platform.sql(
                    "SELECT state FROM webhook_deliveries WHERE job_id = ANY(:ids)", ids=ids
                )
            ),
            what="every delivery recorded as delivered",
        )
        rows = platform.sql(
            "SELECT job_id, state, attempts FROM webhook_deliveries "
            "WHERE job_id = ANY(:ids) AND event = 'job.completed'",
            ids=ids,
        )
        assert sorted(r.job_id for r in rows) == sorted(ids)  # exactly one per job
        assert all(r.attempts >= 3 for r in rows)
    finally:
        receiver.stop()
