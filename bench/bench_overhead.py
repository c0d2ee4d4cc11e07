"""Platform overhead: Spool's echo job against bare Celery, same Redis, same worker count.

    python -m bench.bench_overhead [--jobs 500] [--clients 32] [--seconds 3.5] [--rounds 3]

1. Latency: --jobs sequential echo jobs, from POST /v1/jobs to GET /result/<id>?wait=30
   answering 200 (a long poll, so no poll interval is measured), against bare Celery's
   `noop.delay(x).get()` (bench/bare_celery.py) on the same Redis. For reference, also
   the one-request client: POST with `Prefer: wait=30`, answered 200 with the result.
2. Throughput: --clients closed-loop clients (submit, wait for the result, repeat) for
   --seconds with 1 and then 2 worker processes, against bare Celery with as many worker
   processes (thread pool, same concurrency). For reference, also the one-request client.
   The three take turns, --rounds times, and each ratio is the median of the rounds'
   own: on a shared VM whose speed drifts from one window to the next, a ratio of two
   windows far apart in time measured the drift as much as the platforms.
3. Where the time goes: job-row timestamps split each job into API intake, queue,
   run and result-visible; CPU seconds per job of each process at full load; a cProfile
   of the API path (in-process Flask test client: no gunicorn, no HTTP parsing).
Targets (DESIGN.md, Performance): p50 within 3x of bare Celery, throughput at least half.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from statistics import median
from typing import Any

import redis

from bench.common import (
    UNREACHABLE_LIMITS,
    BenchPlatform,
    CpuMeter,
    Http,
    HttpError,
    Latencies,
    closed_loop,
    commit_latency,
    console,
    family,
    header,
    login,
    pct,
    postgres_sessions,
    table,
)

ECHO = {"kind": "echo", "model": "echo"}
WARMUP_JOBS = 30


@dataclass
class Done:
    job_id: str
    t0: float  # wall clock at send, comparable with the job row's timestamps
    t_end: float  # wall clock when the 200 arrived
    post_s: float
    total_s: float


@dataclass
class Throughput:
    jobs_s: float
    done: int
    errors: int
    latency: Latencies
    cpu: dict[str, float] = field(default_factory=dict)
    new_db_sessions: int | None = None  # connections the pools opened during the run


def combined(runs: list[Throughput]) -> Throughput:
    """Windows of equal length as one: their jobs, errors, latencies and CPU together."""
    cpu: dict[str, float] = defaultdict(float)
    for t in runs:
        for k, v in t.cpu.items():
            cpu[k] += v
    return Throughput(
        sum(t.jobs_s for t in runs) / len(runs),
        sum(t.done for t in runs),
        sum(t.errors for t in runs),
        Latencies([v for t in runs for v in t.latency.values]),
        dict(cpu),
    )


# --- Spool ---------------------------------------------------------------------------


async def spool_job(http: Http, value: int) -> Done:
    t0, m0 = time.time(), time.perf_counter()
    r = await http.request("POST", "/v1/jobs", {**ECHO, "input": {"value": value}})
    if r.status != 202:
        raise HttpError(f"POST /v1/jobs answered {r.status}: {r.body[:200]!r}")
    post_s = time.perf_counter() - m0
    job_id = r.json()["id"]
    while True:
        r = await http.request("GET", f"/result/{job_id}?wait=30")
        if r.status == 200:
            break
        if r.status != 202:
            raise HttpError(f"GET /result answered {r.status}: {r.body[:200]!r}")
    return Done(job_id, t0, time.time(), post_s, time.perf_counter() - m0)


async def spool_sequential(url: str, token: str, n: int) -> list[Done]:
    http = Http.for_url(url, token)
    try:
        return [await spool_job(http, i) for i in range(n)]
    finally:
        await http.close()


async def spool_prefer_job(http: Http, value: int) -> None:
    """The one-request client: POST with `Prefer: wait=30`, answered 200 with the result."""
    body = {**ECHO, "input": {"value": value}}
    r = await http.request("POST", "/v1/jobs", body, headers={"Prefer": "wait=30"})
    if r.status != 200:
        raise HttpError(f"POST /v1/jobs with Prefer: wait answered {r.status}: {r.body[:200]!r}")


async def spool_prefer_wait(url: str, token: str, n: int) -> Latencies:
    http = Http.for_url(url, token)
    lat = Latencies()
    try:
        for i in range(n):
            m0 = time.perf_counter()
            await spool_prefer_job(http, i)
            lat.add(time.perf_counter() - m0)
        return lat
    finally:
        await http.close()


async def spool_throughput(
    url: str, token: str, clients: int, seconds: float, meter: CpuMeter, one_request: bool = False
) -> Throughput:
    """Closed loop: each client submits, waits for the result, repeats. The first
    second warms up; the window after it is measured. `one_request`: the client sends
    one POST with `Prefer: wait` instead of a POST and a GET /result?wait."""

    async def job(http: Http, c: int, n: int) -> None:
        value = c * 1_000_000 + n
        await (spool_prefer_job(http, value) if one_request else spool_job(http, value))

    done, errors, lat = await closed_loop(url, token, job, clients, seconds, meter, warm_s=1.0)
    return Throughput(done / seconds, done, errors, lat, meter.used)


def phases(plat: BenchPlatform, done: list[Done]) -> list[tuple[str, float, float]]:
    """Median and p95 (ms) of each stretch of a job's life, from its row's timestamps."""
    rows = plat.sql(
        "SELECT id, extract(epoch FROM created_at), extract(epoch FROM started_at), "
        "extract(epoch FROM finished_at) FROM jobs WHERE id = ANY(:ids)",
        ids=[d.job_id for d in done],
    )
    ts = {r[0]: (float(r[1]), float(r[2]), float(r[3])) for r in rows}
    parts: dict[str, list[float]] = defaultdict(list)
    for d in done:
        created, started, finished = ts[d.job_id]
        parts["API intake: send → row created (HTTP, auth, validation)"].append(created - d.t0)
        parts["queue: row created → claimed (commit, broker, worker)"].append(started - created)
        parts["run: claimed → finish UPDATE (echo + bookkeeping)"].append(finished - started)
        parts["visible: finish UPDATE → 200 at client (commit, event, wake)"].append(
            d.t_end - finished
        )
        parts["POST /v1/jobs response alone"].append(d.post_s)
        parts["total"].append(d.total_s)
    return [(k, pct(v, 50) * 1000, pct(v, 95) * 1000) for k, v in parts.items()]


# --- bare Celery ---------------------------------------------------------------------


class BareCelery:
    """Bare Celery worker processes on the platform's Redis, and a client."""

    def __init__(self, redis_url: str, var_dir: Any, concurrency: int) -> None:
        self.redis_url, self.var_dir, self.concurrency = redis_url, var_dir, concurrency
        self.procs: list[subprocess.Popen] = []
        os.environ["BENCH_REDIS_URL"] = redis_url
        from bench import bare_celery

        self.app, self.noop = bare_celery.app, bare_celery.noop

    def add_worker(self) -> None:
        log = self.var_dir / f"bare{len(self.procs)}.log"
        env = {**os.environ, "BENCH_REDIS_URL": self.redis_url}
        cmd = [
            sys.executable, "-m", "celery", "-A", "bench.bare_celery", "worker",
            "-P", "threads", "-c", str(self.concurrency), "-Q", "bench.bare",
            "-n", f"bare{len(self.procs)}@%h", "--without-gossip", "--without-mingle",
            "-l", "INFO",
        ]  # fmt: skip
        with log.open("ab") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bare celery worker did not start:\n{log.read_text()}")
            time.sleep(0.1)

    def pids(self) -> dict[str, list[int]]:
        return {"worker": [p for proc in self.procs for p in family(proc.pid)]}

    def job(self, value: int) -> float:
        m0 = time.perf_counter()
        if self.noop.delay(value).get(timeout=30) != value:
            raise RuntimeError("bare celery returned a wrong value")
        return time.perf_counter() - m0

    def sequential(self, n: int) -> Latencies:
        lat = Latencies()
        for i in range(n):
            lat.add(self.job(i))
        return lat

    def throughput(self, clients: int, seconds: float, meter: CpuMeter) -> Throughput:
        warm = 1.0
        start = time.monotonic()
        t_a, t_b = start + warm, start + warm + seconds
        lat = Latencies()
        lock = threading.Lock()
        counts = {"done": 0, "errors": 0}

        def client(i: int) -> None:
            n = 0
            while time.monotonic() < t_b:
                m0 = time.monotonic()
                try:
                    self.job(i * 1_000_000 + n)
                except Exception:
                    with lock:
                        counts["errors"] += 1
                    continue
                finally:
                    n += 1
                m1 = time.monotonic()
                if t_a <= m1 <= t_b:
                    with lock:
                        counts["done"] += 1
                        lat.add(m1 - m0)

        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client, i) for i in range(clients)]
            time.sleep(warm)
            meter.start()
            time.sleep(seconds)
            meter.stop()
            for f in futures:
                f.result()
        return Throughput(
            counts["done"] / seconds, counts["done"], counts["errors"], lat, meter.used
        )

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


