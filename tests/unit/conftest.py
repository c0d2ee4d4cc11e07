"""Fixtures for unit tests: tiny models built once per session, and backends on them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spool.registry import ModelSpec


@pytest.fixture(scope="session")
def torch_one_thread() -> Any:
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    # Two cores shared with other work: one thread is faster and steadier than two.
    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="session")
def tiny_models(torch_one_thread: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from spool.tiny_models import init_tiny

    return init_tiny(tmp_path_factory.mktemp("var"))


def sd_spec(source: Path | str, **overrides: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "name": "tiny-sd",
        "kind": "image.generate",
        "source": str(source),
        "device": "cpu",
        "max_batch_size": 8,
        "limits": {
            "min_width": 32,
            "min_height": 32,
            "max_width": 128,
            "max_height": 128,
            "max_steps": 50,
            "max_num_images": 4,
        },
        "options": {"defaults": {"width": 64, "height": 64, "steps": 4, "guidance_scale": 7.5}},
    }
    return ModelSpec(**{**fields, **overrides})


def llm_spec(source: Path | str, **overrides: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "name": "tiny-llm",
        "kind": "text.generate",
        "source": str(source),
        "device": "cpu",
        "max_batch_size": 16,
        "limits": {"max_tokens": 64, "max_prompt_chars": 2000},
        "options": {"defaults": {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0}},
    }
    return ModelSpec(**{**fields, **overrides})


@pytest.fixture(scope="session")
def sd_backend(tiny_models: dict[str, Path]) -> Iterator[Any]:
    from workers.backends.diffusion import DiffusionBackend

    backend = DiffusionBackend(sd_spec(tiny_models["tiny-sd"]))
    backend.setup()
    yield backend


@pytest.fixture(scope="session")
def llm_backend(tiny_models: dict[str, Path]) -> Iterator[Any]:
    from workers.backends.llm import LLMBackend

    backend = LLMBackend(llm_spec(tiny_models["tiny-llm"]))
    backend.setup()
    yield backend
