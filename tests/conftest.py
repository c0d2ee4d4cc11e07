"""Session fixtures: real PostgreSQL and Redis, a fresh database, a running platform."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2.extensions
import pytest
from sqlalchemy import event

from tests import support


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[support.Services]:
    # Under the project (not pytest's 0700 tmp): the embedded PostgreSQL runs as its own user.
    where = support.ROOT / "var" / f"test-embedded-{os.getpid()}"
    svc = support.start_services(where)
    yield svc
    support.stop_services(svc)
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(services: support.Services) -> Iterator[str]:
    """A fresh, migrated database; this process's settings point at it."""
    url = services.create_database()
    os.environ["DATABASE_URL"] = url
    os.environ["REDIS_URL"] = services.redis_url
    from spool import db, redisconn, registry, settings

    settings.get.cache_clear()
    db.clear_caches()
    redisconn.reset()
    registry.models.cache_clear()
    redisconn.client().flushdb()
    db.upgrade(url)
    yield url
    db.engine().dispose()
    services.drop_database(url)


@pytest.fixture(scope="session")
def redis_client(database_url: str):
    from spool import redisconn

    return redisconn.client()


@pytest.fixture(scope="session")
def platform(
    database_url: str, services: support.Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[support.Platform]:
    """The shared platform: API, one worker for every model, beat."""
    p = support.Platform(database_url, services.redis_url, tmp_path_factory.mktemp("var"))
    try:
        p.start_all()
        yield p
    finally:
        p.stop()


@pytest.fixture()
def user_key(database_url: str) -> str:
    return support.create_user()


@pytest.fixture()
def api(platform: support.Platform, user_key: str) -> support.Api:
    return support.Api(platform.url, user_key)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("SPOOL_VAR_DIR", str(Path(__file__).parent.parent / "var" / "test"))


class _RecordingCursor(psycopg2.extensions.cursor):
    """A psycopg2 cursor that notes what it sends while a test records (`statements`):
    SQLAlchemy's executions and spool.db.rows' alike, as the driver sends them."""

    sink: list[str] | None = None

    def execute(self, query: Any, vars: Any = None) -> Any:  # psycopg2's name
        sink = _RecordingCursor.sink
        text = " ".join(str(query).split())
        # A connection prepares each statement once (PREPARE), and the pool tests a
        # connection idle for a while (SELECT 1): neither is the work under test.
        if sink is not None and not text.startswith("PREPARE ") and text != "SELECT 1":
            sink.append(("auto:" if self.connection.autocommit else "") + text[:60])
        return super().execute(query, vars)


@pytest.fixture()
def statements(database_url: str) -> Iterator[list[str]]:
    """Every statement this process sends to PostgreSQL, on either engine; those in
    autocommit (each its own transaction: no BEGIN, no COMMIT) are marked `auto:`. The
    hot ones are prepared statements (spool.db.prepared): `EXECUTE spool_<name>_…`."""
    sent: list[str] = []

    def recording(dbapi_conn: Any, *_: Any) -> None:
        dbapi_conn.cursor_factory = _RecordingCursor

    from spool import db

    engines = (db.engine(), db.autocommit_engine())
    for eng in engines:
        event.listen(eng, "checkout", recording)
    _RecordingCursor.sink = sent
    try:
        yield sent
    finally:
        _RecordingCursor.sink = None
        for eng in engines:
            event.remove(eng, "checkout", recording)
