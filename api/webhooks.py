"""/v1/jobs/<id>/webhooks: a job's webhook deliveries and their attempts; redeliver."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from flask_jwt_extended import jwt_required
from marshmallow import fields, validate
from sqlalchemy import select, text

from api import dbsession, errors
from api.jobs import load_visible, read_limited, submit_limited
from api.parsing import Blueprint
from api.schemas import Strict
from spool import webhooks
from spool.models import WebhookAttempt, WebhookDelivery
from spool.serialize import iso

blp = Blueprint("webhooks", __name__, url_prefix="/v1/jobs", description="Webhooks")


class AttemptSchema(ma.Schema):
    at = fields.String()
    status_code = fields.Integer(allow_none=True)
    error = fields.String(allow_none=True)
    duration_ms = fields.Integer()


class DeliverySchema(ma.Schema):
    id = fields.String(metadata={"description": "the webhook-id header, the same on every try"})
    type = fields.String()
    url = fields.String()
    state = fields.String(metadata={"description": "pending, delivered, given_up, gone, refused"})
    created_at = fields.String()
    next_attempt_at = fields.String(allow_none=True)
    delivered_at = fields.String(allow_none=True)
    attempts = fields.List(fields.Nested(AttemptSchema))


class DeliveryPageSchema(ma.Schema):
    data = fields.List(fields.Nested(DeliverySchema))


class DeliveryQuerySchema(Strict):
    limit = fields.Integer(load_default=100, validate=validate.Range(1, 1000))


def _delivery(d: WebhookDelivery, attempts: list[WebhookAttempt]) -> dict[str, Any]:
    return {
        "id": d.id,
        "type": d.event,
        "url": d.url,
        "state": d.state,
        "created_at": iso(d.created_at),
        "next_attempt_at": iso(d.next_attempt_at) if d.state == "pending" else None,
        "delivered_at": iso(d.delivered_at),
        "attempts": [
            {
                "at": iso(a.at),
                "status_code": a.status_code,
                "error": a.error,
                "duration_ms": a.duration_ms,
            }
            for a in attempts
        ],
    }


def _with_attempts(s: Any, deliveries: list[WebhookDelivery]) -> list[dict[str, Any]]:
    by_delivery: dict[str, list[WebhookAttempt]] = {d.id: [] for d in deliveries}
    if deliveries:
        found = s.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_(list(by_delivery)))
            .order_by(WebhookAttempt.id)
        )
        for a in found:
            by_delivery[a.delivery_id].append(a)
    return [_delivery(d, by_delivery[d.id]) for d in deliveries]


@blp.route("/<job_id>/webhooks")
@jwt_required()
@read_limited
@blp.arguments(DeliveryQuerySchema(), location="query")
@blp.response(200, DeliveryPageSchema)
def list_deliveries(q: dict[str, Any], job_id: str):
    """The job's webhook deliveries (oldest first) with every attempt."""
    load_visible(job_id)
    s = dbsession.get()  # reads only: autocommit, no transaction
    newest = list(
        s.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc())
            .limit(q["limit"])
        )
    )
    return {"data": _with_attempts(s, newest[::-1])}


REDELIVER_SQL = text(
    """
    UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = now(),
        claim_token = NULL, sent_at = now(), updated_at = now()
    WHERE id = (SELECT id FROM webhook_deliveries WHERE job_id = :job
                ORDER BY created_at DESC, id DESC LIMIT 1)
    RETURNING id
    """
)


@blp.route("/<job_id>/webhooks/redeliver", methods=["POST"])
@jwt_required()
@submit_limited
@blp.response(202, DeliverySchema)
def redeliver(job_id: str):
    """Send the job's latest webhook event again (same webhook-id, a new timestamp)."""
    load_visible(job_id)
    with dbsession.transaction() as s:
        delivery_id = s.scalar(REDELIVER_SQL, {"job": job_id})
        if delivery_id is None:
            raise errors.ApiError(409, "this job has no webhook event to redeliver", "no_webhook")
        webhooks.wake_after_commit(s, [delivery_id])
    s = dbsession.get()  # reads only: autocommit, no transaction
    d = s.get(WebhookDelivery, delivery_id)
    assert d is not None
    return _with_attempts(s, [d])[0]
