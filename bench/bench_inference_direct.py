"""GPU efficiency, direct half: the models' throughput without the platform.

Two paths per model, at batch 1 and at batch N:
  pipeline: the library call itself (diffusers pipeline, transformers `generate`);
  backend:  Spool's backend `predict` (per-job seeds, progress, cancel checks, PNG encoding).
The through-the-platform numbers (bench/) are compared against these.

    python -m bench.bench_inference_direct [--sd-batch 8] [--llm-batch 16] [--repeats 5] [--json]

Run alone, it measures the tiny models. The workloads (WORKLOADS) are what
bench_inference_platform runs and calls these functions with: `tiny` (tiny-sd 64x64,
4 steps; tiny-llm, 32 tokens: the CPU benchmarks) and `real` (random-weight models of
real size, for a GPU: Stable Diffusion 1.5's shapes at 512x512, 20 steps; a
1.1B-parameter Llama, 128 new tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spool import registry, settings, tiny_models
from workers.check import QuietContext


@dataclass(frozen=True)
class Workload:
    """The models a benchmark runs and the work of one job on each."""

    name: str
    sd: str  # model names: tiny_models.PRESETS, and entries of the registry the bench uses
    llm: str
    sd_input: dict[str, Any]
    llm_tokens: int  # every text job makes exactly this many (min_tokens = max_tokens)

    def shapes(self, smoke: bool) -> dict[str, tiny_models.SdShape | tiny_models.LlmShape]:
        """What to build each model from: its preset, or for a smoke run (the workload's
        code path on a CPU, in seconds) the tiny shapes under the same names."""
        if not smoke:
            return {m: tiny_models.PRESETS[m][1] for m in (self.sd, self.llm)}
        return {self.sd: tiny_models.TINY_SD, self.llm: tiny_models.TINY_LLM}

    def smoke(self) -> Workload:
        """The same models (built tiny) with a tiny job's work."""
        tiny = WORKLOADS["tiny"]
        return Workload(self.name, self.sd, self.llm, tiny.sd_input, tiny.llm_tokens)


WORKLOADS = {
    "tiny": Workload(
        "tiny",
        "tiny-sd",
        "tiny-llm",
        {"width": 64, "height": 64, "steps": 4, "guidance_scale": 7.5},
        32,
    ),
    "real": Workload(
        "real",
        "sd15-random",
        "llama-1b-random",
        {"width": 512, "height": 512, "steps": 20, "guidance_scale": 7.5},
        128,
    ),
}
SD_INPUT = WORKLOADS["tiny"].sd_input
LLM_TOKENS = WORKLOADS["tiny"].llm_tokens


@dataclass
class Row:
    model: str
    path: str
    batch: int
    seconds: float  # median wall time of one batch
    images_s: float | None = None
    tokens_s: float | None = None
    jobs_s: float | None = None
    # path "batched vs alone": jobs of one batch whose output equals their solo run, and for
    # images the largest pixel difference (0-255) of any job from its solo run.
    identical: int | None = None
    max_pixel_diff: int | None = None


def _pixels(png: bytes) -> Any:
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def consistency_sd(backend: Any, inputs: list[dict[str, Any]]) -> Row:
    """The same seeded jobs batched and each alone: the API promises the same image."""
    batched = [QuietContext(i) for i in inputs]
    backend.predict(batched)
    identical, worst = 0, 0
    for job_input, ctx in zip(inputs, batched, strict=True):
        alone = QuietContext(job_input)
        backend.predict([alone])
        a, b = _pixels(ctx.artifacts["image-0.png"]), _pixels(alone.artifacts["image-0.png"])
        diff = int(abs(a - b).max())
        identical += diff == 0
        worst = max(worst, diff)
    name = backend.spec.name
    return Row(
        name, "batched vs alone", len(inputs), 0.0, identical=identical, max_pixel_diff=worst
    )


def consistency_llm(backend: Any, inputs: list[dict[str, Any]]) -> Row:
    """The same seeded text jobs batched and each alone: the API promises the same text."""
    batched = backend.predict([QuietContext(i) for i in inputs])
    alone = [backend.predict([QuietContext(i)])[0] for i in inputs]
    identical = sum(a["text"] == b["text"] for a, b in zip(batched, alone, strict=True))
    return Row(backend.spec.name, "batched vs alone", len(inputs), 0.0, identical=identical)


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    import torch

    def timed() -> float:
        started = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # `generate` returns before its last kernels end
        return time.perf_counter() - started

    timed()  # warm-up: first calls at a new shape pick kernels and allocate
    return statistics.median(timed() for _ in range(repeats))


def _spec(name: str, var_dir: Path) -> registry.ModelSpec:
    spec = registry.get(name)
    if spec is None:
        raise SystemExit(f"model {name!r} is not in the model registry")
    tiny_models.init_tiny(var_dir)
    return spec


