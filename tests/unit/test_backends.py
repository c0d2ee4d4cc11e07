"""The diffusion and LLM backends on the tiny models, driven directly with recorded contexts."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.unit.conftest import llm_spec, sd_spec
from tests.unit.recording import RecordingContext
from workers.backends.base import JobCanceled, JobContext, JobTimedOut, ModelLoadError


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _alone(backend: Any, job_input: dict[str, Any]) -> tuple[Any, RecordingContext]:
    ctx = RecordingContext(dict(job_input))
    return backend.predict([ctx])[0], ctx


def _out_of_memory(model: str) -> float:
    """spool_model_out_of_memory_total of `model`, in this process."""
    from prometheus_client import REGISTRY

    labels = {"model": model}
    return REGISTRY.get_sample_value("spool_model_out_of_memory_total", labels) or 0.0


def _assert_same_image(a: bytes, b: bytes) -> None:
    # Identical noise (one generator per image) gives the same image. Kernels for other
    # batch sizes may round differently in the last float bit: allow one level on a few pixels.
    x, y = _pixels(a), _pixels(b)
    assert x.shape == y.shape
    assert int(np.abs(x - y).max()) <= 1
    assert np.count_nonzero(x != y) <= x.size // 1000


# --- image.generate -----------------------------------------------------------------


def test_image_is_a_png_of_the_asked_size(sd_backend: Any) -> None:
    out, ctx = _alone(sd_backend, {"prompt": "a red fox", "width": 48, "height": 32, "seed": 7})
    assert out == {
        "images": [
            {"url": "https://files.test/job_test/image-0.png", "width": 48, "height": 32, "seed": 7}
        ]
    }
    data, content_type = ctx.artifacts["image-0.png"]
    assert content_type == "image/png"
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (48, 32)
    assert _pixels(data).std() > 1  # not a blank image


def test_image_same_seed_same_bytes_and_other_seed_differs(sd_backend: Any) -> None:
    job = {"prompt": "a lighthouse", "seed": 11}
    a = _alone(sd_backend, job)[1].artifacts["image-0.png"][0]
    b = _alone(sd_backend, job)[1].artifacts["image-0.png"][0]
    c = _alone(sd_backend, {**job, "seed": 12})[1].artifacts["image-0.png"][0]
    assert a == b
    assert np.abs(_pixels(a) - _pixels(c)).mean() > 5


def test_image_batched_equals_alone_per_seed(sd_backend: Any) -> None:
    jobs = [
        {"prompt": "a cat", "seed": 1},
        {"prompt": "a dog", "seed": 2, "num_images": 2, "negative_prompt": "blurry"},
        {"prompt": "a cat", "seed": 3},
    ]
    ctxs = [RecordingContext(dict(j), job_id=f"job_{i}") for i, j in enumerate(jobs)]
    outs = sd_backend.predict(ctxs)
    assert [img["seed"] for img in outs[1]["images"]] == [2, 3]
    for job, ctx, out in zip(jobs, ctxs, outs, strict=True):
        assert not isinstance(out, BaseException)
        _, alone = _alone(sd_backend, job)
        assert sorted(ctx.artifacts) == sorted(alone.artifacts)
        for name in alone.artifacts:
            _assert_same_image(ctx.artifacts[name][0], alone.artifacts[name][0])
    # Same seed (3), different prompt: a different image (each prompt reaches its own row).
    dog, cat = ctxs[1].artifacts["image-1.png"][0], ctxs[2].artifacts["image-0.png"][0]
    assert np.abs(_pixels(dog) - _pixels(cat)).mean() > 0


def test_image_progress_every_step_in_order(sd_backend: Any) -> None:
    _, ctx = _alone(sd_backend, {"prompt": "stars", "steps": 5, "seed": 1})
    assert ctx.progress_calls == [(i, 5) for i in range(1, 6)]


def test_image_cancel_one_job_keeps_the_others(sd_backend: Any) -> None:
    jobs = [{"prompt": f"tree {i}", "seed": i, "steps": 6} for i in range(3)]
    ctxs = [RecordingContext(dict(j), job_id=f"job_{i}") for i, j in enumerate(jobs)]
    ctxs[1].cancel_at_check = 3  # one check before the call, then one per step
    outs = sd_backend.predict(ctxs)
    assert isinstance(outs[1], JobCanceled)
    assert ctxs[1].progress_calls == [(1, 6)] and not ctxs[1].artifacts
    for i in (0, 2):
        assert ctxs[i].progress_calls[-1] == (6, 6)
        alone = _alone(sd_backend, jobs[i])[1]
        _assert_same_image(ctxs[i].artifacts["image-0.png"][0], alone.artifacts["image-0.png"][0])


def test_image_all_canceled_stops_the_call(sd_backend: Any) -> None:
    ctxs = [
        RecordingContext({"prompt": "x", "seed": 1, "steps": 40}, cancel_at_check=2),
        RecordingContext({"prompt": "y", "seed": 2, "steps": 40}, timeout_at_check=3),
    ]
    outs = sd_backend.predict(ctxs)
    assert isinstance(outs[0], JobCanceled) and isinstance(outs[1], JobTimedOut)
    # Stopped after the second step, not run to the 40th.
    assert max(len(c.progress_calls) for c in ctxs) <= 2 and ctxs[1].checks == 3


def test_image_bad_input_fails_only_that_job(sd_backend: Any) -> None:
    ctxs = [
        RecordingContext({"prompt": "ok", "seed": 1}),
        RecordingContext({"prompt": "bad", "width": 60}),
        RecordingContext({"prompt": "big", "width": 512}),
    ]
    outs = sd_backend.predict(ctxs)
    assert "images" in outs[0]
    assert isinstance(outs[1], ValueError) and "multiples of 8" in str(outs[1])
    assert isinstance(outs[2], ValueError) and "width" in str(outs[2])


def test_image_batch_key_follows_shape(sd_backend: Any) -> None:
    key = sd_backend.batch_key
    assert key({"prompt": "a", "seed": 1}) == key({"prompt": "b", "seed": 2, "num_images": 2})
    assert key({"prompt": "a"}) == key({"prompt": "a", "width": 64, "height": 64, "steps": 4})
    assert key({"prompt": "a"}) != key({"prompt": "a", "steps": 5})
    assert key({"prompt": "a"}) != key({"prompt": "a", "guidance_scale": 1.0})


def test_image_calls_are_capped_at_max_batch_size(tiny_models: dict[str, Path]) -> None:
    from workers.backends.diffusion import DiffusionBackend

    backend = DiffusionBackend(sd_spec(tiny_models["tiny-sd"], max_batch_size=2))
    backend.setup()
    calls: list[int] = []
    real = backend.pipe

    def counting(**kwargs: Any) -> Any:
        calls.append(len(kwargs["prompt"]))
        return real(**kwargs)

    backend.pipe = counting
    ctxs: list[JobContext] = [
        RecordingContext({"prompt": "p", "seed": i, "steps": 1}) for i in range(3)
    ]
    ctxs.append(RecordingContext({"prompt": "p", "seed": 9, "steps": 1, "num_images": 3}))
    outs = backend.predict(ctxs)
    assert all(isinstance(out, dict) and "images" in out for out in outs)
    assert calls == [2, 1, 3]  # a job is never split across calls


# --- text.generate ------------------------------------------------------------------

TEXT_JOBS: list[dict[str, Any]] = [
    {"prompt": "Hello", "max_tokens": 24, "temperature": 0},
    {"prompt": "The quick brown fox", "max_tokens": 24, "seed": 1, "temperature": 0.8},
    {"prompt": "Once upon a time", "max_tokens": 12, "seed": 2, "top_p": 0.5},
    {"messages": [{"role": "user", "content": "How are you?"}], "max_tokens": 24, "seed": 3},
    {
        "prompt": "Jobs are queued",
        "max_tokens": 30,
        "seed": 4,
        "temperature": 1.3,
        "min_tokens": 30,
    },
]


def test_text_batched_equals_alone(llm_backend: Any) -> None:
    ctxs = [RecordingContext(dict(j), job_id=f"job_{i}") for i, j in enumerate(TEXT_JOBS)]
    outs = llm_backend.predict(ctxs)
    for job, out in zip(TEXT_JOBS, outs, strict=True):
        assert out == _alone(llm_backend, job)[0]
    assert outs[4]["usage"]["completion_tokens"] == 30 and outs[4]["finish_reason"] == "length"
    assert len({o["text"] for o in outs}) == len(outs)


def test_text_decode_uses_the_cache_argument_the_model_names(llm_backend: Any) -> None:
    # transformers renamed forward's `past_key_values` to `cache`; the old name warns, then
    # goes (5.40): a decode step must pass the one this transformers' model takes.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out, _ = _alone(llm_backend, {"prompt": "Hi", "max_tokens": 4, "min_tokens": 4, "seed": 1})
    assert out["usage"]["completion_tokens"] == 4


def test_text_seed_decides_sampling_and_greedy_ignores_it(llm_backend: Any) -> None:
    base = {"prompt": "Hello", "max_tokens": 20, "min_tokens": 20}
    assert (
        _alone(llm_backend, {**base, "seed": 1})[0] == _alone(llm_backend, {**base, "seed": 1})[0]
    )
    assert (
        _alone(llm_backend, {**base, "seed": 1})[0] != _alone(llm_backend, {**base, "seed": 2})[0]
    )
    greedy = {**base, "temperature": 0}
    assert (
        _alone(llm_backend, {**greedy, "seed": 1})[0]
        == _alone(llm_backend, {**greedy, "seed": 2})[0]
    )


def test_text_streams_tokens_with_progress(llm_backend: Any) -> None:
    out, ctx = _alone(llm_backend, {"prompt": "Hi", "max_tokens": 16, "min_tokens": 16, "seed": 5})
    assert out["finish_reason"] == "length"
    prompt_tokens = len(llm_backend.tokenizer("Hi").input_ids)
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 16}
    assert "".join(ctx.tokens) == out["text"] and len(ctx.tokens) > 1
    assert ctx.progress_calls == [(i, 16) for i in range(1, 17)]


def test_text_stop_string_ends_and_is_not_streamed(llm_backend: Any) -> None:
    job = {"prompt": "Numbers", "max_tokens": 40, "min_tokens": 40, "seed": 8, "temperature": 0.7}
    full = _alone(llm_backend, job)[0]["text"]
    stop = full[10:16]  # spans several tokens: its start must be held back, never streamed
    assert len(stop) == 6 and full.index(stop) == 10
    out, ctx = _alone(llm_backend, {**job, "stop": [stop, "never-seen"]})
    assert out["finish_reason"] == "stop"
    assert out["text"] == full[:10]
    assert "".join(ctx.tokens) == out["text"]


def test_text_byte_zero_is_stored_as_replacement_char(llm_backend: Any) -> None:
    # Random weights emit byte 0 now and then; PostgreSQL's jsonb refuses U+0000, so such
    # an output could never be recorded and the job would be retried until worker_lost.
    import torch

    from workers.backends.llm import _Row

    tok = llm_backend.tokenizer
    nul, a = tok.convert_tokens_to_ids("\u0100"), tok.convert_tokens_to_ids("a")
    assert tok.decode([nul, a]) == "\x00a"  # byte-level BPE: byte 0 is the token "Ā"
    ctx = RecordingContext({})
    row = _Row(
        index=0, ctx=ctx, prompt_ids=[1], max_new=2, min_new=0, temperature=1.0, top_p=1.0,
        stop=[], generator=torch.Generator(),
    )  # fmt: skip
    assert not llm_backend._advance(row, nul) and llm_backend._advance(row, a)
    assert row.result["text"] == "".join(ctx.tokens) == "\ufffda"


def test_held_back_is_the_longest_pending_stop_prefix(torch_one_thread: Any) -> None:
    from workers.backends.llm import _held_back

    assert _held_back("hello wor", ["world"]) == 3
    assert _held_back("hello w", ["xyz", "wo"]) == 1
    assert _held_back("hello", ["world"]) == 0
    assert _held_back("abab", ["abac", "b"]) == 2
    assert _held_back("xaba", ["abac"]) == 3
    assert _held_back("", ["ab"]) == 0


def test_text_messages_use_the_chat_template(llm_backend: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = llm_backend.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    by_messages = _alone(llm_backend, {"messages": messages, "seed": 1, "max_tokens": 8})[0]
    by_prompt = _alone(llm_backend, {"prompt": prompt, "seed": 1, "max_tokens": 8})[0]
    # The plain prompt gets a second <s> from the tokenizer; the chat path must not.
    assert by_messages["usage"]["prompt_tokens"] == by_prompt["usage"]["prompt_tokens"] - 1
    assert by_messages["usage"]["prompt_tokens"] > 10


def test_text_cancel_one_row_keeps_the_others(llm_backend: Any) -> None:
    ctxs = [RecordingContext(dict(j), job_id=f"job_{i}") for i, j in enumerate(TEXT_JOBS)]
    ctxs[4].cancel_at_check = 6  # one check before the prompt, then one per token
    ctxs[1].timeout_at_check = 1
    outs = llm_backend.predict(ctxs)
    assert isinstance(outs[4], JobCanceled) and len(ctxs[4].progress_calls) == 4
    assert isinstance(outs[1], JobTimedOut) and not ctxs[1].tokens
    for i in (0, 2, 3):
        assert outs[i] == _alone(llm_backend, TEXT_JOBS[i])[0]


def test_text_failing_context_fails_only_its_job(llm_backend: Any) -> None:
    class Broken(RecordingContext):
        def token(self, text: str) -> None:
            raise ConnectionError("events are down")

    jobs = [{"prompt": "a", "seed": 1, "max_tokens": 8, "min_tokens": 8}] * 2
    ctxs = [Broken(dict(jobs[0])), RecordingContext(dict(jobs[1]))]
    outs = llm_backend.predict(ctxs)
    assert isinstance(outs[0], ConnectionError)
    assert outs[1] == _alone(llm_backend, jobs[1])[0]


def test_text_bad_inputs_fail_only_their_jobs(llm_backend: Any) -> None:
    bad: list[dict[str, Any]] = [
        {},
        {"prompt": ""},
        {"prompt": "x", "max_tokens": 65},
        {"prompt": "x" * 2001},
        {"messages": [{"role": "user"}]},
        {"prompt": "x", "stop": [""]},
        {"prompt": "x", "temperature": -1},
    ]
    ctxs = [RecordingContext(j) for j in bad] + [
        RecordingContext({"prompt": "fine", "max_tokens": 2})
    ]
    outs = llm_backend.predict(ctxs)
    assert all(isinstance(o, ValueError) for o in outs[:-1]), outs
    assert outs[-1]["usage"]["completion_tokens"] >= 1


# --- loading ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["image.generate", "text.generate"])
def test_missing_model_dir_is_a_load_error(
    torch_one_thread: Any, tmp_path: Path, kind: str
) -> None:
    from workers.backends.diffusion import DiffusionBackend
    from workers.backends.llm import LLMBackend

    missing = tmp_path / "nowhere"
    backend = (
        DiffusionBackend(sd_spec(missing))
        if kind == "image.generate"
        else LLMBackend(llm_spec(missing))
    )
    with pytest.raises(ModelLoadError, match=f"failed to load from {missing}"):
        backend.setup()


@pytest.mark.parametrize("kind", ["image.generate", "text.generate"])
def test_broken_model_dir_is_a_load_error(torch_one_thread: Any, tmp_path: Path, kind: str) -> None:
    from workers.backends.diffusion import DiffusionBackend
    from workers.backends.llm import LLMBackend

    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model_index.json").write_text("{not json")
    backend = (
        DiffusionBackend(sd_spec(tmp_path))
        if kind == "image.generate"
        else LLMBackend(llm_spec(tmp_path))
    )
    with pytest.raises(ModelLoadError, match=r"model tiny-(sd|llm) failed to load from"):
        backend.setup()


def test_models_load_at_the_same_time_in_one_process(tiny_models: dict[str, Path]) -> None:
    # A worker's warm-up thread and a job's first load of another model can overlap.
    import threading

    from workers.backends.diffusion import DiffusionBackend
    from workers.backends.llm import LLMBackend

    backends: list[Any] = [DiffusionBackend(sd_spec(tiny_models["tiny-sd"])) for _ in range(2)]
    backends.append(LLMBackend(llm_spec(tiny_models["tiny-llm"])))
    errors: list[BaseException] = []

    def load(backend: Any) -> None:
        try:
            backend.setup()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(b,)) for b in backends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    out, _ = _alone(backends[1], {"prompt": "a cat", "seed": 1, "steps": 1})
    assert "images" in out


def test_backends_are_registered_by_kind(torch_one_thread: Any) -> None:
    from workers.backends import backend_class
    from workers.backends.diffusion import DiffusionBackend
    from workers.backends.llm import LLMBackend

    assert backend_class("image.generate") is DiffusionBackend
    assert backend_class("text.generate") is LLMBackend


def test_device_and_dtype_follow_the_registry(torch_one_thread: Any, tmp_path: Path) -> None:
    from workers.backends import hf

    torch = torch_one_thread
    cpu = torch.device("cpu")
    assert hf.dtype_for(sd_spec(tmp_path, dtype="float16"), cpu) == torch.float32
    assert hf.dtype_for(sd_spec(tmp_path, dtype="bf16"), torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="dtype"):
        hf.dtype_for(sd_spec(tmp_path, dtype="int3"), cpu)
    assert hf.device_for(sd_spec(tmp_path, device="cpu")) == cpu
    if not torch.cuda.is_available():
        assert hf.device_for(sd_spec(tmp_path, device="auto")) == cpu
        with pytest.raises(ModelLoadError, match="CUDA"):
            hf.device_for(sd_spec(tmp_path, device="cuda"))


def test_a_gpu_number_the_process_does_not_see_is_a_clear_load_error(
    torch_one_thread: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from workers.backends import hf

    torch = torch_one_thread
    # A worker process of a 2-GPU host, given GPU 1 (no GPU here: torch is told so).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert hf.device_for(sd_spec(tmp_path, device="cuda")) == torch.device("cuda")
    assert hf.device_for(sd_spec(tmp_path, device="cuda:0")) == torch.device("cuda:0")
    with pytest.raises(ModelLoadError) as err:
        hf.device_for(sd_spec(tmp_path, device="cuda:1"))
    assert str(err.value) == (
        "model tiny-sd asks for device cuda:1 but this process sees 1 GPU(s) "
        "(CUDA_VISIBLE_DEVICES=1): use device auto or cuda, and pick GPUs with "
        "`spool worker --gpus`"
    )


def test_torch_threads_setting(torch_one_thread: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from spool import settings
    from workers.backends import hf

    torch = torch_one_thread
    monkeypatch.setenv("SPOOL_TORCH_THREADS", "1")
    monkeypatch.setattr(hf, "_prepared", False)
    settings.get.cache_clear()
    torch.set_num_threads(2)
    try:
        hf.prepare_process()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
        monkeypatch.undo()
        settings.get.cache_clear()


def test_text_a_short_job_is_handed_over_when_its_row_ends(llm_backend: Any) -> None:
    """A job's result leaves as soon as its row is done, not when the batch's longest is."""
    jobs = [
        {"prompt": "a long one", "seed": 1, "max_tokens": 40, "min_tokens": 40},
        {"prompt": "a short one", "seed": 2, "max_tokens": 2, "min_tokens": 2},
    ]
    ctxs = [RecordingContext(dict(j), job_id=f"job_{i}") for i, j in enumerate(jobs)]
    handed: list[tuple[int, int]] = []  # (job index, tokens the long job had made by then)
    llm_backend.predict_each(ctxs, lambda i, result: handed.append((i, len(ctxs[0].tokens))))
    assert [i for i, _ in handed] == [1, 0]
    assert handed[0][1] < 10  # the long job was still early on when the short one left
    assert llm_backend.predict(ctxs[1:])[0] == _alone(llm_backend, jobs[1])[0]


def test_text_jobs_join_a_running_decode_loop_and_get_what_they_would_alone(
    llm_backend: Any,
) -> None:
    """Jobs admitted between two steps: one whose prompt is longer than everything the
    running row has (its cache is padded to fit), a sampled and a greedy one, and a bad
    input. Each joined job ends on its own, with the text it makes alone; the running
    job's text is untouched by them."""
    first = {"prompt": "a", "seed": 1, "max_tokens": 40, "min_tokens": 40, "temperature": 1.1}
    joining = {
        3: {
            "prompt": "The queue holds jobs for the model, " * 3,
            "seed": 7,
            "max_tokens": 6,
            "min_tokens": 6,
            "temperature": 1.3,
        },
        8: {"prompt": "Hello there", "max_tokens": 5, "min_tokens": 5, "temperature": 0},
        9: {"prompt": ""},  # a bad input fails alone
    }
    ctxs = [RecordingContext(dict(first), job_id="job_0")]
    calls: list[int] = []

    def admit(running: int) -> list[tuple[int, JobContext]]:
        calls.append(running)
        job = joining.get(len(calls))
        if job is None:
            return []
        ctxs.append(RecordingContext(dict(job), job_id=f"job_{len(ctxs)}"))
        return [(len(ctxs) - 1, ctxs[-1])]

    handed: dict[int, Any] = {}
    llm_backend.predict_each(ctxs[:1], lambda i, result: handed.setdefault(i, result), admit)
    assert list(handed)[-1] == 0  # the joined jobs ended first, each on its own
    assert calls[:3] == [1, 1, 1] and 2 in calls  # one row ran, then two
    assert isinstance(handed[3], ValueError)
    assert handed[0] == _alone(llm_backend, first)[0]
    for i, job in ((1, joining[3]), (2, joining[8])):
        assert handed[i] == _alone(llm_backend, job)[0]
        assert "".join(ctxs[i].tokens) == handed[i]["text"]


