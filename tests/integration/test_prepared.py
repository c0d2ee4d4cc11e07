"""Prepared statements (spool.db.prepared) on the real PostgreSQL: prepared once per
connection, prepared again on a new connection, and off when SPOOL_DB_PREPARE=0."""

from __future__ import annotations

import pytest
from sqlalchemy import exc, text

from spool import db, settings

ECHO_SQL = text("SELECT CAST(:a AS int) + CAST(:b AS int) AS total, :a || '%' AS pct")
STMT = db.prepared(ECHO_SQL, "test_sum")


def test_placeholders_become_numbered_parameters() -> None:
    ident, prepare, execute = db._as_prepared("x", "SELECT %(a)s, %(b)s, %(a)s, '5%%'")
    assert ident.startswith("spool_x_")
    assert prepare == f"PREPARE {ident} AS SELECT $1, $2, $1, '5%'"
    assert execute == f"EXECUTE {ident} (%(a)s, %(b)s)"


def _prepared_here(conn) -> list[str]:
    return list(conn.execute(text("SELECT name FROM pg_prepared_statements")).scalars())


def test_prepared_once_per_connection_and_again_after_a_reconnect(database_url: str) -> None:
    eng = db.make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        with eng.connect() as conn:
            assert conn.execute(STMT, {"a": 2, "b": 3}).one() == (5, "2%")
            assert conn.execute(STMT, {"a": 4, "b": 3}).one() == (7, "4%")
            names = [n for n in _prepared_here(conn) if n.startswith("spool_test_sum_")]
            assert len(names) == 1
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with db.engine().connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            other.commit()
        with eng.connect() as conn, pytest.raises(exc.OperationalError):
            conn.execute(STMT, {"a": 1, "b": 1})  # the dead connection: the pool drops it
        with eng.connect() as conn:  # a new connection prepares it again
            assert conn.execute(STMT, {"a": 1, "b": 1}).one() == (2, "1%")
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != pid
    finally:
        eng.dispose()


def test_off_sends_the_plain_statement(database_url: str, monkeypatch) -> None:
    monkeypatch.setenv("SPOOL_DB_PREPARE", "0")
    settings.get.cache_clear()
    eng = db.make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        with eng.connect() as conn:
            assert conn.execute(STMT, {"a": 2, "b": 3}).one() == (5, "2%")
            assert not [n for n in _prepared_here(conn) if n.startswith("spool_test_sum_")]
    finally:
        eng.dispose()
        monkeypatch.delenv("SPOOL_DB_PREPARE")
        settings.get.cache_clear()
