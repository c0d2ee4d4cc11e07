"""`GET /result/<id>?wait=N`, in-process on the real PostgreSQL and Redis, while a
worker's claim and finish run in another thread: a worker's finish announces the
stored result with the job's end, and the long poll answers from it without reading
the row again; an end announced without it (the sweeper's, a large output) is re-read."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

from spool import db, events, registry, users
from tests import support
from workers import lease

# The job reads of the API (the first also checks the token's key).
READS = tuple(
    f"EXECUTE spool_{view}_{by}_" for view in ("job", "result") for by in ("for_key", "of_user")
)


@pytest.fixture()
def client(database_url: str) -> Any:
    from api import create_app

    return create_app().test_client()


def _user_and_auth(client: Any) -> tuple[str, dict[str, str]]:
    with db.transaction() as s:
        user, key = users.create_user(s, f"u_{uuid.uuid4().hex[:8]}")
    token = client.post("/v1/auth/token", json={"api_key": key}).get_json()["access_token"]
    return user.id, {"Authorization": f"Bearer {token}"}


def _queued_job(user_id: str) -> tuple[str, str]:
    """A job on a queue of its own: no worker of the test platform takes it."""
    model, queue = support.own_queue()
    return support.queue_job(user_id, model, input={}), queue


def _soon(action: Callable[[], None]) -> threading.Thread:
    """`action` once the request has had time to park in its long poll."""

    def run() -> None:
        time.sleep(0.3)
        action()

    t = threading.Thread(target=run)
    t.start()
    return t


def _worker_finishes(job_id: str, queue: str, output: Any) -> Callable[[], None]:
    def act() -> None:
        c = lease.claim(queue, "test-worker")
        assert c is not None and c.job_id == job_id
        assert lease.finish(c, "succeeded", output)

    return act


def _reads(statements: list[str]) -> int:
    return sum(any(r in s for r in READS) for s in statements)


def test_a_worker_finish_answers_the_long_poll_without_a_re_read(
    client: Any, statements: list[str]
) -> None:
    user_id, auth = _user_and_auth(client)
    job_id, queue = _queued_job(user_id)
    # Keys in an order jsonb does not keep, a float and a null: the event's copy must be
    # what PostgreSQL stores, not what the worker handed in.
    output = {"zeta": 1, "a": [1, 2.5, "x"], "mid": None}
    statements.clear()
    t = _soon(_worker_finishes(job_id, queue, output))
    r = client.get(f"/result/{job_id}?wait=10", headers=auth)
    t.join()
    assert r.status_code == 200, r.data
    assert _reads(statements) == 1, statements  # the read before the wait; none after
    # ... and that read fetches only what the result shows (no queue position counted)
    assert any("EXECUTE spool_result_for_key_" in s for s in statements), statements

    stored = client.get(f"/result/{job_id}", headers=auth)  # answered from the row
    assert stored.status_code == 200
    assert r.data == stored.data
    assert r.get_json() == {"id": job_id, "status": "succeeded", "output": output}


def test_an_end_announced_before_its_commit_is_re_read(client: Any, statements: list[str]) -> None:
    user_id, auth = _user_and_auth(client)
    job_id, _ = _queued_job(user_id)

    def sweeper_fails_it() -> None:  # announces, then commits (workers/sweeper.py's order)
        events.publish_status(job_id, "failed")
        time.sleep(0.05)
        with db.transaction() as s:
            s.execute(
                text(
                    "UPDATE jobs SET status = 'failed', finished_at = now(), "
                    "error = CAST(:e AS jsonb) WHERE id = :i"
                ),
                {"i": job_id, "e": '{"code": "worker_lost", "message": "gone"}'},
            )

    statements.clear()
    t = _soon(sweeper_fails_it)
    r = client.get(f"/result/{job_id}?wait=10", headers=auth)
    t.join()
    assert r.status_code == 409, r.data
    assert r.get_json()["error"] == {"code": "worker_lost", "message": "gone"}
    assert _reads(statements) >= 2, statements


def test_a_large_output_is_re_read_not_kept_in_redis(
    client: Any, statements: list[str], redis_client: Any
) -> None:
    user_id, auth = _user_and_auth(client)
    job_id, queue = _queued_job(user_id)
    output = {"text": "x" * (lease.RESULT_INLINE_MAX + 1)}
    statements.clear()
    t = _soon(_worker_finishes(job_id, queue, output))
    r = client.get(f"/result/{job_id}?wait=10", headers=auth)
    t.join()
    assert r.status_code == 200
    assert r.get_json()["output"] == output
    assert _reads(statements) == 2, statements
    (entry,) = redis_client.xrange(events.end_key(job_id))
    assert entry[1] == {"status": "succeeded"}


@pytest.fixture()
def own_model(monkeypatch: pytest.MonkeyPatch) -> str:
    """An echo model on a queue of its own, known to this process's API only: no worker
    of the test platform takes its jobs, the test's own claims take nothing else."""
    name = f"echo-{uuid.uuid4().hex[:8]}"
    monkeypatch.setitem(registry.models(), name, registry.ModelSpec(name=name, kind="echo"))
    return name


