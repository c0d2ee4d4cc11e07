"""POST /v1/auth/token and the principal behind every other /v1 request."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from flask import current_app, g, request
from flask.views import MethodView
from flask_jwt_extended import create_access_token, current_user, jwt_required

from api import dbsession, errors
from api.extensions import jwt
from api.parsing import Blueprint
from api.schemas import TokenRequestSchema, TokenSchema, WebhookSecretSchema
from spool import users
from spool.models import User

blp = Blueprint("auth", __name__, url_prefix="/v1", description="Authentication")


REVOKED = "token's API key was revoked or its user deleted"

F = TypeVar("F")


@dataclass(frozen=True)
class Claimed:
    """A token's claims, its key not yet checked (a `key_checked_in_query` view)."""

    user_id: str
    key_id: str


def key_checked_in_query(view: F) -> F:
    """Marks a view whose first query checks the token's key itself (spool/jobs.py's
    `visible_row_for_key`, `insert_checked`): one round trip instead of two. Put it
    innermost, under the other decorators (functools.wraps carries the mark up). Every
    other view gets its principal looked up before it runs."""
    view.spool_key_checked_in_query = True  # type: ignore[attr-defined]
    return view


def _key_checked_in_query() -> bool:
    view = current_app.view_functions.get(request.endpoint or "")
    view_class = getattr(view, "view_class", None)
    if view_class is not None:
        view = getattr(view_class, request.method.lower(), None)
    return bool(getattr(view, "spool_key_checked_in_query", False))


@jwt.user_lookup_loader
def _load_principal(_header: dict, claims: dict[str, Any]) -> users.Principal | Claimed | None:
    # One indexed lookup per request, on the request's session (its view's queries
    # follow on the same connection): a revoked key or deleted user fails at once.
    if _key_checked_in_query():
        return Claimed(str(claims.get("sub", "")), claims.get("kid", ""))
    return users.principal_for_key(dbsession.connection(), claims.get("kid", ""))


@jwt.user_lookup_error_loader
def _revoked(_header: dict, _claims: dict) -> Any:
    return errors.respond(401, REVOKED, "token_revoked")


@jwt.expired_token_loader
def _expired(_header: dict, _claims: dict) -> Any:
    return errors.respond(401, "token has expired", "token_expired")


@jwt.invalid_token_loader
def _invalid(reason: str) -> Any:
    return errors.respond(401, f"invalid token: {reason}", "invalid_token")


@jwt.unauthorized_loader
def _missing(reason: str) -> Any:
    return errors.respond(401, f"missing token: {reason}", "unauthorized")


def principal() -> users.Principal:
    """The request's principal; looked up now if its view deferred the check."""
    p = g.get("_spool_principal")
    if p is None:
        user = current_user
        if isinstance(user, Claimed):
            return verified(users.principal_for_key(dbsession.connection(), user.key_id))
        p = g._spool_principal = user
    g.user_id = p.user_id
    return p


def claimed() -> Claimed | None:
    """The token's unchecked claims, while a `key_checked_in_query` view has not yet
    checked them; None once the principal is known."""
    if g.get("_spool_principal") is not None:
        return None
    user = current_user
    return user if isinstance(user, Claimed) else None


def verified(p: users.Principal | None) -> users.Principal:
    """The principal a query found for the token's key; 401 when there was none."""
    if p is None:
        raise errors.ApiError(401, REVOKED, "token_revoked")
    g._spool_principal = p
    g.user_id = p.user_id
    return p


def login_required(fn):
    return jwt_required()(fn)


@blp.route("/auth/token")
class Token(MethodView):
    @blp.arguments(TokenRequestSchema())
    @blp.response(200, TokenSchema)
    def post(self, body: dict) -> dict:
        """Exchange an API key for a bearer token."""
        s = dbsession.get()  # reads only: autocommit, no transaction
        p = users.authenticate(s, body["api_key"])
        if p is None:
            raise errors.ApiError(401, "invalid or revoked API key", "invalid_api_key")
        ttl = current_app.config["SPOOL"].token_ttl_s
        token = create_access_token(
            identity=p.user_id,
            additional_claims={"kid": p.key_id},
            expires_delta=timedelta(seconds=ttl),
        )
        return {"access_token": token, "token_type": "Bearer", "expires_in": ttl}


@blp.route("/webhook-secret")
class WebhookSecret(MethodView):
    decorators = [jwt_required()]

    @blp.response(200, WebhookSecretSchema)
    def get(self) -> dict:
        """The signing secret of your webhooks (Standard Webhooks)."""
        p = principal()
        s = dbsession.get()  # reads only: autocommit, no transaction
        user = s.get(User, p.user_id)
        return {"secret": user.webhook_secret if user else ""}
