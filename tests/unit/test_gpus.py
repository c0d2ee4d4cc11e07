"""Which GPUs `spool worker` runs a process on each."""

from __future__ import annotations

import pytest

from spool import gpus


def test_auto_takes_the_gpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus, "device_count", lambda: 3)  # no GPU here to count
    assert gpus.resolve("auto", {}) == ["0", "1", "2"]
    # Narrowed already (a scheduler's assignment): those, by the host's names for them.
    assert gpus.resolve("auto", {"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert gpus.resolve("AUTO", {"CUDA_VISIBLE_DEVICES": "GPU-1f2e"}) == ["GPU-1f2e"]
    assert gpus.resolve("auto", {"CUDA_VISIBLE_DEVICES": ""}) == []  # hidden: CPU


def test_auto_without_cuda_is_one_process() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert gpus.device_count() == 0
    assert gpus.resolve("auto", {}) == []


def test_lists_and_none() -> None:
    assert gpus.resolve("none") == [] and gpus.resolve("") == []
    assert gpus.resolve("0, 1,3") == ["0", "1", "3"]
    assert gpus.resolve("GPU-aa,MIG-bb") == ["GPU-aa", "MIG-bb"]


@pytest.mark.parametrize("bad", ["0,0", "cuda:0", "one", ",", "-1"])
def test_a_bad_list_is_refused_with_what_is_allowed(bad: str) -> None:
    with pytest.raises(gpus.GpuSpecError, match="auto, none or distinct GPU indices"):
        gpus.resolve(bad)


def test_a_process_that_keeps_dying_at_once_is_started_ever_more_slowly() -> None:
    assert [gpus.restart_delay(n) for n in range(8)] == [2, 2, 4, 8, 16, 32, 60, 60]
