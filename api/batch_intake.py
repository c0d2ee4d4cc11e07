"""POST /v1/batches: validate, record and enqueue tens of thousands of jobs in one request.

Built for size (bench/bench_batch_intake.py, BENCHMARKS.md "Batch intake"):
- the body is parsed once; NDJSON line by line, so parsed jobs never all exist at once;
- each job is validated by one cached schema instance (building a schema costs more
  than using it) and turned into a row at once;
- rows are inserted in chunks inside the one transaction as validation goes (spool.bulk:
  one JSON parameter per chunk), so memory holds a chunk of rows, not the batch; an
  invalid job rolls everything back, so the whole batch is still validated first;
- after the commit the queue tokens go out through Celery's batched publish
  (spool.dispatch.send).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from flask import current_app, request
from marshmallow import ValidationError
from sqlalchemy.orm import Session

from api import dbsession, errors, idempotency
from api.auth import principal
from api.batch_schemas import MAX_JOBS, BatchJobSchema, BatchOptionsSchema
from api.serialize import base_url
from spool import batches, dispatch, jobs, metrics
from spool.ids import new_id
from spool.models import Batch

CHUNK = 2000
MAX_REPORTED = 20  # invalid jobs named in one 422
NDJSON = "application/x-ndjson"

_job_schema = BatchJobSchema()
_options_schema = BatchOptionsSchema()
_REQUIRED = frozenset(n for n, f in _job_schema.fields.items() if f.required)
_DECLARED = frozenset(_job_schema.fields)
# Schema instances restricted to the fields a job actually has (plus the required
# ones): marshmallow visits every declared field per load, present or not, and a
# batch's jobs usually share one shape. Unknown keys are still refused.
_by_shape: dict[frozenset[str], BatchJobSchema] = {}
MAX_SHAPES = 256


def _schema_for(raw: dict[str, Any]) -> BatchJobSchema:
    keys = frozenset(raw)
    schema = _by_shape.get(keys)
    if schema is None:
        if len(_by_shape) >= MAX_SHAPES:
            return _job_schema
        schema = _by_shape[keys] = BatchJobSchema(only=tuple((keys & _DECLARED) | _REQUIRED))
    return schema


class _Parsed:
    """The raw jobs (an iterator) and the batch's own fields."""

    def __init__(self, raw_jobs: Iterator[tuple[int, Any]], options: dict[str, Any]) -> None:
        self.raw_jobs = raw_jobs
        self.webhook: str | None = options.get("webhook")
        self.metadata: Any = options.get("metadata")


def _ndjson_jobs(body: bytes) -> Iterator[tuple[int, Any]]:
    index = 0
    for line in body.splitlines():
        if not line.strip():
            continue  # blank lines are allowed (an editor's trailing newline)
        if index >= MAX_JOBS:
            raise errors.ApiError(
                422, f"at most {MAX_JOBS} jobs per batch", details={"jobs": ["too many jobs"]}
            )
        try:
            yield index, json.loads(line)
        except ValueError as exc:
            raise errors.ApiError(
                400,
                f"line {index + 1} of the NDJSON body is not valid JSON",
                details={f"jobs.{index}": [f"not valid JSON: {exc}"]},
            ) from exc
        index += 1


def parse(body: bytes, mimetype: str) -> _Parsed:
    if mimetype == NDJSON:
        return _Parsed(_ndjson_jobs(body), {})
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise errors.ApiError(400, "request body is not valid JSON") from exc
    if not isinstance(doc, dict):
        raise errors.ApiError(
            422, "validation failed: _schema", details={"_schema": ["must be an object"]}
        )
    try:
        options = _options_schema.load(doc)
    except ValidationError as exc:
        details = errors._flatten(exc.messages)
        raise errors.ApiError(
            422, f"validation failed: {', '.join(sorted(details))}", details=details
        ) from exc
    return _Parsed(enumerate(options["jobs"]), options)


