"""spool.deliver_webhook: one signed, SSRF-checked, recorded attempt of a delivery.

The delivery row decides (spool/webhooks.py). A task claims it only while it is
pending and due, with one conditional UPDATE that also pushes `next_attempt_at`
past the attempt's longest run: a worker killed mid-attempt leaves a delivery
that falls due again and is woken by the sweeper (`sweep`). The outcome is
recorded only if the attempt still holds the claim (a redeliver may have reset it).

Runs on the spool.cpu queue, never in a GPU worker's inference path.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, text

from spool import batches, db, metrics, settings, webhook_signing, webhooks
from spool.models import WebhookAttempt
from spool.serialize import iso
from workers import webhook_http
from workers.app import app

log = logging.getLogger("spool.webhooks")

# Retries this soon are woken by a Celery countdown; later ones by the sweeper when
# due. Kept well under the broker's visibility timeout: a countdown message sits
# unacknowledged in a worker until then.
MAX_COUNTDOWN_S = 60.0
# How long an attempt holds its claim beyond the HTTP timeout (DNS, recording).
CLAIM_MARGIN_S = 45.0
SWEEP_CHUNK = 1000

_rng = random.Random()


@dataclass(frozen=True)
class Claimed:
    id: str
    token: str
    event: str
    payload: Any
    url: str
    created_at: datetime
    attempts: int
    secret: str


CLAIM_SQL = text(
    """
    UPDATE webhook_deliveries d SET attempts = d.attempts + 1, claim_token = :tok,
        next_attempt_at = now() + make_interval(secs => :hold), updated_at = now()
    FROM users u
    WHERE d.id = :id AND u.id = d.user_id AND d.state = 'pending'
      AND d.next_attempt_at <= now() + interval '1 second'
    RETURNING d.id, d.event, d.payload, d.url, d.created_at, d.attempts, u.webhook_secret
    """
)

RECORD_SQL = text(
    """
    UPDATE webhook_deliveries SET state = :state, last_status = :status, last_error = :error,
        next_attempt_at = CASE WHEN :state = 'pending'
            THEN now() + make_interval(secs => :delay) ELSE NULL END,
        sent_at = CASE WHEN :woken THEN now() + make_interval(secs => :delay) ELSE sent_at END,
        delivered_at = CASE WHEN :state = 'delivered' THEN now() ELSE delivered_at END,
        claim_token = NULL, updated_at = now()
    WHERE id = :id AND claim_token = :tok
    RETURNING id
    """
)


def claim(delivery_id: str) -> Claimed | None:
    s_ = settings.get()
    tok = uuid.uuid4().hex
    with db.transaction() as s:
        row = s.execute(
            CLAIM_SQL,
            {"id": delivery_id, "tok": tok, "hold": s_.webhook_timeout_s + CLAIM_MARGIN_S},
        ).first()
    if row is None:
        return None
    return Claimed(
        row.id,
        tok,
        row.event,
        row.payload,
        row.url,
        row.created_at,
        row.attempts,
        row.webhook_secret,
    )


def body(c: Claimed) -> bytes:
    """The Standard Webhooks body: the event's type, its time, and the object it concerns."""
    doc = {"type": c.event, "timestamp": iso(c.created_at), "data": c.payload}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def outcome(result: webhook_http.DeliveryResult, attempts: int) -> tuple[str, float | None]:
    """(state, delay before the next try): delivered, gone, refused, given_up or pending."""
    if result.success:
        return "delivered", None
    if result.gone:
        return "gone", None
    if result.error and result.error.startswith("refused:"):
        return "refused", None  # the URL now resolves somewhere forbidden: no retry helps
    delay = webhook_http.next_delay(attempts, _rng, result=result)
    if delay is None:
        return "given_up", None
    return "pending", delay * settings.get().webhook_retry_scale


METRIC_OUTCOME = {"given_up": "gave_up", "pending": "retrying"}


