"""Which errors mean the GPU is gone for the process (workers/device.py)."""

from __future__ import annotations

import pytest

from workers import device


def test_cuda_errors_are_device_loss_and_out_of_memory_is_not() -> None:
    torch = pytest.importorskip("torch")
    illegal = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    assert device.lost(illegal)
    # torch before 2.8 raised them as RuntimeErrors with CUDA's message.
    assert device.lost(RuntimeError("CUDA error: device-side assert triggered"))
    assert not device.lost(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 MiB"))
    # A library's own allocation failing (e.g. cuBLAS's workspace) leaves the context usable.
    assert not device.lost(torch.AcceleratorError("CUDA error: out of memory"))
    assert not device.lost(RuntimeError("shape mismatch"))
    assert not device.lost(ValueError("CUDA error: only in words"))
    assert not device.lost(None)


def test_a_device_loss_is_found_behind_what_wraps_it() -> None:
    torch = pytest.importorskip("torch")
    from workers.backends.base import ModelLoadError

    try:
        try:
            raise torch.AcceleratorError("CUDA error: unspecified launch failure")
        except Exception as exc:
            raise ModelLoadError("model sd15 failed to load") from exc
    except ModelLoadError as wrapped:
        assert device.lost(wrapped)
    looped = RuntimeError("outer")
    looped.__context__ = looped  # a cycle ends the walk
    assert not device.lost(looped)
