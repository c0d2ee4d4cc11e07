"""One error shape for everything: {"error": {"code", "message", "details"}} (API.md).

Every HTTPException, validation error and database/Redis outage ends here. A
dependency that is down is a 503; anything unexpected is logged and answered
500 with no internals (a 5xx other than 503 is a bug).
"""

from __future__ import annotations

import logging
from typing import Any

import marshmallow as ma
import redis
from flask import Flask, jsonify
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_failed",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """A domain error with its HTTP status (raise it from views)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or CODES.get(status, "error")
        self.details = details
        self.headers = headers or {}


def not_found(what: str = "resource") -> ApiError:
    return ApiError(404, f"{what} not found")


class ErrorSchema(ma.Schema):
    class Inner(ma.Schema):
        code = ma.fields.String()
        message = ma.fields.String()
        details = ma.fields.Raw(allow_none=True)

    error = ma.fields.Nested(Inner)


def body(status: int, message: str, code: str | None = None, details: Any = None) -> dict:
    return {
        "error": {
            "code": code or CODES.get(status, "error"),
            "message": message,
            "details": details,
        }
    }


def respond(
    status: int,
    message: str,
    code: str | None = None,
    details: Any = None,
    headers: dict[str, str] | None = None,
):
    resp = jsonify(body(status, message, code, details))
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _flatten(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """{"json": {"input": {"width": [..]}}} → {"input.width": [..]} (details name each field)."""
    out: dict[str, list[str]] = {}
    if isinstance(messages, dict):
        for key, val in messages.items():
            if prefix == "" and key in ("json", "query", "headers", "form", "files"):
                out.update(_flatten(val, ""))
                continue
            name = f"{prefix}.{key}" if prefix else str(key)
            out.update(_flatten(val, name))
    elif isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        out[prefix or "_schema"] = list(messages)
    else:
        out[prefix or "_schema"] = [str(messages)]
    return out


def handle_http(error: HTTPException):
    status = error.code or 500
    data = getattr(error, "data", None) or {}
    headers = dict(data.get("headers") or {})
    if status == 422 and "messages" in data:
        details = _flatten(data["messages"])
        fields = ", ".join(sorted(details))
        return respond(422, f"validation failed: {fields}", details=details, headers=headers)
    if status == 400 and "messages" in data:
        return respond(400, "request body is not valid JSON", details=None, headers=headers)
    message = data.get("message") or error.description or error.name
    if status == 429:
        message = f"rate limit exceeded: {error.description}"
    resp = respond(status, message, headers=headers)
    for k, v in error.get_headers() or []:
        if k.lower() not in ("content-type", "content-length"):
            resp.headers[k] = v
    return resp


def install(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return respond(exc.status, exc.message, exc.code, exc.details, exc.headers)

    @app.errorhandler(DataError)
    def _unstorable(exc: Exception):
        # PostgreSQL's jsonb refuses what JSON parsers accept: \u0000, lone surrogates,
        # NaN/Infinity. The request is at fault, not the database: nothing was stored.
        log.info("data refused by PostgreSQL: %s", str(exc).splitlines()[0])
        return respond(
            422,
            "the request holds values PostgreSQL cannot store: NUL characters (\\u0000), "
            "unpaired surrogates, NaN or Infinity",
            "unstorable_value",
            details={"body": [str(getattr(exc, "orig", exc)).splitlines()[0][:200]]},
        )

    @app.errorhandler(OperationalError)
    @app.errorhandler(DBAPIError)
    def _db_down(exc: Exception):
        log.warning("database unavailable: %s", exc)
        return respond(
            503,
            "database unavailable; nothing was accepted",
            "database_unavailable",
            headers={"Retry-After": "5"},
        )

    @app.errorhandler(redis.RedisError)
    def _redis_down(exc: Exception):
        log.warning("redis unavailable: %s", exc)
        return respond(503, "redis unavailable", "redis_unavailable", headers={"Retry-After": "5"})

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        if isinstance(exc, HTTPException):
            return handle_http(exc)
        log.exception("unhandled error")
        return respond(500, "internal error")
