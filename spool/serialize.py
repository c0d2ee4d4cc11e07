"""Job and batch rows → the JSON objects of API.md, for the API and for webhook bodies.

No Flask here: the workers build webhook payloads with the same functions the API
answers with (api/serialize.py adds the request's base URL).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from spool.models import Batch, Job

# A Job, or a row of spool.jobs.view_select (the same names, no ORM object).
JobLike = Job | Row[Any]

# A batch's counts name these; `canceling` counts as running (it has not stopped yet).
COUNT_KEYS = ("queued", "running", "succeeded", "failed", "canceled", "expired")


def iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    return ts.isoformat().replace("+00:00", "Z")


def progress(raw: Any) -> dict[str, Any] | None:
    if not raw:
        return None
    cur, total = int(raw.get("current", 0)), int(raw.get("total", 0))
    return {"current": cur, "total": total, "fraction": round(cur / total, 4) if total else 0.0}


def job(j: JobLike, position: int | None = None, base: str = "") -> dict[str, Any]:
    """The job object; `base` prefixes its urls (empty: paths relative to the API)."""
    return {
        "id": j.id,
        "kind": j.kind,
        "model": j.model,
        "status": j.status,
        "priority": j.priority,
        "input": j.input,
        "output": j.output,
        "error": j.error,
        "progress": progress(j.progress),
        "queue_position": position,
        "attempts": j.attempts,
        "created_at": iso(j.created_at),
        "started_at": iso(j.started_at),
        "finished_at": iso(j.finished_at),
        "batch_id": j.batch_id,
        "custom_id": j.custom_id,
        "retry_of": j.retry_of,
        "metadata": j.metadata_,
        "webhook": j.webhook,
        "webhook_events": j.webhook_events,
        "ttl_s": j.ttl_s,
        "timeout_s": j.timeout_s,
        "urls": {
            "self": f"{base}/v1/jobs/{j.id}",
            "result": f"{base}/result/{j.id}",
            "cancel": f"{base}/v1/jobs/{j.id}/cancel",
            "events": f"{base}/v1/jobs/{j.id}/events",
        },
    }


def batch_counts(total: int, by_status: Mapping[str, int]) -> dict[str, int]:
    counts = {"total": total, **dict.fromkeys(COUNT_KEYS, 0)}
    for status, n in by_status.items():
        key = "running" if status == "canceling" else status
        if key in counts and key != "total":
            counts[key] += n
    return counts


def batch_status(b: Batch, counts: Mapping[str, int]) -> str:
    """The stored end state, else derived from the live counts."""
    if b.status in ("completed", "canceled"):
        return b.status
    unfinished = counts["queued"] + counts["running"]
    if unfinished == 0 and counts["total"]:
        return "completed"
    return "queued" if counts["queued"] == counts["total"] else "running"


def batch(b: Batch, by_status: Mapping[str, int], base: str = "") -> dict[str, Any]:
    """The batch object; `by_status` is {job status: count} of its jobs."""
    counts = batch_counts(b.total, by_status)
    return {
        "id": b.id,
        "status": batch_status(b, counts),
        "counts": counts,
        "created_at": iso(b.created_at),
        "finished_at": iso(b.finished_at),
        "canceled_at": iso(b.canceled_at),
        "metadata": b.metadata_,
        "webhook": b.webhook,
        "urls": {
            "self": f"{base}/v1/batches/{b.id}",
            "results": f"{base}/v1/batches/{b.id}/results",
            "cancel": f"{base}/v1/batches/{b.id}/cancel",
        },
    }
