"""The Flask API: an app factory, one blueprint per resource."""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Callable
from typing import Any

from flask import Flask, Request, g, request

from spool import registry
from spool import settings as settings_mod
from spool.settings import Settings

log = logging.getLogger("spool.api")

JSON_TYPES = {"application/json"}
NDJSON_PATHS = ("/v1/batches",)


class SpoolFlask(Flask):
    """Flask, with its check of whether a view or hook is a coroutine made once per
    function: Flask makes it on every call (inspect, ~1 µs), a dozen times a request."""

    _is_async: dict[Any, bool] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        key = getattr(func, "__func__", func)  # a bound method: its function
        is_async = self._is_async.get(key)
        if is_async is None:
            is_async = self._is_async[key] = inspect.iscoroutinefunction(func)
        return self.async_to_sync(func) if is_async else func


def create_app(settings: Settings | None = None, check_schema: bool = True) -> Flask:
    from api import dbsession, errors, ratelimit, ratelimit_storage
    from api.extensions import api, jwt, limiter

    s = settings or settings_mod.get()
    registry.models()  # a broken registry stops the process booting, not each request
    app = SpoolFlask("spool")
    app.config.update(
        SPOOL=s,
        JWT_SECRET_KEY=s.secret_key,
        JWT_ALGORITHM="HS256",
        JWT_DECODE_ALGORITHMS=["HS256"],  # never `none`, never a key confusion
        JWT_TOKEN_LOCATION=["headers"],
        MAX_CONTENT_LENGTH=s.max_body_bytes,
        RATELIMIT_STORAGE_URI=ratelimit_storage.storage_uri(s.redis_url),
        RATELIMIT_STORAGE_OPTIONS={"socket_connect_timeout": 2, "socket_timeout": 2},
        RATELIMIT_HEADERS_ENABLED=False,  # api/ratelimit.py sets them
        RATELIMIT_SWALLOW_ERRORS=True,  # Redis down must not stop intake (PostgreSQL records it)
        API_TITLE="Spool",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/",
        API_SPEC_OPTIONS={
            "components": {
                "securitySchemes": {
                    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
                }
            },
            "security": [{"bearer": []}],
        },
    )
    if check_schema:
        from spool import db

        db.require_head()

    jwt.init_app(app)
    limiter.init_app(app)
    # flask-limiter's request hooks go: they check default and application-wide limits
    # (Spool has none), set the headers and keep per-request state for its decorators,
    # none of which Spool uses. api/ratelimit.py counts on the views and sets the
    # headers. The hooks cost ~20 µs of CPU per request, /healthz included.
    for hook_list in ("before_request_funcs", "after_request_funcs", "teardown_request_funcs"):
        hooks: dict[Any, list[Any]] = getattr(app, hook_list)
        hooks[None] = [f for f in hooks.get(None, []) if not _bound_to(f, limiter)]
    ratelimit.configure(
        app,
        {
            "submit": ("SPOOL_RATE_LIMIT_SUBMIT", s.rate_limit_submit),
            "read": ("SPOOL_RATE_LIMIT_READ", s.rate_limit_read),
        },
    )
    api.init_app(app)
    errors.install(app)
    dbsession.install(app)

    from api import auth, jobs, ops, results

    for bp in (auth.blp, jobs.blp, results.blp, ops.blp):
        api.register_blueprint(bp)
    _register_optional(api)
    _public_paths(api)

    @app.before_request
    def _request_id_and_content_type():
        # Every request runs this: the request object is fetched once, and the query
        # string is decoded only when it could hold a NUL (a decoded value holds one only
        # where the raw string has `%00` or the byte itself).
        req: Request = request._get_current_object()  # type: ignore[attr-defined]  # Flask types the proxy as a Request
        env = req.environ
        g.request_id = env.get("HTTP_X_REQUEST_ID") or uuid.uuid4().hex
        qs = req.query_string
        if "\x00" in req.path or (
            (b"%00" in qs or b"\x00" in qs) and any("\x00" in v for v in req.args.values())
        ):
            # No id, filter or cursor can hold NUL; the database driver would refuse it.
            return errors.respond(400, "NUL characters are not allowed in the URL")
        if req.method in ("POST", "PUT", "PATCH") and _has_body(req):
            allowed = set(JSON_TYPES)
            if req.path.startswith(NDJSON_PATHS):
                allowed.add("application/x-ndjson")
            if req.mimetype not in allowed:
                return errors.respond(
                    415,
                    f"Content-Type must be {' or '.join(sorted(allowed))}",
                    details={"Content-Type": [req.mimetype or "missing"]},
                )
        return None

    from api import observability

    observability.install(app)

    @app.after_request
    def _add_request_id(resp):
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        return resp

    return app


def _bound_to(func: Any, owner: object) -> bool:
    """A method of `owner`, or a partial of a function with `owner` as first argument."""
    if isinstance(func, functools.partial):
        return bool(func.args) and func.args[0] is owner
    return getattr(func, "__self__", None) is owner


def _has_body(req: Request) -> bool:
    return bool(req.content_length) or req.environ.get("HTTP_TRANSFER_ENCODING") == "chunked"


def _register_optional(api) -> None:
    """Blueprints of features that may not be present in every build."""
    import importlib

    for name in ("api.files", "api.batches", "api.webhooks"):
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        api.register_blueprint(mod.blp)


def _public_paths(api) -> None:
    """Mark the endpoints that need no token in the OpenAPI document."""
    spec = api.spec.to_dict()
    for path in ("/healthz", "/readyz", "/metrics", "/v1/auth/token"):
        for op in spec.get("paths", {}).get(path, {}).values():
            if isinstance(op, dict):
                op["security"] = []
    api.spec._paths.update(spec.get("paths", {}))
