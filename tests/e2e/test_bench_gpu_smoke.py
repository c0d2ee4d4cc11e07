"""The GPU benchmark's code path (scripts/gpu-bench.sh), run as a smoke on the CPU: the
real-size workload's models under their names, built tiny, through a real platform and
the direct calls. A GPU session has minutes on the device: the script must just work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import support

pytestmark = pytest.mark.slow


def test_real_workload_smoke_runs_every_path(tmp_path: Path) -> None:
    out = tmp_path / "gpu-bench.json"
    env = {**os.environ, "SPOOL_VAR_DIR": str(tmp_path / "var"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_inference_platform", "--workload", "real"]
        + ["--smoke", "--clients", "4", "--unbatched-clients", "2", "--json", str(out)],
        cwd=support.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["workload"]["llm"] == "llama-1b-random"
    rows = report["rows"]
    for model in ("sd15-random", "llama-1b-random"):
        platform = [r for r in rows if r["path"] == "platform" and r["model"].startswith(model)]
        assert {r["model"] for r in platform} == {model, f"{model}-b1"}
        assert all(r["done"] > 0 and r["errors"] == 0 for r in platform), platform
        direct = {
            (r["path"], r["batch"]) for r in rows if r["model"] == model and r["path"] != "platform"
        }
        assert ("direct backend", 1) in direct and ("direct pipeline", 1) in direct
    # The models were built where SPOOL_VAR_DIR says, apart from the real ones.
    assert (tmp_path / "var" / "models-smoke" / "sd15-random" / "model_index.json").is_file()
    assert "Targets (a smoke run" in done.stdout
    # The micro-batching-off runs take their own client count; every window says so.
    assert (report["clients"], report["unbatched_clients"]) == (4, 2)
    for model in ("sd15-random", "llama-1b-random"):
        assert f"window {model}-b1: 2 clients" in done.stdout
        assert f"window {model}: 4 clients" in done.stdout
