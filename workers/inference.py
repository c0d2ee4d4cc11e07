"""spool.run_job: claim the job, run it on its model (micro-batched), record the outcome."""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.exc import DataError

from spool import events, logs, registry
from spool.states import Status
from workers import device, lease
from workers.app import WORKER_NAME, app, base_url
from workers.backends import backend_class
from workers.backends.base import Backend, JobCanceled, JobTimedOut, ModelLoadError
from workers.context import Event, RunContext, heartbeat

log = logging.getLogger("spool.worker")
hot_log = logs.hot("spool.worker")  # the lines of every job


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message[:2000]}


_unbatched: dict[str, Backend] = {}
_setup_lock = threading.Lock()


def _run(spec: registry.ModelSpec, ctx: RunContext) -> dict[str, Any]:
    """Through the model's micro-batcher (one batch at a time, batches of up to
    max_batch_size); straight to the backend for one that runs jobs side by side."""
    if spec.max_batch_size > 1 or backend_class(spec.kind).serial:
        from workers.batching import batcher_for

        return batcher_for(spec).run(ctx)
    with _setup_lock:  # one warm copy of the model per process
        backend = _unbatched.get(spec.name)
        if backend is None:
            backend = backend_class(spec.kind)(spec)
            backend.setup()
            _unbatched[spec.name] = backend
    result = backend.predict([ctx])[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _finish(
    ctx: RunContext, status: str, out: Any, err: dict[str, str] | None, unsent: list[Event]
) -> bool:
    c = ctx.claim
    try:
        return lease.finish(c, status, out, err, ctx.last_progress, unsent)
    except DataError as exc:
        # An output PostgreSQL refuses (e.g. NUL in text) would fail again on every retry:
        # fail the job now with the reason, instead of letting its lease run out.
        log.error("job output could not be stored", extra={"job_id": c.job_id})
        return lease.finish(
            c,
            Status.FAILED,
            None,
            _error("unstorable_output", f"the output could not be stored: {exc.orig}"),
            ctx.last_progress,
            unsent,
        )


@app.task(name="spool.run_job", ignore_result=True)
def run_job(hint: str, queue: str) -> str:
    """Run the best queued job of `queue` (`hint`: the job whose submission sent this)."""
    c = lease.claim(queue, WORKER_NAME)
    if c is None:
        return "nothing to do"  # a surplus token: every job of the queue is taken
    job_id = c.job_id
    hot_log.info("job started", job_id=job_id, attempt=c.attempts)
    ctx = RunContext(c, base_url())
    ctx.announce_running()
    beat = heartbeat()
    beat.add(ctx)
    try:
        spec = registry.get(c.model)
        if spec is None:
            raise ModelLoadError(f"model {c.model!r} is not in this worker's registry")
        try:
            output = _run(spec, ctx)
        except Exception as exc:
            device.exit_if_lost(exc, WORKER_NAME)  # every later job here would fail too
            raise
        status, out, err = Status.SUCCEEDED, output, None
    except JobCanceled as exc:
        status, out, err = Status.CANCELED, None, _error("canceled", str(exc))
    except JobTimedOut as exc:
        status, out, err = Status.FAILED, None, _error("timeout", str(exc))
    except ModelLoadError as exc:
        status, out, err = Status.FAILED, None, _error("model_load_failed", str(exc))
    except Exception as exc:
        log.exception("job failed", extra={"job_id": job_id})
        status, out, err = (
            Status.FAILED,
            None,
            _error(getattr(exc, "code", "inference_error"), f"{type(exc).__name__}: {exc}"),
        )
    finally:
        beat.remove(ctx)
        unsent = ctx.close()  # its events not sent yet go out just before its final status
    if ctx.lost.is_set() or not _finish(ctx, status, out, err, unsent):
        events.publish_many(unsent)
        log.warning(
            "job was taken back before it finished; outcome dropped", extra={"job_id": job_id}
        )
        return "lost"
    hot_log.info("job finished", job_id=job_id, status=str(status))
    return str(status)
