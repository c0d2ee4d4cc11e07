"""docker/backup.sh round trip on a scratch database of the test PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.deploy.conftest import DOCKER

psycopg2 = pytest.importorskip("psycopg2")

BACKUP_SH = DOCKER / "backup.sh"
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"

pytestmark = pytest.mark.skipif(
    shutil.which("pg_dump") is None or shutil.which("pg_restore") is None,
    reason="pg_dump/pg_restore not installed (scripts/install-system-deps.sh installs them)",
)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]  # SQLAlchemy's postgresql+psycopg2
    return urlunsplit((scheme, parts.netloc, "/" + name, "", ""))


@pytest.fixture
def scratch_url() -> Iterator[str]:
    """A fresh database on the server named by DATABASE_URL, dropped afterwards."""
    server = os.environ.get("DATABASE_URL") or DEFAULT_URL
    admin_url = _with_database(server, "postgres")
    try:
        admin = psycopg2.connect(admin_url, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {urlsplit(admin_url).hostname}: {exc}")
    admin.autocommit = True
    name = f"spool_backup_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(server, name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _sh(
    *args: str, url: str, cwd: Path, keep: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url, "BACKUP_DIR": str(cwd)}
    if keep is not None:
        env["BACKUP_KEEP"] = keep
    return subprocess.run(
        ["sh", str(BACKUP_SH), *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def _count(url: str) -> int:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM jobs_copy")
        (n,) = cur.fetchone()
    conn.close()
    return int(n)


def test_backup_then_restore_brings_rows_back(scratch_url: str, tmp_path: Path) -> None:
    conn = psycopg2.connect(scratch_url)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE jobs_copy (id text PRIMARY KEY, payload jsonb NOT NULL)")
        cur.execute(
            "INSERT INTO jobs_copy SELECT 'job_' || i, jsonb_build_object('n', i) "
            "FROM generate_series(1, 250) AS i"
        )
    conn.close()

    # The driver suffix the app's URLs may carry must not bother libpq.
    app_style = scratch_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    dump = tmp_path / "spool.dump"
    done = _sh("backup", str(dump), url=app_style, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert dump.stat().st_size > 0
    assert not list(tmp_path.glob("*.partial"))

    conn = psycopg2.connect(scratch_url)
    with conn, conn.cursor() as cur:
        cur.execute("DELETE FROM jobs_copy WHERE id <> 'job_1'")
        cur.execute("INSERT INTO jobs_copy VALUES ('job_after_backup', '{}')")
    conn.close()
    assert _count(scratch_url) == 2

    done = _sh("restore", str(dump), url=scratch_url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert _count(scratch_url) == 250
    with psycopg2.connect(scratch_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT payload->>'n' FROM jobs_copy WHERE id = 'job_42'")
        assert cur.fetchone() == ("42",)
    conn.close()


def test_default_name_and_retention(scratch_url: str, tmp_path: Path) -> None:
    old = tmp_path / "spool-20000101T000000Z.dump"
    done = _sh("backup", str(old), url=scratch_url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    os.utime(old, (946684800, 946684800))  # make it the oldest by mtime too

    done = _sh("backup", url=scratch_url, cwd=tmp_path, keep="1")
    assert done.returncode == 0, done.stderr
    (newest,) = tmp_path.glob("spool-*.dump")
    assert newest != old and newest.name.endswith("Z.dump")
    assert f"removed {old}" in done.stdout


def test_restore_refuses_what_is_not_a_dump(scratch_url: str, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dump"
    junk.write_text("not a dump")
    done = _sh("restore", str(junk), url=scratch_url, cwd=tmp_path)
    assert done.returncode != 0
    assert "not a pg_dump custom archive" in done.stderr


def test_usage_without_arguments(tmp_path: Path) -> None:
    done = subprocess.run(["sh", str(BACKUP_SH)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "Usage" in done.stderr