class _DeviceOf:
    """The tiny pipeline on a device that holds at most `fits` images per call: a call
    over that raises what torch raises on a full GPU (no GPU here to fill)."""

    def __init__(self, pipe: Any, fits: int) -> None:
        self.pipe, self.fits = pipe, fits
        self.calls: list[tuple[int, bool]] = []  # (images, ran)

    def __call__(self, **kwargs: Any) -> Any:
        import torch

        n = len(kwargs["prompt"])
        self.calls.append((n, n <= self.fits))
        if n > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        return self.pipe(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)


def test_image_batch_out_of_memory_runs_again_in_halves_and_remembers(
    tiny_models: dict[str, Path],
) -> None:
    from workers.backends.diffusion import DiffusionBackend

    backend = DiffusionBackend(sd_spec(tiny_models["tiny-sd"], name="tiny-sd-oom"))
    backend.setup()
    real = backend.pipe
    device = backend.pipe = _DeviceOf(real, fits=2)
    before = _out_of_memory("tiny-sd-oom")
    jobs = [{"prompt": f"a cat {i}", "seed": i, "steps": 3} for i in range(4)]
    jobs.append({"prompt": "two dogs", "seed": 9, "steps": 3, "num_images": 2})
    ctxs = [RecordingContext(dict(j), job_id=f"job_{i}") for i, j in enumerate(jobs)]
    outs = backend.predict(ctxs)
    assert all(not isinstance(o, BaseException) for o in outs), outs
    # 6 images refused; its halves (3 + 3) refused; then calls of at most 2, no job split.
    assert device.calls[:3] == [(6, False), (3, False), (2, True)]
    assert _out_of_memory("tiny-sd-oom") - before == 2
    assert all(ran for _, ran in device.calls[3:]) and max(n for n, _ in device.calls[3:]) <= 2
    for job, ctx in zip(jobs, ctxs, strict=True):
        # Progress restarts with the call run again, but a job's reports never go back.
        steps = [c for c, _ in ctx.progress_calls]
        assert steps == sorted(set(steps)) and steps[-1] == 3
        backend.pipe = real
        _, alone = _alone(backend, job)
        backend.pipe = device
        for name in alone.artifacts:
            _assert_same_image(ctx.artifacts[name][0], alone.artifacts[name][0])
    # Remembered for the shape: the next batch goes out in calls that fit, none refused.
    device.calls.clear()
    backend.predict([RecordingContext(dict(j)) for j in jobs[:4]])
    assert device.calls == [(2, True), (2, True)]


