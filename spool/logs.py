"""Structured logs (structlog): JSON in production, readable console in development.

Every record from the stdlib `logging` tree goes through the same processors,
so `extra={"job_id": …}` and bound context (request_id) land in the JSON line.
"""

from __future__ import annotations

import logging
import sys

import structlog

from spool import settings


def configure(component: str) -> None:
    s = settings.get()
    shared: list = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        structlog.stdlib.ExtraAdder(),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if s.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(s.log_level)
    # celery.worker.strategy: "Task … received", a line per job before "job started".
    noisy_loggers = (
        "urllib3",
        "kombu",
        "amqp",
        "celery.beat",
        "celery.app.trace",
        "celery.worker.strategy",
        "alembic",
    )
    for noisy in noisy_loggers:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(component=component)
