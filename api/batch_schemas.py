"""Marshmallow schemas for batches: each job is a POST /v1/jobs body plus `custom_id`."""

from __future__ import annotations

import json
from typing import Any

import marshmallow as ma
from marshmallow import ValidationError, fields, validate, validates_schema

from api.schemas import MAX_METADATA_BYTES, JobCreateSchema, Strict, no_nul
from api.webhook_guard import validate_webhook_url

MAX_JOBS = 100_000


class BatchJobSchema(JobCreateSchema):
    custom_id = fields.String(
        validate=[validate.Length(1, 200), no_nul],
        metadata={"description": "your id for this job, unique within the batch"},
    )


class BatchOptionsSchema(Strict):
    """The batch's own fields of a JSON body (`jobs` is validated job by job)."""

    jobs = fields.Raw(required=True, metadata={"description": "POST /v1/jobs bodies"})
    webhook = fields.Url(
        schemes={"http", "https"},
        require_tld=False,
        validate=[validate.Length(max=2000), validate_webhook_url],
        metadata={"description": "receives one signed batch.completed event"},
    )
    metadata = fields.Dict()

    @validates_schema
    def _shape(self, data: dict, **_: Any) -> None:
        jobs = data.get("jobs")
        if not isinstance(jobs, list) or not jobs:
            raise ValidationError("must be a non-empty list of jobs", "jobs")
        if len(jobs) > MAX_JOBS:
            raise ValidationError(f"at most {MAX_JOBS} jobs per batch", "jobs")
        if "metadata" in data and len(json.dumps(data["metadata"])) > MAX_METADATA_BYTES:
            raise ValidationError(f"must be at most {MAX_METADATA_BYTES} bytes as JSON", "metadata")


class BatchCreateSchema(ma.Schema):
    """The JSON body of POST /v1/batches, for the OpenAPI document (intake validates
    with BatchOptionsSchema and BatchJobSchema, job by job)."""

    jobs = fields.List(fields.Nested(BatchJobSchema), required=True,
                       validate=validate.Length(1, MAX_JOBS))  # fmt: skip
    webhook = fields.Url(metadata={"description": "receives one signed batch.completed event"})
    metadata = fields.Dict()


class BatchCountsSchema(ma.Schema):
    total = fields.Integer()
    queued = fields.Integer()
    running = fields.Integer()
    succeeded = fields.Integer()
    failed = fields.Integer()
    canceled = fields.Integer()
    expired = fields.Integer()


class BatchUrlsSchema(ma.Schema):
    self = fields.String()
    results = fields.String()
    cancel = fields.String()


class BatchSchema(ma.Schema):
    id = fields.String()
    status = fields.String(metadata={"description": "queued, running, completed or canceled"})
    counts = fields.Nested(BatchCountsSchema)
    created_at = fields.String()
    finished_at = fields.String(allow_none=True)
    canceled_at = fields.String(allow_none=True)
    metadata = fields.Raw(allow_none=True)
    webhook = fields.String(allow_none=True)
    urls = fields.Nested(BatchUrlsSchema)


class BatchPageSchema(ma.Schema):
    data = fields.List(fields.Nested(BatchSchema))
    next_cursor = fields.String(allow_none=True)


class BatchListQuerySchema(Strict):
    limit = fields.Integer(load_default=50, validate=validate.Range(1, 500))
    cursor = fields.String()
    all = fields.Boolean(load_default=False, metadata={"description": "admins: every user's"})


class BatchResultLineSchema(ma.Schema):
    """One line of GET /v1/batches/<id>/results (application/x-ndjson)."""

    custom_id = fields.String(allow_none=True)
    job_id = fields.String()
    status = fields.String()
    output = fields.Raw(allow_none=True)
    error = fields.Raw(allow_none=True)