# --- the API path under cProfile -----------------------------------------------------

AREAS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("PostgreSQL round trips (psycopg2, waiting)", lambda f, n: "psycopg2" in n),
    ("Redis/broker socket I/O (waiting)", lambda f, n: "socket" in n or "select" in n),
    ("SQLAlchemy", lambda f, n: "/sqlalchemy/" in f),
    (
        "marshmallow / webargs / flask-smorest",
        lambda f, n: any(
            p in f for p in ("/marshmallow/", "/webargs/", "/flask_smorest/", "/apispec/")
        ),
    ),
    ("JWT (flask-jwt-extended, PyJWT)", lambda f, n: "/jwt/" in f or "/flask_jwt_extended/" in f),
    (
        "rate limiter (flask-limiter, limits)",
        lambda f, n: "/flask_limiter/" in f or "/limits/" in f,
    ),
    ("Celery/kombu send", lambda f, n: "/kombu/" in f or "/celery/" in f),
    ("redis-py (excluding socket wait)", lambda f, n: "/redis/" in f),
    ("Flask / Werkzeug", lambda f, n: "/flask/" in f or "/werkzeug/" in f),
    ("logging / structlog", lambda f, n: "/logging/" in f or "/structlog/" in f),
    ("Spool code (api/, spool/)", lambda f, n: "/work/main/api/" in f or "/spool/" in f),
    ("json", lambda f, n: "/json/" in f or "json" in n),
]


