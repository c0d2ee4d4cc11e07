"""`spool up`: the whole platform as child processes, stopped cleanly on Ctrl-C/SIGTERM.

With no DATABASE_URL / REDIS_URL it starts the embedded PostgreSQL and Redis
under ./var; with them set it uses those and starts no server of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
from sqlalchemy import select

from spool import embedded, settings


def _ensure_dev_user(database_url: str, var_dir: Path) -> str:
    """The development user's API key, created once and kept in var/dev-api-key."""
    from spool import db, users
    from spool.models import User

    key_file = var_dir / "dev-api-key"
    engine = db.make_engine(database_url, pool_size=1)
    try:
        from sqlalchemy.orm import Session

        with Session(engine) as s, s.begin():
            if key_file.exists():
                key = key_file.read_text().strip()
                if users.authenticate(s, key) is not None:
                    return key
            user = s.scalar(select(User).where(User.name == "dev"))
            if user is None:
                user, key = users.create_user(s, "dev", admin=True)
            else:
                key = users.add_key(s, user)
    finally:
        engine.dispose()
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return key


def run_up(port: int | None = None, build_tiny: bool = True) -> None:
    s = settings.get()
    var = s.var_dir
    var.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy()
    env["SPOOL_VAR_DIR"] = str(var)
    if port:
        env["SPOOL_PORT"] = str(port)
    port = int(env.get("SPOOL_PORT", s.port))

    embedded_pg = not s.database_url
    redis_server: embedded.EmbeddedRedis | None = None
    if embedded_pg:
        click.echo("starting embedded PostgreSQL under var/pgdata …")
        env["DATABASE_URL"] = embedded.start_postgres(var)
    if not s.redis_url:
        click.echo("starting embedded Redis under var/redis …")
        redis_server = embedded.start_redis(var)
        env["REDIS_URL"] = redis_server.url

    from spool import db

    db.upgrade(env["DATABASE_URL"])
    key = _ensure_dev_user(env["DATABASE_URL"], var)
    if build_tiny:
        try:
            from spool.tiny_models import init_tiny
        except ImportError:
            click.echo("tiny models skipped: install the `gpu` extra for image/text jobs")
        else:
            click.echo("building tiny models (once) …")
            init_tiny(var)

    me = [sys.executable, "-m", "spool.cli"]
    children: list[subprocess.Popen] = []
    names: dict[int, str] = {}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for cmd in (["api"], ["worker"], ["beat"]):
            children.append(subprocess.Popen(me + cmd, env=env))
            names[children[-1].pid] = cmd[0]
        click.echo(
            f"\nSpool is up: http://{s.host}:{port}  (docs: /docs)\n"
            f"development API key (also in {var / 'dev-api-key'}):\n{key}\n"
            "Ctrl-C stops everything."
        )
        while not stopping:
            for child in children:
                if child.poll() is not None:
                    click.echo(f"spool {names[child.pid]} exited with {child.returncode}; stopping")
                    stopping = True
            time.sleep(0.3)
    finally:
        click.echo("stopping …")
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        if redis_server:
            redis_server.stop()
        if embedded_pg:
            embedded.stop_postgres(var)
        click.echo("stopped.")
