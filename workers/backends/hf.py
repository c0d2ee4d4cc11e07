"""What the diffusers and transformers backends share: device, dtype, quiet loading, inputs.

Importing this module imports torch; the backends import it, `workers.backends` only
imports them when the `gpu` extra is installed.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any

import torch

from spool import metrics, settings
from spool.registry import ModelSpec
from workers.backends.base import JobCanceled, JobContext, JobTimedOut, ModelLoadError

log = logging.getLogger("spool.backends")

# What ctx.check() raises: the job stops, the other jobs of its batch go on.
STOPS: tuple[type[BaseException], ...] = (JobCanceled, JobTimedOut)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

_prepared = False
_prepare_lock = threading.Lock()
# One model loads at a time in a process: `from_pretrained` builds models under
# accelerate's init_empty_weights, which patches torch.nn.Module for every thread, so two
# loads at once (the warm-up thread and a job's first load of another model) leave each
# other's weights on the meta device ("Cannot copy out of meta tensor").
LOAD_LOCK = threading.Lock()


class InvalidInput(ValueError):
    """A job's input that the backend cannot run (the API should have refused it)."""

    code = "invalid_input"


def prepare_process() -> None:
    """Once per process: silence the libraries' progress bars and set torch's thread count."""
    global _prepared
    with _prepare_lock:
        if _prepared:
            return
        conf = settings.get()
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # `import diffusers` creates an inductor cache; keep it under the var dir, not /tmp.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(conf.var_dir / "cache" / "inductor"))
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        if conf.torch_threads > 0:
            torch.set_num_threads(conf.torch_threads)
        _prepared = True


def device_for(spec: ModelSpec) -> torch.device:
    """`device: auto` takes CUDA when there is one; `cuda` without one is a load error."""
    wanted = spec.device.lower()
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"model {spec.name} asks for device {spec.device} but CUDA is unavailable"
        )
    try:
        device = torch.device(wanted)
    except RuntimeError as exc:
        raise ModelLoadError(f"model {spec.name}: unknown device {spec.device!r}") from exc
    if device.type == "cuda" and device.index is not None:
        seen = torch.cuda.device_count()
        if device.index >= seen:
            # A worker process per GPU sees one, as cuda:0 (spool/gpus.py).
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            narrowed = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
            raise ModelLoadError(
                f"model {spec.name} asks for device {spec.device} but this process sees "
                f"{seen} GPU(s){narrowed}: use device auto or cuda, and pick GPUs with "
                "`spool worker --gpus`"
            )
    return device


def dtype_for(spec: ModelSpec, device: torch.device) -> torch.dtype:
    """The registry's dtype on an accelerator; float32 on a CPU, where half types are slow."""
    try:
        dtype = _DTYPES[spec.dtype.lower()]
    except KeyError as exc:
        known = ", ".join(sorted(_DTYPES))
        raise ModelLoadError(f"model {spec.name}: dtype must be one of {known}") from exc
    return torch.float32 if device.type == "cpu" else dtype


def model_source(spec: ModelSpec) -> str:
    """The folder (or cached hub id) to load; a missing local folder fails early and clearly."""
    source = spec.resolved_source(settings.get().var_dir)
    if not source:
        raise ModelLoadError(f"model {spec.name} has no `source` in the model registry")
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if source.startswith(("/", ".", "~")):
        raise ModelLoadError(
            f"model {spec.name} failed to load from {source}: no such directory "
            "(run `spool models init-tiny` for the tiny models)"
        )
    return source  # a hub id ("org/name"), loaded from the local hub cache


def load_kwargs(spec: ModelSpec) -> dict[str, Any]:
    # Workers never download: weights are placed beforehand (HF_HUB_OFFLINE semantics),
    # unless the registry entry opts in with `allow_download: true`.
    kwargs: dict[str, Any] = {"local_files_only": not spec.options.get("allow_download", False)}
    if spec.options.get("variant"):  # e.g. "fp16" weight files of a hub repo
        kwargs["variant"] = str(spec.options["variant"])
    return kwargs


def load_failed(spec: ModelSpec, source: str, exc: BaseException) -> ModelLoadError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(f"model {spec.name} failed to load from {source}: {reason}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def free_device_memory(device: torch.device, spec: ModelSpec, reason: str) -> None:
    """After a call ran out of device memory: count and log it, and give the allocator's
    cached blocks back, so the next call starts from what is really in use."""
    metrics.MODEL_OUT_OF_MEMORY.labels(spec.name).inc()
    log.warning("model %s ran out of device memory: %s", spec.name, reason)
    if device.type == "cuda":
        gc.collect()  # the failed call's frames and tensors, held in reference cycles
        torch.cuda.empty_cache()


def stop_reason(ctx: JobContext) -> BaseException | None:
    """Run ctx.check(); the exception that stops this job, or None to go on."""
    try:
        ctx.check()
    except STOPS as exc:
        return exc
    return None


def int_input(data: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    raw = data.get(key)
    value = default if raw is None else raw
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise InvalidInput(f"{key} must be an integer")
    if not low <= value <= high:
        raise InvalidInput(f"{key} must be between {low} and {high}")
    return int(value)


def float_input(data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    raw = data.get(key)
    value = default if raw is None else raw
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{key} must be a number")
    if not low <= value <= high:
        raise InvalidInput(f"{key} must be between {low} and {high}")
    return float(value)


def seed_input(data: dict[str, Any]) -> int:
    """The job's seed, or a fresh random one (reported back so the result can be reproduced)."""
    raw = data.get("seed")
    if raw is None:
        return secrets.randbelow(2**31)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < 2**63:
        raise InvalidInput("seed must be a non-negative integer")
    return raw