def commands_processed(r: redis.Redis) -> int:
    info: dict[str, Any] = r.info("stats")  # type: ignore[assignment]
    return int(info["total_commands_processed"])


# Calls counted in the profile: (a piece of the file name, the function name).
COUNTED = {
    # psycopg2's own: SQLAlchemy's execution and spool.db.rows both end there
    "SQL statements sent (psycopg2 cursor.execute)": (
        "~",
        "<method 'execute' of 'psycopg2.extensions.cursor' objects>",
    ),
    "pool checkouts (a SELECT 1 first only after 2 s idle)": (
        "sqlalchemy/pool/base.py",
        "_checkout",
    ),
    "commit() calls (an autocommit statement commits on its own)": (
        "sqlalchemy/engine/default.py",
        "do_commit",
    ),
    "rollback() calls (no round trip in autocommit)": (
        "sqlalchemy/engine/default.py",
        "do_rollback",
    ),
    "principal lookups (users.principal_for_key)": ("spool/users.py", "principal_for_key"),
    "JWT decodes (PyJWT decode_complete)": ("jwt/api_jwt.py", "decode_complete"),
    "flask-jwt-extended verify_jwt_in_request": (
        "flask_jwt_extended/view_decorators.py",
        "verify_jwt_in_request",
    ),
}


