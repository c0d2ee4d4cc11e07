"""Mixed text lengths through the platform: do short jobs wait for long ones?

    python -m bench.bench_text_mix [--clients 16] [--seconds 10] [--long 256] [--short 8]

One isolated platform (API, one worker, beat) serves tiny-llm with its shipped batching
settings. Half of --clients closed-loop clients each submit a --long-token job, the
other half a --short-token job (`Prefer: wait`, then the next). A short job that has to
wait for a running batch of long jobs to end takes about as long as they do; one that
joins the running decode loop (continuous batching) takes about its own tokens' time.
Prints jobs/s, tokens/s and the latency of each kind, and the model's rows per forward
pass (`spool_model_step_rows_total` / `spool_model_steps_total`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench.bench_inference_platform import model_platform, worker_counters
from bench.common import (
    CpuMeter,
    Http,
    HttpError,
    Latencies,
    closed_loop,
    console,
    header,
    login,
    table,
)
from spool import settings
from spool.tiny_models import init_tiny

WARMUP_S = 3.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--clients", type=int, default=16, help="closed-loop clients, half short")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window")
    ap.add_argument("--long", type=int, default=256, help="tokens of a long job")
    ap.add_argument("--short", type=int, default=8, help="tokens of a short job")
    args = ap.parse_args(argv)
    header("Mixed text lengths: short jobs among long ones")
    models_dir = init_tiny(settings.get().var_dir)["tiny-llm"].parent
    plat, metrics_url = model_platform("text-mix", args.clients, models_dir, "tiny-llm")
    lat = {"long": Latencies(), "short": Latencies()}
    done = {"long": 0, "short": 0}
    try:
        token = asyncio.run(login(plat.url, plat.users(1)[0]))
        window = {"start": 0.0, "end": 0.0}

        async def one(http: Http, c: int, n: int) -> None:
            kind = "short" if c % 2 else "long"
            tokens = args.short if kind == "short" else args.long
            body: dict[str, Any] = {
                "kind": "text.generate",
                "model": "tiny-llm",
                "input": {
                    "prompt": f"Story {c}.{n}: once upon a time",
                    "max_tokens": tokens,
                    "min_tokens": tokens,
                    "seed": c * 1000 + n,
                },
            }
            t0 = time.monotonic()
            r = await http.request("POST", "/v1/jobs", body, headers={"Prefer": "wait=60"})
            while r.status == 202:
                r = await http.request("GET", f"/result/{r.json()['id']}?wait=30")
            if r.status != 200 or r.json()["status"] != "succeeded":
                raise HttpError(f"job answered {r.status}: {r.body[:300]!r}")
            t1 = time.monotonic()
            if window["start"] <= t0 and t1 <= window["end"]:  # inside the measured window
                lat[kind].add(t1 - t0)
                done[kind] += 1

        before = worker_counters(metrics_url, "tiny-llm")
        window["start"] = time.monotonic() + WARMUP_S
        window["end"] = window["start"] + args.seconds
        loop = closed_loop(plat.url, token, one, args.clients, args.seconds, CpuMeter({}), WARMUP_S)
        asyncio.run(loop)
        after = worker_counters(metrics_url, "tiny-llm")
        steps, rows = after.steps - before.steps, after.step_rows - before.step_rows
    finally:
        plat.close()

    out = []
    for kind, tokens in (("short", args.short), ("long", args.long)):
        n = done[kind]
        out.append(
            (
                f"{kind} ({tokens} tokens)",
                n / args.seconds,
                n * tokens / args.seconds,
                lat[kind].ms(50),
                lat[kind].ms(95),
            )
        )
    console.print(
        table(
            f"tiny-llm, {args.clients} clients (half short, half long), {args.seconds:.0f} s",
            ["jobs", "jobs/s", "tokens/s", "p50 ms", "p95 ms"],
            out,
        )
    )
    console.print(f"rows per forward pass: {rows / steps if steps else 0:.1f} over {steps:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
