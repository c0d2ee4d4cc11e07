"""Pure parts of webhooks and batches: who is told, what an attempt leads to, the batch
object's counts and status, the delivery body. (The rest runs against real services in
tests/e2e/test_webhooks.py, tests/e2e/test_batches.py, tests/integration.)"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from spool import serialize, settings, webhooks
from spool.bulk import _split
from spool.ids import new_id
from workers import webhook_http
from workers import webhooks as tasks


def result(status: int | None, error: str | None = None) -> webhook_http.DeliveryResult:
    return webhook_http.DeliveryResult(status, error, 12.0)


def test_event_filter() -> None:
    assert webhooks.wants("https://x", None, "job.completed")  # "completed" is the default
    assert not webhooks.wants("https://x", None, "job.started")
    assert webhooks.wants("https://x", ["started"], "job.started")
    assert not webhooks.wants("https://x", ["started"], "job.completed")
    assert webhooks.wants("https://x", ["progress", "completed"], "job.progress")
    assert not webhooks.wants(None, ["started", "progress", "completed"], "job.started")


@pytest.fixture()
def scale(monkeypatch: pytest.MonkeyPatch) -> Iterator[float]:
    monkeypatch.setenv("SPOOL_WEBHOOK_RETRY_SCALE", "0.01")
    settings.get.cache_clear()
    yield 0.01
    settings.get.cache_clear()


def test_an_attempt_leads_to_the_next_state(scale: float) -> None:
    assert tasks.outcome(result(200), 1) == ("delivered", None)
    assert tasks.outcome(result(204), 7) == ("delivered", None)
    assert tasks.outcome(result(410, "HTTP 410"), 1) == ("gone", None)
    refused = result(None, "refused: address 10.0.0.1 is private")
    assert tasks.outcome(refused, 1) == ("refused", None)
    state, delay = tasks.outcome(result(500, "HTTP 500"), 1)
    # The first retry is 5 s after the first try (±15 % jitter), scaled by the setting.
    assert state == "pending" and delay is not None
    assert 5 * 0.85 * scale <= delay <= 5 * 1.15 * scale
    state, delay = tasks.outcome(result(None, "connection refused"), 2)
    assert state == "pending" and delay is not None and delay <= 300 * 1.15 * scale
    assert tasks.outcome(result(302, "redirect"), 3)[0] == "pending"  # 3xx is a failure
    last = len(webhook_http.RETRY_SCHEDULE_S)
    assert tasks.outcome(result(500, "HTTP 500"), last)[0] == "pending"
    assert tasks.outcome(result(500, "HTTP 500"), last + 1) == ("given_up", None)


def test_the_retry_schedule_spans_more_than_a_day() -> None:
    assert sum(webhook_http.RETRY_SCHEDULE_S) > 24 * 3600
    rng = random.Random(1)
    delays = [webhook_http.next_delay(n, rng) for n in range(1, 11)]
    assert delays[-1] is None and all(d is not None for d in delays[:-1])


def test_body_is_the_standard_webhooks_shape() -> None:
    at = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
    c = tasks.Claimed("msg_1", "tok", "job.completed", {"id": "job_1"}, "https://x", at, 1, "s")
    body = json.loads(tasks.body(c))
    assert body == {
        "type": "job.completed",
        "timestamp": "2026-11-21T12:00:00Z",
        "data": {"id": "job_1"},
    }


def test_batch_counts_and_status() -> None:
    b = SimpleNamespace(status="queued", total=5)
    counts = serialize.batch_counts(5, {"queued": 5})
    assert counts == {"total": 5, "queued": 5, "running": 0, "succeeded": 0, "failed": 0,
                      "canceled": 0, "expired": 0}  # fmt: skip
    assert serialize.batch_status(b, counts) == "queued"
    counts = serialize.batch_counts(5, {"queued": 2, "running": 1, "canceling": 1, "failed": 1})
    assert counts["running"] == 2 and serialize.batch_status(b, counts) == "running"
    counts = serialize.batch_counts(5, {"succeeded": 4, "expired": 1})
    assert serialize.batch_status(b, counts) == "completed"
    b.status = "canceled"
    assert serialize.batch_status(b, serialize.batch_counts(5, {"running": 5})) == "canceled"


def test_bulk_split_sends_shared_values_once() -> None:
    rows = [{"id": f"j{i}", "user_id": "u", "input": {"v": i}, "ttl_s": None} for i in range(5)]
    assert _split(rows) == (("user_id", "ttl_s"), ("id", "input"))
    rows[4]["user_id"] = "other"
    assert _split(rows) == (("ttl_s",), ("id", "user_id", "input"))


def test_ids_keep_their_format() -> None:
    ids = {new_id("job") for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == 24 and i.startswith("job_") for i in ids)
    assert set("".join(i[4:] for i in ids)) == set("0123456789abcdefghijklmnopqrstuvwxyz")
