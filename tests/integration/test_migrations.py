"""Migrations that change indexes on a live database: 0004's concurrent index swap, up,
down and up again, and rerun after a build that was interrupted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from alembic import command
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from spool import db
from tests import support


@pytest.fixture()
def scratch_db(services: support.Services) -> Iterator[str]:
    url = services.create_database()
    yield url
    services.drop_database(url)


def _rows(url: str, sql: str) -> list[Any]:
    eng = create_engine(db.normalize_url(url), poolclass=NullPool)
    try:
        with eng.connect() as conn:
            return list(conn.execute(text(sql)).all())
    finally:
        eng.dispose()


def _indexes(url: str) -> dict[str, str]:
    rows = _rows(url, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'jobs'")
    return {name: definition for name, definition in rows}


def test_0004_swaps_the_queued_index_and_back(scratch_db: str) -> None:
    cfg = db.alembic_config(scratch_db)
    command.upgrade(cfg, "0003")
    assert "ix_jobs_queued_order" in _indexes(scratch_db)
    # What an interrupted concurrent build leaves: an index of the new name, not the
    # one wanted. The rerun must replace it, not keep it.
    eng = create_engine(db.normalize_url(scratch_db), isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(text("CREATE INDEX ix_jobs_queued_key ON jobs (queue)"))
    eng.dispose()

    command.upgrade(cfg, "head")
    after = _indexes(scratch_db)
    assert "ix_jobs_queued_order" not in after
    key = after["ix_jobs_queued_key"]
    assert "priority_rank)::bigint" in key and "INCLUDE (priority_rank, seq)" in key
    assert "WHERE" in key and "queued" in key

    command.downgrade(cfg, "0003")
    back = _indexes(scratch_db)
    assert "ix_jobs_queued_key" not in back and "ix_jobs_queued_order" in back
    command.upgrade(cfg, "head")
    assert _indexes(scratch_db)["ix_jobs_queued_key"] == key


def _jobs_options(url: str) -> set[str]:
    ((options,),) = _rows(url, "SELECT reloptions FROM pg_class WHERE relname = 'jobs'")
    return set(options or [])


def test_0005_vacuums_jobs_after_a_few_thousand_dead_rows(scratch_db: str) -> None:
    cfg = db.alembic_config(scratch_db)
    command.upgrade(cfg, "0005")
    assert _jobs_options(scratch_db) == {
        "autovacuum_vacuum_threshold=2000",
        "autovacuum_vacuum_scale_factor=0.02",
    }
    command.downgrade(cfg, "0004")
    assert _jobs_options(scratch_db) == set()
