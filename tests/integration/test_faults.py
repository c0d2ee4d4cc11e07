"""Faults against real processes: every accepted job ends, and none runs twice at once."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import requests

from tests import support

pytestmark = pytest.mark.slow


@pytest.fixture()
def iso(services: support.Services, tmp_path) -> Iterator[support.IsolatedPlatform]:
    p = support.IsolatedPlatform(services, tmp_path)
    try:
        yield p
    finally:
        p.close()


def running_events(p: support.IsolatedPlatform, job_id: str) -> list[str]:
    r = p.redis_client()
    return [f["data"] for _, f in r.xrange(f"spool:ev:{job_id}") if f["type"] == "status"]


def test_sigkill_worker_mid_job_retries_once(iso: support.IsolatedPlatform) -> None:
    iso.start_api()
    iso.start_beat()
    w = iso.start_worker()
    api = support.Api(iso.url, iso.user())
    job = api.submit({"sleep_s": 4, "value": "survivor"})
    support.wait_until(
        lambda: api.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="job running"
    )
    w.kill()  # SIGKILL the whole worker: its message was acked, its lease will expire
    iso.start_worker()
    done = api.wait(job["id"], timeout=60)
    assert done["status"] == "succeeded" and done["output"] == {"value": "survivor"}
    assert done["attempts"] == 2
    finishes = [e for e in running_events(iso, job["id"]) if '"succeeded"' in e]
    assert len(finishes) == 1


def test_sigkill_loses_no_reserved_messages(iso: support.IsolatedPlatform) -> None:
    """With one slot, the next messages wait in Redis, not in the killed worker."""
    iso.start_api()
    iso.start_beat()
    w = iso.start_worker(SPOOL_WORKER_CONCURRENCY="1")
    api = support.Api(iso.url, iso.user())
    jobs = [api.submit({"sleep_s": 1.5, "value": i}) for i in range(4)]
    support.wait_until(
        lambda: api.get(f"/v1/jobs/{jobs[0]['id']}").json()["status"] == "running",
        what="first job running",
    )
    w.kill()
    iso.start_worker(SPOOL_WORKER_CONCURRENCY="2")
    for j in jobs:
        assert api.wait(j["id"], timeout=60)["status"] == "succeeded"


def test_flushed_redis_loses_no_job(iso: support.IsolatedPlatform) -> None:
    iso.start_api()
    iso.start_beat()
    api = support.Api(iso.url, iso.user())
    jobs = [api.submit({"value": i}) for i in range(20)]  # no worker yet: all queued
    iso.redis_client().flushall()
    iso.start_worker()
    for j in jobs:
        assert api.wait(j["id"], timeout=60)["status"] == "succeeded"


def test_long_job_is_not_redelivered(iso: support.IsolatedPlatform) -> None:
    # The job takes 5 s and a second worker stands idle: nothing (no visibility timeout,
    # no sweeper pass) hands the running job's message or the job to it.
    iso.start_api()
    iso.start_beat()
    iso.start_worker()
    iso.start_worker()
    api = support.Api(iso.url, iso.user())
    job = api.submit({"sleep_s": 5})
    done = api.wait(job["id"], timeout=60)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    starts = [e for e in running_events(iso, job["id"]) if '"running"' in e]
    assert len(starts) == 1


def test_ttl_expires_and_timeout_fails(iso: support.IsolatedPlatform) -> None:
    iso.start_api()
    iso.start_beat()
    iso.start_worker(queues="spool.cpu")  # housekeeping only: nobody runs echo jobs yet
    api = support.Api(iso.url, iso.user())
    doomed = api.submit({"value": 1}, ttl_s=1)
    support.wait_until(
        lambda: api.get(f"/v1/jobs/{doomed['id']}").json()["status"] == "expired",
        timeout=20,
        what="ttl expiry",
    )
    r = api.get(f"/result/{doomed['id']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "expired"
    iso.start_worker(models="echo")
    slow = api.submit({"sleep_s": 10}, timeout_s=1)
    done = api.wait(slow["id"], timeout=30)
    assert done["status"] == "failed" and done["error"]["code"] == "timeout"


def test_redis_restart_worker_resumes_and_api_never_hangs(iso: support.IsolatedPlatform) -> None:
    iso.start_api()
    iso.start_beat()
    iso.start_worker()
    api = support.Api(iso.url, iso.user())
    assert api.wait(api.submit({"value": "before"})["id"])["status"] == "succeeded"

    iso.kill_redis()
    t0 = time.monotonic()
    r = api.post(
        "/v1/jobs", json={"kind": "echo", "model": "echo", "input": {"value": "during"}}, timeout=15
    )
    took = time.monotonic() - t0
    assert r.status_code == 202, r.text  # recorded in PostgreSQL: accepted, sent later
    assert took < 8, f"submit took {took:.1f}s with Redis down"
    during = r.json()["id"]
    ready = requests.get(iso.url + "/readyz", timeout=10)
    assert ready.status_code == 503 and "redis" in ready.json()["error"]["details"]

    iso.restart_redis()
    iso.wait_ready()
    assert api.wait(during, timeout=60)["status"] == "succeeded"
    after = api.submit({"value": "after"})
    assert api.wait(after["id"], timeout=60)["status"] == "succeeded"
