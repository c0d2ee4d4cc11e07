"""Newest-first cursor pagination shared by the job and batch lists."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, select

from api import errors
from spool.users import Principal


def newest_first(model: Any, q: dict[str, Any], p: Principal) -> Select:
    """The user's rows (every user's for an admin asking `all`), after the cursor."""
    stmt = select(model).order_by(model.seq.desc()).limit(q["limit"] + 1)
    if not (q["all"] and p.is_admin):
        stmt = stmt.where(model.user_id == p.user_id)
    if q.get("cursor"):
        try:
            stmt = stmt.where(model.seq < int(q["cursor"]))
        except ValueError as exc:
            raise errors.ApiError(422, "invalid cursor", details={"cursor": ["invalid"]}) from exc
    return stmt


def split(rows: list[Any], limit: int) -> tuple[list[Any], str | None]:
    """The page (one extra row was fetched to know whether more follow) and its cursor."""
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, str(rows[-1].seq) if more else None
