"""GPU efficiency, direct half: the tiny models' throughput without the platform.

Two paths per model, at batch 1 and at batch N:
  pipeline: the library call itself (diffusers pipeline, transformers `generate`);
  backend:  Spool's backend `predict` (per-job seeds, progress, cancel checks, PNG encoding).
The through-the-platform numbers (bench/) are compared against these.

    python -m bench.bench_inference_direct [--sd-batch 8] [--llm-batch 16] [--repeats 5] [--json]
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

from spool import registry, settings
from spool.tiny_models import init_tiny

SD_INPUT = {"width": 64, "height": 64, "steps": 4, "guidance_scale": 7.5}
LLM_TOKENS = 32


@dataclass
class Row:
    model: str
    path: str
    batch: int
    seconds: float  # median wall time of one batch
    images_s: float | None = None
    tokens_s: float | None = None
    jobs_s: float | None = None


class _QuietContext:
    """A JobContext that discards what it is told (the bench measures compute only)."""

    def __init__(self, job_input: dict[str, Any]) -> None:
        self.job_id = "job_bench"
        self.input = job_input

    def progress(self, current: int, total: int) -> None:
        pass

    def token(self, text: str) -> None:
        pass

    def canceled(self) -> bool:
        return False

    def check(self) -> None:
        pass

    def save_artifact(self, name: str, data: bytes, content_type: str) -> str:
        return ""


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: first calls at a new shape pick kernels and allocate
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _spec(name: str, var_dir: Path) -> registry.ModelSpec:
    spec = registry.get(name)
    if spec is None:
        raise SystemExit(f"model {name!r} is not in the model registry")
    init_tiny(var_dir)
    return spec


def bench_sd(var_dir: Path, batches: list[int], repeats: int) -> list[Row]:
    import torch

    from workers.backends.diffusion import DiffusionBackend

    backend = DiffusionBackend(_spec("tiny-sd", var_dir))
    backend.setup()
    rows = []
    for n in batches:

        def pipeline(n: int = n) -> object:
            return backend.pipe(
                prompt=[f"a photo of thing {i}" for i in range(n)],
                width=SD_INPUT["width"],
                height=SD_INPUT["height"],
                num_inference_steps=SD_INPUT["steps"],
                guidance_scale=SD_INPUT["guidance_scale"],
                generator=[torch.Generator("cpu").manual_seed(i) for i in range(n)],
            )

        def predict(n: int = n) -> object:
            jobs = [
                _QuietContext({"prompt": f"a photo of thing {i}", "seed": i, **SD_INPUT})
                for i in range(n)
            ]
            return backend.predict(jobs)  # type: ignore[arg-type]

        for path, run in (("pipeline", pipeline), ("backend", predict)):
            s = _median_seconds(run, repeats)
            rows.append(Row("tiny-sd", path, n, s, images_s=n / s, jobs_s=n / s))
    return rows


def bench_llm(var_dir: Path, batches: list[int], repeats: int) -> list[Row]:
    from workers.backends.llm import LLMBackend

    backend = LLMBackend(_spec("tiny-llm", var_dir))
    backend.setup()
    model, tokenizer = backend.model, backend.tokenizer
    rows = []
    for n in batches:
        prompts = [f"Question {i}: what does a worker do with a job?" for i in range(n)]

        def generate(prompts: list[str] = prompts) -> object:
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(backend.device)
            return model.generate(
                **enc, max_new_tokens=LLM_TOKENS, min_new_tokens=LLM_TOKENS, do_sample=False
            )

        def predict(prompts: list[str] = prompts) -> object:
            # min_tokens: random weights emit EOS early; every row makes exactly 32 tokens.
            jobs = [
                _QuietContext(
                    {"prompt": p, "max_tokens": LLM_TOKENS, "min_tokens": LLM_TOKENS, "seed": i}
                )
                for i, p in enumerate(prompts)
            ]
            return backend.predict(jobs)  # type: ignore[arg-type]

        for path, run in (("pipeline", generate), ("backend", predict)):
            s = _median_seconds(run, repeats)
            rows.append(Row("tiny-llm", path, n, s, tokens_s=n * LLM_TOKENS / s, jobs_s=n / s))
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
        rows += bench_sd(var_dir, sorted({1, n}), args.repeats)
    if args.only in (None, "llm"):
        n = args.llm_batch or _spec("tiny-llm", var_dir).max_batch_size
        rows += bench_llm(var_dir, sorted({1, n}), args.repeats)
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        device = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
        print(f"direct inference ({device}); tiny-sd {SD_INPUT}; tiny-llm {LLM_TOKENS} new tokens")
        print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