def bench_sd(
    spec: registry.ModelSpec,
    batches: list[int],
    repeats: int,
    w: Workload = WORKLOADS["tiny"],
    check: int = 0,
) -> list[Row]:
    """Timed calls at each batch size; with `check`, a batch of that many jobs against
    each job alone too."""
    import torch

    from workers.backends.diffusion import DiffusionBackend

    backend = DiffusionBackend(spec)
    backend.setup()
    sd_input = w.sd_input
    rows = []
    for n in batches:

        def pipeline(n: int = n) -> object:
            return backend.pipe(
                prompt=[f"a photo of thing {i}" for i in range(n)],
                width=sd_input["width"],
                height=sd_input["height"],
                num_inference_steps=sd_input["steps"],
                guidance_scale=sd_input["guidance_scale"],
                generator=[torch.Generator("cpu").manual_seed(i) for i in range(n)],
            )

        def predict(n: int = n) -> object:
            jobs = [
                QuietContext({"prompt": f"a photo of thing {i}", "seed": i, **sd_input})
                for i in range(n)
            ]
            return backend.predict(jobs)  # type: ignore[arg-type]

        for path, run in (("pipeline", pipeline), ("backend", predict)):
            s = _median_seconds(run, repeats)
            rows.append(Row(spec.name, path, n, s, images_s=n / s, jobs_s=n / s))
    if check:
        inputs = [{"prompt": f"a photo of thing {i}", "seed": i, **sd_input} for i in range(check)]
        rows.append(consistency_sd(backend, inputs))
    return rows


def bench_llm(
    spec: registry.ModelSpec,
    batches: list[int],
    repeats: int,
    w: Workload = WORKLOADS["tiny"],
    check: int = 0,
) -> list[Row]:
    """As bench_sd; the check mixes greedy and sampled jobs."""
    from workers.backends.llm import LLMBackend

    backend = LLMBackend(spec)
    backend.setup()
    tokens = w.llm_tokens
    model, tokenizer = backend.model, backend.tokenizer
    rows = []
    for n in batches:
        prompts = [f"Question {i}: what does a worker do with a job?" for i in range(n)]

        def generate(prompts: list[str] = prompts) -> object:
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(backend.device)
            return model.generate(
                **enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )

        def predict(prompts: list[str] = prompts) -> object:
            # min_tokens: random weights emit EOS early; every row makes exactly `tokens`.
            jobs = [
                QuietContext({"prompt": p, "max_tokens": tokens, "min_tokens": tokens, "seed": i})
                for i, p in enumerate(prompts)
            ]
            return backend.predict(jobs)  # type: ignore[arg-type]

        for path, run in (("pipeline", generate), ("backend", predict)):
            s = _median_seconds(run, repeats)
            rows.append(Row(spec.name, path, n, s, tokens_s=n * tokens / s, jobs_s=n / s))
    if check:
        inputs = [
            {
                "prompt": f"Question {i}: what does a worker do with a job?" + " more" * i,
                "max_tokens": tokens,
                "min_tokens": tokens,
                "seed": i,
                "temperature": 0 if i % 2 else 1.0,
            }
            for i in range(check)
        ]
        rows.append(consistency_llm(backend, inputs))
    return rows


def _table(rows: list[Row]) -> str:
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:,.1f}"

    head = ("model", "path", "batch", "s/batch", "images/s", "tokens/s", "jobs/s")
    lines = ["{:<9} {:<9} {:>5} {:>8} {:>9} {:>9} {:>8}".format(*head)]
    for r in rows:
        lines.append(
            f"{r.model:<9} {r.path:<9} {r.batch:>5} {r.seconds:>8.3f} {num(r.images_s):>9} "
            f"{num(r.tokens_s):>9} {num(r.jobs_s):>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--var-dir", type=Path, default=None, help="where the tiny models are")
    parser.add_argument(
        "--sd-batch", type=int, default=0, help="N for tiny-sd (default: its max_batch_size)"
    )
    parser.add_argument(
        "--llm-batch", type=int, default=0, help="N for tiny-llm (default: its max_batch_size)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: SPOOL_TORCH_THREADS)"
    )
    parser.add_argument("--only", choices=["sd", "llm"], default=None)
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args(argv)

    import torch

    var_dir = args.var_dir or settings.get().var_dir
    threads = args.threads or settings.get().torch_threads
    if threads:
        torch.set_num_threads(threads)
    rows: list[Row] = []
    if args.only in (None, "sd"):
        n = args.sd_batch or _spec("tiny-sd", var_dir).max_batch_size
        rows += bench_sd(_spec("tiny-sd", var_dir), sorted({1, n}), args.repeats)
    if args.only in (None, "llm"):
        n = args.llm_batch or _spec("tiny-llm", var_dir).max_batch_size
        rows += bench_llm(_spec("tiny-llm", var_dir), sorted({1, n}), args.repeats)
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        device = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
        print(f"direct inference ({device}); tiny-sd {SD_INPUT}; tiny-llm {LLM_TOKENS} new tokens")
        print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
