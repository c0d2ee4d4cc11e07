"""Read path: GET /v1/jobs/<id> requests/s and latency under concurrent clients.

    python -m bench.bench_read [--clients 32] [--seconds 15] [--queued 1000]

The API runs as `spool up` runs it: gunicorn, 2 gevent worker processes, default
rate limits (each client is its own user, as a real client would be, so the per-user
read limit of 200/s is not what is measured). Two rounds:
  finished: every job read has succeeded (one primary-key read plus auth);
  queued:   every job read is queued behind --queued others, so each answer also
            counts its queue position (the worker is stopped for this round).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.common import (
    BenchPlatform,
    CpuMeter,
    Http,
    HttpError,
    Latencies,
    console,
    header,
    login,
    table,
)

ECHO = {"kind": "echo", "model": "echo"}
JOBS_PER_CLIENT = 5


@dataclass
class Round:
    name: str
    seconds: float
    lat: Latencies = field(default_factory=Latencies)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return self.statuses[200]

    @property
    def rps(self) -> float:
        return sum(self.statuses.values()) / self.seconds


async def submit_jobs(url: str, tokens: list[str], per_client: int, wait: bool) -> list[list[str]]:
    """Each client's own jobs; with `wait`, each has finished before this returns."""

    async def one(token: str) -> list[str]:
        http = Http.for_url(url, token)
        ids = []
        try:
            for i in range(per_client):
                r = await http.request("POST", "/v1/jobs", {**ECHO, "input": {"value": i}})
                assert r.status == 202, r.body
                ids.append(r.json()["id"])
            if wait:
                for job_id in ids:
                    while (await http.request("GET", f"/result/{job_id}?wait=30")).status == 202:
                        pass
        finally:
            await http.close()
        return ids

    return list(await asyncio.gather(*(one(t) for t in tokens)))


async def read_round(
    name: str, url: str, tokens: list[str], ids: list[list[str]], seconds: float, meter: CpuMeter
) -> Round:
    warm = 1.0
    rnd = Round(name, seconds)
    start = time.monotonic()
    t_a, t_b = start + warm, start + warm + seconds

    async def client(token: str, mine: list[str]) -> None:
        http = Http.for_url(url, token)
        rng = random.Random(token)
        try:
            while time.monotonic() < t_b:
                m0 = time.monotonic()
                try:
                    r = await http.request("GET", f"/v1/jobs/{rng.choice(mine)}")
                except HttpError:
                    if t_a <= time.monotonic() <= t_b:
                        rnd.errors += 1
                    continue
                m1 = time.monotonic()
                if t_a <= m1 <= t_b:
                    rnd.statuses[r.status] += 1
                    rnd.lat.add(m1 - m0)
        finally:
            await http.close()

    async def metering() -> None:
        await asyncio.sleep(warm)
        meter.start()
        await asyncio.sleep(seconds)
        rnd.cpu = meter.stop()

    await asyncio.gather(metering(), *(client(t, m) for t, m in zip(tokens, ids, strict=True)))
    return rnd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=15.0, help="measured window per round")
    ap.add_argument("--queued", type=int, default=1000, help="jobs queued ahead in round 2")
    args = ap.parse_args(argv)
    header(f"Read path: GET /v1/jobs/<id>, {args.clients} concurrent clients")
    t_start = time.monotonic()

    plat = BenchPlatform("read")
    rounds: list[Round] = []
    try:
        plat.start(workers=1)
        keys = plat.users(args.clients)
        tokens = [asyncio.run(login(plat.url, k)) for k in keys]
        done_ids = asyncio.run(submit_jobs(plat.url, tokens, JOBS_PER_CLIENT, wait=True))
        rounds.append(
            asyncio.run(
                read_round(
                    "finished jobs", plat.url, tokens, done_ids, args.seconds, CpuMeter(plat.pids)
                )
            )
        )

        # Round 2: stop the worker, so the jobs stay queued behind a backlog.
        for w in plat.p.workers:
            w.stop()
        ahead = max(args.queued // args.clients, 1)
        asyncio.run(submit_jobs(plat.url, tokens, ahead, wait=False))
        queued_ids = asyncio.run(submit_jobs(plat.url, tokens, JOBS_PER_CLIENT, wait=False))
        n_queued = plat.sql("SELECT count(*) FROM jobs WHERE status = 'queued'")[0][0]
        rounds.append(
            asyncio.run(
                read_round(
                    f"queued jobs ({n_queued} in the queue)",
                    plat.url,
                    tokens,
                    queued_ids,
                    args.seconds,
                    CpuMeter(plat.pids),
                )
            )
        )
    finally:
        plat.close()

    rows = []
    for r in rounds:
        other = sum(v for k, v in r.statuses.items() if k != 200)
        rows.append(
            (r.name, r.rps, r.lat.ms(50), r.lat.ms(95), r.lat.ms(99), r.ok, other, r.errors)
        )
    console.print(
        table(
            f"GET /v1/jobs/<id>: {args.clients} clients, keep-alive, "
            f"{args.seconds:.0f} s per round",
            ["round", "req/s", "p50 ms", "p95 ms", "p99 ms", "200s", "non-200", "conn errors"],
            rows,
        )
    )
    cpu_rows = []
    for c in sorted(set().union(*(r.cpu for r in rounds))):
        cpu_rows.append((c, *(1000 * r.cpu.get(c, 0.0) / max(r.ok, 1) for r in rounds)))
    console.print(table("CPU per request (ms)", ["process", *(r.name for r in rounds)], cpu_rows))
    console.print(f"took {time.monotonic() - t_start:.0f} s")
    bad = any(r.errors or sum(v for k, v in r.statuses.items() if k != 200) for r in rounds)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
