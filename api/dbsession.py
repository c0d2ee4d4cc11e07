"""One database session per request: one pool checkout and one transaction.

The token's user look-up, the view's reads and its writes share it, so a request pays
for one checkout and one transaction end instead of one per helper. A view that blocks
(a long poll, an event stream) calls `release()` first, so that it holds no connection
while it waits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, g
from sqlalchemy.orm import Session

from spool import db


def get() -> Session:
    s: Session | None = g.get("_db_session")
    if s is None:
        s = g._db_session = db.session()
    return s


@contextmanager
def transaction() -> Iterator[Session]:
    """Commit what the block did (and the reads before it) on success; roll back on error."""
    s = get()
    try:
        yield s
        s.commit()
    except BaseException:
        s.rollback()
        raise


def release() -> None:
    """End the request's transaction and give its connection back to the pool."""
    s: Session | None = g.pop("_db_session", None)
    if s is not None:
        s.close()


def install(app: Flask) -> None:
    app.teardown_appcontext(lambda _exc: release())
