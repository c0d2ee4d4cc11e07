"""`spool worker` on a host with several GPUs: a worker process per GPU.

No GPU here: `--gpus 0,1` names two, and each process gets its own
CUDA_VISIBLE_DEVICES as it would on a GPU host (echo jobs need no device)."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import psutil
import requests
from sqlalchemy import text

from tests import support


def _children(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children() if c.status() != psutil.STATUS_ZOMBIE]


def _finished(metrics_text: str, model: str) -> float:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("spool_jobs_finished_total{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_worker_runs_a_process_per_gpu_and_starts_a_dead_one_again(
    database_url: str, services: support.Services, tmp_path: Path
) -> None:
    from spool import db

    model = f"gpu{uuid.uuid4().hex[:6]}"  # only these workers serve it
    models_file = tmp_path / "models.yaml"
    models_file.write_text(f"models:\n  {model}:\n    kind: echo\n    max_batch_size: 1\n")
    port = support.free_port()
    p = support.Platform(
        database_url, services.redis_url, tmp_path / "var", {"SPOOL_MODELS_FILE": str(models_file)}
    )
    try:
        p.start_api()
        sup = p._start(
            "workers", ["worker", "--gpus", "0,1", "--models", model], SPOOL_METRICS_PORT=str(port)
        )
        support.wait_until(lambda: len(_children(sup.pid)) == 2, 60, what="two worker processes")
        first = _children(sup.pid)
        assert sorted(c.environ().get("CUDA_VISIBLE_DEVICES", "") for c in first) == ["0", "1"]
        api = support.Api(p.url, support.create_user())

        def online() -> int:
            models = api.get("/v1/models").json()
            return next(m["workers_online"] for m in models if m["name"] == model)

        support.wait_until(lambda: online() == 2, 60, what="both processes online")
        jobs = [api.submit({"value": i, "sleep_s": 0.3}, model=model)["id"] for i in range(8)]
        assert all(api.wait(j)["status"] == "succeeded" for j in jobs)
        with db.engine().connect() as conn:
            ran_on = conn.execute(
                text("SELECT DISTINCT worker FROM jobs WHERE id = ANY(:ids)"), {"ids": jobs}
            ).scalars()
            assert len(set(ran_on)) == 2  # both processes took jobs
        # One /metrics for the host, summing both processes.
        scrape = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert _finished(scrape, model) == 8

        victim = first[0]
        gpu = victim.environ()["CUDA_VISIBLE_DEVICES"]
        victim.kill()
        support.wait_until(
            lambda: len(now := _children(sup.pid)) == 2 and victim.pid not in {c.pid for c in now},
            30,
            what="the killed process started again",
        )
        again = next(c for c in _children(sup.pid) if c.pid != first[1].pid)
        assert again.environ()["CUDA_VISIBLE_DEVICES"] == gpu
        support.wait_until(lambda: online() >= 2, 60, what="the new process online")
        job = api.submit({"value": "after"}, model=model)["id"]
        assert api.wait(job)["output"] == {"value": "after"}

        kids = _children(sup.pid)
        metrics_dir = p.var_dir / "prometheus" / f"worker-{sup.pid}"
        assert list(metrics_dir.glob("*.db"))  # the processes' metric files
        sup.p.send_signal(signal.SIGTERM)
        assert sup.p.wait(60) == 0
        _, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive
        assert not metrics_dir.exists()  # gone with them
    finally:
        p.stop()


def test_worker_processes_stop_when_their_supervisor_is_killed(
    database_url: str, services: support.Services, tmp_path: Path
) -> None:
    p = support.Platform(database_url, services.redis_url, tmp_path)
    try:
        sup = p._start("workers", ["worker", "--gpus", "0,1", "--models", "echo"])
        support.wait_until(lambda: sup.log.read_text().count("ready for models") == 2, 60)
        kids = _children(sup.pid)
        assert len(kids) == 2
        sup.p.kill()  # SIGKILL: nothing passes it on (Proc.kill would signal the group)
        sup.p.wait(10)
        _, alive = psutil.wait_procs(kids, timeout=30)
        assert not alive, "worker processes outlived their supervisor"
    finally:
        p.stop()


def test_worker_refuses_a_bad_gpu_list(
    database_url: str, services: support.Services, tmp_path
) -> None:
    import subprocess

    p = support.Platform(database_url, services.redis_url, tmp_path)
    out = subprocess.run(
        [*support.SPOOL, "worker", "--gpus", "0,0", "--models", "echo"],
        env=p.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "distinct GPU indices or UUIDs" in out.stderr
