"""The SDK against a small real HTTP server that speaks the API.md shapes."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spool.client import (
    AuthError,
    Client,
    NotFound,
    RateLimited,
    Unavailable,
    ValidationFailed,
    WaitTimeout,
)
from tests.integration.fakespool import API_KEY, FakeSpool, api_error, running


@pytest.fixture
def server() -> Iterator[FakeSpool]:
    with running() as fake:
        yield fake


@pytest.fixture
def client(server: FakeSpool) -> Iterator[Client]:
    with Client(server.url, API_KEY, timeout=5.0) as c:
        yield c


def test_submit_get_and_long_poll_wait(server: FakeSpool, client: Client) -> None:
    job = client.submit("echo", "echo", {"value": 42}, priority="high", metadata={"a": 1})
    assert job["id"] == "job_1"
    sent = json.loads(server.seen_at("POST", "/v1/jobs")[0].body)
    assert sent == {
        "kind": "echo",
        "model": "echo",
        "input": {"value": 42},
        "priority": "high",
        "metadata": {"a": 1},
    }
    assert server.seen_at("POST", "/v1/jobs")[0].headers["Idempotency-Key"]
    assert client.get(job["id"])["status"] == "queued"

    started = time.monotonic()
    result = client.wait(job["id"], timeout=10)
    assert result == {"id": "job_1", "status": "succeeded", "output": {"value": 42}}
    # One held request, answered as soon as the job ended: no polling loop.
    polls = server.seen_at("GET", "/v1/jobs/job_1/result")
    assert len(polls) == 1
    assert polls[0].headers.get("Authorization") == "Bearer tok1"
    assert time.monotonic() - started < 1.0
    assert server.mints == 1  # the token is cached


def test_wait_timeout(server: FakeSpool, client: Client) -> None:
    server.new_job({"kind": "echo", "model": "echo", "input": {}}, finish_in=None)
    started = time.monotonic()
    with pytest.raises(WaitTimeout):
        client.wait("job_1", timeout=1.0)
    assert time.monotonic() - started < 3.0


def test_result_of_a_canceled_job_is_returned_not_raised(server: FakeSpool, client: Client) -> None:
    server.new_job({"kind": "echo", "model": "echo", "input": {}}, finish_in=None)
    assert client.cancel("job_1")["status"] == "canceled"
    assert client.wait("job_1", timeout=5)["status"] == "canceled"


def test_token_refreshed_once_on_401(server: FakeSpool, client: Client) -> None:
    server.new_job({"kind": "echo", "model": "echo", "input": {}})
    client.get("job_1")
    server.tokens.clear()  # e.g. the server's signing key rotated: every token is now invalid
    assert client.get("job_1")["id"] == "job_1"
    assert server.mints == 2
    gets = server.seen_at("GET", "/v1/jobs/job_1")
    assert [g.headers["Authorization"] for g in gets] == [
        "Bearer tok1",
        "Bearer tok1",
        "Bearer tok2",
    ]


def test_token_renewed_before_it_expires(server: FakeSpool, client: Client) -> None:
    server.expires_in = 1
    server.new_job({"kind": "echo", "model": "echo", "input": {}})
    client.get("job_1")
    time.sleep(1.0)
    client.get("job_1")
    gets = server.seen_at("GET", "/v1/jobs/job_1")
    assert [g.headers["Authorization"] for g in gets] == ["Bearer tok1", "Bearer tok2"]


def test_bad_api_key_is_an_auth_error(server: FakeSpool) -> None:
    with Client(server.url, "sk_wrong") as bad, pytest.raises(AuthError) as info:
        bad.get("job_1")
    assert info.value.status == 401 and info.value.code == "invalid_api_key"


def test_retry_after_honoured_and_idempotency_key_kept(server: FakeSpool, client: Client) -> None:
    server.script[("POST", "/v1/jobs")] = [
        (429, {"Retry-After": "1"}, api_error("rate_limited", "slow down")),
        (503, {"Retry-After": "1"}, api_error("unavailable", "db down")),
        "drop",
    ]
    job = client.submit("echo", "echo", {"value": 1})
    attempts = server.seen_at("POST", "/v1/jobs")
    assert len(attempts) == 4
    assert len({a.headers["Idempotency-Key"] for a in attempts}) == 1
    assert attempts[1].at - attempts[0].at >= 0.95
    assert attempts[2].at - attempts[1].at >= 0.95
    assert len(server.jobs) == 1 and job["id"] == "job_1"


def test_explicit_idempotency_key_is_sent(server: FakeSpool, client: Client) -> None:
    first = client.submit("echo", "echo", {}, idempotency_key="order-17")
    again = client.submit("echo", "echo", {}, idempotency_key="order-17")
    assert first["id"] == again["id"]
    assert {s.headers["Idempotency-Key"] for s in server.seen_at("POST", "/v1/jobs")} == {
        "order-17"
    }


def test_long_retry_after_is_not_slept_on(server: FakeSpool, client: Client) -> None:
    server.script[("POST", "/v1/jobs")] = [
        (429, {"Retry-After": "3600"}, api_error("too_many_queued", "cap")),
    ]
    with pytest.raises(RateLimited) as info:
        client.submit("echo", "echo", {})
    assert info.value.retry_after == 3600 and info.value.code == "too_many_queued"
    assert len(server.seen_at("POST", "/v1/jobs")) == 1


def test_non_idempotent_post_is_not_retried(server: FakeSpool, client: Client) -> None:
    server.script[("POST", "/v1/jobs/job_1/retry")] = [
        (503, {"Retry-After": "0"}, api_error("unavailable", "down")),
    ]
    with pytest.raises(Unavailable):
        client.retry("job_1")
    assert len(server.seen_at("POST", "/v1/jobs/job_1/retry")) == 1


def test_errors_carry_the_api_error_body(server: FakeSpool, client: Client) -> None:
    with pytest.raises(NotFound) as info:
        client.get("job_nope")
    assert (info.value.status, info.value.code, info.value.details) == (
        404,
        "not_found",
        {"id": "job_nope"},
    )
    server.script[("POST", "/v1/jobs")] = [
        (422, {}, api_error("validation_failed", "bad input", {"input.prompt": ["required"]})),
    ]
    with pytest.raises(ValidationFailed) as bad:
        client.submit("image.generate", "tiny-sd", {})
    assert bad.value.details == {"input.prompt": ["required"]}


def test_connection_refused_becomes_unavailable() -> None:
    with Client("http://127.0.0.1:9", API_KEY, max_retries=1) as dead:
        dead._sleep = lambda _: None
        with pytest.raises(Unavailable) as info:
            dead.get("job_1")
    assert info.value.status is None and info.value.code == "connection_error"


def test_list_follows_cursors(server: FakeSpool, client: Client) -> None:
    for n in range(5):
        server.new_job({"kind": "echo", "model": "echo", "input": {"value": n}})
    ids = [job["id"] for job in client.list(kind="echo", limit=2)]
    assert ids == ["job_5", "job_4", "job_3", "job_2", "job_1"]
    pages = server.seen_at("GET", "/v1/jobs")
    assert len(pages) == 3


def test_events_reconnect_with_last_event_id(server: FakeSpool, client: Client) -> None:
    server.new_job({"kind": "echo", "model": "echo", "input": {}})
    got = list(client.events("job_1"))
    assert [(e.id, e.event) for e in got] == [
        ("1", "status"),
        ("2", "progress"),
        ("3", "progress"),
        ("4", "done"),
    ]
    assert got[2].json() == {"current": 2, "total": 2}
    connections = server.seen_at("GET", "/v1/jobs/job_1/events")
    assert len(connections) == 2
    assert "Last-Event-ID" not in connections[0].headers
    assert connections[1].headers["Last-Event-ID"] == "2"


def test_batches_ndjson_and_json(server: FakeSpool, client: Client, tmp_path: Path) -> None:
    jobs = [
        {"custom_id": f"c{i}", "kind": "echo", "model": "echo", "input": {"value": i}}
        for i in range(2)
    ]
    batch = client.submit_batch(jobs)
    assert batch["status"] == "queued"
    content_type, body = server.batches[-1]
    assert content_type == "application/x-ndjson"
    assert [json.loads(line) for line in body.splitlines()] == jobs

    client.submit_batch(jobs, webhook="https://example.com/hook", metadata={"run": 1})
    content_type, body = server.batches[-1]
    assert content_type == "application/json"
    assert json.loads(body) == {
        "jobs": jobs,
        "webhook": "https://example.com/hook",
        "metadata": {"run": 1},
    }

    results = list(client.batch_results(batch["id"]))
    assert [r["custom_id"] for r in results] == ["c0", "c1", "c2", "bad/../id"]
    seen: list[int] = []
    final = client.wait_batch(batch["id"], interval=0.01, on_update=lambda b: seen.append(1))
    assert final["status"] == "completed" and len(seen) == 4


def test_batch_file_is_streamed_with_a_content_key(
    server: FakeSpool, client: Client, tmp_path: Path
) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b'{"kind": "echo", "model": "echo", "input": {}}\n' * 3)
    server.script[("POST", "/v1/batches")] = ["drop"]
    first = client.submit_batch_file(path)
    second = client.submit_batch_file(path)
    posts = server.seen_at("POST", "/v1/batches")
    assert len(posts) == 3  # the dropped upload was sent again, whole
    keys = {p.headers["Idempotency-Key"] for p in posts}
    assert keys == {"batch-sha256-" + hashlib.sha256(path.read_bytes()).hexdigest()}
    assert all(p.body == path.read_bytes() for p in posts)
    assert first["id"] == second["id"]


def test_download_relative_absolute_and_foreign(
    server: FakeSpool, client: Client, tmp_path: Path
) -> None:
    saved = client.download("/v1/files/job_1/out.png", tmp_path)
    assert saved == tmp_path / "out.png"
    assert saved.read_bytes() == b"\x89PNG fake /v1/files/job_1/out.png"
    other = client.download(server.url + "/v1/files/job_1/b.png", tmp_path / "renamed.png")
    assert other.read_bytes().endswith(b"/v1/files/job_1/b.png")
    assert (
        server.seen_at("GET", "/v1/files/job_1/b.png")[0]
        .headers["Authorization"]
        .startswith("Bearer ")
    )

    # Another origin (here: the same server by another name) never receives our token.
    foreign = server.url.replace("127.0.0.1", "localhost") + "/v1/files/job_1/c.png"
    with pytest.raises(AuthError):
        client.download(foreign, tmp_path)
    assert "Authorization" not in server.seen_at("GET", "/v1/files/job_1/c.png")[0].headers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "renamed.png"]


def test_webhook_secret(client: Client) -> None:
    assert client.webhook_secret().startswith("whsec_")
