"""Inference backends behind one interface; importing this registers the built-in ones."""

from __future__ import annotations

from workers.backends import echo  # noqa: F401  (registers itself)
from workers.backends.base import Backend, backend_class, register

__all__ = ["Backend", "backend_class", "load_optional_backends", "register"]


OPTIONAL_LIBS = {"torch", "diffusers", "transformers", "accelerate", "PIL"}


def load_optional_backends() -> None:
    """Import the GPU backends when their libraries are installed (extra `gpu`)."""
    import importlib

    for name in ("workers.backends.diffusion", "workers.backends.llm"):
        try:
            importlib.import_module(name)
        except ImportError as exc:  # torch/diffusers missing: those kinds stay unavailable
            if exc.name == name or (exc.name or "").split(".")[0] in OPTIONAL_LIBS:
                continue
            raise