def profile_api(
    plat: BenchPlatform, api_key: str, n: int
) -> tuple[list[tuple[str, float, float]], list[tuple[str, float]], float]:
    """Per (POST /v1/jobs + GET /v1/jobs/<id>), in this process under cProfile: ms of own
    time by area, how many round trips of each kind, and the wall time."""
    os.environ.update(
        DATABASE_URL=plat.database_url,
        REDIS_URL=plat.redis_url,
        SPOOL_VAR_DIR=str(plat.var_dir),
        SPOOL_LOG_LEVEL="INFO",
        SPOOL_LOG_FORMAT="json",
        **UNREACHABLE_LIMITS,
    )
    from spool import db, redisconn, registry, settings

    settings.get.cache_clear()
    db.clear_caches()
    redisconn.reset()
    registry.models.cache_clear()
    from api import create_app
    from spool.logs import configure

    configure("api")
    app = create_app()
    client = app.test_client()
    got = client.post("/v1/auth/token", json={"api_key": api_key}).get_json()
    token = got["access_token"]
    auth = {"Authorization": f"Bearer {token}"}

    def one(i: int) -> None:
        r = client.post("/v1/jobs", json={**ECHO, "input": {"value": i}}, headers=auth)
        assert r.status_code == 202, r.data
        job_id = r.get_json()["id"]
        assert client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200

    for i in range(20):  # warm caches and pools outside the profile
        one(i)
    import logging

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [logging.NullHandler()]  # format each record, write nowhere
    r = redis.Redis.from_url(plat.redis_url)
    commands_before = commands_processed(r)
    prof = cProfile.Profile()
    m0 = time.perf_counter()
    prof.enable()
    for i in range(n):
        one(i)
    prof.disable()
    wall_ms = (time.perf_counter() - m0) * 1000 / n
    # Minus the INFO call itself; beat's sweep adds a few more: a rounding error.
    redis_commands = commands_processed(r) - commands_before - 1
    r.close()
    root.handlers[:] = saved
    stats = pstats.Stats(prof)
    calls: dict[str, int] = defaultdict(int)
    for (filename, _line, name), (_cc, nc, *_rest) in stats.stats.items():  # type: ignore[attr-defined]
        for what, (file_part, func) in COUNTED.items():
            if func == name and file_part in filename:
                calls[what] += nc
    counts = [(what, calls[what] / n) for what in COUNTED]
    counts.append(("Redis commands (server's count)", redis_commands / n))
    by_area: dict[str, float] = defaultdict(float)
    for (filename, _line, name), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        area = next((a for a, match in AREAS if match(filename, name)), "other Python")
        by_area[area] += tottime
    total = sum(by_area.values())
    rows = sorted(by_area.items(), key=lambda kv: -kv[1])
    return [(a, t * 1000 / n, 100 * t / total) for a, t in rows], counts, wall_ms


