"""Operations: /healthz, /readyz, /metrics and GET /v1/models."""

from __future__ import annotations

import time

import marshmallow as ma
from flask import Response
from flask_jwt_extended import jwt_required
from sqlalchemy import func, select, text

from api import errors
from api.errors import ErrorSchema
from api.jobs import read_limited
from api.parsing import Blueprint
from api.schemas import ModelSchema
from spool import db, redisconn, registry, workers_online
from spool.models import Job

blp = Blueprint("ops", __name__, description="Operations")


class StatusSchema(ma.Schema):
    status = ma.fields.String()


@blp.route("/healthz")
@blp.response(200, StatusSchema)
def healthz():
    """200 while the process is alive."""
    return {"status": "ok"}


@blp.route("/readyz")
@blp.response(200, StatusSchema)
@blp.alt_response(503, schema=ErrorSchema, description="PostgreSQL or Redis is down")
def readyz():
    """200 when PostgreSQL and Redis answer, else 503 naming what is down."""
    down: dict[str, str] = {}
    try:
        with db.engine().connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        down["postgresql"] = str(exc).splitlines()[0][:200]
    try:
        redisconn.client().ping()
    except Exception as exc:
        down["redis"] = str(exc)[:200]
    if down:
        # A Response, not a dict: the 200 schema must not filter the error body.
        message = "not ready: " + ", ".join(sorted(down)) + " down"
        return errors.respond(503, message, "unavailable", details=down)
    return {"status": "ready"}


@blp.route("/metrics")
def metrics():
    """Prometheus text format."""
    from spool import metrics as m

    body, ctype = m.render()
    return Response(body, content_type=ctype)


@blp.route("/v1/models")
@jwt_required()
@read_limited
@blp.response(200, ModelSchema(many=True))
def list_models():
    """The models this platform serves, with workers online and jobs queued."""
    specs = registry.models()
    with db.session() as s:
        queued = dict(
            s.execute(
                select(Job.model, func.count()).where(Job.status == "queued").group_by(Job.model)
            ).all()
        )
    online = workers_online.counts(list(specs), now=time.time())
    return [
        {
            "name": spec.name,
            "kind": spec.kind,
            "queue": spec.queue,
            "workers_online": online.get(spec.name, 0),
            "queued": queued.get(spec.name, 0),
            "limits": spec.effective_limits,
        }
        for spec in specs.values()
    ]
