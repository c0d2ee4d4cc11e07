"""Job rows → the JSON objects of API.md, with this API's base URL (spool/serialize.py
holds the serializers, shared with the workers' webhook payloads)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flask import Response, current_app, request

from spool import serialize as _s

iso = _s.iso
progress = _s.progress


def base_url() -> str:
    configured = current_app.config["SPOOL"].base_url
    return configured or request.host_url.rstrip("/")


def json_response(
    body: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A body already in its API.md shape, sent as it is.

    flask-smorest passes a Response through, so the hot views (submit, get, result) skip
    its marshmallow dump of what spool.serialize built field by field; their schemas
    still document them, and the schemathesis suite checks that the two agree.
    """
    return current_app.response_class(
        json.dumps(body, separators=(",", ":")), status, headers, mimetype="application/json"
    )


def job(j: _s.JobLike, position: int | None = None) -> dict[str, Any]:
    return _s.job(j, position, base_url())
