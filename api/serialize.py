"""Job rows → the JSON objects of API.md, with this API's base URL (spool/serialize.py
holds the serializers, shared with the workers' webhook payloads)."""

from __future__ import annotations

from typing import Any

from flask import current_app, request

from spool import serialize as _s
from spool.models import Job

iso = _s.iso
progress = _s.progress


def base_url() -> str:
    configured = current_app.config["SPOOL"].base_url
    return configured or request.host_url.rstrip("/")


def job(j: Job, position: int | None = None) -> dict[str, Any]:
    return _s.job(j, position, base_url())
