"""Engine and session factories, and the schema-at-head check.

Connections are made by factories, never at import. Every process makes its
own engine (workers dispose the one inherited across fork).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import namedtuple
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Engine, Executable, create_engine, event, exc, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from spool import settings

ROOT = Path(__file__).resolve().parent.parent


class SchemaNotAtHead(RuntimeError):
    """The database is not migrated to the code's Alembic head."""


def normalize_url(url: str) -> str:
    """Plain postgresql:// URLs use psycopg2 (SQLAlchemy 2.1 would pick psycopg 3)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def make_engine(
    url: str, pool_size: int | None = None, max_overflow: int | None = None, **kw: Any
) -> Engine:
    s = settings.get()
    eng = create_engine(
        normalize_url(url),
        # Per process: every API process and worker holds up to pool + overflow
        # connections, and together they must fit under PostgreSQL's max_connections.
        pool_size=s.db_pool_size if pool_size is None else pool_size,
        max_overflow=s.db_max_overflow if max_overflow is None else max_overflow,
        pool_timeout=10,
        pool_recycle=1800,
        # A dead database must fail a request in seconds, not hang it.
        connect_args={"connect_timeout": 3, "options": "-c statement_timeout=30000"},
        future=True,
        **kw,
    )
    if s.db_prepare:
        event.listen(eng, "before_cursor_execute", _use_prepared, retval=True)
    event.listen(eng, "checkout", _ping_if_idle)
    event.listen(eng, "checkin", _mark_used)
    event.listen(eng, "connect", _mark_used)  # a new connection needs no test
    return eng


# A connection idle for longer than this is tested (SELECT 1) before use: a restarted
# database must not fail the next request. One in steady use is not: `pool_pre_ping`
# would add a round trip to every checkout, and a connection that dies mid-use is
# detected all the same (the error invalidates the pool; the request answers 503).
PING_IDLE_S = 2.0


def _mark_used(_dbapi_conn: Any, record: Any) -> None:
    record.info["used_at"] = time.monotonic()


def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    if time.monotonic() - record.info.get("used_at", 0.0) < PING_IDLE_S:
        return
    try:
        with dbapi_conn.cursor() as cur:
            cur.execute("SELECT 1")
    except Exception as err:
        # The pool replaces the connection and tries again (SQLAlchemy's documented
        # pessimistic-disconnect recipe).
        raise exc.DisconnectionError(str(err)) from err


# --- statements PostgreSQL parses and plans once per connection ------------------------
#
# psycopg2 sends each statement as text, which PostgreSQL parses and plans every time.
# For the statements every job runs (the API's submit and read, the worker's claim and
# finish) that was most of their server time: a job read took ~500 µs, ~180 µs once
# prepared (bench numbers in BENCHMARKS.md). A statement marked with `prepared()` is
# sent as PREPARE the first time a connection runs it, and as EXECUTE after. Prepared
# statements outlive a rolled-back transaction and die with their connection, as the
# pool record's `info` does.

PREPARE_OPTION = "spool_prepare"
_PARAM = re.compile(r"%\((\w+)\)s")
E = TypeVar("E", bound=Executable)


def prepared(stmt: E, name: str) -> E:
    """`stmt`, run as a prepared statement called `name` (plus a hash of its SQL)."""
    return stmt.execution_options(**{PREPARE_OPTION: name})


@lru_cache(maxsize=256)
def _as_prepared(name: str, statement: str) -> tuple[str, str, str]:
    """(statement name, its PREPARE, its EXECUTE with psycopg2 placeholders)."""
    names: list[str] = []

    def number(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    # PREPARE is sent without parameters, so psycopg2 leaves `%%` as it is.
    body = _PARAM.sub(number, statement).replace("%%", "%")
    ident = f"spool_{name}_{hashlib.sha1(statement.encode()).hexdigest()[:10]}"
    args = ", ".join(f"%({n})s" for n in names)
    return ident, f"PREPARE {ident} AS {body}", f"EXECUTE {ident}" + (f" ({args})" if args else "")


def _use_prepared(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    name = context.execution_options.get(PREPARE_OPTION) if context is not None else None
    if name is None or executemany or not isinstance(parameters, dict):
        return statement, parameters
    return _prepared_once(cursor, conn.connection.info, name, statement), parameters


def _prepared_once(cursor: Any, info: dict[str, Any], name: str, statement: str) -> str:
    """The EXECUTE of `statement`, PREPAREd first if this connection (its pool record's
    `info`) has not prepared it yet."""
    ident, prepare, execute = _as_prepared(name, statement)
    done: set[str] = info.setdefault("spool_prepared", set())
    if ident not in done:
        cursor.execute(prepare)
        done.add(ident)
    return execute


# --- the hottest statements, straight on the driver's cursor ------------------------------
#
# Every job runs four statements: the API's submit and read, the worker's claim and
# finish. Through SQLAlchemy's execution machinery (execution context, events, result and
# row objects) each cost ~115 µs more CPU than the same statement on the pooled
# connection's psycopg2 cursor (bench numbers in BENCHMARKS.md). `rows()` runs a
# statement on that cursor and keeps what SQLAlchemy gave: the pool (checkout test,
# invalidation), the prepared statement, and errors as SQLAlchemy's exceptions, so a lost
# connection is invalidated and callers catch what they caught before. What it leaves
# out is SQLAlchemy's bind and result processing: bound values go in as the driver takes
# them (JSON already dumped), and psycopg2's own conversions are what come out, which for
# Spool's column types (text, numbers, timestamps, booleans, jsonb) are the same values;
# tests/integration/test_db_rows.py holds the two ways equal on the hot statements.

# A row read by column name: SQLAlchemy's Row, or the named tuple of `rows()`.
RowLike = Any


@lru_cache(maxsize=64)
def _row_type(columns: tuple[str, ...]) -> Any:
    return namedtuple("Row", columns)  # its fields are the query's


@lru_cache(maxsize=64)
def _sql_of(stmt: ClauseElement, dialect: Any) -> tuple[str, dict[str, Any]]:
    """The statement's SQL, and the values it binds itself (a literal compared to a
    column, e.g. `status = 'queued'`), which SQLAlchemy's execution would add."""
    compiled = cast(SQLCompiler, stmt.compile(dialect=dialect))
    if compiled.insert_prefetch or compiled.update_prefetch:
        # Python-side column defaults, which SQLAlchemy computes at each execution
        raise ValueError(f"give every column with a Python default a value: {stmt}")
    own = {name: bp.effective_value for name, bp in compiled.binds.items() if not bp.required}
    return str(compiled), own


