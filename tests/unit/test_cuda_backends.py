"""The backends on CUDA: the registry's half dtypes, seeds, batching and streaming on a GPU.

Marked `gpu` and skipped where torch sees no CUDA device (CI, the 2-core machines). Run on a
lent GPU with `python -m pytest -m gpu tests/unit/test_cuda_backends.py` (scripts/gpu-bench.sh
runs them after the benchmark). The same tiny models as the CPU tests, loaded from disk with
`from_pretrained`; only the device and dtype differ.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.unit.conftest import llm_spec, sd_spec
from tests.unit.recording import RecordingContext

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda(torch_one_thread: Any) -> Any:
    torch = torch_one_thread
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch


@pytest.fixture(scope="module")
def sd_cuda(cuda: Any, tiny_models: dict[str, Path]) -> Iterator[Any]:
    from workers.backends.diffusion import DiffusionBackend

    backend = DiffusionBackend(sd_spec(tiny_models["tiny-sd"], device="auto", dtype="float16"))
    backend.setup()
    yield backend


@pytest.fixture(scope="module")
def llm_cuda(cuda: Any, tiny_models: dict[str, Path]) -> Iterator[Any]:
    from workers.backends.llm import LLMBackend

    backend = LLMBackend(llm_spec(tiny_models["tiny-llm"], device="auto", dtype="bfloat16"))
    backend.setup()
    yield backend


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _run(backend: Any, *inputs: dict[str, Any]) -> tuple[list[Any], list[RecordingContext]]:
    ctxs = [RecordingContext(dict(i), job_id=f"job_{n}") for n, i in enumerate(inputs)]
    return backend.predict(ctxs), ctxs


def test_device_auto_takes_the_gpu_with_the_registry_dtype(
    cuda: Any, sd_cuda: Any, llm_cuda: Any
) -> None:
    assert sd_cuda.device.type == "cuda" and llm_cuda.device.type == "cuda"
    unet = next(sd_cuda.pipe.unet.parameters())
    assert unet.device.type == "cuda" and unet.dtype == cuda.float16
    weight = next(llm_cuda.model.parameters())
    assert weight.device.type == "cuda" and weight.dtype == cuda.bfloat16


def test_image_on_gpu_is_a_png_and_a_seed_repeats_exactly(sd_cuda: Any) -> None:
    job = {"prompt": "a red fox", "width": 64, "height": 48, "seed": 5}
    outs, ctxs = _run(sd_cuda, job)
    assert not isinstance(outs[0], BaseException), outs[0]
    data = ctxs[0].artifacts["image-0.png"][0]
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (64, 48)
    assert _pixels(data).std() > 1  # not blank, and no NaN turned black by float16
    assert ctxs[0].progress_calls == [(i, 4) for i in range(1, 5)]
    again = _run(sd_cuda, job)[1][0].artifacts["image-0.png"][0]
    assert again == data


def test_image_batched_on_gpu_matches_each_alone(sd_cuda: Any) -> None:
    # The noise is drawn per image from its own generator (on the CPU), so a batch changes
    # only the kernels' rounding: at most a level or two on a few pixels in float16.
    jobs = [{"prompt": f"a house {i}", "seed": 20 + i} for i in range(4)]
    _, batched = _run(sd_cuda, *jobs)
    worst, differing = 0, 0
    for job, ctx in zip(jobs, batched, strict=True):
        alone = _run(sd_cuda, job)[1][0]
        a = _pixels(ctx.artifacts["image-0.png"][0])
        b = _pixels(alone.artifacts["image-0.png"][0])
        worst = max(worst, int(np.abs(a - b).max()))
        differing += int(np.count_nonzero(a != b))
    print(f"batched vs alone on CUDA: max pixel diff {worst}, {differing} values differ")
    assert worst <= 2
    assert differing <= 4 * 64 * 64 * 3 // 100


def test_text_on_gpu_streams_what_it_returns(llm_cuda: Any) -> None:
    outs, ctxs = _run(llm_cuda, {"prompt": "Hello", "max_tokens": 12, "min_tokens": 12, "seed": 3})
    out = outs[0]
    assert not isinstance(out, BaseException), out
    assert out["usage"]["completion_tokens"] == 12
    assert "".join(ctxs[0].tokens) == out["text"]
    assert ctxs[0].progress_calls[-1] == (12, 12)


def test_text_seeded_sampling_repeats_on_gpu(llm_cuda: Any) -> None:
    job = {"prompt": "Once", "max_tokens": 16, "min_tokens": 16, "seed": 9, "temperature": 1.0}
    first = _run(llm_cuda, job)[0][0]
    second = _run(llm_cuda, job)[0][0]
    other = _run(llm_cuda, {**job, "seed": 10})[0][0]
    assert first["text"] == second["text"]
    assert first["text"] != other["text"]


def test_text_batched_on_gpu_gives_each_job_its_text_alone(llm_cuda: Any) -> None:
    jobs = [
        {"prompt": "p" * (3 + i), "max_tokens": 16, "min_tokens": 16, "seed": i} for i in range(4)
    ]
    outs, _ = _run(llm_cuda, *jobs)
    same = sum(
        out["text"] == _run(llm_cuda, job)[0][0]["text"]
        for job, out in zip(jobs, outs, strict=True)
    )
    print(f"batched vs alone on CUDA (bfloat16): {same}/{len(jobs)} texts identical")
    assert same == len(jobs)
