"""A worker whose GPU fails (a sticky CUDA error) gives its jobs back and exits.

No GPU here, so the failure is the one part faked: a `sitecustomize` on the faulty
worker's PYTHONPATH makes its echo backend raise torch's AcceleratorError, with CUDA's
message, for a job whose value asks for it. Everything else is real: the API, the worker
processes, the sweeper, PostgreSQL and Redis."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from tests import support

FAULT = "GPU_FAULT"
SITE = f'''
import workers.backends.echo as echo

_one = echo.EchoBackend._one


def _faulty(self, job):
    if job.input.get("value") == "{FAULT}":
        import torch

        return torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    return _one(self, job)


echo.EchoBackend._one = _faulty
'''


def test_worker_with_a_failed_gpu_gives_its_jobs_back_and_exits(
    services: support.Services, tmp_path: Path
) -> None:
    from workers.device import EXIT_DEVICE_LOST

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITE)
    model = f"gpu{uuid.uuid4().hex[:6]}"
    models_file = tmp_path / "models.yaml"
    models_file.write_text(f"models:\n  {model}:\n    kind: echo\n    max_batch_size: 1\n")
    p = support.IsolatedPlatform(
        services, tmp_path / "var", {"SPOOL_MODELS_FILE": str(models_file)}
    )
    try:
        p.start_api()
        p.start_beat()
        faulty = p.start_worker(model, PYTHONPATH=os.pathsep.join([str(inject), str(support.ROOT)]))
        api = support.Api(p.url, p.user())
        doomed = api.submit({"value": FAULT}, model=model)["id"]
        support.wait_until(lambda: not faulty.alive(), 60, what="the faulty worker's exit")
        assert faulty.p.returncode == EXIT_DEVICE_LOST, faulty.tail()
        log = faulty.log.read_text(errors="replace")
        assert "the GPU failed for this process (CUDA error: an illegal memory access" in log
        assert "gave back 1 running job(s)" in log
        # The job was not failed: the sweeper queues it again, and a healthy worker runs it
        # (this one's echo has no fault: it echoes the value).
        assert api.get(f"/v1/jobs/{doomed}").json()["status"] in ("queued", "running")
        p.start_worker(model, queues="spool.cpu")  # and the sweeper's rounds
        done = api.wait(doomed, timeout=60)
        assert done["status"] == "succeeded", done
        assert done["output"] == {"value": FAULT} and done["attempts"] == 2
    finally:
        p.close()