# --- the run -------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--jobs", type=int, default=500, help="sequential jobs for latency")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients for throughput")
    ap.add_argument("--seconds", type=float, default=3.5, help="each throughput window")
    ap.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds")
    ap.add_argument("--profile-requests", type=int, default=100)
    args = ap.parse_args(argv)
    header("Platform overhead: Spool vs bare Celery")
    t_start = time.monotonic()

    # Two job slots per worker process on both sides: the comparison is per process.
    plat = BenchPlatform("overhead", **UNREACHABLE_LIMITS, SPOOL_WORKER_CONCURRENCY="2")
    bare: BareCelery | None = None
    try:
        # Both stacks stay up side by side (idle, each costs next to nothing) and their
        # measurements alternate, so a change in the machine's other load between two
        # measurements does not land on one side only.
        plat.start(workers=1)
        bare = BareCelery(plat.redis_url, plat.var_dir, concurrency=2)
        bare.add_worker()
        api_key = plat.users(1)[0]
        token = asyncio.run(login(plat.url, api_key))
        asyncio.run(spool_sequential(plat.url, token, WARMUP_JOBS))
        bare.sequential(WARMUP_JOBS)
        seq = asyncio.run(spool_sequential(plat.url, token, args.jobs))
        spool_lat = Latencies([d.total_s for d in seq])
        bare_lat = bare.sequential(args.jobs)
        prefer_lat = asyncio.run(spool_prefer_wait(plat.url, token, args.jobs))
        spool_phases = phases(plat, seq)
        commit = commit_latency(plat.database_url)
        spool_phases.append(
            ("for scale: one INSERT + COMMIT (WAL flush)", commit.ms(50), commit.ms(95))
        )

        spool_tp: dict[int, Throughput] = {}
        bare_tp: dict[int, Throughput] = {}
        prefer_tp: dict[int, Throughput] = {}  # for reference: the one-request client
        tp_ratios: dict[int, list[float]] = {}
        one_ratios: dict[int, list[float]] = {}
        redis_pid = [plat.p.redis.process.pid]
        for n_workers in (1, 2):
            if n_workers == 2:
                plat.add_worker()
                bare.add_worker()
            sessions = postgres_sessions(plat.database_url)
            windows: dict[str, list[Throughput]] = defaultdict(list)
            # Spool, bare Celery and the one-request client in turn, `--rounds` times:
            # what else the VM does at a moment lands on all three, and each ratio is
            # taken within a round (its median is reported).
            for _ in range(args.rounds):
                windows["spool"].append(
                    asyncio.run(
                        spool_throughput(
                            plat.url, token, args.clients, args.seconds, CpuMeter(plat.pids)
                        )
                    )
                )
                windows["bare"].append(
                    bare.throughput(
                        args.clients,
                        args.seconds,
                        CpuMeter(lambda: {**bare.pids(), "redis": redis_pid}),
                    )
                )
                windows["prefer"].append(
                    asyncio.run(
                        spool_throughput(
                            plat.url, token, args.clients, args.seconds, CpuMeter(plat.pids), True
                        )
                    )
                )
            spool_tp[n_workers], bare_tp[n_workers], prefer_tp[n_workers] = (
                combined(windows[k]) for k in ("spool", "bare", "prefer")
            )
            spool_tp[n_workers].new_db_sessions = postgres_sessions(plat.database_url) - sessions
            pairs = list(zip(windows["spool"], windows["prefer"], windows["bare"], strict=True))
            tp_ratios[n_workers] = [ratio(s.jobs_s, b.jobs_s) for s, _, b in pairs]
            one_ratios[n_workers] = [ratio(o.jobs_s, b.jobs_s) for _, o, b in pairs]
        # The profile runs the API in this process; the workers would add Redis traffic.
        bare.close()
        for w in plat.p.workers:
            w.stop()
        profile, counts, profile_wall = profile_api(plat, api_key, args.profile_requests)
    finally:
        if bare is not None:
            bare.close()
        plat.close()

    # --- report ------------------------------------------------------------------------
    lat_rows = [
        ("Spool: POST → GET /result?wait → 200", *(spool_lat.ms(q) for q in (50, 95, 99))),
        ("bare Celery: delay() → get()", *(bare_lat.ms(q) for q in (50, 95, 99))),
        ("ratio Spool / Celery", *(ratio(spool_lat.ms(q), bare_lat.ms(q)) for q in (50, 95, 99))),
        (
            "(for reference) Spool, one request: POST + Prefer: wait → 200",
            *(prefer_lat.ms(q) for q in (50, 95, 99)),
        ),
    ]
    console.print(
        table(
            f"Latency, {args.jobs} sequential echo jobs (ms)", ["", "p50", "p95", "p99"], lat_rows
        )
    )

    def tp_row(label: str, t: Throughput) -> tuple[object, ...]:
        return (label, t.jobs_s, t.latency.ms(50), t.latency.ms(99), t.errors)

    def ratio_row(label: str, per_round: list[float]) -> tuple[object, ...]:
        rounds = ", ".join(f"{r:.2f}" for r in per_round)
        return (f"{label} (rounds: {rounds})", median(per_round), float("nan"), float("nan"), "")

    tp_rows: list[tuple[object, ...]] = []
    for n in (1, 2):
        s, b, one = spool_tp[n], bare_tp[n], prefer_tp[n]
        tp_rows += [
            tp_row(f"{n} worker process(es): Spool", s),
            tp_row(f"{n} worker process(es): bare Celery", b),
            ratio_row(f"{n} worker process(es): ratio Spool / Celery", tp_ratios[n]),
            tp_row(f"(for reference) {n}: Spool, one request (Prefer: wait)", one),
            ratio_row(f"(for reference) {n}: ratio one-request Spool / Celery", one_ratios[n]),
        ]
    console.print(
        table(
            f"Throughput, {args.clients} closed-loop clients, {args.rounds} rounds of "
            f"{args.seconds:g} s windows (Spool, bare Celery, one-request Spool in turn); "
            "ratios: the median of the rounds'",
            ["", "jobs/s", "p50 ms", "p99 ms", "errors"],
            tp_rows,
        )
    )

    opened = " / ".join(str(spool_tp[n].new_db_sessions) for n in (1, 2))
    console.print(
        f"PostgreSQL connections Spool's pools opened during the 1 / 2 worker runs: {opened} "
        "(the pools filling up to the load; pools that open and close connections under load "
        "show hundreds here, each a backend start)"
    )

    console.print(
        table(
            "Where a Spool job's time goes (sequential run, job-row timestamps)",
            ["stretch", "p50 ms", "p95 ms"],
            spool_phases,
        )
    )

    cpu_rows = []
    runs = (spool_tp[1], prefer_tp[1], bare_tp[1])
    for c in sorted(set().union(*(t.cpu for t in runs))):
        cpu_rows.append((c, *(1000 * t.cpu.get(c, 0.0) / max(t.done, 1) for t in runs)))
    cpu_rows.append(("total", *(1000 * sum(t.cpu.values()) / max(t.done, 1) for t in runs)))
    console.print(
        table(
            "CPU per job at full load, 1 worker process (ms of CPU)",
            ["process", "Spool", "Spool, one request", "bare Celery"],
            cpu_rows,
        )
    )

    console.print(
        table(
            f"API path under cProfile: POST /v1/jobs + GET /v1/jobs/<id>, in-process, "
            f"{profile_wall:.1f} ms wall per pair with the profiler on",
            ["area (own time)", "ms per pair", "%"],
            profile,
        )
    )

    console.print(
        table(
            "Round trips and decodes per POST /v1/jobs + GET /v1/jobs/<id> "
            "(a queued job: the GET also counts its queue position)",
            ["what", "per pair"],
            counts,
        )
    )

    p50_ratio = ratio(spool_lat.ms(50), bare_lat.ms(50))
    tp_median = {n: median(tp_ratios[n]) for n in (1, 2)}
    one_median = {n: median(one_ratios[n]) for n in (1, 2)}
    console.print(
        table(
            "Targets",
            ["target", "measured", "verdict"],
            [
                ("p50 within 3x of bare Celery", f"{p50_ratio:.1f}x", verdict(p50_ratio <= 3)),
                *(
                    (
                        f"throughput ≥ 0.5x bare Celery, {n} worker(s)",
                        f"{tp_median[n]:.2f}x",
                        verdict(tp_median[n] >= 0.5),
                    )
                    for n in (1, 2)
                ),
                *(
                    (
                        f"the same, one-request client (Prefer: wait), {n} worker(s)",
                        f"{one_median[n]:.2f}x",
                        verdict(one_median[n] >= 0.5),
                    )
                    for n in (1, 2)
                ),
            ],
        )
    )
    console.print(f"took {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
