"""gunicorn settings for the API (read by `spool api`).

gevent workers: a long poll (`?wait=`, `Prefer: wait`) or an SSE stream parks a
greenlet instead of pinning a worker process.
"""

from __future__ import annotations

import os

worker_class = "api.gunicorn_worker.Worker"  # gevent_pywsgi, with keep-alive rotation
worker_connections = int(os.environ.get("SPOOL_API_WORKER_CONNECTIONS", "1000"))
workers = int(os.environ.get("SPOOL_API_WORKERS", "2"))
bind = f"{os.environ.get('SPOOL_HOST', '127.0.0.1')}:{os.environ.get('SPOOL_PORT', '8000')}"
timeout = 90  # above the longest wait (60 s) a request may ask for
graceful_timeout = 20
keepalive = 5
accesslog = None  # the app logs one structured line per request
preload_app = False  # each worker builds its own engine and Redis pools after fork


def post_worker_init(worker) -> None:
    # Make psycopg2 cooperative with gevent, so a slow query parks only its greenlet.
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()


def child_exit(server, worker) -> None:
    # prometheus-client multiprocess mode: drop the dead worker's live gauges.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
