"""The job lifecycle over HTTP, as a client drives it (API.md: auth, jobs, results, errors)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests import support


def err(r: requests.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"]), body
    return body["error"]


def test_token_submit_poll_result(api: support.Api) -> None:
    r = api.post(
        "/v1/jobs", json={"kind": "echo", "model": "echo", "input": {"value": {"a": [1, 2]}}}
    )
    assert r.status_code == 202
    job = r.json()
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["id"].startswith("job_") and job["status"] in ("queued", "running", "succeeded")
    assert job["urls"]["result"].endswith(f"/result/{job['id']}")
    done = api.wait(job["id"])
    assert done["status"] == "succeeded"
    assert done["output"] == {"value": {"a": [1, 2]}}
    assert done["attempts"] == 1 and done["queue_position"] is None
    assert done["started_at"] and done["finished_at"]
    r = api.get(f"/result/{job['id']}")
    assert r.status_code == 200
    assert r.json() == {"id": job["id"], "status": "succeeded", "output": {"value": {"a": [1, 2]}}}
    assert api.get(f"/v1/jobs/{job['id']}/result").status_code == 200


def test_result_codes_202_then_409_for_failed(api: support.Api) -> None:
    slow = api.submit({"sleep_s": 2})
    r = api.get(f"/result/{slow['id']}")
    assert r.status_code == 202 and "Retry-After" in r.headers
    assert r.json()["status"] in ("queued", "running")
    failed = api.submit({"fail": True})
    api.wait(failed["id"])
    r = api.get(f"/result/{failed['id']}")
    assert r.status_code == 409
    assert r.json()["status"] == "failed" and r.json()["error"]["code"] == "echo_failed"


def test_long_poll_wakes_on_completion_not_on_timeout(api: support.Api) -> None:
    job = api.submit({"sleep_s": 1.0})
    t0 = time.monotonic()
    r = api.get(f"/result/{job['id']}", params={"wait": 30})
    took = time.monotonic() - t0
    assert r.status_code == 200
    assert took < 10, f"long poll returned after {took:.1f}s: it was not woken by the job's end"


def test_parked_long_polls_hold_no_database_connection(api: support.Api) -> None:
    # 40 long polls park on one job, four times the connections the API process may
    # open (pool 5 + overflow 5). Were each to hold one while it waits, the others and
    # the plain read below would wait for the pool until its 10 s timeout (the job runs
    # longer than that) and answer 503.
    job = api.submit({"sleep_s": 11})
    headers = {"Authorization": api.s.headers["Authorization"]}

    def long_poll(_: int) -> int:
        r = requests.get(
            f"{api.base}/result/{job['id']}", params={"wait": 30}, headers=headers, timeout=60
        )
        return r.status_code

    with ThreadPoolExecutor(40) as pool:
        polls = pool.map(long_poll, range(40))
        time.sleep(1.5)  # every poll is parked by now
        t0 = time.monotonic()
        assert api.get(f"/v1/jobs/{job['id']}").status_code == 200
        assert time.monotonic() - t0 < 3
        assert list(polls) == [200] * 40


def test_prefer_wait_returns_finished_job(api: support.Api) -> None:
    r = api.post(
        "/v1/jobs",
        json={"kind": "echo", "model": "echo", "input": {"value": 7}},
        headers={"Prefer": "wait=20"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded" and r.json()["output"] == {"value": 7}


def test_list_filters_and_cursor_pagination(api: support.Api) -> None:
    ids = [api.submit({"value": i}, metadata={"n": i})["id"] for i in range(5)]
    page1 = api.get("/v1/jobs", params={"limit": 3}).json()
    assert [j["id"] for j in page1["data"]] == ids[::-1][:3]  # newest first
    page2 = api.get("/v1/jobs", params={"limit": 3, "cursor": page1["next_cursor"]}).json()
    assert [j["id"] for j in page2["data"]][:2] == ids[::-1][3:5]
    for i in ids:
        api.wait(i)
    ok = api.get("/v1/jobs", params={"status": "succeeded", "model": "echo", "limit": 500}).json()
    assert set(ids) <= {j["id"] for j in ok["data"]}
    none = api.get("/v1/jobs", params={"status": "failed", "kind": "echo"}).json()
    assert not set(ids) & {j["id"] for j in none["data"]}


def test_cancel_queued_job_never_runs(platform: support.Platform, api: support.Api) -> None:
    # A far-future ttl and a model nobody serves would hide bugs; instead fill the worker.
    blockers = [api.submit({"sleep_s": 3}) for _ in range(6)]
    victim = api.submit({"value": "never"})
    r = api.post(f"/v1/jobs/{victim['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "canceled"
    assert api.post(f"/v1/jobs/{victim['id']}/cancel").status_code == 409
    for b in blockers:
        api.wait(b["id"])
    job = api.get(f"/v1/jobs/{victim['id']}").json()
    assert job["status"] == "canceled" and job["attempts"] == 0 and job["output"] is None
    r = api.get(f"/result/{victim['id']}")
    assert r.status_code == 409


def test_cancel_running_job(api: support.Api) -> None:
    job = api.submit({"sleep_s": 30})
    support.wait_until(
        lambda: api.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", what="job running"
    )
    r = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] in ("canceling", "canceled")
    t0 = time.monotonic()
    done = api.wait(job["id"], timeout=20)
    assert done["status"] == "canceled"
    assert time.monotonic() - t0 < 5


def test_retry_creates_new_job(api: support.Api) -> None:
    failed = api.submit({"fail": True})
    api.wait(failed["id"])
    r = api.post(f"/v1/jobs/{failed['id']}/retry")
    assert r.status_code == 202
    new = r.json()
    assert new["id"] != failed["id"] and new["retry_of"] == failed["id"]
    ok = api.submit({"value": 1})
    api.wait(ok["id"])
    assert api.post(f"/v1/jobs/{ok['id']}/retry").status_code == 409


def test_idempotency_key(api: support.Api) -> None:
    body = {"kind": "echo", "model": "echo", "input": {"value": "idem"}}
    h = {"Idempotency-Key": "k-123"}
    a = api.post("/v1/jobs", json=body, headers=h)
    b = api.post("/v1/jobs", json=body, headers=h)
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"]
    c = api.post("/v1/jobs", json={**body, "input": {"value": "other"}}, headers=h)
    assert c.status_code == 422 and err(c)["code"] == "idempotency_key_reused"
    listed = api.get("/v1/jobs", params={"limit": 500}).json()["data"]
    assert sum(j["input"] == {"value": "idem"} for j in listed) == 1


def test_idempotency_keys_are_per_user(platform: support.Platform, api: support.Api) -> None:
    other = support.Api(platform.url, support.create_user())
    body = {"kind": "echo", "model": "echo", "input": {}}
    a = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "shared"})
    b = other.post("/v1/jobs", json=body, headers={"Idempotency-Key": "shared"})
    assert a.json()["id"] != b.json()["id"]


def test_validation_names_the_field(api: support.Api) -> None:
    r = api.post("/v1/jobs", json={"kind": "echo", "model": "echo", "input": {"sleep_s": 999}})
    assert r.status_code == 422
    e = err(r)
    assert e["code"] == "validation_failed" and "input.sleep_s" in e["details"]
    r = api.post("/v1/jobs", json={"kind": "echo", "input": {}})
    assert r.status_code == 422 and "model" in err(r)["details"]
    r = api.post("/v1/jobs", json={"kind": "echo", "model": "nope", "input": {}})
    assert r.status_code == 422 and "model" in err(r)["details"]
    r = api.post(
        "/v1/jobs", json={"kind": "echo", "model": "echo", "input": {}, "priority": "urgent"}
    )
    assert r.status_code == 422 and "priority" in err(r)["details"]
    r = api.post("/v1/jobs", json={"kind": "echo", "model": "echo", "input": {}, "bogus": 1})
    assert r.status_code == 422 and "bogus" in err(r)["details"]


def test_malformed_json_wrong_type_and_deep_json(api: support.Api) -> None:
    h = {"Content-Type": "application/json"}
    r = api.post("/v1/jobs", data=b'{"kind": "echo", ', headers=h)
    assert r.status_code == 400 and err(r)["code"] == "bad_request"
    r = api.post("/v1/jobs", data=b"\xff\xfe\x00garbage", headers=h)
    assert r.status_code == 400
    r = api.post("/v1/jobs", data=b"[" * 100_000 + b"]" * 100_000, headers=h)
    assert r.status_code in (400, 422), r.text
    err(r)
    r = api.post("/v1/jobs", data=b"kind=echo", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and err(r)["code"] == "unsupported_media_type"


def test_oversized_body_413(platform: support.Platform, api: support.Api) -> None:
    big = (
        b'{"kind": "echo", "model": "echo", "input": {"value": "'
        + b"x" * (65 * 1024 * 1024)
        + b'"}}'
    )
    r = api.post("/v1/jobs", data=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and err(r)["code"] == "payload_too_large"


def test_auth_errors_401(platform: support.Platform, user_key: str) -> None:
    anon = support.Api(platform.url)
    r = anon.get("/v1/jobs")
    assert r.status_code == 401 and err(r)
    anon.s.headers["Authorization"] = "Bearer not-a-jwt"
    assert anon.get("/v1/jobs").status_code == 401
    r = anon.post("/v1/auth/token", json={"api_key": "sk_wrong"})
    assert r.status_code == 401 and err(r)["code"] == "invalid_api_key"
    r = anon.post("/v1/auth/token", json={})
    assert r.status_code == 422


def test_revoked_key_token_stops_working(platform: support.Platform) -> None:
    from spool import db, users

    name = "revokee"
    with db.transaction() as s:
        _, key = users.create_user(s, name)
    client = support.Api(platform.url, key)
    assert client.get("/v1/jobs").status_code == 200
    with db.transaction() as s:
        users.revoke(s, name)
    r = client.get("/v1/jobs")
    assert r.status_code == 401 and err(r)["code"] == "token_revoked"


def test_other_users_job_is_404(platform: support.Platform, api: support.Api) -> None:
    job = api.submit({"value": "mine"})
    other = support.Api(platform.url, support.create_user())
    for path in (
        f"/v1/jobs/{job['id']}",
        f"/result/{job['id']}",
        f"/v1/jobs/{job['id']}/result",
        f"/v1/jobs/{job['id']}/events",
    ):
        r = other.get(path)
        assert r.status_code == 404, path
        assert err(r)["code"] == "not_found"
    assert other.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
    assert other.post(f"/v1/jobs/{job['id']}/retry").status_code == 404
    assert job["id"] not in {j["id"] for j in other.get("/v1/jobs").json()["data"]}
    assert other.get("/v1/jobs/job_doesnotexist").status_code == 404


def test_admin_sees_all(platform: support.Platform, api: support.Api) -> None:
    job = api.submit({"value": "for admin"})
    admin = support.Api(platform.url, support.create_user(admin=True))
    assert admin.get(f"/v1/jobs/{job['id']}").status_code == 200
    everyone = admin.get("/v1/jobs", params={"all": "true", "limit": 500}).json()["data"]
    assert job["id"] in {j["id"] for j in everyone}


def test_priority_high_starts_before_normal_and_low(
    platform: support.Platform, api: support.Api
) -> None:
    # Saturate the worker, then queue low, normal, high: they start high → normal → low.
    blockers = [api.submit({"sleep_s": 1.5}) for _ in range(4)]
    support.wait_until(
        lambda: all(api.get(f"/v1/jobs/{b['id']}").json()["status"] == "running" for b in blockers),
        what="blockers running",
    )
    low = api.submit({"value": "low"}, priority="low")
    normal = api.submit({"value": "normal"}, priority="normal")
    high = api.submit({"value": "high"}, priority="high")
    assert api.get(f"/v1/jobs/{low['id']}").json()["queue_position"] == 2
    assert api.get(f"/v1/jobs/{high['id']}").json()["queue_position"] == 0
    done = {j["input"]["value"]: api.wait(j["id"]) for j in (low, normal, high)}
    assert done["high"]["started_at"] <= done["normal"]["started_at"] <= done["low"]["started_at"]


def test_openapi_and_docs(platform: support.Platform) -> None:
    spec = requests.get(platform.url + "/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.")
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/result/{job_id}", "/v1/auth/token"} <= set(
        spec["paths"]
    )
    assert "JobCreate" in spec["components"]["schemas"]
    assert requests.get(platform.url + "/docs", timeout=10).status_code == 200


def test_health_and_ready(platform: support.Platform) -> None:
    assert requests.get(platform.url + "/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(platform.url + "/readyz", timeout=5).status_code == 200
    r = requests.get(platform.url + "/v1/nope", timeout=5)
    assert r.status_code == 404 and err(r)
