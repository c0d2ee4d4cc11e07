"""One database connection per request, in autocommit mode, with a transaction only to
write.

The token's user look-up, the view's reads and its writes share one connection, so a
request pays for one pool checkout. It is in autocommit mode: a read is one round trip,
where a transaction would add psycopg2's BEGIN and the pool's ROLLBACK (three).
`transaction()` brackets the statements that must commit together with an explicit
BEGIN ... COMMIT on that same connection.

The hot views (a submit, a job or result read) run Core statements on `connection()`
and make no ORM Session (~150 µs of CPU each). A view that needs the ORM takes `get()`:
a Session on the same connection.

A view that blocks (a long poll, an event stream) calls `release()` first, so that it
holds no connection while it waits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, g
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from spool import db

log = logging.getLogger(__name__)


def connection() -> Connection:
    """The request's connection, checked out of the pool on first use."""
    conn: Connection | None = g.get("_db_conn")
    if conn is None:
        conn = g._db_conn = db.autocommit_engine().connect()
    return conn


def get() -> Session:
    """The request's ORM Session, on the request's connection."""
    s: Session | None = g.get("_db_session")
    if s is None:
        # rollback_only: the Session never commits the connection's (autocommit, so
        # empty) transaction; statements commit on their own or in `transaction()`.
        s = g._db_session = Session(
            bind=connection(), expire_on_commit=False, join_transaction_mode="rollback_only"
        )
    return s


@contextmanager
def transaction(atomic: bool = True) -> Iterator[Session]:
    """The block's statements commit together, or not at all. `atomic=False` when the
    block writes with a single statement, which commits on its own: two round trips
    (BEGIN, COMMIT) fewer.

    Either way the session's own commit ends the block (no round trip in autocommit): it
    runs the session's after_commit hooks, e.g. the webhook wake-ups of
    spool.webhooks.wake_after_commit, and a failure runs its after_rollback ones.
    """
    s = get()
    conn = s.connection()
    if atomic:
        conn.exec_driver_sql("BEGIN")
    try:
        yield s
        s.flush()  # the ORM's pending writes go in before the COMMIT
        if atomic:
            conn.exec_driver_sql("COMMIT")
        s.commit()
    except BaseException:
        if atomic:
            try:
                conn.exec_driver_sql("ROLLBACK")
            except SQLAlchemyError as exc:  # the connection died: the server dropped it
                log.warning("rollback failed: %s", exc)
        s.rollback()  # the session forgets the block's changes and returns the connection
        raise


def release() -> None:
    """Give the request's connection back to the pool (no round trip in autocommit)."""
    s: Session | None = g.pop("_db_session", None)
    if s is not None:
        s.close()
    conn: Connection | None = g.pop("_db_conn", None)
    if conn is not None:
        conn.close()


def install(app: Flask) -> None:
    app.teardown_appcontext(lambda _exc: release())
