"""Heavier faults: a worker killed again and again under load, and PostgreSQL going away.

Each ends with every accepted job in a terminal state, none run twice at once.
"""

from __future__ import annotations

import collections
import os
import shutil
import time

import pytest
import requests

from spool import embedded
from tests import support
from tests.webhook_receiver import Receiver, of_type

pytestmark = pytest.mark.slow


def test_sigkill_repeatedly_across_200_jobs(services: support.Services, tmp_path) -> None:
    receiver = Receiver()
    p = support.IsolatedPlatform(
        services,
        tmp_path,
        {
            "SPOOL_WEBHOOK_ALLOW_PRIVATE": "1",
            "SPOOL_WEBHOOK_RETRY_SCALE": "0.01",
            "SPOOL_MAX_ATTEMPTS": "5",
        },
    )
    try:
        p.start_api()
        p.start_beat()
        p.start_worker(queues="spool.cpu")  # webhooks and the sweeper survive the kills
        api = support.Api(p.url, p.user())
        jobs = [
            api.submit({"sleep_s": 0.3, "value": i}, webhook=receiver.url())["id"]
            for i in range(200)
        ]
        for _ in range(4):  # kill the echo worker mid-job, four times, under load
            w = p.start_worker(models="echo", SPOOL_WORKER_CONCURRENCY="8")
            time.sleep(2.0)
            w.kill()
        p.start_worker(models="echo", SPOOL_WORKER_CONCURRENCY="8")
        done = [api.wait(j, timeout=120) for j in jobs]
        assert {d["status"] for d in done} == {"succeeded"}
        assert sorted(d["output"]["value"] for d in done) == list(range(200))
        retried = [d for d in done if d["attempts"] > 1]
        assert retried, "the kills hit no running job: the test proved nothing"
        # No job ran twice at once: one `running` → `succeeded` per attempt, in order.
        r = p.redis_client()
        for d in retried:
            statuses = [
                f["data"] for _, f in r.xrange(f"spool:ev:{d['id']}") if f["type"] == "status"
            ]
            assert sum('"succeeded"' in s for s in statuses) == 1
        completed = receiver.wait_for(of_type("job.completed"), count=200, timeout=60)
        time.sleep(1.0)  # a duplicate would arrive now
        per_job = collections.Counter(
            r.json["data"]["id"] for r in receiver.received(of_type("job.completed"))
        )
        assert len(completed) >= 200 and set(per_job) == set(jobs)
        assert max(per_job.values()) == 1, "a job.completed webhook was sent twice"
    finally:
        p.close()
        receiver.stop()


def test_postgres_unreachable_for_10_s(services: support.Services, tmp_path) -> None:
    pg_var = support.ROOT / "var" / f"test-pgdown-{os.getpid()}"
    url = embedded.start_postgres(pg_var)
    own = support.Services(url, services.redis_url)
    p = support.IsolatedPlatform(own, tmp_path)
    try:
        p.start_api()
        p.start_beat()
        p.start_worker(models="echo", queues="spool.cpu")
        api = support.Api(p.url, p.user())
        running = api.submit({"sleep_s": 3})
        queued = [api.submit({"sleep_s": 0.2, "value": i}) for i in range(10)]

        embedded.stop_postgres(pg_var)
        down_at = time.monotonic()
        answers: list[int] = []
        while time.monotonic() - down_at < 10:
            t0 = time.monotonic()
            r = api.post(
                "/v1/jobs", json={"kind": "echo", "model": "echo", "input": {}}, timeout=15
            )
            assert time.monotonic() - t0 < 8, "the API hung on a dead database"
            answers.append(r.status_code)
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "database_unavailable"
                assert "Retry-After" in r.headers
            time.sleep(0.5)
        assert set(answers) == {503}, answers  # nothing accepted that could not be recorded
        ready = requests.get(p.url + "/readyz", timeout=10)
        assert ready.status_code == 503 and "postgresql" in ready.json()["error"]["details"]

        embedded.start_postgres(pg_var)
        p.wait_ready()
        for j in [running] + queued:
            assert api.wait(j["id"], timeout=90)["status"] == "succeeded"
        after = api.submit({"value": "after"})
        assert api.wait(after["id"], timeout=60)["status"] == "succeeded"
        n = p.sql("SELECT count(*) FROM jobs WHERE status NOT IN ('succeeded')")[0][0]
        assert n == 0
    finally:
        p.stop()
        p.redis.stop()
        embedded.stop_postgres(pg_var)
        shutil.rmtree(pg_var, ignore_errors=True)


def test_hanging_or_failing_receivers_do_not_slow_jobs(
    services: support.Services, tmp_path
) -> None:
    """Receivers that hang, answer 500 or drop the connection: jobs finish at full speed."""
    import socket

    hang = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    drop = socket.create_server(("127.0.0.1", 0))  # accepts, closes at once
    stop = False

    def dropper() -> None:
        while not stop:
            try:
                conn, _ = drop.accept()
                conn.close()
            except OSError:
                return

    import threading

    threading.Thread(target=dropper, daemon=True).start()
    failing = Receiver()
    failing.answer("/hook", *([500] * 100))
    p = support.IsolatedPlatform(
        services, tmp_path, {"SPOOL_WEBHOOK_ALLOW_PRIVATE": "1", "SPOOL_WEBHOOK_TIMEOUT_S": "30"}
    )
    try:
        p.start_api()
        p.start_beat()
        # As deployed: the webhook worker's slots outnumber the receivers that hang (its
        # auto size is 32; FAST_ENV pins 4 for every worker).
        p.start_worker(queues="spool.cpu", SPOOL_WORKER_CONCURRENCY="16")
        p.start_worker(models="echo")
        api = support.Api(p.url, p.user())
        hooks = [
            f"http://127.0.0.1:{hang.getsockname()[1]}/h",
            f"http://127.0.0.1:{drop.getsockname()[1]}/h",
            failing.url(),
        ]
        t0 = time.monotonic()
        jobs = [api.submit({"value": i}, webhook=hooks[i % 3])["id"] for i in range(30)]
        for j in jobs:
            assert api.wait(j, timeout=60)["status"] == "succeeded"
        took = time.monotonic() - t0
        assert took < 20, f"30 echo jobs took {took:.1f}s behind stuck webhook receivers"
        # Deliveries are being retried as documented, not given up or lost.
        failing.wait_for(of_type("job.completed"), count=10, timeout=30)
        deliveries = api.get(f"/v1/jobs/{jobs[2]}/webhooks").json()["data"]
        tries = [a for d in deliveries for a in d["attempts"]]
        assert tries and all(a["status_code"] == 500 for a in tries)
        assert deliveries[-1]["state"] == "pending"  # retried on schedule, not given up
    finally:
        stop = True
        p.close()
        failing.stop()
        hang.close()
        drop.close()
