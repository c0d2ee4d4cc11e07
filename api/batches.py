"""/v1/batches: submit many jobs at once, follow them, stream their results, cancel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Response
from flask.views import MethodView
from flask_jwt_extended import jwt_required
from sqlalchemy import select, text

from api import batch_intake, dbsession, errors, pagination
from api.auth import principal
from api.batch_schemas import (
    BatchCreateSchema,
    BatchListQuerySchema,
    BatchPageSchema,
    BatchResultLineSchema,
    BatchSchema,
)
from api.jobs import read_limited, submit_limited
from api.parsing import Blueprint
from api.serialize import base_url
from spool import batches, db, metrics, serialize
from spool.models import Batch

blp = Blueprint("batches", __name__, url_prefix="/v1/batches", description="Batches")

RESULTS_CHUNK = 1000
RESULTS_SQL = text(
    "SELECT seq, id, custom_id, status, output, error FROM jobs "
    "WHERE batch_id = :b AND seq > :after ORDER BY seq LIMIT :n"
)

SUBMIT_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": BatchCreateSchema},
        "application/x-ndjson": {
            "schema": {"type": "string", "description": "one BatchJob object per line"}
        },
    },
}


def load_visible(s: Any, batch_id: str) -> Batch:
    p = principal()
    b = batches.visible(s, batch_id, p.user_id, p.is_admin)
    if b is None:
        raise errors.not_found("batch")
    return b


@blp.route("")
class Batches(MethodView):
    decorators = [jwt_required()]

    @submit_limited
    @blp.doc(requestBody=SUBMIT_BODY)
    @blp.response(202, BatchSchema)
    def post(self):
        """Submit a batch of jobs (JSON, or NDJSON with one job per line)."""
        return batch_intake.create()

    @read_limited
    @blp.arguments(BatchListQuerySchema(), location="query")
    @blp.response(200, BatchPageSchema)
    def get(self, q: dict[str, Any]):
        """List your batches, newest first."""
        stmt = pagination.newest_first(select(Batch), Batch, q, principal())
        s = dbsession.get()  # reads only: autocommit, no transaction
        rows, cursor = pagination.split(list(s.scalars(stmt)), q["limit"])
        counts: dict[str, dict[str, int]] = {b.id: {} for b in rows}
        if rows:
            for r in s.execute(
                text(
                    "SELECT batch_id, status, count(*) AS n FROM jobs "
                    "WHERE batch_id = ANY(:ids) GROUP BY batch_id, status"
                ),
                {"ids": list(counts)},
            ):
                counts[r.batch_id][r.status] = r.n
        base = base_url()
        data = [serialize.batch(b, counts[b.id], base) for b in rows]
        return {"data": data, "next_cursor": cursor}


@blp.route("/<batch_id>")
@jwt_required()
@read_limited
@blp.response(200, BatchSchema)
def get(batch_id: str):
    """Get a batch with live counts of its jobs."""
    s = dbsession.get()  # reads only: autocommit, no transaction
    return batches.to_object(s, load_visible(s, batch_id), base_url())


def _result_lines(batch_id: str) -> Iterator[bytes]:
    """Keyset pages of the batch's jobs in submit order: a short query per page, so a
    slow reader holds neither a transaction nor more than one page in memory."""
    after = 0
    while True:
        with db.session() as s:
            page = s.execute(RESULTS_SQL, {"b": batch_id, "after": after, "n": RESULTS_CHUNK}).all()
        if not page:
            return
        yield "".join(
            json.dumps(
                {
                    "custom_id": r.custom_id,
                    "job_id": r.id,
                    "status": r.status,
                    "output": r.output,
                    "error": r.error,
                },
                separators=(",", ":"),
            )
            + "\n"
            for r in page
        ).encode()
        if len(page) < RESULTS_CHUNK:
            return
        after = page[-1].seq


@blp.route("/<batch_id>/results")
@jwt_required()
@read_limited
@blp.doc(
    responses={
        "200": {
            "description": "one line per job, in submit order",
            "content": {"application/x-ndjson": {"schema": BatchResultLineSchema}},
        }
    }
)
def results(batch_id: str):
    """Stream the batch's results as NDJSON: custom_id, job_id, status, output, error."""
    s = dbsession.get()  # reads only: autocommit, no transaction
    load_visible(s, batch_id)
    dbsession.release()  # the stream reads a page at a time, each on a short session
    return Response(_result_lines(batch_id), mimetype="application/x-ndjson")


@blp.route("/<batch_id>/cancel", methods=["POST"])
@jwt_required()
@submit_limited
@blp.response(202, BatchSchema)
def cancel(batch_id: str):
    """Cancel every job of the batch that has not finished."""
    with dbsession.transaction() as s:
        b = load_visible(s, batch_id)
        if b.status == "completed":
            raise errors.ApiError(409, f"batch {b.id} already completed", "batch_finished")
        changed = batches.cancel(s, b)
    batches.announce_cancel(changed)
    for c in changed:
        stage = "queued" if c.status == "canceled" else "running"
        metrics.JOBS_CANCELED.labels(c.model, stage).inc()
        if c.status == "canceled":
            metrics.observe_job_finished(c.kind, c.model, "canceled", None)
    s = dbsession.get()  # reads only: autocommit, no transaction
    return batches.to_object(s, load_visible(s, batch_id), base_url())
