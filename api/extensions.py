"""Extensions created at module level and bound in create_app (Flask tutorial style)."""

from __future__ import annotations

from flask import request
from flask_jwt_extended import JWTManager, get_jwt, verify_jwt_in_request
from flask_limiter import Limiter
from flask_smorest import Api

from api import errors


class SpoolApi(Api):
    """flask-smorest with the API.md error shape."""

    ERROR_SCHEMA = errors.ErrorSchema

    def handle_http_exception(self, error):
        return errors.handle_http(error)


def rate_limit_key() -> str:
    """Limits are per user: the token's subject, else the client address.

    Limited views run after `jwt_required`, so the verified claims are already there;
    reading them (not verifying again) saves a JWT decode and a user look-up per call,
    and flask-limiter calls this more than once per request.
    """
    try:
        claims = get_jwt()
    except RuntimeError:  # no token verified yet on this request
        try:
            verify_jwt_in_request(optional=True)
            claims = get_jwt()
        except Exception:  # a bad token is answered 401 by the view itself
            claims = {}
    sub = claims.get("sub") if claims else None
    return f"user:{sub}" if sub else f"ip:{request.remote_addr}"


jwt = JWTManager()
api = SpoolApi()
limiter = Limiter(
    rate_limit_key,
    headers_enabled=True,
    swallow_errors=True,
    strategy="fixed-window",
    key_prefix="spool-rl",
)
