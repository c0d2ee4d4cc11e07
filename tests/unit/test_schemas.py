"""Request validation: per-kind inputs and the model registry's limits (no server needed)."""

from __future__ import annotations

import pytest
from marshmallow import ValidationError

from api.schemas import JobCreateSchema, load_input
from spool.registry import ModelSpec

IMAGE = ModelSpec(
    "img",
    "image.generate",
    limits={"max_width": 256, "max_height": 256, "max_steps": 50, "max_num_images": 4},
)
TEXT = ModelSpec("txt", "text.generate", limits={"max_tokens": 128, "max_prompt_chars": 100})


def errors_of(spec: ModelSpec, raw: dict) -> dict:
    with pytest.raises(ValidationError) as exc:
        load_input(spec, raw)
    return exc.value.messages["input"]


def test_image_input_limits_name_the_field() -> None:
    ok = load_input(IMAGE, {"prompt": "a fox", "width": 64, "height": 128, "steps": 4})
    assert ok["width"] == 64
    assert "width" in errors_of(IMAGE, {"prompt": "x", "width": 512})
    assert "width" in errors_of(IMAGE, {"prompt": "x", "width": 65})  # not a multiple of 8
    assert "steps" in errors_of(IMAGE, {"prompt": "x", "steps": 51})
    assert "steps" in errors_of(IMAGE, {"prompt": "x", "steps": 151})
    assert "num_images" in errors_of(IMAGE, {"prompt": "x", "num_images": 5})
    assert "prompt" in errors_of(IMAGE, {"prompt": ""})
    assert "prompt" in errors_of(IMAGE, {})
    assert "bogus" in errors_of(IMAGE, {"prompt": "x", "bogus": 1})


def test_limits_an_entry_leaves_out_are_its_kinds_as_the_backends_apply_them() -> None:
    bare_image, bare_text = ModelSpec("img0", "image.generate"), ModelSpec("t0", "text.generate")
    assert errors_of(bare_image, {"prompt": "x", "width": 2048})["width"] == [
        "must be at most 1024 for this model"
    ]
    assert "height" in errors_of(bare_image, {"prompt": "x", "height": 32})  # under 64
    assert load_input(bare_image, {"prompt": "x", "width": 1024, "steps": 150})["steps"] == 150
    assert "max_tokens" in errors_of(bare_text, {"prompt": "x", "max_tokens": 4097})
    # The entry's own limits win over the kind's, both ways.
    strict = ModelSpec("img1", "image.generate", limits={"max_guidance_scale": 20, "min_width": 32})
    assert "guidance_scale" in errors_of(strict, {"prompt": "x", "guidance_scale": 25})
    assert load_input(strict, {"prompt": "x", "width": 32})["width"] == 32
    assert strict.limit("max_width") == 1024 and strict.limit("min_width") == 32


def test_text_input_prompt_or_messages() -> None:
    assert load_input(TEXT, {"prompt": "hi", "max_tokens": 10, "stop": "\n"})["stop"] == ["\n"]
    msgs = [{"role": "user", "content": "hi"}]
    assert load_input(TEXT, {"messages": msgs})["messages"] == msgs
    assert "prompt" in errors_of(TEXT, {"prompt": "hi", "messages": msgs})
    assert "prompt" in errors_of(TEXT, {})
    assert "max_tokens" in errors_of(TEXT, {"prompt": "hi", "max_tokens": 129})
    assert "prompt" in errors_of(TEXT, {"prompt": "x" * 101})
    assert "messages" in errors_of(TEXT, {"messages": [{"role": "wizard", "content": "x"}]})
    assert "temperature" in errors_of(TEXT, {"prompt": "x", "temperature": 3})
    assert "top_p" in errors_of(TEXT, {"prompt": "x", "top_p": 0})
    assert "stop" in errors_of(TEXT, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]})


def test_job_request_checks_model_and_kind() -> None:
    schema = JobCreateSchema()
    job = schema.load({"kind": "echo", "model": "echo", "input": {"value": [1]}})
    assert job["input"] == {"value": [1]}
    with pytest.raises(ValidationError) as exc:
        schema.load({"kind": "echo", "model": "no-such-model", "input": {}})
    assert "model" in exc.value.messages
    with pytest.raises(ValidationError) as exc:
        schema.load({"kind": "text.generate", "model": "echo", "input": {"prompt": "x"}})
    assert "kind" in exc.value.messages
    with pytest.raises(ValidationError) as exc:
        schema.load({"kind": "echo", "model": "echo", "input": {}, "metadata": {"x": "y" * 20000}})
    assert "metadata" in exc.value.messages
    with pytest.raises(ValidationError) as exc:
        schema.load({"kind": "echo", "model": "echo", "input": {"sleep_s": 61}})
    assert "sleep_s" in exc.value.messages["input"]
