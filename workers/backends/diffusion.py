"""`image.generate`: any diffusers text-to-image pipeline, many jobs per pipeline call.

Every image has its own seeded generator, so its starting noise is the same whether
it runs alone or in a batch. Progress and cancel are checked at every denoising step,
per job: a canceled job stops reporting and is dropped from the results, the others
go on; when every job of a call is canceled the call stops.

A call that runs out of device memory is run again as two halves, and the backend
caps that shape's calls at the larger half for a while (`LearnedCaps`): batching never
fails a job that fits alone. A job that does not fit even alone fails with
`out_of_memory`.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from spool.registry import ModelSpec
from workers.backends import hf
from workers.backends.base import Backend, JobContext, OutOfMemory, Result, register


class _AllStopped(Exception):
    """Raised from the step callback to abort a call whose jobs were all canceled."""


@dataclass(frozen=True)
class Shape:
    """The parameters one pipeline call shares; jobs with equal shapes batch together."""

    width: int
    height: int
    steps: int
    guidance_scale: float


@dataclass
class _Request:
    index: int
    ctx: JobContext
    prompt: str
    negative_prompt: str
    seeds: list[int]
    stopped: BaseException | None = None
    reported: int = 0  # the last step reported: a call run again does not go back


@register
class DiffusionBackend(Backend):
    kind = "image.generate"

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.pipe: Any = None
        self.device = torch.device("cpu")
        # A pipeline keeps per-call state on itself (step count, interrupt flag).
        self._lock = threading.Lock()

    def setup(self) -> None:
        hf.prepare_process()
        from diffusers import AutoPipelineForText2Image

        self.device = hf.device_for(self.spec)
        dtype = hf.dtype_for(self.spec, self.device)
        source = hf.model_source(self.spec)
        try:
            with hf.LOAD_LOCK:
                pipe = AutoPipelineForText2Image.from_pretrained(
                    source, dtype=dtype, **hf.load_kwargs(self.spec)
                )
                pipe = pipe.to(self.device)
            self._save_memory(pipe)
        except Exception as exc:  # any failure here means the model is unusable
            raise hf.load_failed(self.spec, source, exc) from exc
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe

    def _save_memory(self, pipe: Any) -> None:
        """The registry's memory settings: less GPU memory per call for a little time
        (big images or batches on a small GPU)."""
        options = self.spec.options
        if options.get("attention_slicing"):
            pipe.enable_attention_slicing()  # attention computed in slices
        if options.get("vae_slicing") or options.get("vae_tiling"):
            vae = getattr(pipe, "vae", None)
            if vae is None:
                raise ValueError("vae_slicing / vae_tiling: this pipeline has no VAE")
            if options.get("vae_slicing"):
                vae.enable_slicing()  # a batch's images decoded one at a time
            if options.get("vae_tiling"):
                vae.enable_tiling()  # a large image decoded in overlapping tiles

    def batch_key(self, job_input: dict[str, Any]) -> Hashable:
        return self.shape(job_input)

    def shape(self, data: dict[str, Any]) -> Shape:
        """The job's size, steps and guidance, with the registry's defaults and limits."""
        d, lim = self.spec.defaults, self.spec.limit
        width = hf.int_input(data, "width", d.get("width", 512), lim("min_width"), lim("max_width"))
        height = hf.int_input(
            data, "height", d.get("height", 512), lim("min_height"), lim("max_height")
        )
        if width % 8 or height % 8:
            raise hf.InvalidInput("width and height must be multiples of 8")
        steps = hf.int_input(data, "steps", d.get("steps", 30), 1, lim("max_steps"))
        guidance = hf.float_input(
            data,
            "guidance_scale",
            d.get("guidance_scale", 7.5),
            0.0,
            lim("max_guidance_scale"),
        )
        return Shape(width, height, steps, guidance)

    def predict(self, jobs: list[JobContext]) -> list[Result]:
        if self.pipe is None:
            raise RuntimeError("DiffusionBackend.predict called before setup()")
        results: list[Result | None] = [None] * len(jobs)
        groups: dict[Shape, list[_Request]] = {}
        for index, ctx in enumerate(jobs):
            try:
                shape = self.shape(ctx.input)
                groups.setdefault(shape, []).append(self._request(index, ctx))
            except hf.InvalidInput as exc:
                results[index] = exc
        with self._lock:
            for shape, requests in groups.items():
                for call in self._pack(requests, self.caps.get(shape)):
                    self._run_call(shape, call, results)
        return [r if r is not None else RuntimeError("job was not run") for r in results]

    def _request(self, index: int, ctx: JobContext) -> _Request:
        data = ctx.input
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise hf.InvalidInput("prompt must be a non-empty string")
        negative = data.get("negative_prompt") or ""
        if not isinstance(negative, str):
            raise hf.InvalidInput("negative_prompt must be a string")
        count = hf.int_input(data, "num_images", 1, 1, self.spec.limit("max_num_images"))
        seed = hf.seed_input(data)
        return _Request(index, ctx, prompt, negative, [seed + k for k in range(count)])

    def _pack(self, requests: list[_Request], cap: int | None = None) -> list[list[_Request]]:
        """Split into pipeline calls of at most max_batch_size (or `cap`) images; a job is
        never split."""
        cap = max(1, min(self.spec.max_batch_size, cap or self.spec.max_batch_size))
        calls: list[list[_Request]] = []
        size = cap
        for request in requests:
            if size + len(request.seeds) > cap:
                calls.append([])
                size = 0
            calls[-1].append(request)
            size += len(request.seeds)
        return calls

    def _run_call(
        self, shape: Shape, requests: list[_Request], results: list[Result | None]
    ) -> None:
        live = []
        for request in requests:  # jobs canceled while waiting for an earlier call
            if (stop := hf.stop_reason(request.ctx)) is not None:
                results[request.index] = stop
            else:
                live.append(request)
        if not live:
            return

        def on_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            total = pipe.num_timesteps  # second-order schedulers call back 2N-1 times
            for request in live:
                if request.stopped is None:
                    request.stopped = _report(request, step + 1, total)
            if all(request.stopped is not None for request in live):
                raise _AllStopped
            return tensors

        prompts = [r.prompt for r in live for _ in r.seeds]
        negatives = [r.negative_prompt for r in live for _ in r.seeds]
        # CPU generators: the same noise on any device, drawn per image.
        generators = [torch.Generator("cpu").manual_seed(s) for r in live for s in r.seeds]
        oom: str | None = None
        try:
            images = self.pipe(
                prompt=prompts,
                negative_prompt=negatives,
                width=shape.width,
                height=shape.height,
                num_inference_steps=shape.steps,
                guidance_scale=shape.guidance_scale,
                generator=generators,
                output_type="pil",
                callback_on_step_end=on_step,
            ).images
        except _AllStopped:
            images = []
        except torch.OutOfMemoryError as exc:
            oom = hf.first_line(exc)  # the traceback holds the call's tensors: let go first
        except Exception as exc:  # this call's jobs fail, later calls still run
            for request in live:
                results[request.index] = request.stopped or exc
            return
        if oom is not None:
            self._out_of_memory(shape, live, results, oom)
            return
        offset = 0
        for request in live:
            mine = images[offset : offset + len(request.seeds)]
            offset += len(request.seeds)
            if request.stopped is not None:
                results[request.index] = request.stopped
                continue
            try:
                results[request.index] = _output(request, shape, mine)
            except Exception as exc:  # storing this job's images failed; the others stand
                results[request.index] = exc

    def _out_of_memory(
        self, shape: Shape, live: list[_Request], results: list[Result | None], reason: str
    ) -> None:
        """A call too big for the device: run it again as two halves, and cap the shape's
        later calls at the larger half; a job alone that does not fit fails."""
        hf.free_device_memory(self.device, self.spec, reason)
        images = sum(len(r.seeds) for r in live)
        if len(live) == 1:
            request = live[0]
            results[request.index] = request.stopped or OutOfMemory(
                f"model {self.spec.name} ran out of device memory on {images} image(s) of "
                f"{shape.width}x{shape.height}, {shape.steps} steps: {reason}"
            )
            return
        half, size = 0, 0
        while size < images / 2 and half < len(live) - 1:
            size += len(live[half].seeds)
            half += 1
        self.caps.lower(max(size, images - size), shape)
        for part in (live[:half], live[half:]):
            for r in part:
                if r.stopped is not None:  # canceled (or failed to report) during the call
                    results[r.index] = r.stopped
            # Packed again: the first half may have lowered the cap for the second.
            for call in self._pack([r for r in part if r.stopped is None], self.caps.get(shape)):
                self._run_call(shape, call, results)


def _report(request: _Request, current: int, total: int) -> BaseException | None:
    """Check the job's cancel flag and report progress; the exception that stops it, if any."""
    try:
        request.ctx.check()
        if current > request.reported:
            request.ctx.progress(current, total)
            request.reported = current
    except Exception as exc:  # kept in this job's slot; the batch goes on
        return exc
    return None


def _output(request: _Request, shape: Shape, images: list[Any]) -> dict[str, Any]:
    out = []
    for k, (image, seed) in enumerate(zip(images, request.seeds, strict=True)):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        url = request.ctx.save_artifact(f"image-{k}.png", buf.getvalue(), "image/png")
        out.append({"url": url, "width": shape.width, "height": shape.height, "seed": seed})
    return {"images": out}
