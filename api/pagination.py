"""Newest-first cursor pagination shared by the job and batch lists."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select

from api import errors
from spool.users import Principal


def newest_first(stmt: Select, cols: Any, q: dict[str, Any], p: Principal) -> Select:
    """`stmt` limited to the user's rows (every user's for an admin asking `all`), after
    the cursor, newest first; `cols` has the `seq` and `user_id` columns."""
    stmt = stmt.order_by(cols.seq.desc()).limit(q["limit"] + 1)
    if not (q["all"] and p.is_admin):
        stmt = stmt.where(cols.user_id == p.user_id)
    if q.get("cursor"):
        try:
            stmt = stmt.where(cols.seq < int(q["cursor"]))
        except ValueError as exc:
            raise errors.ApiError(422, "invalid cursor", details={"cursor": ["invalid"]}) from exc
    return stmt


def split(rows: list[Any], limit: int) -> tuple[list[Any], str | None]:
    """The page (one extra row was fetched to know whether more follow) and its cursor."""
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, str(rows[-1].seq) if more else None
