"""Webhooks end to end (API.md "Webhooks"): real API, worker and beat processes, and a
real receiver on loopback (so the platform allows private addresses, see conftest)."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
import standardwebhooks

from spool import webhook_signing
from tests import support
from tests.e2e.conftest import new_user
from tests.webhook_receiver import Receiver


def for_job(job_id: str, event_type: str | None = None):
    return lambda r: (
        r.json["data"].get("id") == job_id and (event_type is None or r.json["type"] == event_type)
    )


def deliveries(api: support.Api, job_id: str) -> list[dict]:
    r = api.get(f"/v1/jobs/{job_id}/webhooks")
    assert r.status_code == 200, r.text
    return r.json()["data"]


def test_signed_with_the_users_secret(hooks_api: support.Api, receiver: Receiver) -> None:
    secret = hooks_api.get("/v1/webhook-secret").json()["secret"]
    job = hooks_api.submit({"value": "signed"}, webhook=receiver.url("/signed"))
    done = hooks_api.wait(job["id"])
    (got,) = receiver.wait_for(for_job(job["id"], "job.completed"))
    assert got.path == "/signed" and got.headers["content-type"] == "application/json"
    assert got.webhook_id.startswith("msg_")
    # Our own verifier and the reference Standard Webhooks library both accept it.
    webhook_signing.verify(secret, got.headers, got.body)
    standardwebhooks.Webhook(secret).verify(got.body, got.headers)
    with pytest.raises(webhook_signing.WebhookVerificationError):
        webhook_signing.verify(webhook_signing.new_secret(), got.headers, got.body)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(got.body + b" ", got.headers)
    body = got.json
    assert set(body) == {"type", "timestamp", "data"}
    assert body["data"]["status"] == "succeeded" and body["data"]["output"] == {"value": "signed"}
    assert body["data"]["id"] == done["id"] and body["data"]["finished_at"]
    datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))


def test_events_follow_webhook_events(hooks_api: support.Api, receiver: Receiver) -> None:
    url = receiver.url("/events")
    every = hooks_api.submit(
        {"sleep_s": 5}, webhook=url, webhook_events=["started", "progress", "completed"]
    )
    default = hooks_api.submit({"sleep_s": 1}, webhook=url)
    started_only = hooks_api.submit({"sleep_s": 1}, webhook=url, webhook_events=["started"])
    for job in (every, default, started_only):
        hooks_api.wait(job["id"])
    receiver.wait_for(for_job(every["id"], "job.completed"))
    receiver.wait_for(for_job(default["id"], "job.completed"))
    receiver.wait_for(for_job(started_only["id"], "job.started"))
    time.sleep(1.0)  # anything not asked for would have come by now

    def types(job_id: str) -> list[str]:
        return [r.json["type"] for r in receiver.received(for_job(job_id))]

    seen = types(every["id"])
    assert seen[0] == "job.started" and seen[-1] == "job.completed", seen
    progress = [r.json["data"]["progress"] for r in receiver.received(for_job(every["id"]))
                if r.json["type"] == "job.progress"]  # fmt: skip
    # One per second slept, throttled to at most one every 2 s per job.
    assert 1 <= len(progress) <= 3, seen
    assert all(p["total"] == 5 and 1 <= p["current"] <= 5 for p in progress)
    made = [d["created_at"] for d in deliveries(hooks_api, every["id"])
            if d["type"] == "job.progress"]  # fmt: skip
    stamps = [datetime.fromisoformat(t.replace("Z", "+00:00")) for t in made]
    assert all((b - a).total_seconds() >= 1.9 for a, b in zip(stamps, stamps[1:], strict=False))
    assert types(default["id"]) == ["job.completed"]
    assert types(started_only["id"]) == ["job.started"]


def test_retried_after_500_with_the_same_id(hooks_api: support.Api, receiver: Receiver) -> None:
    receiver.answer("/flaky", 500, 503, 200)
    job = hooks_api.submit({"value": 1}, webhook=receiver.url("/flaky"))
    got = receiver.wait_for(for_job(job["id"]), count=3)
    assert [r.status for r in got] == [500, 503, 200]
    assert len({r.webhook_id for r in got}) == 1  # the same webhook-id on every attempt
    secret = hooks_api.get("/v1/webhook-secret").json()["secret"]
    for r in got:
        webhook_signing.verify(secret, r.headers, r.body)
    (d,) = support.wait_until(
        lambda: [d for d in deliveries(hooks_api, job["id"]) if d["state"] == "delivered"],
        what="the delivery recorded as delivered",
    )
    assert d["id"] == got[0].webhook_id and d["type"] == "job.completed"
    assert [a["status_code"] for a in d["attempts"]] == [500, 503, 200]
    assert [a["error"] for a in d["attempts"]] == ["HTTP 500", "HTTP 503", None]
    assert all(a["at"] and a["duration_ms"] >= 0 for a in d["attempts"])
    assert d["delivered_at"] and d["next_attempt_at"] is None


def test_410_gone_stops_retries(hooks_api: support.Api, receiver: Receiver) -> None:
    receiver.answer("/gone", 410, 200)
    job = hooks_api.submit({"value": 1}, webhook=receiver.url("/gone"))
    receiver.wait_for(for_job(job["id"]))
    (d,) = support.wait_until(
        lambda: [d for d in deliveries(hooks_api, job["id"]) if d["state"] == "gone"],
        what="the delivery marked gone",
    )
    time.sleep(0.5)  # a retry would come after 0.05 s at this platform's scale
    assert len(receiver.received(for_job(job["id"]))) == 1
    assert [a["status_code"] for a in d["attempts"]] == [410]


def test_redeliver_sends_the_latest_event_again(
    hooks_platform: support.IsolatedPlatform, hooks_api: support.Api, receiver: Receiver
) -> None:
    job = hooks_api.submit({"value": "again"}, webhook=receiver.url("/again"),
                           webhook_events=["started", "completed"])  # fmt: skip
    hooks_api.wait(job["id"])
    (first,) = receiver.wait_for(for_job(job["id"], "job.completed"))
    support.wait_until(
        lambda: any(d["state"] == "delivered" and d["type"] == "job.completed"
                    for d in deliveries(hooks_api, job["id"])),
        what="the first delivery recorded",
    )  # fmt: skip
    time.sleep(1.1)  # so that the new webhook-timestamp differs
    r = hooks_api.post(f"/v1/jobs/{job['id']}/webhooks/redeliver")
    assert r.status_code == 202, r.text
    assert r.json()["id"] == first.webhook_id and r.json()["type"] == "job.completed"
    again = receiver.wait_for(for_job(job["id"], "job.completed"), count=2)[1]
    assert again.webhook_id == first.webhook_id
    assert int(again.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    assert again.json["data"] == first.json["data"]
    secret = hooks_api.get("/v1/webhook-secret").json()["secret"]
    webhook_signing.verify(secret, again.headers, again.body)
    (d,) = [d for d in deliveries(hooks_api, job["id"]) if d["type"] == "job.completed"]
    assert len(d["attempts"]) == 2 and d["state"] == "delivered"
    # Nothing to redeliver for a job without webhooks; another user's job is not found.
    plain = hooks_api.submit({"value": 0})
    assert hooks_api.post(f"/v1/jobs/{plain['id']}/webhooks/redeliver").status_code == 409
    other = support.Api(hooks_api.base, new_user(hooks_platform))
    assert other.post(f"/v1/jobs/{job['id']}/webhooks/redeliver").status_code == 404
    assert other.get(f"/v1/jobs/{job['id']}/webhooks").status_code == 404


def test_failed_and_canceled_jobs_are_completed_events(
    hooks_api: support.Api, receiver: Receiver
) -> None:
    url = receiver.url("/terminal")
    failed = hooks_api.submit({"fail": True}, webhook=url)
    slow = hooks_api.submit({"sleep_s": 30}, webhook=url, priority="low")
    hooks_api.wait(failed["id"])
    assert hooks_api.post(f"/v1/jobs/{slow['id']}/cancel").status_code == 202
    (f,) = receiver.wait_for(for_job(failed["id"], "job.completed"))
    assert f.json["data"]["status"] == "failed" and f.json["data"]["error"]["code"]
    (c,) = receiver.wait_for(for_job(slow["id"], "job.completed"))
    assert c.json["data"]["status"] == "canceled"


REFUSED = [
    "http://127.0.0.1:8080/hook",
    "http://10.1.2.3/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]:8080/hook",
    "http://localhost:8080/hook",
    "https://192.168.0.10/hook",
    "http://[::ffff:127.0.0.1]/hook",
]


def test_private_webhook_urls_are_refused_at_submit(
    hooks_platform: support.IsolatedPlatform, strict_api_url: str
) -> None:
    api = support.Api(strict_api_url, new_user(hooks_platform))
    for url in REFUSED:
        r = api.post("/v1/jobs", json={"kind": "echo", "model": "echo", "input": {},
                                       "webhook": url})  # fmt: skip
        assert r.status_code == 422, (url, r.text)
        assert list(r.json()["error"]["details"]) == ["webhook"], url
        r = api.post("/v1/batches", json={"jobs": [{"kind": "echo", "model": "echo",
                                                    "input": {}}], "webhook": url})  # fmt: skip
        assert r.status_code == 422 and list(r.json()["error"]["details"]) == ["webhook"], url
    job = {"kind": "echo", "model": "echo", "input": {}}
    r = api.post("/v1/batches", json={"jobs": [job, {**job, "webhook": REFUSED[2]}]})
    assert r.status_code == 422 and list(r.json()["error"]["details"]) == ["jobs.1.webhook"]
    # A public address is accepted (an IP literal: no DNS needed in the test). The job
    # asks only for progress events, which an echo job without sleep_s never has, so
    # nothing is ever sent there.
    public = {**job, "webhook": "https://8.8.8.8/hook", "webhook_events": ["progress"]}
    r = api.post("/v1/jobs", json=public)
    assert r.status_code == 202, r.text
    assert api.get("/v1/jobs", params={"limit": 500}).json()["data"][0]["id"] == r.json()["id"]


def test_api_sends_its_wake_ups_after_commit_without_the_sweeper(
    services: support.Services, receiver: Receiver, tmp_path
) -> None:
    """A cancel's job.completed and a redeliver are woken by the API right after its
    commit (webhooks.wake_after_commit); no beat runs here, so no sweeper can make up for
    a wake-up that was dropped."""
    p = support.IsolatedPlatform(services, tmp_path, {"SPOOL_WEBHOOK_ALLOW_PRIVATE": "1"})
    try:
        p.start_api()
        p.start_worker(queues="spool.cpu")  # webhooks only: the echo job stays queued
        api = support.Api(p.url, p.user())
        job = api.submit({"value": 1}, webhook=receiver.url())
        assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
        (first,) = receiver.wait_for(for_job(job["id"], "job.completed"), timeout=15)
        assert first.json["data"]["status"] == "canceled"
        assert api.post(f"/v1/jobs/{job['id']}/webhooks/redeliver").status_code == 202
        receiver.wait_for(for_job(job["id"], "job.completed"), count=2, timeout=15)
    finally:
        p.close()
