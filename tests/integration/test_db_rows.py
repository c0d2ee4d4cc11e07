"""spool.db.rows: a statement on the pooled connection's driver cursor gives what
SQLAlchemy's execution gave, and fails the way it failed (on the real PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import exc, text

from spool import db, jobs
from tests import support

PROBE = db.prepared(
    text(
        "SELECT CAST(:n AS int) + 1 AS n, CAST(:doc AS jsonb) AS doc, now() AS at, "
        "EXTRACT(EPOCH FROM interval '1.5 seconds') AS secs, CAST(:flag AS boolean) AS flag"
    ),
    "rows_probe",
)
JSON_KINDS = text(
    "SELECT jsonb_typeof(metadata), jsonb_typeof(webhook_events) FROM jobs WHERE id = :i"
)
PARAMS = {"n": 41, "doc": '{"a": [1, "x"]}', "flag": True}


def test_rows_are_what_sqlalchemy_gives(statements: list[str]) -> None:
    with db.autocommit_engine().connect() as conn:
        expected = conn.execute(PROBE, PARAMS).one()
        statements.clear()
        (got,) = db.rows(conn, PROBE, PARAMS)
        (again,) = db.rows(conn, PROBE, PARAMS)
    assert got.n == expected.n == 42
    assert got.doc == expected.doc == {"a": [1, "x"]}
    assert type(got.secs) is type(expected.secs) and got.secs == expected.secs
    assert got.at.tzinfo is not None and got.flag is True and again.n == 42
    # prepared once per connection (SQLAlchemy's run prepared it): EXECUTE each time
    assert len(statements) == 2, statements
    assert all(s.startswith("auto:EXECUTE spool_rows_probe_") for s in statements), statements


def test_a_statement_not_marked_prepared_is_sent_as_it_is(statements: list[str]) -> None:
    with db.autocommit_engine().connect() as conn:
        assert db.rows(conn, text("SELECT CAST(:v AS text) AS v"), {"v": "plain"})[0].v == "plain"
    assert statements == ["auto:SELECT CAST(%(v)s AS text) AS v"]


def test_a_refused_value_is_sqlalchemys_data_error() -> None:
    # workers/inference.py fails a job whose output PostgreSQL refuses on DataError
    with db.autocommit_engine().connect() as conn:
        with pytest.raises(exc.DataError):
            db.rows(conn, PROBE, {**PARAMS, "n": "not a number"})
        assert db.rows(conn, PROBE, PARAMS)[0].n == 42  # the connection is still usable


def test_a_lost_connection_is_invalidated_and_the_pool_recovers() -> None:
    eng = db.autocommit_engine()
    with eng.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with eng.connect() as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        with pytest.raises(exc.OperationalError) as raised:
            db.rows(conn, PROBE, PARAMS)
        assert raised.value.connection_invalidated
        assert conn.invalidated
    with eng.connect() as conn:  # a fresh connection from the pool
        assert db.rows(conn, PROBE, PARAMS)[0].n == 42


def _user_and_key() -> tuple[str, str]:
    user_id = support.create_user_id()
    with db.autocommit_engine().connect() as conn:
        key_id = conn.execute(
            text("SELECT id FROM api_keys WHERE user_id = :u"), {"u": user_id}
        ).scalar_one()
    return user_id, key_id


def _as_dict(row: Any) -> dict[str, Any]:
    return dict(row._mapping) if hasattr(row, "_mapping") else row._asdict()


def test_the_api_statements_read_the_same_both_ways() -> None:
    """The submit's INSERT and the reads of GET /v1/jobs/<id> and GET /result, on the
    driver's cursor, give the values and types SQLAlchemy's execution gives."""
    user_id, key_id = _user_and_key()
    model, _ = support.own_queue()
    req = {"kind": "echo", "model": model, "input": {"value": [1, "é"]}, "priority": "high"}
    with db.autocommit_engine().connect() as conn:
        made = jobs.insert_checked(conn, jobs.new_row(user_id, req), key_id, 100)
        hooked = jobs.new_row(
            user_id, {**req, "webhook": "https://example.com/h", "metadata": {"k": "v"}}
        )
        with_hook = jobs.insert_checked(conn, hooked, key_id, 100)
        assert made is not None and with_hook is not None
        for job in (made, with_hook):
            for reads in (jobs._VIEW, jobs._RESULT):
                for stmt, params in (
                    (reads.by_id, {"job_id": job.id}),
                    (reads.of_user, {"job_id": job.id, "user_id": user_id}),
                    (reads.for_key, {"job_id": job.id, "key_id": key_id}),
                ):
                    ours = _as_dict(db.first(conn, stmt, params))
                    theirs = _as_dict(conn.execute(stmt, params).one())
                    assert ours == theirs
                    assert {k: type(v) for k, v in ours.items()} == {
                        k: type(v) for k, v in theirs.items()
                    }
        # What the INSERT returned is what a read shows, and JSON went in as SQLAlchemy's
        # JSONB binds it: a missing metadata is JSON null, as an ORM insert stores it.
        assert _as_dict(made) == _as_dict(conn.execute(jobs._VIEW.by_id, {"job_id": made.id}).one())
        assert made.input == {"value": [1, "é"]} and with_hook.metadata_ == {"k": "v"}
        kinds = conn.execute(JSON_KINDS, {"i": made.id}).one()
        orm_row = jobs.new_row(user_id, req)
        with db.transaction() as s:
            jobs.insert_one(s, orm_row)
        orm_kinds = conn.execute(JSON_KINDS, {"i": orm_row["id"]}).one()
        assert tuple(kinds) == tuple(orm_kinds)


def test_a_refused_insert_returns_none() -> None:
    user_id, key_id = _user_and_key()
    model, _ = support.own_queue()
    row = jobs.new_row(user_id, {"kind": "echo", "model": model, "input": {"value": 1}})
    with db.autocommit_engine().connect() as conn:
        assert jobs.insert_checked(conn, row, key_id, 0) is None  # the queued-jobs cap
        assert jobs.insert_checked(conn, row, "no-such-key", 100) is None
        assert jobs.view_row(conn, row["id"]) is None


def test_outside_autocommit_a_statement_joins_sqlalchemys_transaction() -> None:
    """On a connection that is not in autocommit, a write is the caller's to commit, as
    with SQLAlchemy's own execute: rolled back when the connection closes without it."""
    model, _ = support.own_queue()
    user_id, key_id = _user_and_key()
    kept = jobs.new_row(user_id, {"kind": "echo", "model": model, "input": {"value": 1}})
    dropped = jobs.new_row(user_id, {"kind": "echo", "model": model, "input": {"value": 2}})
    with db.engine().connect() as conn:
        assert jobs.insert_checked(conn, kept, key_id, 100) is not None
        assert conn.in_transaction()
        conn.commit()
    with db.engine().connect() as conn:
        assert jobs.insert_checked(conn, dropped, key_id, 100) is not None
    with db.autocommit_engine().connect() as conn:
        assert jobs.view_row(conn, kept["id"]) is not None
        assert jobs.view_row(conn, dropped["id"]) is None
