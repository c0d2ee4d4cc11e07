"""POST /v1/auth/token and the principal behind every other /v1 request."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import current_app, g
from flask.views import MethodView
from flask_jwt_extended import create_access_token, current_user, jwt_required

from api import dbsession, errors
from api.extensions import jwt
from api.parsing import Blueprint
from api.schemas import TokenRequestSchema, TokenSchema, WebhookSecretSchema
from spool import users
from spool.models import User

blp = Blueprint("auth", __name__, url_prefix="/v1", description="Authentication")


@jwt.user_lookup_loader
def _load_principal(_header: dict, claims: dict[str, Any]) -> users.Principal | None:
    # One indexed lookup per request, on the request's session (its view's queries
    # follow in the same transaction): a revoked key or deleted user fails at once.
    return users.principal_for_key(dbsession.get(), claims.get("kid", ""))


@jwt.user_lookup_error_loader
def _revoked(_header: dict, _claims: dict) -> Any:
    return errors.respond(401, "token's API key was revoked or its user deleted", "token_revoked")


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
    p = current_user
    g.user_id = p.user_id
    return p


def login_required(fn):
    return jwt_required()(fn)


@blp.route("/auth/token")
class Token(MethodView):
    @blp.arguments(TokenRequestSchema)
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
