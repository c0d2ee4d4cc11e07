"""Test plumbing: real services, real processes, a thin HTTP client.

PostgreSQL and Redis come from DATABASE_URL / REDIS_URL when set (CI points them
at the machine's servers); otherwise the embedded ones are started, exactly as
`spool up` does. Each test session gets a fresh database of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parent.parent
SPOOL = [sys.executable, "-m", "spool.cli"]


@dataclass
class Services:
    server_url: str  # a PostgreSQL URL on the server where test databases are created
    redis_url: str
    embedded: list[Any] = field(default_factory=list)

    def create_database(self) -> str:
        from spool.db import normalize_url

        name = f"spool_test_{uuid.uuid4().hex[:10]}"
        eng = create_engine(normalize_url(self.server_url), isolation_level="AUTOCOMMIT")
        with eng.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        eng.dispose()
        return (
            make_url(normalize_url(self.server_url))
            .set(database=name)
            .render_as_string(hide_password=False)
        )

    def drop_database(self, url: str) -> None:
        from spool.db import normalize_url

        name = make_url(url).database
        eng = create_engine(
            normalize_url(self.server_url), isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        try:
            with eng.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except OperationalError as exc:  # cleanup only: never fail a test run on it
            warnings.warn(f"could not drop test database {name}: {exc}", stacklevel=1)
        finally:
            eng.dispose()


def start_services(var_dir: Path) -> Services:
    from spool import embedded

    db_url = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    started: list[Any] = []
    if not db_url:
        db_url = embedded.start_postgres(var_dir)
        started.append(("pg", var_dir))
    if not redis_url:
        r = embedded.start_redis(var_dir, persist=False)
        redis_url = r.url
        started.append(r)
    return Services(db_url, redis_url, started)


def stop_services(svc: Services) -> None:
    from spool import embedded

    for item in svc.embedded:
        if isinstance(item, tuple):
            embedded.stop_postgres(item[1])
        else:
            item.stop()


class Proc:
    """A child process in its own session, so a kill takes its children too."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.log = args, log
        self._fh = log.open("ab")
        self.p = subprocess.Popen(
            args,
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, sig)
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(10)
        self._fh.close()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def free_port() -> int:
    from spool.embedded import free_port as fp

    return fp()


