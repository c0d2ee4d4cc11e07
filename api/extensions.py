"""Extensions created at module level and bound in create_app (Flask tutorial style)."""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from threading import Lock
from typing import Any

import flask_jwt_extended.view_decorators as jwt_views
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


class CachingJWTManager(JWTManager):
    """Remembers verified tokens until they expire.

    A client sends the same token with every request, and flask-jwt-extended parses it
    three times per verification (claims, header, then verified claims). A token seen
    and verified before is the same bytes, so its claims are the same: only its expiry
    must be checked again, here. A revoked key or deleted user is still caught on every
    request by the user look-up, or by the view's own query (auth.key_checked_in_query).
    """

    MAX_TOKENS = 10_000

    def __init__(self) -> None:
        super().__init__()
        self._verified: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = Lock()

    def _decode_jwt_from_config(
        self, encoded_token: str, csrf_value: Any = None, allow_expired: bool = False
    ) -> dict:
        with self._lock:
            claims = self._verified.get(encoded_token)
        if claims is not None and csrf_value is None and time.time() < claims["exp"]:
            return dict(claims)
        claims = super()._decode_jwt_from_config(encoded_token, csrf_value, allow_expired)
        if not allow_expired and csrf_value is None and "exp" in claims:
            with self._lock:
                self._verified[encoded_token] = claims
                while len(self._verified) > self.MAX_TOKENS:
                    self._verified.popitem(last=False)
        return dict(claims)


# After verifying a token, flask-jwt-extended parses its header again on every request
# (for get_jwt_header), and PyJWT checks every character of the token's three segments
# on each parse: ~60 µs of a ~1 ms read. The header of the same bytes is the same dict;
# a token that does not parse raises, and is not remembered.
_parse_header = jwt_views.get_unverified_jwt_headers


@functools.lru_cache(maxsize=CachingJWTManager.MAX_TOKENS)
def _remembered_header(encoded_token: str) -> dict:
    return _parse_header(encoded_token)


def unverified_header(encoded_token: str) -> dict:
    return dict(_remembered_header(encoded_token))  # a copy: the caller may change it


jwt_views.get_unverified_jwt_headers = unverified_header
jwt = CachingJWTManager()
api = SpoolApi()
RATE_LIMIT_PREFIX = "spool-rl"  # every rate-limit counter's key starts with it
# The configuration and storage of the rate limits; api/ratelimit.py counts and answers.
limiter = Limiter(
    rate_limit_key,
    headers_enabled=False,
    swallow_errors=True,
    strategy="fixed-window",
    key_prefix=RATE_LIMIT_PREFIX,
)
