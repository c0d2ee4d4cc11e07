"""The Celery app of the workers, its process hygiene and its liveness beat."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time

from celery import signals

from spool import db, dispatch, metrics, redisconn, settings, workers_online
from spool.gpus import SUPERVISOR_ENV

log = logging.getLogger("spool.worker")

app = dispatch.celery_app()
app.conf.imports = ("workers.inference", "workers.sweeper", "workers.webhooks")

WORKER_NAME = os.environ.get("SPOOL_WORKER_NAME") or f"{socket.gethostname()}:{os.getpid()}"
LIVENESS_EVERY_S = 5.0
ALIVE_KEY = "spool:worker-alive:{}"


def served_models() -> list[str]:
    raw = os.environ.get("SPOOL_WORKER_MODELS", "")
    return [m for m in (x.strip() for x in raw.split(",")) if m]


@signals.worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Connections inherited across fork are the parent's: never share them.
    db.dispose()
    redisconn.reset()


_stop = threading.Event()


def _orphaned() -> bool:
    """Whether the `spool worker` supervisor that started this process is gone (even
    SIGKILLed, which it cannot pass on): the process then stops, as its siblings do."""
    supervisor = os.environ.get(SUPERVISOR_ENV, "")
    return supervisor.isdigit() and os.getppid() != int(supervisor)


def _liveness_loop() -> None:
    models = served_models()
    while not _stop.is_set():
        if _orphaned():
            log.warning("the supervisor (pid %s) is gone: stopping", os.environ[SUPERVISOR_ENV])
            os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown: running jobs finish
            return
        try:
            workers_online.beat(WORKER_NAME, models)
            redisconn.client().set(ALIVE_KEY.format(WORKER_NAME), "1", ex=30)
            # A scrape of a multi-GPU host is served by `spool worker`'s supervisor, which
            # holds no GPU: each worker process records its own memory figures.
            metrics.sample_gpu_memory()
        except Exception as exc:
            log.debug("liveness beat failed: %s", exc)
        _stop.wait(LIVENESS_EVERY_S)


def _warm_up() -> None:
    """Load every served model now and make one small call on it (`check.warm_input`), so
    that the first job pays for neither: the load, nor the device's lazy start (on an H200,
    a first 64 px 1-step image took 1.71 s with Stable Diffusion 1.5, a first token 0.39 s
    with a 1.1B model)."""
    from spool import registry
    from workers import device
    from workers.backends import backend_class
    from workers.batching import batcher_for
    from workers.check import QuietContext, warm_input

    for name in served_models():
        spec = registry.get(name)
        if spec is None or not backend_class(spec.kind).serial:
            continue  # echo: nothing to load, and its jobs run side by side
        try:
            batcher = batcher_for(spec)
            t0 = time.monotonic()
            batcher.setup()
        except Exception as exc:
            device.exit_if_lost(exc, WORKER_NAME)
            log.error("model %s failed to load: %s", name, exc)
            continue
        t1 = time.monotonic()
        job_input = warm_input(spec)
        if job_input is not None:
            try:
                [result] = batcher.backend.predict([QuietContext(job_input, "job_warm_up")])
            except Exception as exc:
                result = exc
            if isinstance(result, BaseException):  # the model is loaded: jobs will tell
                device.exit_if_lost(result, WORKER_NAME)
                log.warning("model %s: its warm-up call failed: %s", name, result)
        t2 = time.monotonic()
        log.info(
            "model %s warm in %.2f s (load %.2f s, first call %.2f s)",
            name,
            t2 - t0,
            t1 - t0,
            t2 - t1,
        )


@signals.worker_ready.connect
def _ready(**_: object) -> None:
    db.require_head()
    threading.Thread(target=_liveness_loop, name="spool-liveness", daemon=True).start()
    threading.Thread(target=_warm_up, name="spool-warmup", daemon=True).start()
    port = settings.get().metrics_port
    try:
        if metrics.start_worker_metrics_server(port):
            log.info("worker metrics on :%d/metrics", port)
    except OSError as exc:  # another worker on this host has the port: run without
        log.warning("worker metrics port %d unavailable: %s", port, exc)
    log.info("worker %s ready for models %s", WORKER_NAME, served_models() or "(none)")


@signals.worker_shutdown.connect
def _shutdown(**_: object) -> None:
    _stop.set()
    with contextlib.suppress(Exception):  # going away anyway; the records expire
        workers_online.leave(WORKER_NAME, served_models())
        redisconn.client().delete(ALIVE_KEY.format(WORKER_NAME))


def base_url() -> str:
    return settings.get().base_url
