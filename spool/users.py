"""Users and their API keys (created by `spool users create`, shown once)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy.orm import Session

from spool import db, security
from spool.ids import new_id
from spool.models import ApiKey, User


def _new_webhook_secret() -> str:
    # Late import: the signing module belongs to the webhooks feature.
    try:
        from spool.webhook_signing import new_secret
    except ImportError:  # pragma: no cover - module ships with the package
        import base64
        import secrets

        return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    return new_secret()


class UserExists(ValueError):
    pass


class UserNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the user and the key their token was minted from."""

    user_id: str
    name: str
    is_admin: bool
    key_id: str


def create_user(session: Session, name: str, admin: bool = False) -> tuple[User, str]:
    if session.scalar(select(User).where(User.name == name)) is not None:
        raise UserExists(f"user {name!r} already exists")
    user = User(id=new_id("usr"), name=name, is_admin=admin, webhook_secret=_new_webhook_secret())
    session.add(user)
    session.flush()
    key = add_key(session, user)
    return user, key


def add_key(session: Session, user: User) -> str:
    key = security.new_api_key()
    session.add(
        ApiKey(
            id=new_id("key"),
            user_id=user.id,
            key_hash=security.hash_key(key),
            prefix=security.display_prefix(key),
        )
    )
    session.flush()
    return key


def revoke(session: Session, name: str) -> int:
    """Revoke every key of a user; tokens minted from them stop working at once."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise UserNotFound(f"no user {name!r}")
    res = session.execute(
        update(ApiKey)
        .where(ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return res.rowcount or 0  # type: ignore[attr-defined]


def delete(session: Session, name: str) -> None:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise UserNotFound(f"no user {name!r}")
    user.deleted_at = datetime.now(UTC)


def authenticate(session: Session, api_key: str) -> Principal | None:
    row = session.execute(
        select(User, ApiKey)
        .join(ApiKey, ApiKey.user_id == User.id)
        .where(
            ApiKey.key_hash == security.hash_key(api_key),
            ApiKey.revoked_at.is_(None),
            User.deleted_at.is_(None),
        )
    ).first()
    if row is None:
        return None
    user, key = row
    return Principal(user.id, user.name, user.is_admin, key.id)


# Built once (it runs on every authenticated request): executing it only looks up
# the compiled form in SQLAlchemy's cache. The hot job queries (spool/jobs.py) join it
# as a subquery, so they check the token's key in their own round trip.
PRINCIPAL = (
    select(User.id, User.name, User.is_admin)
    .join(ApiKey, ApiKey.user_id == User.id)
    .where(ApiKey.id == bindparam("key_id"), ApiKey.revoked_at.is_(None), User.deleted_at.is_(None))
)

_PRINCIPAL = db.prepared(PRINCIPAL, "principal")


def principal_for_key(conn: Connection, key_id: str) -> Principal | None:
    """The token's principal, or None when its key was revoked or its user deleted."""
    # A Core statement on a bare connection: none of the ORM's machinery.
    row = conn.execute(_PRINCIPAL, {"key_id": key_id}).first()
    return Principal(row[0], row[1], row[2], key_id) if row else None
