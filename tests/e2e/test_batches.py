"""Batches end to end (API.md "Batches"): intake, counts, results, cancel, idempotency,
the batch.completed webhook, the CLI, and fairness towards single jobs."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import requests

from spool import webhook_signing
from tests import support
from tests.e2e.conftest import new_user
from tests.webhook_receiver import Receiver

TERMINAL = {"succeeded", "failed", "canceled", "expired"}
# A job that cannot start here (the hooks platform's worker serves no tiny-llm): it stays
# queued, for the queued-cap tests.
QUEUED_LLM = {"kind": "text.generate", "model": "tiny-llm", "input": {"prompt": "hi"}}


def echo(i: int, **extra) -> dict:
    return {"kind": "echo", "model": "echo", "input": {"value": i}, **extra}


def wait_batch(api: support.Api, batch_id: str, timeout: float = 120) -> dict:
    def ended():
        b = api.get(f"/v1/batches/{batch_id}").json()
        return b if b["status"] in ("completed", "canceled") and b["finished_at"] else None

    return support.wait_until(ended, timeout=timeout, every=0.25, what=f"batch {batch_id} to end")


def results(api: support.Api, batch_id: str) -> list[dict]:
    r = api.get(f"/v1/batches/{batch_id}/results", stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.iter_lines() if line]


def error(r: requests.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    return body["error"]


def test_thousand_jobs_complete_with_counts_and_ordered_results(
    hooks_platform: support.IsolatedPlatform, hooks_api: support.Api
) -> None:
    n = 1000
    jobs = [echo(i, custom_id=f"c-{i}") for i in range(n)]
    r = hooks_api.post("/v1/batches", json={"jobs": jobs, "metadata": {"run": 1}})
    assert r.status_code == 202, r.text
    created = r.json()
    assert (
        created["id"].startswith("bat_") and r.headers["Location"] == f"/v1/batches/{created['id']}"
    )
    assert created["status"] in ("queued", "running") and created["counts"]["total"] == n
    assert set(created["counts"]) == {"total", "queued", "running", "succeeded", "failed",
                                      "canceled", "expired"}  # fmt: skip
    done = wait_batch(hooks_api, created["id"])
    assert done["status"] == "completed" and done["metadata"] == {"run": 1}
    assert done["counts"] == {"total": n, "queued": 0, "running": 0, "succeeded": n,
                              "failed": 0, "canceled": 0, "expired": 0}  # fmt: skip
    lines = results(hooks_api, created["id"])
    assert [x["custom_id"] for x in lines] == [f"c-{i}" for i in range(n)]  # submit order
    assert [x["output"] for x in lines] == [{"value": i} for i in range(n)]
    assert all(set(x) == {"custom_id", "job_id", "status", "output", "error"} for x in lines)
    assert {x["status"] for x in lines} == {"succeeded"} and {x["error"] for x in lines} == {None}
    one = hooks_api.get(f"/v1/jobs/{lines[5]['job_id']}").json()
    assert one["batch_id"] == created["id"] and one["priority"] == "low"
    assert one["custom_id"] == "c-5"
    listed = hooks_api.get("/v1/batches").json()
    assert listed["data"][0]["id"] == created["id"]
    assert listed["data"][0]["counts"]["succeeded"] == n
    # Another user sees none of it.
    other = support.Api(hooks_api.base, new_user(hooks_platform))
    for path in ("", "/results"):
        assert other.get(f"/v1/batches/{created['id']}{path}").status_code == 404
    assert other.post(f"/v1/batches/{created['id']}/cancel").status_code == 404
    assert other.get("/v1/batches").json()["data"] == []


def test_one_invalid_job_rejects_the_batch_naming_its_index(hooks_api: support.Api) -> None:
    jobs = [echo(i) for i in range(10)]
    jobs[7] = {"kind": "image.generate", "model": "tiny-sd", "input": {"prompt": "x", "width": 100}}
    r = hooks_api.post("/v1/batches", json={"jobs": jobs})
    assert r.status_code == 422, r.text
    e = error(r)
    assert list(e["details"]) == ["jobs.7.input.width"] and "jobs.7.input.width" in e["message"]
    jobs[7] = echo(7, custom_id="dup")
    jobs[3] = echo(3, custom_id="dup")
    r = hooks_api.post("/v1/batches", json={"jobs": jobs})
    assert r.status_code == 422 and list(error(r)["details"]) == ["jobs.7.custom_id"]
    r = hooks_api.post("/v1/batches", json={"jobs": [echo(0), {"kind": "echo"}, "x"]})
    assert r.status_code == 422
    assert {"jobs.1.model", "jobs.1.input", "jobs.2._schema"} <= set(error(r)["details"])
    assert hooks_api.post("/v1/batches", json={"jobs": []}).status_code == 422
    r = hooks_api.post("/v1/batches", json={"jobs": [echo(0)], "extra": 1})
    assert r.status_code == 422 and "extra" in error(r)["details"]
    r = hooks_api.post("/v1/batches", data=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    # Nothing was created by any of these.
    assert hooks_api.get("/v1/jobs").json()["data"] == []
    assert hooks_api.get("/v1/batches").json()["data"] == []


def test_ndjson_body(hooks_api: support.Api) -> None:
    lines = [json.dumps(echo(i, custom_id=f"n{i}")) for i in range(50)]
    body = ("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n").encode()
    r = hooks_api.post("/v1/batches", data=body, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 202, r.text
    done = wait_batch(hooks_api, r.json()["id"])
    assert done["counts"]["succeeded"] == 50
    assert [x["custom_id"] for x in results(hooks_api, done["id"])] == [f"n{i}" for i in range(50)]
    bad = b"\n".join([json.dumps(echo(0)).encode(), b"{not json"])
    r = hooks_api.post("/v1/batches", data=bad, headers={"Content-Type": "application/x-ndjson"})
    assert r.status_code == 400 and "jobs.1" in error(r)["details"]
    r = hooks_api.post("/v1/batches", data=b"a,b", headers={"Content-Type": "text/csv"})
    assert r.status_code == 415


def test_idempotent_resubmit_creates_nothing_new(hooks_api: support.Api) -> None:
    body = {"jobs": [echo(i, custom_id=str(i)) for i in range(30)]}
    key = {"Idempotency-Key": "batch-once"}
    first = hooks_api.post("/v1/batches", json=body, headers=key)
    again = hooks_api.post("/v1/batches", json=body, headers=key)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    jobs = hooks_api.get("/v1/jobs", params={"batch_id": first.json()["id"], "limit": 500})
    assert len(jobs.json()["data"]) == 30
    assert len(hooks_api.get("/v1/batches").json()["data"]) == 1
    body["jobs"].pop()
    r = hooks_api.post("/v1/batches", json=body, headers=key)
    assert r.status_code == 422 and "Idempotency-Key" in error(r)["details"]


def test_cancel_stops_every_unfinished_job(hooks_api: support.Api) -> None:
    jobs = [{"kind": "echo", "model": "echo", "input": {"sleep_s": 2}} for _ in range(40)]
    created = hooks_api.post("/v1/batches", json={"jobs": jobs}).json()
    support.wait_until(
        lambda: hooks_api.get(f"/v1/batches/{created['id']}").json()["counts"]["running"] > 0,
        what="a job of the batch to start",
    )
    r = hooks_api.post(f"/v1/batches/{created['id']}/cancel")
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "canceled" and r.json()["canceled_at"]
    assert r.json()["counts"]["queued"] == 0
    done = wait_batch(hooks_api, created["id"], timeout=60)
    counts = done["counts"]
    assert done["status"] == "canceled" and counts["queued"] == counts["running"] == 0
    assert counts["canceled"] >= 30 and counts["canceled"] + counts["succeeded"] == 40
    assert {x["status"] for x in results(hooks_api, created["id"])} <= {"canceled", "succeeded"}
    assert hooks_api.post(f"/v1/batches/{created['id']}/cancel").status_code == 202
    small = hooks_api.post("/v1/batches", json={"jobs": [echo(1)]}).json()
    wait_batch(hooks_api, small["id"])
    assert hooks_api.post(f"/v1/batches/{small['id']}/cancel").status_code == 409


def test_the_queued_cap_refuses_a_batch_that_would_pass_it(
    hooks_platform: support.IsolatedPlatform, strict_api_url: str
) -> None:
    api = support.Api(strict_api_url, new_user(hooks_platform))  # at most 50 queued
    r = api.post("/v1/batches", json={"jobs": [QUEUED_LLM] * 51})
    assert r.status_code == 429 and error(r)["code"] == "too_many_queued"
    assert "Retry-After" in r.headers
    assert api.get("/v1/jobs").json()["data"] == []  # nothing was recorded
    created = api.post("/v1/batches", json={"jobs": [QUEUED_LLM] * 50})
    assert created.status_code == 202, created.text
    r = api.post("/v1/batches", json={"jobs": [QUEUED_LLM]})
    assert r.status_code == 429
    assert api.post(f"/v1/batches/{created.json()['id']}/cancel").status_code == 202


def test_the_queued_cap_refuses_a_single_job_past_it(
    hooks_platform: support.IsolatedPlatform, strict_api_url: str
) -> None:
    api = support.Api(strict_api_url, new_user(hooks_platform))  # at most 50 queued
    created = api.post("/v1/batches", json={"jobs": [QUEUED_LLM] * 49})
    assert created.status_code == 202, created.text
    last = api.post("/v1/jobs", json=QUEUED_LLM)  # the 50th: the INSERT's own check lets it in
    assert last.status_code == 202, last.text
    r = api.post("/v1/jobs", json=QUEUED_LLM)
    assert r.status_code == 429 and error(r)["code"] == "too_many_queued"
    assert "Retry-After" in r.headers
    assert len(api.get("/v1/jobs?limit=100").json()["data"]) == 50  # nothing more recorded
    assert api.post(f"/v1/jobs/{last.json()['id']}/cancel").status_code == 202
    assert api.post("/v1/jobs", json=QUEUED_LLM).status_code == 202  # room again
    assert api.post(f"/v1/batches/{created.json()['id']}/cancel").status_code == 202


def test_batch_completed_webhook(hooks_api: support.Api, receiver: Receiver) -> None:
    body = {"jobs": [echo(i) for i in range(20)], "webhook": receiver.url("/batch")}
    created = hooks_api.post("/v1/batches", json=body).json()
    assert created["webhook"] == receiver.url("/batch")
    (got,) = receiver.wait_for(
        lambda r: r.json["type"] == "batch.completed" and r.json["data"]["id"] == created["id"]
    )
    secret = hooks_api.get("/v1/webhook-secret").json()["secret"]
    webhook_signing.verify(secret, got.headers, got.body)
    data = got.json["data"]
    assert data["status"] == "completed" and data["counts"]["succeeded"] == 20
    assert data["finished_at"]
    time.sleep(1)
    assert len(receiver.received(lambda r: r.json["data"].get("id") == created["id"])) == 1


def test_cli_batch_submit_wait_and_rerun(
    hooks_platform: support.IsolatedPlatform, hooks_api: support.Api, tmp_path: Path
) -> None:
    key = hooks_api.api_key
    assert key
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(echo(i, custom_id=f"l{i}")) + "\n" for i in range(20)))
    env = {**os.environ, "SPOOL_URL": hooks_platform.url, "SPOOL_API_KEY": key}
    cmd = support.SPOOL + ["batch", "submit", str(path), "--wait", "--poll-interval", "0.2"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                           cwd=support.ROOT)  # fmt: skip
    assert first.returncode == 0, first.stderr
    batch_id = first.stdout.strip().splitlines()[-1]
    assert batch_id.startswith("bat_") and "completed" in first.stderr
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120,
                           cwd=support.ROOT)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == batch_id
    assert [b["id"] for b in hooks_api.get("/v1/batches").json()["data"]] == [batch_id]
    jobs = hooks_api.get("/v1/jobs", params={"batch_id": batch_id, "limit": 500}).json()
    assert len(jobs["data"]) == 20


def test_a_normal_job_starts_before_a_waiting_batch(
    hooks_platform: support.IsolatedPlatform, hooks_api: support.Api
) -> None:
    """Batch jobs default to low priority: a job submitted while 10,000 of them wait
    starts before the batch's remaining jobs."""
    jobs = [echo(i) for i in range(10_000)]
    created = hooks_api.post("/v1/batches", json={"jobs": jobs})
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    normal = hooks_api.submit({"value": "me first"})
    ((accepted_at,),) = hooks_platform.sql("SELECT clock_timestamp()")  # it is committed
    try:
        hooks_api.wait(normal["id"], timeout=60)
        ((overtook, before_start, total),) = hooks_platform.sql(
            "SELECT count(*) FILTER (WHERE b.started_at > :t AND b.started_at < n.started_at), "
            "count(*) FILTER (WHERE b.started_at < n.started_at), count(*) "
            "FROM jobs b, jobs n WHERE b.batch_id = :b AND n.id = :n",
            t=accepted_at, b=batch_id, n=normal["id"],
        )  # fmt: skip
    finally:
        hooks_api.post(f"/v1/batches/{batch_id}/cancel")  # the rest need not run
    assert total == 10_000
    # Once the job was accepted, no batch job started before it: at most the worker's
    # threads (4) were already inside a claim when it became visible.
    assert overtook <= 4, (overtook, before_start)
    assert total - before_start > 5000
    # Inserted in chunks (and overlapped with validation): still in submit order.
    values = [v for (v,) in hooks_platform.sql(
        "SELECT (input->>'value')::int FROM jobs WHERE batch_id = :b ORDER BY seq", b=batch_id
    )]  # fmt: skip
    assert values == list(range(10_000))