def test_image_memory_settings_slice_and_tile_and_change_no_image(
    tiny_models: dict[str, Path],
) -> None:
    from workers.backends.diffusion import DiffusionBackend

    plain = DiffusionBackend(sd_spec(tiny_models["tiny-sd"]))
    plain.setup()
    spec = sd_spec(tiny_models["tiny-sd"])
    saving = {"attention_slicing": True, "vae_slicing": True, "vae_tiling": True}
    lean = DiffusionBackend(replace(spec, options={**spec.options, **saving}))
    lean.setup()
    assert lean.pipe.vae.use_slicing and lean.pipe.vae.use_tiling
    assert not plain.pipe.vae.use_slicing and not plain.pipe.vae.use_tiling
    processors = {type(p).__name__ for p in lean.pipe.unet.attn_processors.values()}
    assert processors == {"SlicedAttnProcessor"}
    jobs = [{"prompt": f"a cat {i}", "seed": i, "steps": 3} for i in range(2)]
    ctxs = [RecordingContext(dict(j)) for j in jobs]
    assert all(not isinstance(o, BaseException) for o in lean.predict(ctxs))
    for job, ctx in zip(jobs, ctxs, strict=True):
        _, alone = _alone(plain, job)
        for name, (data, _) in alone.artifacts.items():
            _assert_same_image(ctx.artifacts[name][0], data)


