"""What a text job's streaming costs the worker: token and progress events per decode step.

    python -m bench.bench_reporting [--rows 16] [--steps 256] [--step-ms 20]

A decode loop reports, at every step and for every row, a check (cancel, deadline), a
token and a progress (workers/context.py): the decode thread hands them to the courier
thread, which sends each round's events in one Redis pipeline, writes throttled progress
to PostgreSQL and polls the cancel flags. This runs that reporting for --rows jobs over
--steps steps against an isolated redis-server and PostgreSQL, with the model's step
replaced by --step-ms of sleep (the decode thread waits with the GIL free, as for a GPU
that is behind) and then of busy Python (it holds the GIL, as when it launches a GPU's
kernels one by one), each also with reporting off for the baseline. It prints the
process's CPU and the decode thread's CPU per event, and how much longer the steps took.

The jobs' claims are not in the database, so each progress write is a real UPDATE that
matches no row: the same round trip, one row fewer to write.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from dataclasses import dataclass

from bench.common import BenchPlatform, console, header, table


@dataclass
class Result:
    mode: str
    step_ms: float
    events: int
    wall_s: float
    process_cpu_ms: float
    loop_cpu_ms: float


def _spin(n: int) -> None:
    for _ in range(n):
        pass


def calibrated(seconds: float) -> int:
    """Loop iterations that take `seconds` here: a fixed amount of work (a step that ended
    at a deadline would hide the time other threads took the GIL from it)."""
    n = 100_000
    while True:
        started = time.perf_counter()
        _spin(n)
        took = time.perf_counter() - started
        if took > 0.05:
            return max(1, int(n * seconds / took))
        n *= 2


def run(rows: int, steps: int, step_s: float, report: bool, spin: int) -> Result:
    from workers import context, lease

    def claim() -> lease.Claim:
        job_id = "job_" + uuid.uuid4().hex
        return lease.Claim(job_id, "t", "text.generate", "m", {}, 1, 600, "u")

    ctxs = [context.RunContext(claim()) for _ in range(rows)]
    wall, cpu, loop = time.perf_counter(), time.process_time(), time.thread_time()
    for step in range(steps):
        if report:
            for ctx in ctxs:
                ctx.check()
                ctx.token(" tok")
                ctx.progress(step + 1, steps)
        if spin:
            _spin(spin)
        else:
            time.sleep(step_s)
    loop = time.thread_time() - loop
    for ctx in ctxs:
        ctx.close()  # waits for the round sending its last events
    return Result(
        f"{'reporting' if report else 'baseline (no reporting)'}, {'busy' if spin else 'sleep'}",
        1000 * step_s,
        rows * steps * 2 if report else 0,
        time.perf_counter() - wall,
        1000 * (time.process_time() - cpu),
        1000 * loop,
    )


def summed(runs: list[Result]) -> Result:
    first = runs[0]
    return Result(
        first.mode,
        first.step_ms,
        sum(r.events for r in runs),
        sum(r.wall_s for r in runs),
        sum(r.process_cpu_ms for r in runs),
        sum(r.loop_cpu_ms for r in runs),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("--pairs", type=int, default=3, help="alternating runs without and with")
    args = ap.parse_args(argv)
    header("Streaming a text job's tokens: the worker's CPU per event")
    plat = BenchPlatform("reporting")
    try:
        os.environ.update(DATABASE_URL=plat.database_url, REDIS_URL=plat.redis_url)
        from spool import settings

        settings.get.cache_clear()
        results = []
        ratios: list[list[float]] = []
        step_s = args.step_ms / 1000
        for spin in (0, calibrated(step_s)):
            # Alternating pairs: the machine's speed drifts between runs (a busy step's
            # fixed work took 4.3 to 5.9 s for 256 steps in single runs here).
            pairs = [
                (
                    run(args.rows, args.steps, step_s, report=False, spin=spin),
                    run(args.rows, args.steps, step_s, report=True, spin=spin),
                )
                for _ in range(args.pairs)
            ]
            results.append(tuple(summed([pair[i] for pair in pairs]) for i in (0, 1)))
            ratios.append(sorted(got.wall_s / base.wall_s - 1 for base, got in pairs))
    finally:
        plat.close()
    rows = []
    for (base, got), spread in zip(results, ratios, strict=True):
        for r in (base, got):
            per_event = r.events or 1
            extra_cpu = r.process_cpu_ms - (base.process_cpu_ms if r is got else 0.0)
            extra_loop = r.loop_cpu_ms - (base.loop_cpu_ms if r is got else 0.0)
            rows.append(
                (
                    r.mode,
                    r.step_ms,
                    r.events,
                    r.wall_s,
                    r.process_cpu_ms,
                    r.loop_cpu_ms,
                    1000 * extra_cpu / per_event if r.events else "-",
                    1000 * extra_loop / per_event if r.events else "-",
                    f"{100 * (r.wall_s / base.wall_s - 1):+.1f} % "
                    f"({100 * spread[0]:+.1f} to {100 * spread[-1]:+.1f})"
                    if r.events
                    else "-",
                )
            )
    console.print(
        table(
            f"{args.rows} rows x {args.steps} steps x {args.pairs} runs, a token and a progress "
            "event per row and step (µs per event: over the baseline of the same step)",
            [
                "run",
                "step ms",
                "events",
                "wall s",
                "process CPU ms",
                "decode thread CPU ms",
                "µs/event, process",
                "µs/event, decode thread",
                "wall vs baseline (pairs)",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
