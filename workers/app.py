"""The Celery app of the workers, its process hygiene and its liveness beat."""

from __future__ import annotations

import logging
import os
import socket
import threading

from celery import signals

from spool import db, dispatch, metrics, redisconn, settings, workers_online

log = logging.getLogger("spool.worker")

app = dispatch.celery_app()
app.conf.imports = ("workers.inference", "workers.sweeper")

WORKER_NAME = os.environ.get("SPOOL_WORKER_NAME") or f"{socket.gethostname()}:{os.getpid()}"
LIVENESS_EVERY_S = 5.0


def served_models() -> list[str]:
    raw = os.environ.get("SPOOL_WORKER_MODELS", "")
    return [m for m in (x.strip() for x in raw.split(",")) if m]


@signals.worker_process_init.connect
def _after_fork(**_: object) -> None:
    # Connections inherited across fork are the parent's: never share them.
    db.dispose()
    redisconn.reset()


@signals.task_received.connect
def _received(request=None, **_: object) -> None:
    # The message left Redis: from now on the lease (or the sweeper) answers for the job.
    try:
        args = request.args if request is not None else None
        if args:
            redisconn.client().hdel(dispatch.SENT_KEY, args[0])
    except Exception as exc:
        log.debug("could not clear sent marker: %s", exc)


_stop = threading.Event()


def _liveness_loop() -> None:
    models = served_models()
    while not _stop.is_set():
        try:
            workers_online.beat(WORKER_NAME, models)
            redisconn.client().set(f"spool:worker-alive:{WORKER_NAME}", "1", ex=30)
        except Exception as exc:
            log.debug("liveness beat failed: %s", exc)
        _stop.wait(LIVENESS_EVERY_S)


@signals.worker_ready.connect
def _ready(**_: object) -> None:
    db.require_head()
    threading.Thread(target=_liveness_loop, name="spool-liveness", daemon=True).start()
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
    try:
        workers_online.leave(WORKER_NAME, served_models())
    except Exception:
        pass


def base_url() -> str:
    return settings.get().base_url
