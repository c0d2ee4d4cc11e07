"""A/B: the echo throughput of two trees of Spool, measured in alternating windows.

    python -m bench.ab OLD_TREE NEW_TREE [--rounds 6] [--seconds 6] [--one-request] [--workers 1]

e.g. `git worktree add /tmp/old 0.6.2` then `python -m bench.ab /tmp/old .`. Both platforms
run side by side (each its own PostgreSQL and Redis, started from its tree, like
bench_overhead's); their measurement windows alternate (A, B, A, B, ...), so what else the
machine is doing lands on both. On a shared 2-core VM the CPU per job of one platform
varied by ±15 % from one window to the next: a change of a few percent shows only this
way, as the median of paired windows. Prints each window and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.bench_overhead import spool_throughput
from bench.common import CpuMeter, console, postgres_backends, table


def serve() -> None:
    """Child mode: a platform from the tree on sys.path; one JSON line, then run until
    stdin closes."""
    from bench.common import UNREACHABLE_LIMITS, BenchPlatform, login

    plat = BenchPlatform("ab", **UNREACHABLE_LIMITS, SPOOL_WORKER_CONCURRENCY="2")
    try:
        plat.start(workers=int(os.environ.get("SPOOL_AB_WORKERS", "1")))
        token = asyncio.run(login(plat.url, plat.users(1)[0]))
        pids = {k: v for k, v in plat.pids().items() if k != "postgres"}
        line = {"url": plat.url, "token": token, "pids": pids, "db": plat.database_url}
        print(json.dumps(line), flush=True)
        sys.stdin.read()
    finally:
        plat.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("trees", nargs=2, type=Path, help="the A and B trees (checkouts)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=6.0, help="each window")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="worker processes of each")
    ap.add_argument("--one-request", action="store_true", help="POST with Prefer: wait")
    args = ap.parse_args(argv)

    platforms: dict[str, dict[str, Any]] = {}
    children: list[subprocess.Popen] = []
    try:
        for name, tree in zip("AB", args.trees, strict=True):
            tree = tree.resolve()
            env = {**os.environ, "PYTHONPATH": str(tree), "SPOOL_AB_WORKERS": str(args.workers)}
            # This file, run with the tree first on the path: the tree's platform and
            # bench plumbing (a tree from before this file existed works too).
            child = subprocess.Popen(
                [sys.executable, __file__, "--serve"],
                cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            children.append(child)
            assert child.stdout is not None
            platforms[name] = json.loads(child.stdout.readline())
        windows: dict[str, list[tuple[float, dict[str, float]]]] = {"A": [], "B": []}
        for r in range(-1, args.rounds):  # round -1 warms both up (pools, caches): not kept
            for name, p in platforms.items():

                def pids(p: dict[str, Any] = p) -> dict[str, list[int]]:
                    return {**p["pids"], "postgres": postgres_backends(p["db"])}

                tp = asyncio.run(
                    spool_throughput(
                        p["url"], p["token"], args.clients, args.seconds, CpuMeter(pids),
                        args.one_request,
                    )
                )  # fmt: skip
                per_job = {k: 1000 * v / max(tp.done, 1) for k, v in tp.cpu.items()}
                if r < 0:
                    continue
                windows[name].append((tp.jobs_s, per_job))
                total = sum(per_job.values())
                console.print(f"{name} round {r}: {tp.jobs_s:.1f} jobs/s, {total:.2f} ms CPU/job")
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
        for child in children:
            child.wait(60)

    components = sorted({c for w in windows.values() for _, cpu in w for c in cpu})
    rows = []
    for name, tree in zip("AB", args.trees, strict=True):
        w = windows[name]
        rows.append(
            (
                f"{name}: {tree}",
                statistics.median(j for j, _ in w),
                statistics.median(sum(cpu.values()) for _, cpu in w),
                *(statistics.median(cpu.get(c, 0.0) for _, cpu in w) for c in components),
            )
        )
    flow = "one request (Prefer: wait)" if args.one_request else "POST + GET /result?wait"
    console.print(
        table(
            f"A/B, {args.rounds} alternating {args.seconds:.0f} s windows each, "
            f"{args.clients} clients, {flow}, {args.workers} worker(s): medians",
            ["tree", "jobs/s", "CPU ms/job", *components],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve()
        raise SystemExit(0)
    raise SystemExit(main())