def test_a_submit_with_prefer_wait_answers_from_the_end_like_a_read(
    client: Any, statements: list[str], own_model: str
) -> None:
    """`POST /v1/jobs` with `Prefer: wait`: the whole job from the committed end (the
    submitted job plus what the finish changed), no read after the wait, and the same
    object a read of the finished row shows."""
    _, auth = _user_and_auth(client)
    queue = registry.queue_name(own_model)
    output = {"zeta": 1, "a": [1, 2.5, "x"], "mid": None}
    taken: list[str] = []

    def worker() -> None:
        c = lease.claim(queue, "test-worker")
        assert c is not None
        taken.append(c.job_id)
        assert lease.finish(c, "succeeded", output, progress=(3, 4))

    statements.clear()
    t = _soon(worker)
    body = {"kind": "echo", "model": own_model, "input": {"value": 1}, "metadata": {"k": "v"}}
    r = client.post("/v1/jobs", json=body, headers={**auth, "Prefer": "wait=10"})
    t.join()
    assert r.status_code == 200, r.data
    job = r.get_json()
    assert taken == [job["id"]]
    assert _reads(statements) == 0, statements  # the INSERT returned the job; no re-read
    assert job["status"] == "succeeded" and job["output"] == output
    assert job["progress"] == {"current": 3, "total": 4, "fraction": 0.75}
    assert job["started_at"] and job["finished_at"] and job["attempts"] == 1

    read = client.get(f"/v1/jobs/{job['id']}", headers=auth)  # from the row
    assert read.status_code == 200
    assert r.data == read.data


def test_a_submit_with_prefer_wait_re_reads_an_end_without_its_fields(
    client: Any, statements: list[str], own_model: str
) -> None:
    """An end announced with only the output and error (a worker of the release before
    this one, mid-upgrade) is not enough for the whole job: it is read again."""
    _, auth = _user_and_auth(client)
    queue = registry.queue_name(own_model)

    def old_worker() -> None:
        c = lease.claim(queue, "test-worker")
        assert c is not None
        with db.transaction() as s:
            s.execute(
                text(
                    "UPDATE jobs SET status = 'succeeded', finished_at = now(), "
                    "output = CAST(:o AS jsonb) WHERE id = :i"
                ),
                {"i": c.job_id, "o": '{"value": 2}'},
            )
        events.publish_status(
            c.job_id, "succeeded", None, '{"output": {"value": 2}, "error": null}'
        )

    statements.clear()
    t = _soon(old_worker)
    r = client.post(
        "/v1/jobs",
        json={"kind": "echo", "model": own_model, "input": {}},
        headers={**auth, "Prefer": "wait=10"},
    )
    t.join()
    assert r.status_code == 200, r.data
    assert r.get_json()["output"] == {"value": 2}
    assert _reads(statements) == 1, statements
    read = client.get(f"/v1/jobs/{r.get_json()['id']}", headers=auth)
    assert r.data == read.data
