"""Inference backends behind one interface (a tiny registry, Redash style).

The echo backend is always there; the GPU ones are imported on first use, so a
worker serving only echo never pays for importing torch.
"""

from __future__ import annotations

import importlib

from workers.backends import echo  # noqa: F401  (importing it registers the backend)
from workers.backends.base import _REGISTRY, Backend, ModelLoadError, register

__all__ = ["Backend", "backend_class", "register"]

MODULES = {
    "image.generate": "workers.backends.diffusion",
    "text.generate": "workers.backends.llm",
}


def backend_class(kind: str) -> type[Backend]:
    if kind not in _REGISTRY and kind in MODULES:
        try:
            importlib.import_module(MODULES[kind])
        except ImportError as exc:
            raise ModelLoadError(
                f"{kind} jobs need the `gpu` extra (torch, diffusers, transformers): {exc}"
            ) from exc
    try:
        return _REGISTRY[kind]
    except KeyError as exc:
        raise ModelLoadError(f"no backend for job kind {kind!r}") from exc
