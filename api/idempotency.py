"""`Idempotency-Key` for POST /v1/jobs and /v1/batches (API.md).

The key is recorded (with a hash of the request) in its own committed
transaction before any work, so a concurrent twin sees it and gets 409; the
resource id is filled in by the same transaction that creates the resource.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from api import dbsession
from api.errors import ApiError
from spool.models import IdempotencyKey

WINDOW = timedelta(hours=24)
# A key still without a resource this long after it was taken was abandoned
# (its request died); another request may take it over.
ABANDONED = timedelta(seconds=60)
MAX_KEY_LEN = 255


def request_hash(path: str, body: bytes) -> str:
    return hashlib.sha256(path.encode() + b"\n" + body).hexdigest()


def claim(user_id: str, key: str, req_hash: str, rtype: str) -> str | None:
    """None: go ahead and create. A string: the id created earlier by this key."""
    if not key or len(key) > MAX_KEY_LEN:
        raise ApiError(
            422,
            "Idempotency-Key must be 1-255 characters",
            details={"Idempotency-Key": ["must be 1-255 characters"]},
        )
    now = datetime.now(UTC)
    with dbsession.transaction() as s:
        inserted = s.execute(
            insert(IdempotencyKey)
            .values(user_id=user_id, key=key, request_hash=req_hash, resource_type=rtype)
            .on_conflict_do_nothing()
            .returning(IdempotencyKey.key)
        ).first()
        if inserted:
            return None
        row = s.execute(
            select(IdempotencyKey)
            .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key)
            .with_for_update()
        ).scalar_one()
        stale = row.created_at < now - WINDOW or (
            row.resource_id is None and row.created_at < now - ABANDONED
        )
        if stale:
            row.request_hash, row.resource_type = req_hash, rtype
            row.resource_id, row.created_at = None, now
            return None
        if row.request_hash != req_hash or row.resource_type != rtype:
            raise ApiError(
                422,
                "Idempotency-Key was already used with a different request",
                "idempotency_key_reused",
                details={"Idempotency-Key": ["used with a different request body"]},
            )
        if row.resource_id is None:
            raise ApiError(
                409,
                "a request with this Idempotency-Key is still being processed",
                "idempotency_in_progress",
                headers={"Retry-After": "1"},
            )
        return row.resource_id


def complete(s: Session, user_id: str, key: str, resource_id: str) -> None:
    """Inside the transaction that creates the resource."""
    s.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == key)
        .values(resource_id=resource_id)
    )


def release(user_id: str, key: str) -> None:
    """The request failed before creating anything: free the key for a retry."""
    with dbsession.transaction() as s:
        s.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.user_id == user_id,
                IdempotencyKey.key == key,
                IdempotencyKey.resource_id.is_(None),
            )
        )