def test_image_job_that_does_not_fit_alone_fails_with_out_of_memory(
    tiny_models: dict[str, Path],
) -> None:
    from workers.backends.diffusion import DiffusionBackend

    backend = DiffusionBackend(sd_spec(tiny_models["tiny-sd"]))
    backend.setup()
    backend.pipe = _DeviceOf(backend.pipe, fits=1)
    jobs = [
        {"prompt": "a cat", "seed": 1, "steps": 2},
        {"prompt": "dogs", "seed": 2, "steps": 2, "num_images": 2, "width": 48},
    ]
    small, big = backend.predict([RecordingContext(dict(j)) for j in jobs])
    assert not isinstance(small, BaseException)
    assert isinstance(big, Exception) and getattr(big, "code", None) == "out_of_memory"
    assert str(big) == (
        "model tiny-sd ran out of device memory on 2 image(s) of 48x64, 2 steps: "
        "CUDA out of memory. Tried to allocate 2.00 GiB"
    )


class _ModelOnDeviceOf:
    """The tiny LM on a device that holds at most `cells` tokens of a batch's context
    (rows x attention width) per forward pass: a batch fits at first and runs out of
    memory as its texts grow, as a KV cache does on a full GPU."""

    def __init__(self, model: Any, cells: int) -> None:
        self.model, self.cells = model, cells
        self.passes: list[tuple[int, bool]] = []  # (rows, ran)

    def __call__(self, **kwargs: Any) -> Any:
        import torch

        rows, width = kwargs["attention_mask"].shape
        self.passes.append((rows, rows * width <= self.cells))
        if rows * width > self.cells:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB\nmore")
        return self.model(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def test_text_batch_out_of_memory_goes_on_in_halves_without_losing_a_token(
    tiny_models: dict[str, Path],
) -> None:
    from workers.backends.llm import LLMBackend

    backend = LLMBackend(llm_spec(tiny_models["tiny-llm"], name="tiny-llm-oom"))
    backend.setup()
    real = backend.model
    jobs = [
        {"prompt": "Hi", "max_tokens": 12, "min_tokens": 12, "seed": i, "temperature": 1.0}
        for i in range(4)
    ]
    jobs[3]["temperature"] = 0  # greedy rows go on as well as sampled ones
    expected = [_alone(backend, job)[0] for job in jobs]
    prompt_len = expected[0]["usage"]["prompt_tokens"]
    # Two rows fit to the end (the last pass attends over the prompt and 11 tokens);
    # four rows fit the prompts and a few tokens, then run out.
    device = backend.model = _ModelOnDeviceOf(real, cells=2 * (prompt_len + 11))
    assert 4 * (prompt_len + 2) <= device.cells < 4 * (prompt_len + 11)
    before = _out_of_memory("tiny-llm-oom")
    ctxs = [RecordingContext(dict(j), job_id=f"job_{i}") for i, j in enumerate(jobs)]
    outs = backend.predict(ctxs)
    assert _out_of_memory("tiny-llm-oom") - before == 1
    assert (4, False) in device.passes and device.passes[0] == (4, True)  # ran out midway
    assert outs == expected  # the texts they would have had, token counts included
    for out, ctx in zip(outs, ctxs, strict=True):
        assert isinstance(out, dict) and "".join(ctx.tokens) == out["text"]  # none twice
        steps = [c for c, _ in ctx.progress_calls]
        assert steps == list(range(1, 13))  # progress never goes back
    # Later batches are capped at the half that fit, for a while.
    assert backend.batch_limit == 2
    device.passes.clear()
    assert backend.predict([RecordingContext(dict(j)) for j in jobs[:2]]) == expected[:2]
    assert all(ran for _, ran in device.passes)


def test_text_jobs_through_the_micro_batcher_survive_running_out_of_memory(
    tiny_models: dict[str, Path],
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from workers.backends.llm import LLMBackend
    from workers.batching import MicroBatcher

    backend = LLMBackend(llm_spec(tiny_models["tiny-llm"], name="tiny-llm-oom-batcher"))
    backend.setup()
    jobs = [
        {"prompt": "Hi", "max_tokens": 10, "min_tokens": 10, "seed": i, "temperature": 0.8}
        for i in range(6)
    ]
    expected = [_alone(backend, job)[0] for job in jobs]
    prompt_len = expected[0]["usage"]["prompt_tokens"]
    batcher = MicroBatcher(backend, max_batch_size=16, wait_ms=100)
    batcher.setup()  # loads the model again: the small device goes on after
    device = backend.model = _ModelOnDeviceOf(backend.model, cells=2 * (prompt_len + 9))
    ctxs = [RecordingContext(dict(j), job_id=f"job_{i}") for i, j in enumerate(jobs)]
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            outs = list(pool.map(batcher.run, ctxs))
    finally:
        batcher.close()
    assert outs == expected  # every job, batched, split and joined as it came
    assert all("".join(c.tokens) == o["text"] for c, o in zip(ctxs, outs, strict=True))
    assert max(batcher.batch_sizes) > 2 and (max(batcher.batch_sizes), False) in device.passes
    assert backend.batch_limit is not None and backend.batch_limit <= 3


def test_text_row_that_does_not_fit_alone_fails_with_out_of_memory(
    tiny_models: dict[str, Path],
) -> None:
    from workers.backends.llm import LLMBackend

    backend = LLMBackend(llm_spec(tiny_models["tiny-llm"]))
    backend.setup()
    short = {"prompt": "Hi", "max_tokens": 2, "min_tokens": 2, "seed": 1}
    prompt_len = _alone(backend, short)[0]["usage"]["prompt_tokens"]
    backend.model = _ModelOnDeviceOf(backend.model, cells=prompt_len + 3)
    long = {**short, "max_tokens": 8, "min_tokens": 8}
    handed: dict[int, Any] = {}
    ctxs = [RecordingContext(dict(j)) for j in (short, long)]
    backend.predict_each(ctxs, lambda i, result: handed.setdefault(i, result))
    assert handed[0]["usage"]["completion_tokens"] == 2  # fits alone: it ran to its end
    assert isinstance(handed[1], Exception) and getattr(handed[1], "code", None) == "out_of_memory"
    assert str(handed[1]) == (
        f"model tiny-llm ran out of device memory decoding one row of {prompt_len + 4} "
        "tokens: CUDA out of memory. Tried to allocate 1.00 GiB"
    )
    assert len(ctxs[1].tokens) > 0  # what it streamed before stays its own
    # The micro-batcher forms batches under the learned cap.
    from concurrent.futures import ThreadPoolExecutor

    from workers.batching import MicroBatcher

    assert backend.batch_limit == 1
    batcher = MicroBatcher(backend, max_batch_size=16, wait_ms=50)
    try:
        with ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(batcher.run, [RecordingContext(dict(short)) for _ in range(3)]))
    finally:
        batcher.close()
    assert [o["usage"]["completion_tokens"] for o in outs] == [2, 2, 2]
    assert max(batcher.batch_sizes) == 1
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("spool_model_batch_limit", {"model": "tiny-llm"}) == 1


def test_learned_caps_only_go_down_and_are_forgotten_after_their_ttl() -> None:
    from workers.backends.base import LearnedCaps

    now = [0.0]
    caps = LearnedCaps(ttl_s=60.0, clock=lambda: now[0])
    assert caps.get() is None
    assert caps.lower(4) and caps.get() == 4
    assert not caps.lower(6) and caps.get() == 4  # never raised while in force
    assert caps.lower(2, key="512x512") and caps.get("512x512") == 2 and caps.get() == 4
    assert caps.lowest() == 2
    now[0] = 59.0
    assert caps.get() == 4
    now[0] = 60.0
    assert caps.get() is None and caps.get("512x512") is None  # memory may be back: try
    assert caps.lowest() is None
    assert caps.lower(8) and caps.get() == 8


def test_text_batch_out_of_memory_while_sampling_moves_no_generator(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running out of memory in the sampler (after the forward pass) must not leave a
    row's generator moved: the rows going on in halves draw what they would alone."""
    import torch

    from workers.backends.llm import LLMBackend

    backend = LLMBackend(llm_spec(tiny_models["tiny-llm"]))
    backend.setup()
    jobs = [
        {"prompt": "Hi", "max_tokens": 6, "min_tokens": 6, "seed": 11, "temperature": 1.0},
        {"prompt": "Hi", "max_tokens": 6, "min_tokens": 6, "seed": 12, "top_p": 0.9},
    ]
    expected = [_alone(backend, job)[0] for job in jobs]
    vocab = len(backend.tokenizer)
    real_cumsum = torch.Tensor.cumsum
    seen = [0]

    def cumsum(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.dtype.is_floating_point and self.dim() == 2 and self.shape[-1] >= vocab:
            seen[0] += 1
            if seen[0] == 5:  # a cumulative sum of the sampler, at the second token
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 MiB")
        return real_cumsum(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cumsum", cumsum)
    outs = backend.predict([RecordingContext(dict(j)) for j in jobs])
    assert seen[0] > 5  # it ran out, and went on
    assert outs == expected


def test_warm_up_call_runs_on_each_backend(sd_backend: Any, llm_backend: Any) -> None:
    from spool.registry import ModelSpec
    from workers.check import QuietContext, warm_input

    image_ctx = QuietContext(warm_input(sd_backend.spec))
    [image] = sd_backend.predict([image_ctx])
    assert image["images"][0]["width"] == sd_backend.spec.defaults["width"]  # the usual shape
    assert list(image_ctx.artifacts) == ["image-0.png"]
    [text] = llm_backend.predict([QuietContext(warm_input(llm_backend.spec))])
    assert text["usage"]["completion_tokens"] == 2  # the prefill and one decode step
    short = replace(llm_backend.spec, limits={"max_tokens": 1})
    assert warm_input(short)["max_tokens"] == 1
    assert warm_input(ModelSpec(name="echo", kind="echo")) is None


@pytest.mark.parametrize(
    "settings",
    [
        [(1.0, 1.0)] * 5,  # the defaults: every row samples the whole distribution
        [(0.7, 0.9), (1.3, 0.5), (1.0, 0.8)],  # every row top-p
        [(0.0, 1.0), (1.0, 1.0), (0.8, 0.6), (0.0, 0.5), (1.2, 1.0)],  # greedy, whole, top-p
    ],
    ids=["all-whole", "all-top-p", "mixed"],
)
def test_sampler_gives_each_row_what_it_gets_alone(
    llm_backend: Any, settings: list[tuple[float, float]]
) -> None:
    import torch

    from workers.backends.llm import _Row

    def rows(pick: list[int]) -> list[_Row]:
        return [
            _Row(
                index=i,
                ctx=RecordingContext({}),
                prompt_ids=[1],
                max_new=8,
                min_new=3 if i % 2 else 0,  # some rows may not end yet
                temperature=settings[i][0],
                top_p=settings[i][1],
                stop=[],
                generator=torch.Generator("cpu").manual_seed(100 + i),
                ids=[7],
            )
            for i in pick
        ]

    vocab = len(llm_backend.tokenizer)
    for trial in range(20):
        logits = torch.randn(len(settings), vocab, generator=torch.Generator().manual_seed(trial))
        everyone = list(range(len(settings)))
        batch = rows(everyone)
        together = [llm_backend._sample(logits.clone(), batch) for _ in range(3)]
        alone_rows = [rows([i])[0] for i in everyone]
        alone = [
            [llm_backend._sample(logits[i : i + 1].clone(), [row])[0] for _ in range(3)]
            for i, row in zip(everyone, alone_rows, strict=True)
        ]
        assert [list(step) for step in zip(*alone, strict=True)] == together
