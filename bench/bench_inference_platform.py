"""GPU efficiency through the platform: tiny-llm and tiny-sd jobs/s under concurrent clients.

    python -m bench.bench_inference_platform [--clients 16] [--seconds 8] [--only llm|sd]
        [--workload tiny|real] [--smoke] [--json FILE]

One isolated platform (API, one worker, beat; its own database and redis-server) serves
each tiny model twice from one registry file: as itself (micro-batching on, the shipped
max_batch_size and batch_wait_ms) and as `<model>-b1`, the same weights with
max_batch_size 1 (micro-batching off). --clients closed-loop clients each submit a job
with `Prefer: wait`, take the result and submit the next, for --seconds per mode, measured
in two halves (off, on, off, on) after a warm-up each.
Every job does the same work: fixed seeds; text jobs make exactly 32 tokens (`min_tokens`
= `max_tokens`); image jobs are 64x64, 4 steps, one image. An `echo` run on the same
platform gives its ceiling: jobs/s with no model work at all.

The same backend (`predict`, what the worker runs) and the library pipeline are then
called directly in this process (bench/bench_inference_direct.py), one torch thread on
both sides, at batch 1 and at the batch size the platform's worker actually ran (its
/metrics: rows per forward pass for text models, whose running batches take in jobs,
`spool_microbatch_size` for images).

Targets (the issue): micro-batching >= 2.5x the unbatched throughput for tiny-llm; the
platform >= 80% of the direct call's throughput at the same batch size.

`--workload real` runs the same with random-weight models of real size, built on first
use (tiny_models.PRESETS: Stable Diffusion 1.5's shapes at 512x512, 20 steps, float16; a
1.1B-parameter Llama, 128 new tokens, bfloat16): the GPU run (scripts/gpu-bench.sh).
`--smoke` runs a workload's whole code path in seconds on a CPU: its models built with
the tiny shapes, a tiny job's work, short windows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from bench import bench_inference_direct as direct
from bench.common import (
    UNREACHABLE_LIMITS,
    BenchPlatform,
    CpuMeter,
    Http,
    HttpError,
    Latencies,
    answers,
    closed_loop,
    header,
    login,
    table,
)
from spool import registry, settings, tiny_models
from tests import support

WARMUP_S = 1.5
KINDS = {"llm": "text.generate", "sd": "image.generate"}
COMPONENTS = ("worker", "api", "postgres", "redis", "client (bench)")
console = Console(width=150)  # the tables are wide; keep them whole when piped


@dataclass
class Run:
    model: str
    jobs_s: float
    done: int
    errors: int
    p50_ms: float
    mean_batch: float
    model_busy: float  # fraction of the wall time the model spent running batches
    cpu_ms_per_job: dict[str, float] = field(default_factory=dict)

    @property
    def unbatched(self) -> bool:
        return self.model.endswith("-b1")


# --- the platform side -----------------------------------------------------------------


def job_body(model: str, kind: str, i: int, w: direct.Workload) -> dict[str, Any]:
    """Job i of a run; the same i gives the same input (fixed seeds)."""
    if kind == "text.generate":
        data: dict[str, Any] = {
            "prompt": f"Question {i}: what does a worker do with a job?",
            "max_tokens": w.llm_tokens,
            # Random weights emit EOS early: every job makes exactly llm_tokens.
            "min_tokens": w.llm_tokens,
            "seed": i,
        }
    elif kind == "image.generate":
        data = {"prompt": f"a photo of thing {i}", "seed": i, **w.sd_input}
    else:
        data = {"value": i}
    return {"kind": kind, "model": model, "input": data}


def registry_file(models_dir: Path, out: Path, w: direct.Workload) -> Path:
    """The shipped registry plus the workload's models from `models_dir` (a model not in
    it takes the entry of the tiny model of its kind, with limits and defaults that fit its
    job), and a `-b1` twin of each."""
    data = yaml.safe_load(registry.DEFAULT_FILE.read_text())
    models = data["models"]
    for name, template in ((w.sd, "tiny-sd"), (w.llm, "tiny-llm")):
        entry = dict(models.get(name) or models[template])
        entry["source"] = str(models_dir / name)
        if name == w.sd:
            side = max(w.sd_input["width"], w.sd_input["height"])
            entry["limits"] = {**entry["limits"], "max_width": side, "max_height": side}
            entry["defaults"] = {**entry["defaults"], **w.sd_input}
        else:
            entry["limits"] = {**entry["limits"], "max_tokens": max(512, w.llm_tokens)}
        models[name] = entry
        models[f"{name}-b1"] = {**entry, "max_batch_size": 1}
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


@dataclass(frozen=True)
class WorkerCounters:
    """The worker's model counters for one model at one scrape."""

    batched_jobs: float = 0.0  # spool_microbatch_size_sum
    batches: float = 0.0  # spool_microbatch_size_count
    busy_s: float = 0.0  # spool_model_busy_seconds_total
    steps: float = 0.0  # spool_model_steps_total (text models)
    step_rows: float = 0.0  # spool_model_step_rows_total
    at: float = field(default_factory=time.monotonic)