def _alongside(fn: Callable[[], None]) -> Callable[[], None]:
    """Run `fn` concurrently when gevent drives this process (gunicorn's gevent workers,
    psycopg2 made cooperative): the insert's greenlet sends its query and waits while
    this one validates the next chunk, so PostgreSQL works on the other core meanwhile.
    Returns the join. Elsewhere (a test client, a sync worker) `fn` just runs now."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        fn()
        return lambda: None
    import gevent

    glet = gevent.spawn(fn)
    gevent.sleep(0)  # let it encode and send its chunk before validation goes on
    return glet.get


class _Writer:
    """Validated rows → the database in chunks; collects what the tokens need."""

    def __init__(self, s: Session, user_id: str, batch_id: str) -> None:
        self.s, self.user_id, self.batch_id = s, user_id, batch_id
        self.at = jobs.now()
        self.messages: list[dispatch.Message] = []
        self.per_model: Counter[tuple[str, str]] = Counter()
        self.total = 0
        self._join: Callable[[], None] = lambda: None

    def write(self, reqs: list[dict[str, Any]]) -> None:
        rows = [
            jobs.new_row(
                self.user_id, req, batch_id=self.batch_id, default_priority="low", at=self.at
            )
            for req in reqs
        ]
        self.messages += jobs.messages(rows)
        self.per_model.update((r["kind"], r["model"]) for r in rows)
        self.total += len(rows)
        self._join()  # one insert at a time on the session
        self._join = _alongside(lambda: jobs.insert_rows(self.s, rows))

    def finish(self, quietly: bool = False) -> None:
        join, self._join = self._join, lambda: None
        try:
            join()
        except Exception:
            if not quietly:
                raise


def _validate_into(parsed: _Parsed, writer: _Writer) -> None:
    """Every job is validated (up to MAX_REPORTED invalid ones); rows are written, chunk
    by chunk, until the first invalid job. Errors name the job: `jobs.7.input.width`."""
    problems: dict[str, list[str]] = {}
    try:
        invalid = _validate_chunks(parsed, writer, problems)
    except BaseException:
        writer.finish(quietly=True)  # never leave an insert running on the session
        raise
    writer.finish()
    if problems:
        shown = ", ".join(list(problems)[:10])
        more = f" ({invalid} invalid jobs or more)" if invalid >= MAX_REPORTED else ""
        raise errors.ApiError(422, f"validation failed: {shown}{more}", details=problems)
    if writer.total == 0:
        raise errors.ApiError(
            422, "validation failed: jobs", details={"jobs": ["a batch needs at least one job"]}
        )


def _validate_chunks(parsed: _Parsed, writer: _Writer, problems: dict[str, list[str]]) -> int:
    invalid = 0
    seen: dict[str, int] = {}
    raw_jobs = iter(parsed.raw_jobs)
    while chunk := list(itertools.islice(raw_jobs, CHUNK)):
        reqs = []
        for index, raw in chunk:
            # One load per job (not many=True: a post_load error would lose its index).
            try:
                if not isinstance(raw, dict):
                    raise ValidationError({"_schema": ["must be an object (a POST /v1/jobs body)"]})
                req = _schema_for(raw).load(raw)
                custom_id = req.get("custom_id")
                if custom_id is not None:
                    earlier = seen.setdefault(custom_id, index)
                    if earlier != index:
                        raise ValidationError({"custom_id": [f"already used by jobs.{earlier}"]})
            except ValidationError as exc:
                problems.update(errors._flatten(exc.messages, f"jobs.{index}"))
                invalid += 1
                if invalid >= MAX_REPORTED:
                    return invalid
                continue
            reqs.append(req)
        if not invalid:
            writer.write(reqs)
            time.sleep(0)  # under gevent: this worker's other requests run between chunks
    return invalid


def _check_cap(s: Session, user_id: str, adding: int) -> None:
    cap = current_app.config["SPOOL"].max_queued_per_user
    queued = jobs.queued_count(s, user_id)  # includes this batch's own rows
    if adding == 0 and queued >= cap:
        message = f"you have {queued} queued jobs, the most allowed; wait for some to finish"
    elif adding and queued > cap:
        message = (
            f"this batch would make {queued} queued jobs, more than the {cap} allowed; "
            "wait for some to finish or submit fewer"
        )
    else:
        return
    raise errors.ApiError(429, message, "too_many_queued", headers={"Retry-After": "10"})


def create() -> tuple[dict[str, Any], int, dict[str, str]]:
    """Record the batch and its jobs (idempotently), then send their tokens."""
    p = principal()
    body = request.get_data(cache=False)
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        existing = idempotency.claim(
            p.user_id, key, idempotency.request_hash(request.path, body), "batch"
        )
        if existing:
            return response(existing), 202, {"Location": f"/v1/batches/{existing}"}
    try:
        parsed = parse(body, request.mimetype)
        del body  # the parsed form is what is needed from here on
        batch_id = new_id("bat")
        with dbsession.transaction() as s:
            _check_cap(s, p.user_id, 0)
            writer = _Writer(s, p.user_id, batch_id)
            _validate_into(parsed, writer)
            _check_cap(s, p.user_id, writer.total)
            batch = Batch(
                id=batch_id,
                user_id=p.user_id,
                status="queued",
                webhook=parsed.webhook,
                metadata_=parsed.metadata,
                total=writer.total,
                created_at=writer.at,
            )
            s.add(batch)
            if key is not None:
                idempotency.complete(s, p.user_id, key, batch_id)
            # Built before the commit, as for single jobs: once committed, no later
            # failure may answer 503 "nothing accepted" (a retry would duplicate it).
            s.flush()
            obj = batches.to_object(s, batch, base_url())
    except Exception:
        if key is not None:
            idempotency.release(p.user_id, key)
        raise
    dispatch.send(writer.messages)
    for (kind, model), n in writer.per_model.items():
        metrics.JOBS_SUBMITTED.labels(kind, model).inc(n)
    return obj, 202, {"Location": f"/v1/batches/{batch_id}"}


def response(batch_id: str) -> dict[str, Any]:
    p = principal()
    s = dbsession.get()  # reads only: autocommit, no transaction
    b = batches.visible(s, batch_id, p.user_id, p.is_admin)
    if b is None:
        raise errors.not_found("batch")
    return batches.to_object(s, b, base_url())
