"""Per-request metrics and logs, and the live gauges /metrics reads at scrape time."""

from __future__ import annotations

import time

import structlog
from flask import Flask, Request, g, request
from sqlalchemy import func, select, text

from spool import db, logs, metrics, redisconn, registry, workers_online
from spool.models import Job

log = logs.hot("spool.api.access")
_live_registered = False


def _count_by_model(statuses: tuple[str, ...]) -> dict[str, float]:
    with db.session() as s, s.begin():
        s.execute(text("SET LOCAL statement_timeout = 1000"))
        rows = s.execute(
            select(Job.model, func.count()).where(Job.status.in_(statuses)).group_by(Job.model)
        ).all()
    return {model: float(n) for model, n in rows}


def _queue_lengths() -> dict[str, float]:
    # Celery keeps one Redis list per priority step (celery_config: sep ":", steps 0/3/6).
    r = redisconn.client()
    queues = [spec.queue for spec in registry.models().values()] + ["spool.cpu"]
    with r.pipeline(transaction=False) as pipe:
        for q in queues:
            for key in (q, f"{q}:3", f"{q}:6"):
                pipe.llen(key)
        lengths = pipe.execute()
    return {q: float(sum(lengths[i * 3 : (i + 1) * 3])) for i, q in enumerate(queues)}


def live_collector() -> metrics.LiveCollector:
    return metrics.LiveCollector(
        {
            "jobs_queued": lambda: _count_by_model(("queued",)),
            "jobs_running": lambda: _count_by_model(("running", "canceling")),
            "workers_online": lambda: workers_online.counts(list(registry.models())),
            "queue_length": _queue_lengths,
        }
    )


def install(app: Flask) -> None:
    global _live_registered
    if not _live_registered:  # once per process, however many apps tests create
        metrics.add_scrape_collector(live_collector())
        _live_registered = True

    @app.before_request
    def _start() -> None:
        g.t0 = time.perf_counter()
        metrics.HTTP_IN_FLIGHT.inc()
        structlog.contextvars.bind_contextvars(request_id=g.get("request_id"))

    @app.after_request
    def _observe(resp):
        # Runs on every request: the request and `g` are fetched once, and headers and
        # the query string are read from the WSGI environ (no parsing for a request
        # without `wait=`).
        req: Request = request._get_current_object()  # type: ignore[attr-defined]  # Flask types the proxy as a Request
        state = g._get_current_object()
        elapsed = time.perf_counter() - state.get("t0", time.perf_counter())
        rule = req.url_rule
        endpoint = rule.rule if rule is not None else "<unmatched>"
        env = req.environ
        if (b"wait" in req.query_string and req.args.get("wait")) or env.get(
            "HTTP_PREFER", ""
        ).startswith("wait"):
            endpoint += " wait"
        method, path, status = req.method, req.path, resp.status_code
        metrics.observe_request(endpoint, method, status, elapsed)
        if path != "/metrics":
            line = {
                "method": method,
                "path": path,
                "status": status,
                "ms": round(elapsed * 1000, 2),
                "request_id": state.get("request_id"),
                "user_id": state.get("user_id"),
            }
            # Written once the response is sent (the server closes it then), not before:
            # the client need not wait for the formatted line (~0.1 ms). The next request
            # on the connection is read only after it.
            resp.call_on_close(lambda: log.info("request", **line))
        return resp

    @app.teardown_request
    def _done(_exc: BaseException | None) -> None:
        if "t0" in g:
            metrics.HTTP_IN_FLIGHT.dec()
        structlog.contextvars.unbind_contextvars("request_id")
