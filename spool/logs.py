"""Structured logs (structlog): JSON in production, readable console in development.

Every record from the stdlib `logging` tree goes through the same processors,
so `extra={"job_id": …}` and bound context (request_id) land in the JSON line.

The lines written for every request and every job (`hot`) skip the stdlib's LogRecord
and its formatter and go through structlog's own pipeline to the same stream: the same
fields, rendered by the same renderer, for less than half the CPU (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from spool import settings

_hot: dict[str, Any] = {}  # what configure() set up for the hot lines


class _HandlerSink:
    """structlog's final logger for the hot lines: the rendered line goes to the stdlib
    handler's stream under the handler's own lock, so it never interleaves with a line
    of the stdlib's."""

    def __init__(self, handler: logging.StreamHandler) -> None:
        self.handler = handler

    def msg(self, message: str) -> None:
        self.handler.acquire()
        try:
            self.handler.stream.write(message + "\n")
            self.handler.flush()
        finally:
            self.handler.release()

    info = warning = error = msg


class HotLogger:
    """A logger for lines written on every request or job. Once `configure()` has run,
    a line goes through structlog's own processors (the same fields and renderer as the
    stdlib's records get); before that, it is a plain stdlib record of logger `name`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._bound: Any = None
        self._generation = -1

    def info(self, event: str, **fields: Any) -> None:
        if not _hot:
            logging.getLogger(self.name).info(event, extra=fields)
            return
        if self._generation != _hot["generation"]:  # configure() ran again (tests)
            self._bound = structlog.wrap_logger(
                _hot["sink"],
                processors=_hot["processors"],
                wrapper_class=structlog.make_filtering_bound_logger(
                    logging.getLogger(self.name).getEffectiveLevel()
                ),
            ).bind(logger=self.name)
            self._generation = _hot["generation"]
        self._bound.info(event, **fields)


def hot(name: str) -> HotLogger:
    """The logger for the per-request and per-job lines of `name`."""
    return HotLogger(name)


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
    _hot.update(
        sink=_HandlerSink(handler),
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        generation=_hot.get("generation", 0) + 1,
    )
