"""`spool models check`: load a registry model as a worker does and run one small job.

Before a model goes into production its operator wants to know that it loads from its
`source`, on which device and dtype, how long that takes, how big it is, and that a job
runs on it: without starting the platform or waiting for a first job to fail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from spool.registry import ModelSpec
from workers.backends import backend_class


@dataclass
class Checked:
    name: str
    kind: str
    device: str = "-"
    dtype: str = "-"
    parameters: int | None = None
    load_s: float | None = None
    job: str = ""  # what the job made, e.g. "1 image of 64x64, 1 step"
    job_s: float | None = None
    # The same job again: what a job costs once the device's lazy start is paid (the
    # first call's kernels loaded and chosen), as after a worker's warm-up.
    again_s: float | None = None
    peak_memory_bytes: int | None = None  # CUDA only
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class QuietContext:
    """A JobContext for a job run outside the platform (a check, a benchmark): progress
    and tokens go nowhere, artifacts are kept in memory by name (nothing is stored)."""

    def __init__(self, job_input: dict[str, Any], job_id: str = "job_check") -> None:
        self.job_id = job_id
        self.input = job_input
        self.artifacts: dict[str, bytes] = {}

    def progress(self, current: int, total: int) -> None:
        pass

    def token(self, text: str) -> None:
        pass

    def canceled(self) -> bool:
        return False

    def check(self) -> None:
        pass

    def save_artifact(self, name: str, data: bytes, content_type: str) -> str:
        self.artifacts[name] = data
        return f"memory://{name}"


def small_input(spec: ModelSpec) -> tuple[dict[str, Any], str]:
    """The smallest job worth running on the model, and how to say what it made."""
    if spec.kind == "image.generate":
        # 64 px: the smallest size whose latents survive a Stable Diffusion UNet's downsampling.
        width = min(max(64, spec.limit("min_width")), spec.limit("max_width"))
        height = min(max(64, spec.limit("min_height")), spec.limit("max_height"))
        job = {"prompt": "a test pattern", "width": width, "height": height, "steps": 1}
        return {**job, "seed": 0}, f"1 image of {width}x{height}, 1 step"
    if spec.kind == "text.generate":
        return {"prompt": "Hello", "max_tokens": 1, "min_tokens": 1, "seed": 0}, "1 token"
    return {"value": "check"}, "an echo"


def warm_input(spec: ModelSpec) -> dict[str, Any] | None:
    """A worker's first call on a model, made at start-up so that the first job does not
    pay for the device's lazy start (on a GPU: kernels loaded on first use, library handles,
    kernel choice by shape): an image of the model's default size in 1 step, or a prompt
    and 2 tokens (the prefill and a decode step). None for a kind with nothing to warm."""
    if spec.kind == "image.generate":
        return {"prompt": "a test pattern", "steps": 1, "num_images": 1, "seed": 0}
    if spec.kind == "text.generate":
        tokens = min(2, spec.limit("max_tokens", 2))
        return {"prompt": "Hello", "max_tokens": tokens, "min_tokens": tokens, "seed": 0}
    return None


def _modules(backend: Any) -> list[Any]:
    holder = getattr(backend, "pipe", None) or getattr(backend, "model", None)
    if holder is None:  # echo: no model (and maybe no torch installed)
        return []
    import torch

    if isinstance(holder, torch.nn.Module):
        return [holder]
    components = getattr(holder, "components", {})  # a diffusers pipeline
    return [c for c in components.values() if isinstance(c, torch.nn.Module)]


def check(spec: ModelSpec) -> Checked:
    """Load `spec`'s model and run `small_input` on it; what went wrong is in `error`."""
    out = Checked(spec.name, spec.kind)
    try:
        backend = backend_class(spec.kind)(spec)
        started = time.perf_counter()
        backend.setup()
        out.load_s = time.perf_counter() - started
    except Exception as exc:  # the message is what the operator needs: no traceback
        out.error = str(exc) or type(exc).__name__
        return out
    modules = _modules(backend)
    if modules:
        first = next(modules[0].parameters(), None)
        out.device = str(getattr(backend, "device", "-"))
        out.dtype = str(first.dtype).removeprefix("torch.") if first is not None else "-"
        out.parameters = sum(p.numel() for m in modules for p in m.parameters())
    cuda = _cuda_for(out.device)
    if cuda is not None:
        cuda.reset_peak_memory_stats()
    job_input, out.job = small_input(spec)
    times: list[float] = []
    for _ in range(2):
        started = time.perf_counter()
        try:
            [result] = backend.predict([QuietContext(dict(job_input))])
        except Exception as exc:
            result = exc
        times.append(time.perf_counter() - started)
        if isinstance(result, BaseException):
            out.error = f"the job failed: {type(result).__name__}: {result}"
            break
    out.job_s = times[0]
    out.again_s = times[1] if len(times) == 2 and out.error is None else None
    if cuda is not None:
        out.peak_memory_bytes = int(cuda.max_memory_allocated())
    return out


def _cuda_for(device: str) -> Any:
    if not device.startswith("cuda"):
        return None
    import torch

    return torch.cuda


def describe(c: Checked) -> str:
    """One line for the operator."""
    if c.load_s is None:
        return f"{c.name:<16} {c.kind:<15} FAILED to load: {c.error}"
    size = f"{c.parameters / 1e6:,.1f} M params" if c.parameters is not None else "-"
    where = f"{c.device} {c.dtype}" if c.device != "-" else "-"
    line = f"{c.name:<16} {c.kind:<15} {where:<16} {size:>17}  loaded in {c.load_s:.2f} s"
    if c.job_s is not None:
        line += f", {c.job} in {c.job_s:.2f} s"
    if c.again_s is not None:
        line += f" (again: {c.again_s:.2f} s)"
    if c.peak_memory_bytes is not None:
        line += f", peak {c.peak_memory_bytes / 2**30:.2f} GiB"
    return line + ("  ok" if c.ok else f"  FAILED: {c.error}")