def worker_counters(metrics_url: str, model: str) -> WorkerCounters:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            if sample.labels.get("model") == model:
                values[sample.name] = sample.value
    return WorkerCounters(
        values.get("spool_microbatch_size_sum", 0.0),
        values.get("spool_microbatch_size_count", 0.0),
        values.get("spool_model_busy_seconds_total", 0.0),
        values.get("spool_model_steps_total", 0.0),
        values.get("spool_model_step_rows_total", 0.0),
    )


async def run_clients(
    url: str,
    token: str,
    model: str,
    kind: str,
    clients: int,
    seconds: float,
    meter: CpuMeter,
    w: direct.Workload,
    warm_s: float = WARMUP_S,
) -> tuple[int, int, Latencies]:
    """Each client: POST /v1/jobs with `Prefer: wait`, check the output, repeat; the first
    `warm_s` (the clients falling into step) are not counted."""

    async def one(http: Http, c: int, n: int) -> None:
        r = await http.request(
            "POST",
            "/v1/jobs",
            job_body(model, kind, (c * 100 + n) % 1000, w),
            headers={"Prefer": "wait=60"},
        )
        while r.status == 202:  # not done within the wait: long-poll the result
            r = await http.request("GET", f"/result/{r.json()['id']}?wait=30")
        if r.status != 200 or r.json()["status"] != "succeeded":
            raise HttpError(f"job answered {r.status}: {r.body[:300]!r}")

    return await closed_loop(url, token, one, clients, seconds, meter, warm_s)


def measure(
    plat: BenchPlatform,
    token: str,
    metrics_url: str,
    model: str,
    kind: str,
    seconds: float,
    clients: int,
    w: direct.Workload,
    first: bool = True,
) -> Run:
    """Jobs/s of `model` in one window; CPU per job by process."""
    if first:  # the worker warmed the model at start; this runs the job itself once first
        idle = CpuMeter({})
        asyncio.run(run_clients(plat.url, token, model, kind, 2, 0.5, idle, w, warm_s=0.5))
    before = worker_counters(metrics_url, model)
    meter = CpuMeter(plat.pids())
    done, errors, lat = asyncio.run(
        run_clients(plat.url, token, model, kind, clients, seconds, meter, w)
    )
    after = worker_counters(metrics_url, model)
    batches = after.batches - before.batches
    mean_batch = (after.batched_jobs - before.batched_jobs) / batches if batches else 1.0
    if steps := after.steps - before.steps:  # jobs join a text model's running batch
        mean_batch = (after.step_rows - before.step_rows) / steps  # rows per forward pass
    # Over the whole run, the clients' warm-up included (the scrapes bracket it).
    busy = (after.busy_s - before.busy_s) / (after.at - before.at)
    cpu = {k: 1000 * v / max(done, 1) for k, v in meter.used.items()}
    # One line per window: a long run (real models on a GPU) shows where it is.
    console.print(
        f"  window {model}: {clients} clients, {done} jobs in {seconds:.0f} s "
        f"({done / seconds:.2f}/s), {errors} errors, mean batch {mean_batch:.1f}"
    )
    return Run(model, done / seconds, done, errors, lat.ms(50), mean_batch, busy, cpu)


