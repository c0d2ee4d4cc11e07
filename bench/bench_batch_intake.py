"""Batch intake: time to accept 10,000 and 50,000 jobs in one POST /v1/batches, and memory.

    python -m bench.bench_batch_intake [--sizes 1000,10000,50000] [--repeat 3] [--worker]

"Accepted" is the time from sending the request to its 202: the body parsed, every
job validated, every row committed and every job's queue token published to Redis.
The API runs as `spool up` runs it (gunicorn, 2 gevent workers); the peak RSS is
that of the gunicorn worker process that served the request, sampled every 10 ms;
CPU seconds are those of the API processes and of PostgreSQL's and Redis' server
processes during the request: on a shared machine the load average (printed) moves
the wall time, the CPU seconds much less.
Without --worker no worker runs, so the intake has the machine to itself; with it,
an echo worker drains the batch meanwhile, as in production.
Targets (DESIGN.md, Performance 2): 10,000 jobs < 3 s, 50,000 jobs < 15 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field

import psutil
import requests

from bench.common import (
    UNREACHABLE_LIMITS,
    BenchPlatform,
    CpuMeter,
    console,
    header,
    table,
)

TARGETS_S = {10_000: 3.0, 50_000: 15.0}
MB = 1024 * 1024


def body(n: int, fmt: str) -> tuple[bytes, str]:
    """n echo jobs with custom ids, as JSON or NDJSON (what `spool batch submit` sends)."""
    jobs = (
        {"custom_id": f"row-{i}", "kind": "echo", "model": "echo", "input": {"value": i}}
        for i in range(n)
    )
    if fmt == "ndjson":
        data = "".join(json.dumps(j, separators=(",", ":")) + "\n" for j in jobs)
        return data.encode(), "application/x-ndjson"
    return json.dumps({"jobs": list(jobs)}, separators=(",", ":")).encode(), "application/json"


class RssSampler(threading.Thread):
    """Peak RSS of each gunicorn worker process while a request runs."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.procs = [psutil.Process(p) for p in pids]
        self.start_rss = {p.pid: p.memory_info().rss for p in self.procs}
        self.peak = dict(self.start_rss)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.01):
            for p in self.procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)

    def stop(self) -> tuple[int, int]:
        """(peak RSS, growth) of the process that grew most: the one that served it."""
        self._stop_event.set()
        self.join()
        pid = max(self.procs, key=lambda p: self.peak[p.pid] - self.start_rss[p.pid]).pid
        return self.peak[pid], self.peak[pid] - self.start_rss[pid]


@dataclass
class Result:
    n: int
    fmt: str
    body_mb: float
    seconds: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    growth: list[int] = field(default_factory=list)
    api_cpu: list[float] = field(default_factory=list)
    db_cpu: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)


def login(url: str, api_key: str) -> str:
    r = requests.post(f"{url}/v1/auth/token", json={"api_key": api_key}, timeout=10)
    r.raise_for_status()
    return str(r.json()["access_token"])


def gunicorn_workers(bp: BenchPlatform) -> list[int]:
    assert bp.p.api is not None
    master = psutil.Process(bp.p.api.pid)
    return [c.pid for c in master.children(recursive=True)] or [master.pid]


def run_one(bp: BenchPlatform, token: str, n: int, fmt: str, res: Result) -> None:
    data, ctype = body(n, fmt)
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": ctype,
        "Idempotency-Key": uuid.uuid4().hex,
    }
    sampler = RssSampler(gunicorn_workers(bp))
    pids = bp.pids()
    cpu = CpuMeter({"api": pids["api"], "db": pids["postgres"] + pids["redis"]})
    load = os.getloadavg()[0]
    sampler.start()
    cpu.start()
    t0 = time.perf_counter()
    r = requests.post(f"{bp.url}/v1/batches", data=data, headers=headers, timeout=600)
    took = time.perf_counter() - t0
    used = cpu.stop()
    peak, growth = sampler.stop()
    if r.status_code != 202:
        raise RuntimeError(f"{n} {fmt}: {r.status_code} {r.text[:300]}")
    batch_id = r.json()["id"]
    ((rows,),) = bp.sql("SELECT count(*) FROM jobs WHERE batch_id = :b", b=batch_id)
    if rows != n or r.json()["counts"]["total"] != n:
        raise RuntimeError(f"{n} {fmt}: {rows} rows recorded")
    res.seconds.append(took)
    res.api_cpu.append(used.get("api", 0.0))
    res.db_cpu.append(used.get("db", 0.0))
    res.load.append(load)
    res.peak_rss.append(peak)
    res.growth.append(growth)
    # The next run starts from an empty queue: its jobs are not what is measured.
    requests.post(f"{bp.url}/v1/batches/{batch_id}/cancel", headers=headers, timeout=600)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--formats", default="json,ndjson")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help="an echo worker drains meanwhile")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    formats = args.formats.split(",")

    header("Batch intake")
    bp = BenchPlatform("batch", **UNREACHABLE_LIMITS, SPOOL_MAX_QUEUED_PER_USER="1000000")
    try:
        bp.p.start_api()
        if args.worker:
            bp.add_worker()
        (key,) = bp.users(1)
        token = login(bp.url, key)
        run_one(bp, token, 100, "json", Result(100, "json", 0))  # warm-up: imports, pools
        results = []
        for n in sizes:
            for fmt in formats:
                res = Result(n, fmt, len(body(n, fmt)[0]) / MB)
                for _ in range(args.repeat):
                    run_one(bp, token, n, fmt, res)
                results.append(res)
                console.print(f"{n} {fmt}: {[round(s, 2) for s in res.seconds]} s")
    finally:
        bp.close()

    rows = []
    for r in results:
        med = statistics.median(r.seconds)
        target = TARGETS_S.get(r.n)
        verdict = "-" if target is None else ("yes" if max(r.seconds) < target else "NO")
        rows.append(
            (
                f"{r.n:,}", r.fmt, r.body_mb, med, max(r.seconds), r.n / med,
                statistics.median(r.api_cpu), statistics.median(r.db_cpu),
                max(r.peak_rss) / MB, max(r.growth) / MB, statistics.median(r.load),
                "-" if target is None else f"< {target:g} s", verdict,
            )
        )  # fmt: skip
    console.print(
        table(
            f"POST /v1/batches, {args.repeat} runs each"
            + (", echo worker draining" if args.worker else ", no worker running"),
            [
                "jobs",
                "body",
                "MB",
                "median s",
                "max s",
                "jobs/s",
                "API CPU s",
                "PG+Redis CPU s",
                "API peak RSS MB",
                "RSS growth MB",
                "load avg",
                "target",
                "met (max)",
            ],
            rows,
        ),  # fmt: skip
        width=150,
    )


if __name__ == "__main__":
    main()
