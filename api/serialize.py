"""Job rows → the JSON objects of API.md."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import current_app, request

from spool.models import Job


def iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    return ts.isoformat().replace("+00:00", "Z")


def base_url() -> str:
    configured = current_app.config["SPOOL"].base_url
    return configured or request.host_url.rstrip("/")


def progress(raw: Any) -> dict[str, Any] | None:
    if not raw:
        return None
    cur, total = int(raw.get("current", 0)), int(raw.get("total", 0))
    return {"current": cur, "total": total, "fraction": round(cur / total, 4) if total else 0.0}


def job(j: Job, position: int | None = None) -> dict[str, Any]:
    base = base_url()
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
