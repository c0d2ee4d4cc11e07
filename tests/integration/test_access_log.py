"""The API's access log: one structured line per request, written once the response is
sent (the server closes it then), so the client does not wait for it."""

from __future__ import annotations

import logging
from typing import Any

import pytest


@pytest.fixture()
def client(database_url: str) -> Any:
    from api import create_app

    return create_app().test_client()


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "spool.api.access"]


def test_the_access_line_is_written_after_the_response_is_sent(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="spool.api.access")
    r = client.get("/healthz", headers={"X-Request-ID": "req-after-send"}, buffered=False)
    assert r.status_code == 200
    assert _lines(caplog) == []  # the response is out, not yet closed by the server
    r.close()
    (line,) = _lines(caplog)
    assert line.getMessage() == "request"
    fields = vars(line)  # the `extra` of the log call
    assert (fields["method"], fields["path"], fields["status"]) == ("GET", "/healthz", 200)
    assert fields["request_id"] == "req-after-send" and fields["ms"] >= 0