# Fast timings so faults resolve in seconds, not minutes.
FAST_ENV = {
    "SPOOL_LEASE_S": "3",
    "SPOOL_HEARTBEAT_S": "0.5",
    "SPOOL_SWEEP_INTERVAL_S": "0.5",
    "SPOOL_RESEND_GRACE_S": "2",
    "SPOOL_API_WORKERS": "1",
    "SPOOL_WORKER_CONCURRENCY": "4",
    "SPOOL_TORCH_THREADS": "1",
    "SPOOL_RATE_LIMIT_SUBMIT": "100000/minute",
    "SPOOL_RATE_LIMIT_READ": "100000/minute",
    "SPOOL_LOG_LEVEL": "INFO",
    "SPOOL_LOG_FORMAT": "json",
    "SPOOL_METRICS_PORT": "0",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


class Platform:
    """API, workers and beat as real processes against the test database and Redis."""

    def __init__(
        self,
        database_url: str,
        redis_url: str,
        var_dir: Path,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.database_url, self.redis_url, self.var_dir = database_url, redis_url, var_dir
        self.extra_env = extra_env or {}
        self.procs: list[Proc] = []
        self.port = free_port()
        self.api: Proc | None = None
        self.workers: list[Proc] = []
        self.beat: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPOOL_")}
        env.update(FAST_ENV)
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            SPOOL_VAR_DIR=str(self.var_dir),
            SPOOL_PORT=str(self.port),
        )
        env.update(self.extra_env)
        env.update(overrides)
        return env

    def _start(self, name: str, args: list[str], **env: str) -> Proc:
        self.var_dir.mkdir(parents=True, exist_ok=True)
        proc = Proc(SPOOL + args, self.env(**env), self.var_dir / f"{name}.log")
        self.procs.append(proc)
        return proc

    def start_api(self, **env: str) -> Proc:
        self.api = self._start("api", ["api"], **env)
        self.wait_ready()
        return self.api

    def start_worker(
        self, models: str | None = None, queues: str | None = None, **env: str
    ) -> Proc:
        args = ["worker"]
        if models:
            args += ["--models", models]
        if queues:
            args += ["--queues", queues]
        w = self._start(f"worker{len(self.workers)}", args, **env)
        self.workers.append(w)
        self.wait_worker(w)
        return w

    def wait_worker(self, w: Proc, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready" in w.log.read_text(errors="replace"):
                return
            if not w.alive():
                raise RuntimeError(f"worker exited:\n{w.tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready in {timeout}s:\n{w.tail()}")

    def start_beat(self) -> Proc:
        self.beat = self._start("beat", ["beat"])
        return self.beat

    def start_all(self, models: str | None = None) -> Platform:
        self.start_api()
        self.start_worker(models)
        self.start_beat()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.api and not self.api.alive():
                raise RuntimeError(f"api exited:\n{self.api.tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"api not ready:\n{self.api.tail() if self.api else ''}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()


def create_user(name: str | None = None, admin: bool = False) -> str:
    """A user in the test database (in-process, through spool.users); returns its API key."""
    from spool import db, users

    with db.transaction() as s:
        _, key = users.create_user(s, name or f"u_{uuid.uuid4().hex[:8]}", admin)
    return key


def create_user_id(name: str | None = None) -> str:
    """A user in the test database (in-process); returns its id."""
    from spool import db, users

    with db.transaction() as s:
        user, _ = users.create_user(s, name or f"u_{uuid.uuid4().hex[:8]}")
        return user.id


def own_queue() -> tuple[str, str]:
    """A model name no other test uses and its queue: no worker of the test platform
    consumes it, and a test's claims on it find only the test's own jobs."""
    from spool import registry

    model = f"m{uuid.uuid4().hex[:8]}"
    return model, registry.queue_name(model)


def queue_job(user_id: str, model: str, **req: Any) -> str:
    """An echo job of `model` recorded as queued (no message sent); returns its id."""
    from spool import db, jobs

    row = jobs.new_row(user_id, {"kind": "echo", "model": model, "input": {"value": 1}, **req})
    with db.transaction() as s:
        jobs.insert_rows(s, [row])
    return row["id"]


class Api:
    """A client as a user would write one: requests + a bearer token."""

    def __init__(self, base: str, api_key: str | None = None) -> None:
        self.base = base
        self.s = requests.Session()
        self.api_key = api_key
        if api_key:
            self.login(api_key)

    def login(self, api_key: str) -> None:
        r = self.s.post(self.base + "/v1/auth/token", json={"api_key": api_key}, timeout=10)
        r.raise_for_status()
        self.s.headers["Authorization"] = "Bearer " + r.json()["access_token"]

    def get(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 70)
        return self.s.get(self.base + path, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 70)
        return self.s.post(self.base + path, **kw)

    def submit(
        self, input: dict | None = None, kind: str = "echo", model: str = "echo", **fields: Any
    ) -> dict:
        r = self.post(
            "/v1/jobs", json={"kind": kind, "model": model, "input": input or {}, **fields}
        )
        assert r.status_code == 202, r.text
        return r.json()

    def wait(self, job_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.get(f"/result/{job_id}", params={"wait": min(20, timeout)})
            if r.status_code != 202:
                return self.get(f"/v1/jobs/{job_id}").json()
        raise AssertionError(
            f"job {job_id} did not finish in {timeout}s: {self.get(f'/v1/jobs/{job_id}').json()}"
        )


def wait_until(pred, timeout: float = 30, every: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        val = pred()
        if val:
            return val
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


class IsolatedPlatform(Platform):
    """A platform with its own database and its own Redis server, which a test may kill,
    restart or flush without disturbing any other test."""

    def __init__(self, services: Services, var_dir: Path, extra_env: dict[str, str] | None = None):
        from spool import db, embedded

        self.services = services
        url = services.create_database()
        db.upgrade(url)
        self.redis_port = embedded.free_port()
        self.redis = embedded.start_redis(var_dir, port=self.redis_port)
        super().__init__(url, self.redis.url, var_dir, extra_env)

    def redis_client(self):
        import redis

        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def kill_redis(self) -> None:
        self.redis.process.kill()
        self.redis.process.wait(10)

    def restart_redis(self) -> None:
        from spool import embedded

        self.redis = embedded.start_redis(self.var_dir, port=self.redis_port)

    def user(self, name: str | None = None) -> str:
        out = subprocess.run(
            SPOOL + ["users", "create", name or f"u_{uuid.uuid4().hex[:8]}"],
            env=self.env(),
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        return out.stdout.strip().splitlines()[-1]

    def sql(self, query: str, **params: Any) -> list[Any]:
        from spool.db import normalize_url

        eng = create_engine(normalize_url(self.database_url), poolclass=NullPool)
        try:
            with eng.begin() as conn:
                return list(conn.execute(text(query), params))
        finally:
            eng.dispose()

    def close(self) -> None:
        self.stop()
        self.redis.stop()
        self.services.drop_database(self.database_url)
