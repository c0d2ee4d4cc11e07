"""spool.db.rows: a statement on the pooled connection's driver cursor gives what
SQLAlchemy's execution gave, and fails the way it failed (on the real PostgreSQL)."""

from __future__ import annotations

import pytest
from sqlalchemy import exc, text

from spool import db

PROBE = db.prepared(
    text(
        "SELECT CAST(:n AS int) + 1 AS n, CAST(:doc AS jsonb) AS doc, now() AS at, "
        "EXTRACT(EPOCH FROM interval '1.5 seconds') AS secs, CAST(:flag AS boolean) AS flag"
    ),
    "rows_probe",
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