def merged(runs: list[Run]) -> Run:
    """Windows of one model taken at different times, as one run (jobs/s over all of them)."""
    done = sum(r.done for r in runs)
    seconds = sum(r.done / r.jobs_s for r in runs if r.jobs_s)
    cpu: dict[str, float] = {}
    for r in runs:
        for k, v in r.cpu_ms_per_job.items():
            cpu[k] = cpu.get(k, 0.0) + v * r.done / max(done, 1)
    return Run(
        runs[0].model,
        done / seconds if seconds else 0.0,
        done,
        sum(r.errors for r in runs),
        sorted(r.p50_ms for r in runs)[len(runs) // 2],
        sum(r.mean_batch * r.done for r in runs) / max(done, 1),
        sum(r.model_busy for r in runs) / len(runs),  # windows of equal length
        cpu,
    )


def model_platform(
    name: str,
    clients: int,
    models_dir: Path,
    served: str,
    w: direct.Workload = direct.WORKLOADS["tiny"],
) -> tuple[BenchPlatform, str]:
    """A started isolated platform (API, one worker serving `served` from the workload's
    models in `models_dir`, beat) and its worker's /metrics URL; the caller closes it."""
    metrics_port = support.free_port()
    plat = BenchPlatform(
        name,
        # Enough slots for every client's job to reach the batcher at once.
        SPOOL_WORKER_CONCURRENCY=str(max(clients, 16)),
        SPOOL_TORCH_THREADS="1",
        SPOOL_METRICS_PORT=str(metrics_port),
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_OFFLINE="1",
        **UNREACHABLE_LIMITS,
    )
    try:
        plat.var_dir.mkdir(parents=True, exist_ok=True)
        reg = registry_file(models_dir, plat.var_dir / "models.yaml", w)
        plat.p.extra_env["SPOOL_MODELS_FILE"] = str(reg)
        plat.p.start_api()
        worker = plat.p.start_worker(served, queues="spool.cpu")
        plat.p.start_beat()
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        support.wait_until(lambda: answers(metrics_url), timeout=60, what="worker metrics")
        # The worker loads and warms its models one after the other in the background: a
        # window measured meanwhile would share the machine with the loading of the next.
        models = [m for m in served.split(",") if m != "echo"]

        def warm() -> bool:
            log = worker.log.read_text(errors="replace")
            if failed := [m for m in models if f"model {m} failed to load" in log]:
                raise RuntimeError(f"models {failed} failed to load:\n{worker.tail()}")
            return all(f"model {m} warm in" in log for m in models)

        support.wait_until(warm, timeout=900, what="every model loaded and warm")
    except BaseException:
        plat.close()
        raise
    return plat, metrics_url


def run_platform(args: argparse.Namespace, models_dir: Path) -> list[Run]:
    w = args.workload
    served = ["echo"] + [f"{m},{m}-b1" for m, _ in args.models]
    plat, metrics_url = model_platform("inference", args.clients, models_dir, ",".join(served), w)
    runs = []
    try:
        token = asyncio.run(login(plat.url, plat.users(1)[0]))
        for model, kind in args.models:
            # Off, on, off, on: the machine's other load drifts; both modes see the same.
            windows: dict[str, list[Run]] = {f"{model}-b1": [], model: []}
            for i in range(2):
                for name, got in windows.items():
                    got.append(
                        measure(
                            plat,
                            token,
                            metrics_url,
                            name,
                            kind,
                            args.seconds / 2,
                            args.unbatched_clients if name.endswith("-b1") else args.clients,
                            w,
                            first=i == 0,
                        )
                    )
            runs += [merged(got) for got in windows.values()]
        # Last: the worker's start-up (model loading) is long over.
        echo_s = 1.0 if args.smoke else 4.0
        runs.append(measure(plat, token, metrics_url, "echo", "echo", echo_s, args.clients, w))
    finally:
        plat.close()
    return runs


# --- the report ------------------------------------------------------------------------


def report(args: argparse.Namespace, runs: list[Run]) -> list[dict[str, Any]]:
    w: direct.Workload = args.workload
    rows: list[tuple[Any, ...]] = []
    checks: list[direct.Row] = []
    targets: list[tuple[str, str, str]] = []
    out: list[dict[str, Any]] = []
    echo = next(r for r in runs if r.model == "echo")
    rows.append(
        (
            "echo",
            "platform (no model work: its ceiling)",
            "-",
            echo.jobs_s,
            "-",
            echo.p50_ms,
            echo.errors,
        )
    )
    out.append({"path": "platform", **asdict(echo)})
    for model, kind in args.models:
        off = next(r for r in runs if r.model == f"{model}-b1")
        on = next(r for r in runs if r.model == model)
        n_on = max(1, round(on.mean_batch))
        spec = args.specs[model]
        n_max = spec.max_batch_size
        bench = direct.bench_llm if kind == "text.generate" else direct.bench_sd
        # The full batch too where it is cheap (a tiny-sd batch of 8 takes seconds per call).
        sizes = {1, n_on, n_max} if kind == "text.generate" else {1, n_on}
        measured = bench(spec, sorted(sizes), args.repeats, w, check=args.check)
        checks += [d for d in measured if d.path == "batched vs alone"]
        ref = {(d.path, d.batch): d for d in measured if d.path != "batched vs alone"}
        per_job = w.llm_tokens if kind == "text.generate" else 1
        for run, n in ((off, 1), (on, n_on)):
            mode = "off" if run.unbatched else "on"
            rows.append(
                (
                    model,
                    f"platform, micro-batching {mode}",
                    f"{run.mean_batch:.1f}",
                    run.jobs_s,
                    run.jobs_s * per_job,
                    run.p50_ms,
                    run.errors,
                )
            )
            out.append({"path": "platform", **asdict(run)})
            for path in ("backend", "pipeline"):
                d = ref[(path, n)]
                label = "direct backend.predict" if path == "backend" else "direct library call"
                rows.append(
                    (
                        model,
                        label,
                        str(n),
                        d.jobs_s,
                        (d.jobs_s or 0) * per_job,
                        1000 * d.seconds,
                        "",
                    )
                )
            backend = ref[("backend", n)].jobs_s or float("nan")
            share = run.jobs_s / backend
            targets.append(
                (
                    f"{model}, micro-batching {mode}: platform ≥ 80% of direct at batch {n}",
                    f"{share:.0%}",
                    "met" if share >= 0.8 else "MISSED",
                )
            )
        for path in ("backend", "pipeline") if n_max in sizes - {1, n_on} else ():
            d = ref[(path, n_max)]
            label = f"direct {'backend.predict' if path == 'backend' else 'library call'} (max)"
            rows.append(
                (
                    model,
                    label,
                    str(n_max),
                    d.jobs_s,
                    (d.jobs_s or 0) * per_job,
                    1000 * d.seconds,
                    "",
                )
            )
        out += [{**asdict(d), "path": f"direct {d.path}"} for d in ref.values()]
        out += [asdict(d) for d in checks if d.model == model]
        speedup = on.jobs_s / off.jobs_s if off.jobs_s else float("nan")
        if model == "tiny-llm" and not args.smoke:
            verdict = "met" if speedup >= 2.5 else "MISSED"
            targets.append(
                ("tiny-llm: micro-batching ≥ 2.5x unbatched", f"{speedup:.2f}x", verdict)
            )
        else:
            targets.append(
                (f"{model}: micro-batching vs unbatched (no target)", f"{speedup:.2f}x", "-")
            )

    unit = "tokens/s (llm) or images/s (sd)"
    console.print(
        table(
            f"Through the platform vs direct: {args.clients} closed-loop clients"
            + (
                f" ({args.unbatched_clients} with micro-batching off), "
                if args.unbatched_clients != args.clients
                else ", "
            )
            + f"{args.seconds:.0f} s window; {w.llm} {w.llm_tokens} tokens/job, {w.sd} "
            f"{w.sd_input['width']}x{w.sd_input['height']} {w.sd_input['steps']} steps/job; "
            f"{args.device}",
            ["model", "path", "batch", "jobs/s", unit, "p50 ms (direct: per call)", "errors"],
            rows,
        )
    )
    console.print(
        table(
            "CPU per job (ms) by process during the platform windows; model busy: the "
            "share of the wall time the model ran batches (spool_model_busy_seconds_total)",
            ["run", *COMPONENTS, "total", "model busy"],
            [
                (
                    r.model,
                    *(r.cpu_ms_per_job.get(k, 0.0) for k in COMPONENTS),
                    sum(r.cpu_ms_per_job.values()),
                    f"{r.model_busy:.0%}" if r.model != "echo" else "-",
                )
                for r in runs
            ],
        )
    )
    if checks:
        console.print(
            table(
                "Same seed, batched or alone (the API's promise): jobs of one batch of "
                f"{args.check} whose output equals their solo run (direct backend.predict)",
                ["model", "identical", "largest pixel difference (0-255)"],
                [
                    (
                        c.model,
                        f"{c.identical}/{c.batch}",
                        "-" if c.max_pixel_diff is None else c.max_pixel_diff,
                    )
                    for c in checks
                ],
            )
        )
    title = "Targets" + (
        " (a smoke run: tiny models, 2 s windows; not a measurement)" if args.smoke else ""
    )
    console.print(table(title, ["target", "measured", "verdict"], targets))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    ap.add_argument(
        "--unbatched-clients",
        type=int,
        default=None,
        help="clients of the micro-batching-off runs (default: --clients); a worker runs "
        "those jobs one at a time, so 2 already keep it busy and more only queue",
    )
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per run")
    ap.add_argument("--repeats", type=int, default=3, help="timed direct calls per batch size")
    ap.add_argument("--only", choices=sorted(KINDS), default=None)
    ap.add_argument("--workload", choices=sorted(direct.WORKLOADS), default="tiny")
    ap.add_argument(
        "--check", type=int, default=4, help="jobs in the batched-vs-alone check (0: none)"
    )
    ap.add_argument("--smoke", action="store_true", help="the workload's code path, in seconds")
    ap.add_argument("--json", type=Path, default=None, help="also write every row here")
    args = ap.parse_args(argv)
    w = direct.WORKLOADS[args.workload]
    if args.smoke:
        w = w.smoke()
        args.seconds = min(args.seconds, 2.0)
        args.repeats = 1
    args.workload = w
    if args.unbatched_clients is None:
        args.unbatched_clients = args.clients
    names = {"llm": w.llm, "sd": w.sd}
    args.models = [(names[k], kind) for k, kind in KINDS.items() if args.only in (None, k)]
    header(
        f"GPU efficiency through the platform ({w.name} workload{', smoke' if args.smoke else ''})"
    )
    started = time.monotonic()

    import torch

    torch.set_num_threads(1)  # as the worker runs (SPOOL_TORCH_THREADS=1)
    args.device = (
        f"cuda: {torch.cuda.get_device_name()}"
        if torch.cuda.is_available()
        else "cpu, 1 torch thread"
    )
    var_dir = settings.get().var_dir
    # A smoke run's models are tiny under the workload's names: kept apart from real ones.
    folder = "models-smoke" if args.smoke else "models"
    built = time.monotonic()
    run_names = {m for m, _ in args.models}
    shapes = {m: s for m, s in w.shapes(args.smoke).items() if m in run_names}
    models_dir = var_dir / folder
    tiny_models.init_models(var_dir, list(shapes), shapes=shapes, folder=folder)
    console.print(f"models in {models_dir} ({time.monotonic() - built:.0f} s to build)")
    reg = registry_file(models_dir, var_dir / f"bench-{w.name}-models.yaml", w)
    args.specs = registry.load(reg)
    runs = run_platform(args, models_dir)
    rows = report(args, runs)  # direct calls run now, with the platform stopped
    if args.json:
        meta = {
            "workload": asdict(w),
            "smoke": args.smoke,
            "device": args.device,
            "clients": args.clients,
            "unbatched_clients": args.unbatched_clients,
            "seconds": args.seconds,
        }
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2, default=str))
    console.print(f"took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
