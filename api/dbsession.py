"""One database session per request, in autocommit mode, with a transaction only to write.

The token's user look-up, the view's reads and its writes share one session, so a
request pays for one pool checkout. Its connection is in autocommit mode: a read is one
round trip, where a transaction would add psycopg2's BEGIN and the pool's ROLLBACK
(three). `transaction()` brackets the statements that must commit together with an
explicit BEGIN ... COMMIT on that same connection.

A view that blocks (a long poll, an event stream) calls `release()` first, so that it
holds no connection while it waits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, g
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from spool import db

log = logging.getLogger(__name__)


def get() -> Session:
    s: Session | None = g.get("_db_session")
    if s is None:
        s = g._db_session = db.autocommit_session()
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


def install(app: Flask) -> None:
    app.teardown_appcontext(lambda _exc: release())
