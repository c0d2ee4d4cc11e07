"""One model worker process per GPU.

A worker process keeps one warm copy of each of its models on one device, so a host
with several GPUs runs a process per GPU, each seeing only its own
(`CUDA_VISIBLE_DEVICES`). `spool worker` does that by itself (`--gpus`, `SPOOL_GPUS`):
it becomes a small supervisor that starts a worker process per GPU, starts a process
again when one dies (its running jobs come back through the sweeper, as for any lost
worker), serves one /metrics for all of them, and stops them all on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("spool.gpus")

VISIBLE = "CUDA_VISIBLE_DEVICES"
SUPERVISOR_ENV = "SPOOL_SUPERVISOR_PID"  # a child's supervisor, for it to stop without one
RESTART_DELAY_S = 2.0  # a process that dies at once is not started in a tight loop
MAX_RESTART_DELAY_S = 60.0
STABLE_S = 60.0  # a process that ran this long before dying starts the count afresh


def restart_delay(quick_deaths: int) -> float:
    """Seconds before starting a GPU's process again, after `quick_deaths` deaths in a
    row that each came within STABLE_S of its start: 2, 2, 4, 8 … 60 (a GPU that kills
    its process at once is retried ever more slowly, not every 2 s forever)."""
    return min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** max(0, quick_deaths - 1))


class GpuSpecError(ValueError):
    """`--gpus` / SPOOL_GPUS is neither auto, none nor a list of GPUs."""


def device_count() -> int:
    """GPUs the CUDA driver shows this process (0 without torch or CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.device_count())


def visible(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES (the host's names of the GPUs this process
    sees, cuda:0 first), or None when it is unset."""
    env = os.environ if environ is None else environ
    if VISIBLE not in env:
        return None
    return [g.strip() for g in env[VISIBLE].split(",") if g.strip()]


def resolve(spec: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs to run a worker process on each, as `CUDA_VISIBLE_DEVICES` entries.

    `auto`: every GPU this process may use (the entries of its own CUDA_VISIBLE_DEVICES
    when set, else the driver's count); `none` (or empty): none, one process for
    whatever devices it sees; else a comma-separated list of GPU indices or UUIDs.
    """
    value = spec.strip().lower()
    if value in ("", "none"):
        return []
    if value == "auto":
        narrowed = visible(environ)  # by a scheduler, or by hand: keep its names
        return narrowed if narrowed is not None else [str(i) for i in range(device_count())]
    gpus = [g.strip() for g in spec.split(",") if g.strip()]
    bad = [g for g in gpus if not (g.isdigit() or g.upper().startswith(("GPU-", "MIG-")))]
    if bad or not gpus or len(set(gpus)) != len(gpus):
        raise GpuSpecError(
            f"--gpus / SPOOL_GPUS must be auto, none or distinct GPU indices or UUIDs "
            f"(e.g. 0,1,3), not {spec!r}"
        )
    return gpus


class Supervisor:
    """A worker process per GPU, each started again when it dies, until stopped."""

    def __init__(self, argv: Sequence[str], gpus: Sequence[str], env: Mapping[str, str]) -> None:
        self.argv, self.gpus, self.env = list(argv), list(gpus), dict(env)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._started_at: dict[str, float] = {}
        self._quick_deaths: dict[str, int] = dict.fromkeys(self.gpus, 0)
        self._stopping = False

    def _start(self, gpu: str) -> None:
        # The children serve no metrics port of their own: this process serves theirs.
        env = {**self.env, VISIBLE: gpu, "SPOOL_METRICS_PORT": "0"}
        # A child whose supervisor is gone stops by itself (workers/app.py), so that a
        # SIGKILLed supervisor leaves no worker behind.
        env[SUPERVISOR_ENV] = str(os.getpid())
        child = subprocess.Popen(self.argv, env=env)
        self.children[gpu] = child
        self._started_at[gpu] = time.monotonic()
        log.info("worker for GPU %s started (pid %d)", gpu, child.pid)

    def stop(self, *_: object) -> None:
        self._stopping = True

    def run(self, poll_s: float = 0.2) -> int:
        """Start every GPU's process and keep them running; returns once stopped."""
        from spool import metrics

        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for gpu in self.gpus:
            self._start(gpu)
        due: dict[str, float] = {}  # GPU → when its dead process starts again
        try:
            while not self._stopping:
                now = time.monotonic()
                for gpu, child in list(self.children.items()):
                    code = child.poll()
                    if code is None:
                        continue
                    if gpu not in due:
                        quick = now - self._started_at[gpu] < STABLE_S
                        self._quick_deaths[gpu] = self._quick_deaths[gpu] + 1 if quick else 0
                        delay = restart_delay(self._quick_deaths[gpu])
                        log.warning(
                            "worker for GPU %s (pid %d) exited with %s; starting it again in "
                            "%.0f s",
                            gpu,
                            child.pid,
                            code,
                            delay,
                        )
                        metrics.mark_process_dead(child.pid)
                        due[gpu] = now + delay
                    elif now >= due[gpu]:
                        del due[gpu]
                        self._start(gpu)
                time.sleep(poll_s)
        finally:
            self._stop_children()
        return 0

    def _stop_children(self, grace_s: float = 30.0) -> None:
        """SIGTERM (Celery's warm shutdown: running jobs finish), then SIGKILL."""
        live = [c for c in self.children.values() if c.poll() is None]
        for child in live:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in live:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def supervise(worker_args: Sequence[str], gpus: Sequence[str], var_dir: Path, port: int) -> int:
    """Run `spool worker <worker_args>` once per GPU; one /metrics on `port` sums them."""
    from spool import metrics

    given = os.environ.get(metrics.MULTIPROC_ENV)
    directory = metrics.setup_multiproc_dir(
        given or var_dir / "prometheus" / f"worker-{os.getpid()}"
    )
    own = None if given else directory
    try:
        if metrics.start_worker_metrics_server(port):
            log.info("metrics of the %d GPU workers on :%d/metrics", len(gpus), port)
    except OSError as exc:
        log.warning("worker metrics port %d unavailable: %s", port, exc)
    argv = [sys.executable, "-m", "spool.cli", "worker", *worker_args, "--gpus", "none"]
    try:
        return Supervisor(argv, gpus, os.environ).run()
    finally:
        if own is not None:  # its processes' files, gone with them (a restart makes anew)
            shutil.rmtree(own, ignore_errors=True)
