"""What the API's hot requests cost in SQL statements, in-process on the real PostgreSQL:
a submit and a read are one statement each, which also checks the token's key, and
each is a prepared statement (spool.db.prepared).
(Rate limits: tests/integration/test_ratelimit_storage.py.)"""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest

from tests import support

ECHO = {"kind": "echo", "model": "echo"}


@pytest.fixture()
def client(database_url: str) -> Any:
    from api import create_app

    return create_app().test_client()


def _auth(client: Any) -> dict[str, str]:
    key = support.create_user()
    token = client.post("/v1/auth/token", json={"api_key": key}).get_json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


def test_submit_and_read_are_one_statement_each(client: Any, statements: list[str]) -> None:
    auth = _auth(client)
    client.get("/v1/models", headers=auth)  # warm: pools, compiled statements
    statements.clear()

    r = client.post("/v1/jobs", json={**ECHO, "input": {"value": 1}}, headers=auth)
    assert r.status_code == 202, r.data
    assert len(statements) == 1, statements
    assert statements[0].startswith("auto:EXECUTE spool_job_insert_"), statements
    statements.clear()

    job_id = r.get_json()["id"]
    # A result read fetches only what the result shows: no queue position counted.
    for path, read in (
        (f"/v1/jobs/{job_id}", "job"),
        (f"/result/{job_id}", "result"),
        (f"/v1/jobs/{job_id}/result", "result"),
    ):
        assert client.get(path, headers=auth).status_code in (200, 202)
        assert len(statements) == 1, statements
        assert statements[0].startswith(f"auto:EXECUTE spool_{read}_for_key_"), statements
        statements.clear()

    # Another user's job: one statement too, and a 404 (not a 401: the key is valid).
    other = _auth(client)
    statements.clear()
    assert client.get(f"/v1/jobs/{job_id}", headers=other).status_code == 404
    assert len(statements) == 1, statements


def test_the_hot_views_make_no_orm_session(client: Any) -> None:
    """A submit and the reads run Core statements on the request's connection: making
    an ORM Session cost more CPU than the statement it would run."""
    from sqlalchemy.orm import Session

    auth = _auth(client)
    init = Session.__init__
    with mock.patch.object(Session, "__init__", autospec=True, side_effect=init) as made:
        r = client.post("/v1/jobs", json={**ECHO, "input": {"value": 1}}, headers=auth)
        assert r.status_code == 202, r.data
        job_id = r.get_json()["id"]
        for path in (f"/v1/jobs/{job_id}", f"/result/{job_id}", f"/v1/jobs/{job_id}/result"):
            assert client.get(path, headers=auth).status_code in (200, 202)
        assert made.call_count == 0
        # A view that needs the ORM still gets its Session.
        assert client.get("/v1/jobs", headers=auth).status_code == 200
        assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code in (202, 409)
        assert made.call_count >= 1


def test_the_other_views_look_the_principal_up_first(client: Any, statements: list[str]) -> None:
    auth = _auth(client)
    statements.clear()
    assert client.get("/v1/jobs", headers=auth).status_code == 200
    assert statements[0].startswith("auto:EXECUTE spool_principal_"), statements  # then the page
    assert len(statements) == 2, statements