def first(conn: Connection, stmt: Executable, params: dict[str, Any]) -> RowLike | None:
    """The first of `rows()`, or None."""
    found = rows(conn, stmt, params)
    return found[0] if found else None


def rows(conn: Connection, stmt: Executable, params: dict[str, Any]) -> list[RowLike]:
    """The rows of a statement (bound values as the driver takes them), as named tuples,
    run on `conn`'s driver cursor; prepared when it is marked `prepared()`."""
    name = stmt.get_execution_options().get(PREPARE_OPTION)
    sql, own = _sql_of(cast(ClauseElement, stmt), conn.dialect)  # every Executable of ours is one
    if own:
        params = {**own, **params}
    fairy = conn.connection
    raw = fairy.dbapi_connection
    assert raw is not None  # checked out: a live connection
    if not raw.autocommit and not conn.in_transaction():
        # SQLAlchemy's autobegin, as its own execute would: the caller's commit (or the
        # pool's rollback) then ends what this statement did
        conn.begin()
    cursor = None
    try:
        cursor = raw.cursor()
        if name is not None and settings.get().db_prepare:
            sql = _prepared_once(cursor, fairy.info, name, sql)
        cursor.execute(sql, params)
        if cursor.description is None:
            return []
        make = _row_type(tuple(d[0] for d in cursor.description))._make
        return [make(r) for r in cursor.fetchall()]
    except conn.dialect.loaded_dbapi.Error as err:
        lost = conn.dialect.is_disconnect(err, raw, cursor)
        if lost:
            conn.invalidate(err)
        raise exc.DBAPIError.instance(
            sql, params, err, conn.dialect.loaded_dbapi.Error, connection_invalidated=lost
        ) from err
    finally:
        if cursor is not None:
            cursor.close()


@lru_cache(maxsize=1)
def engine() -> Engine:
    return make_engine(settings.get().database_url)


@lru_cache(maxsize=1)
def autocommit_engine() -> Engine:
    """Each statement commits on its own: reads cost one round trip, not three (psycopg2
    sends BEGIN, and the pool a ROLLBACK, around every transaction). For the API's
    request connections (api/dbsession.py), which open a transaction only to write, and
    the worker's single-statement writes (workers/lease.py)."""
    return make_engine(settings.get().database_url, isolation_level="AUTOCOMMIT")


@lru_cache(maxsize=1)
def _factory() -> sessionmaker[Session]:
    return sessionmaker(bind=engine(), expire_on_commit=False)


def session() -> Session:
    return _factory()()


def clear_caches() -> None:
    """Forget engines and factories (tests and benchmarks that change DATABASE_URL)."""
    for cached in (engine, autocommit_engine, _factory):
        cached.cache_clear()


@contextmanager
def transaction() -> Iterator[Session]:
    """A session in one transaction: committed on success, rolled back on error."""
    s = session()
    try:
        with s.begin():
            yield s
    finally:
        s.close()


def dispose() -> None:
    """Forget connections inherited across fork (the parent keeps its own)."""
    for cached in (engine, autocommit_engine):
        if cached.cache_info().currsize:
            cached().dispose(close=False)


def alembic_config(url: str | None = None):  # -> alembic.config.Config
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.set_main_option(
        "sqlalchemy.url", normalize_url(url or settings.get().database_url).replace("%", "%%")
    )
    return cfg


def upgrade(url: str | None = None) -> None:
    from alembic import command

    command.upgrade(alembic_config(url), "head")


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("postgresql://")).get_current_head()


def current_revision(eng: Engine) -> str | None:
    with eng.connect() as conn:
        exists = conn.execute(text("SELECT to_regclass('alembic_version')")).scalar()
        if not exists:
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def require_head(eng: Engine | None = None) -> None:
    """Refuse to start on a database that is not migrated to head."""
    eng = eng or engine()
    current, head = current_revision(eng), head_revision()
    if current != head:
        raise SchemaNotAtHead(
            f"database schema is at {current or 'nothing'}, the code needs {head}: "
            "run `spool db upgrade` first"
        )
