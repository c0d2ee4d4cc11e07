"""Shared benchmark plumbing: an isolated platform, a cheap HTTP client, stats, tables.

The platform is started exactly as the tests start one (tests/support.py): its own
PostgreSQL database and its own redis-server, with real API (gunicorn + gevent),
worker and beat processes. Settings default to what `spool up` runs, not to the
tests' fast timings.

The load generator shares the machine with the platform (2 cores in the published
runs), so it is a plain asyncio HTTP/1.1 keep-alive client: one event loop, one
connection per simulated client, a few tens of microseconds of CPU per request.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from tests import support

ROOT = support.ROOT
# Piped into a file, rich assumes 80 columns and squeezes wide tables into "…" cells.
console = Console(width=None if sys.stdout.isatty() else 150)

# What `spool up` runs (spool/settings.py defaults), overriding the tests' fast timings.
SPOOL_UP_ENV = {
    "SPOOL_API_WORKERS": "2",
    "SPOOL_LEASE_S": "30",
    "SPOOL_HEARTBEAT_S": "0",
    "SPOOL_SWEEP_INTERVAL_S": "5",
    "SPOOL_RESEND_GRACE_S": "10",
    "SPOOL_RATE_LIMIT_SUBMIT": "50/second;2000/minute",
    "SPOOL_RATE_LIMIT_READ": "200/second;20000/minute",
    "SPOOL_LOG_LEVEL": "INFO",
    "SPOOL_LOG_FORMAT": "json",
}
# Same shape (two limits, so the same Redis round trips per request), never reached: for
# benchmarks that measure the platform itself with a single user.
UNREACHABLE_LIMITS = {
    "SPOOL_RATE_LIMIT_SUBMIT": "1000000/second;100000000/minute",
    "SPOOL_RATE_LIMIT_READ": "1000000/second;100000000/minute",
}


# --- the platform under test -----------------------------------------------------------


def spool_up_concurrency() -> int:
    """The job slots `spool up`'s worker gets: it serves every model, and the auto rule
    (spool/cli.py) sizes it for the largest micro-batch. The benchmarks' workers serve
    echo only (see add_worker) but keep that many slots."""
    from spool import registry

    largest = max((spec.max_batch_size for spec in registry.models().values()), default=1)
    return max(4, 2 * largest)


class BenchPlatform:
    """An isolated platform (own database, own redis-server) started like `spool up`."""

    def __init__(self, name: str, **env: str) -> None:
        exit_on_sigterm()
        self.var_dir = ROOT / "var" / f"bench-{name}-{uuid.uuid4().hex[:6]}"
        self.services = support.start_services(self.var_dir / "services")
        base = {**SPOOL_UP_ENV, "SPOOL_WORKER_CONCURRENCY": str(spool_up_concurrency())}
        self.p = support.IsolatedPlatform(self.services, self.var_dir, {**base, **env})

    @property
    def url(self) -> str:
        return self.p.url

    @property
    def port(self) -> int:
        return self.p.port

    @property
    def database_url(self) -> str:
        return self.p.database_url

    @property
    def redis_url(self) -> str:
        return self.p.redis_url

    def start(self, workers: int = 1) -> BenchPlatform:
        self.p.start_api()
        for _ in range(workers):
            self.add_worker()
        self.p.start_beat()
        return self

    def add_worker(self) -> support.Proc:
        # Echo and the housekeeping queue. Not every model: a worker warms its GPU models
        # in the background after start-up (importing torch and friends for tens of seconds
        # of CPU), which would be measured as platform overhead on a 2-core machine.
        return self.p.start_worker(models="echo", queues="spool.cpu")

    def users(self, n: int) -> list[str]:
        """n new users; returns their API keys (in-process: the CLI costs a second each)."""
        from spool import db, users

        eng = db.make_engine(self.database_url, pool_size=1)
        keys = []
        try:
            with Session(eng) as s, s.begin():
                for _ in range(n):
                    keys.append(users.create_user(s, f"bench_{uuid.uuid4().hex[:10]}")[1])
        finally:
            eng.dispose()
        return keys

    def sql(self, query: str, **params: Any) -> list[Any]:
        return self.p.sql(query, **params)

    def pids(self) -> dict[str, list[int]]:
        """Processes by component, for CPU accounting."""
        out: dict[str, list[int]] = {"api": [], "worker": [], "beat": [], "redis": []}
        for name, procs in (
            ("api", [self.p.api]),
            ("worker", self.p.workers),
            ("beat", [self.p.beat]),
        ):
            for proc in procs:
                if proc is not None and proc.alive():
                    out[name] += family(proc.pid)
        out["redis"] = [self.p.redis.process.pid]
        out["postgres"] = postgres_backends(self.database_url)
        return out

    def close(self, keep_logs: bool = False) -> Path | None:
        """Stop everything and drop the database; with keep_logs, the processes' logs are
        kept under var/bench-logs-… (returned) for a run that found something wrong."""
        import shutil

        self.p.close()
        support.stop_services(self.services)
        kept = None
        if keep_logs:
            kept = ROOT / "var" / self.var_dir.name.replace("bench-", "bench-logs-", 1)
            kept.mkdir(parents=True, exist_ok=True)
            for log in self.var_dir.glob("*.log"):
                shutil.copy(log, kept / log.name)
        shutil.rmtree(self.var_dir, ignore_errors=True)
        return kept


def exit_on_sigterm() -> None:
    """SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so `finally` stops the platform
    instead of leaving its processes and database behind."""

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def commit_latency(database_url: str, n: int = 200) -> Latencies:
    """One-row INSERT + COMMIT on the platform's server: the WAL flush every durable
    state change waits for."""
    from spool.db import normalize_url

    eng = create_engine(normalize_url(database_url), poolclass=NullPool)
    lat = Latencies()
    try:
        with eng.connect() as conn:
            # A real table: a temporary one writes no WAL, so its commit never flushes.
            conn.execute(text("CREATE TABLE IF NOT EXISTS bench_commit (x int)"))
            conn.commit()
            for _ in range(n):
                m0 = time.perf_counter()
                conn.execute(text("INSERT INTO bench_commit VALUES (1)"))
                conn.commit()
                lat.add(time.perf_counter() - m0)
    finally:
        eng.dispose()
    return lat


def family(pid: int) -> list[int]:
    try:
        proc = psutil.Process(pid)
        return [pid] + [c.pid for c in proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def postgres_sessions(database_url: str) -> int:
    """Sessions this database has had since its server started (PostgreSQL 14+): the
    difference over a run is how many connections the pools opened during it."""
    from spool.db import normalize_url

    eng = create_engine(normalize_url(database_url), poolclass=NullPool)
    try:
        with eng.connect() as conn:
            got = conn.execute(
                text("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
            ).scalar()
            return int(got or 0) - 1  # not counting this one
    finally:
        eng.dispose()


def postgres_backends(database_url: str) -> list[int]:
    """The server processes serving connections to this database (the pools keep them)."""
    from spool.db import normalize_url

    eng = create_engine(normalize_url(database_url), poolclass=NullPool)
    try:
        with eng.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            return [r[0] for r in rows]
    finally:
        eng.dispose()


def cpu_times(pids: Iterable[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


class CpuMeter:
    """CPU seconds spent by each component (and this process) between start() and stop().

    `groups` (or, when it is a function, what it returns at each end: e.g. `plat.pids`)
    names each component's processes. A process that appeared in between (a new database
    connection) counts whole; one that ended in between is lost (an undercount, never a
    negative)."""

    def __init__(self, groups: dict[str, list[int]] | Callable[[], dict[str, list[int]]]) -> None:
        self.groups: Callable[[], dict[str, list[int]]] = (
            groups if callable(groups) else lambda: groups
        )
        self.before: dict[str, dict[int, float]] = {}
        self.used: dict[str, float] = {}

    def start(self) -> CpuMeter:
        self.before = {k: cpu_times(v) for k, v in self.groups().items()}
        self.before["client (bench)"] = {0: _self_cpu()}
        return self

    def stop(self) -> dict[str, float]:
        now = {k: cpu_times(v) for k, v in self.groups().items()}
        now["client (bench)"] = {0: _self_cpu()}
        self.used = {
            k: sum(t - self.before.get(k, {}).get(pid, 0.0) for pid, t in times.items())
            for k, times in now.items()
            if times
        }
        return self.used


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


# --- a cheap HTTP/1.1 client -----------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpError(Exception):
    """The connection failed or closed mid-request (not an HTTP status)."""


class Http:
    """One keep-alive HTTP/1.1 connection, as one client would hold it."""

    IDLE_S = 4.0  # gunicorn closes idle keep-alive connections after 5 s

    def __init__(self, host: str, port: int, token: str | None = None) -> None:
        self.host, self.port = host, port
        self.token = token
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None
        self._last = 0.0

    @classmethod
    def for_url(cls, url: str, token: str | None = None) -> Http:
        hostport = url.split("://", 1)[1].rstrip("/")
        host, _, port = hostport.partition(":")
        return cls(host, int(port or 80), token)

    async def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._r = self._w = None

    async def _connect(self) -> None:
        await self.close()
        self._r, self._w = await asyncio.open_connection(self.host, self.port)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 90.0,
    ) -> Response:
        if self._w is None or time.monotonic() - self._last > self.IDLE_S:
            await self._connect()
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        if body is not None:
            lines.append("Content-Type: application/json")
        if payload or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(payload)}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
        try:
            resp = await asyncio.wait_for(self._roundtrip(raw), timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            await self.close()
            raise HttpError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        self._last = time.monotonic()
        if resp.headers.get("connection", "").lower() == "close":
            await self.close()
        return resp

    async def _roundtrip(self, raw: bytes) -> Response:
        assert self._r is not None and self._w is not None
        self._w.write(raw)
        await self._w.drain()
        head = await self._r.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await self._r.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._chunked()
        else:
            body = await self._r.read()
            headers["connection"] = "close"
        return Response(status, headers, body)

    async def _chunked(self) -> bytes:
        assert self._r is not None
        parts: list[bytes] = []
        while True:
            size = int((await self._r.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._r.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self._r.readexactly(size))
            await self._r.readexactly(2)


async def login(url: str, api_key: str) -> str:
    http = Http.for_url(url)
    try:
        r = await http.request("POST", "/v1/auth/token", {"api_key": api_key})
        if r.status != 200:
            raise RuntimeError(f"login failed: {r.status} {r.body[:200]!r}")
        return str(r.json()["access_token"])
    finally:
        await http.close()


# --- statistics and tables -------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks; NaN when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Latencies:
    """Seconds, summarized in milliseconds."""

    values: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.values.append(seconds)

    def ms(self, q: float) -> float:
        return pct(self.values, q) * 1000

    def summary(self) -> str:
        if not self.values:
            return "-"
        return f"p50 {self.ms(50):.1f} / p95 {self.ms(95):.1f} / p99 {self.ms(99):.1f} ms"


async def closed_loop(
    url: str,
    token: str,
    job: Callable[[Http, int, int], Awaitable[None]],
    clients: int,
    seconds: float,
    meter: CpuMeter,
    warm_s: float = 1.0,
) -> tuple[int, int, Latencies]:
    """`clients` clients each run `job(http, client, n)` back to back. The first `warm_s`
    (the clients falling into step) are not counted; `meter` measures the window after.
    Returns (jobs done in the window, errors, their latencies)."""
    start = time.monotonic()
    t_a, t_b = start + warm_s, start + warm_s + seconds
    lat = Latencies()
    counts = {"done": 0, "errors": 0}

    async def client(c: int) -> None:
        http = Http.for_url(url, token)
        n = 0
        try:
            while time.monotonic() < t_b:
                m0 = time.monotonic()
                try:
                    await job(http, c, n)
                except HttpError as exc:
                    counts["errors"] += 1
                    if counts["errors"] <= 3:
                        console.print(f"[red]error[/red] {exc}")
                    await asyncio.sleep(0.1)  # do not spin on a failing platform
                    continue
                finally:
                    n += 1
                m1 = time.monotonic()
                if t_a <= m1 <= t_b:
                    counts["done"] += 1
                    lat.add(m1 - m0)
        finally:
            await http.close()

    async def metering() -> None:
        await asyncio.sleep(warm_s)
        meter.start()
        await asyncio.sleep(seconds)
        meter.stop()

    await asyncio.gather(metering(), *(client(c) for c in range(clients)))
    return counts["done"], counts["errors"], lat


def answers(url: str) -> bool:
    """Whether `url` answers 200 now (a server still starting does not)."""
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    return t


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def header(what: str) -> None:
    cpus = psutil.cpu_count() or 0
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    console.print(
        f"[bold]{what}[/bold] — {cpus} CPU (load average before: {load}), "
        f"PostgreSQL {'from DATABASE_URL' if os.environ.get('DATABASE_URL') else 'embedded'}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )


def ensure_dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