def record(c: Claimed, result: webhook_http.DeliveryResult) -> tuple[str, float | None]:
    """Store the attempt (always) and the delivery's next state (if the claim still holds)."""
    state, delay = outcome(result, c.attempts)
    woken = delay is not None and delay <= MAX_COUNTDOWN_S
    with db.transaction() as s:
        s.execute(
            insert(WebhookAttempt).values(
                delivery_id=c.id,
                status_code=result.status_code,
                error=result.error,
                duration_ms=round(result.duration_ms),
            )
        )
        held = s.execute(
            RECORD_SQL,
            {
                "id": c.id,
                "tok": c.token,
                "state": state,
                "status": result.status_code,
                "error": result.error,
                "delay": delay or 0.0,
                "woken": woken,
            },
        ).first()
    metrics.WEBHOOK_DELIVERIES.labels(c.event, METRIC_OUTCOME.get(state, state)).inc()
    metrics.WEBHOOK_DURATION.observe(result.duration_ms / 1000.0)
    if held is not None and woken:
        webhooks.wake([c.id], countdown=delay)
    return state, delay


@app.task(name=webhooks.DELIVER_TASK, ignore_result=True)
def deliver_webhook(delivery_id: str) -> str:
    c = claim(delivery_id)
    if c is None:
        return "skipped"  # delivered, given up, not due yet, or another attempt holds it
    s_ = settings.get()
    payload = body(c)
    headers = webhook_signing.headers(c.secret, c.id, payload)
    result = webhook_http.post(
        c.url, payload, headers, timeout_s=s_.webhook_timeout_s,
        allow_private=s_.webhook_allow_private,
    )  # fmt: skip
    state, delay = record(c, result)
    log.info(
        "webhook %s", state,
        extra={"delivery_id": c.id, "event": c.event, "attempt": c.attempts,
               "status_code": result.status_code, "error": result.error, "retry_in_s": delay},
    )  # fmt: skip
    return state


# --- the sweeper's part ----------------------------------------------------------------------

DUE_SQL = text(
    """
    UPDATE webhook_deliveries SET sent_at = now()
    WHERE id IN (
        SELECT id FROM webhook_deliveries
        WHERE state = 'pending' AND next_attempt_at <= now()
          AND (sent_at IS NULL OR sent_at < now() - make_interval(secs => :resend))
        ORDER BY next_attempt_at LIMIT :n FOR UPDATE SKIP LOCKED)
    RETURNING id
    """
)

OPEN_BATCHES_SQL = text(
    """
    SELECT b.id FROM batches b WHERE b.finished_at IS NULL AND NOT EXISTS (
        SELECT 1 FROM jobs j
        WHERE j.batch_id = b.id AND j.status IN ('queued', 'running', 'canceling'))
    LIMIT 500
    """
)


# Deliveries hold a copy of the job's output: they go when the job's results do
# (SPOOL_RESULT_RETENTION_S), a bounded chunk per pass.
PRUNE_SQL = text(
    """
    DELETE FROM webhook_deliveries WHERE id IN (
        SELECT id FROM webhook_deliveries
        WHERE created_at < now() - make_interval(secs => :keep) AND state <> 'pending'
        LIMIT :n)
    RETURNING id
    """
)


def sweep() -> dict[str, int]:
    """Wake due deliveries whose wake-up was lost; end batches whose end was missed.

    A wake-up is presumed lost when the delivery has been due for longer than a few
    sweeper grace periods since it was last sent (a duplicate is a no-op claim).
    """
    resend = 3 * settings.get().resend_grace_s
    with db.transaction() as s:
        open_done = list(s.scalars(OPEN_BATCHES_SQL))
        ended = batches.finish_if_done(s, open_done) if open_done else []
    with db.transaction() as s:
        due = list(s.scalars(DUE_SQL, {"resend": resend, "n": SWEEP_CHUNK}))
    woken = webhooks.wake(due) if due else 0
    with db.transaction() as s:
        keep = settings.get().result_retention_s
        pruned = len(s.execute(PRUNE_SQL, {"keep": keep, "n": SWEEP_CHUNK}).all())
    return {"webhooks_woken": woken, "batches_ended": len(ended), "webhooks_pruned": pruned}
