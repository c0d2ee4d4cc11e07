"""The per-request and per-job lines (spool.logs.hot): structlog's own pipeline to the
stdlib handler's stream, with the fields, context and levels of every other line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from spool import logs, settings
from spool.settings import Settings


@pytest.fixture()
def stream(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """configure() writing to the captured stderr; the root logger and the hot-line
    setup as they were afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    hot = dict(logs._hot)
    monkeypatch.setattr(settings, "get", lambda: Settings(log_format="json", log_level="INFO"))
    try:
        yield capsys
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logs._hot.clear()
        logs._hot.update(hot)
        structlog.contextvars.clear_contextvars()


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_a_hot_line_is_one_json_line_with_the_context(stream: Any) -> None:
    logs.configure("api")
    structlog.contextvars.bind_contextvars(request_id="req-1")
    logs.hot("spool.api.access").info("request", method="GET", status=200, ms=1.5)
    logging.getLogger("spool.api").info("a stdlib line", extra={"n": 1})
    hot, std = _lines(stream)
    assert hot["event"] == "request" and hot["logger"] == "spool.api.access"
    assert (hot["method"], hot["status"], hot["ms"]) == ("GET", 200, 1.5)
    assert hot["level"] == "info" and hot["timestamp"].endswith("Z")
    # the same bound context and standard fields as the stdlib's records get
    for key in ("component", "request_id", "level"):
        assert hot[key] == std[key]
    assert set(std) - {"n"} <= set(hot) | {"event"}


def test_a_hot_line_follows_its_logger_level(stream: Any) -> None:
    logging.getLogger("spool.worker").setLevel(logging.WARNING)
    try:
        logs.configure("worker")
        logs.hot("spool.worker").info("job started", job_id="j1")
        assert _lines(stream) == []
    finally:
        logging.getLogger("spool.worker").setLevel(logging.NOTSET)
    logs.configure("worker")  # a logger made before a configure() follows the new one
    line = logs.hot("spool.worker")
    line.info("job started", job_id="j1")
    logs.configure("worker")
    line.info("job finished", job_id="j1", status="succeeded")
    assert [(e["event"], e["job_id"]) for e in _lines(stream)] == [
        ("job started", "j1"),
        ("job finished", "j1"),
    ]


def test_before_configure_a_hot_line_is_a_stdlib_record(
    stream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    logs._hot.clear()
    caplog.set_level(logging.INFO, logger="spool.api.access")
    logs.hot("spool.api.access").info("request", path="/healthz")
    (record,) = [r for r in caplog.records if r.name == "spool.api.access"]
    assert record.getMessage() == "request" and vars(record)["path"] == "/healthz"
