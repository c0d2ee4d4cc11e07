"""Many-row INSERTs as one JSON parameter per chunk, expanded by PostgreSQL.

psycopg2 sends an executemany as multi-row VALUES statements that it interpolates
in the client: ~250 µs a job row. Here each chunk is one JSON array of arrays,
encoded by the C json encoder; columns whose value is the same in every row of
the chunk (a batch's user, timestamps, priority…) are sent once as parameters
instead. That costs ~15 µs a row all told (bench/bench_batch_intake.py; COPY in
text format was ~90 µs, its escaping being Python).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import JSON, String, Table, TextClause, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

CHUNK_ROWS = 5000
_DIALECT = postgresql.dialect()


def _default(value: Any) -> str:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _is_json(table: Table, name: str) -> bool:
    return isinstance(table.c[name].type, JSON)


def _sql_type(table: Table, name: str) -> str:
    col_type = table.c[name].type
    # Not VARCHAR(n): an explicit cast to it truncates silently, where assigning text
    # to the column refuses an over-long value as an executemany would.
    if isinstance(col_type, String):
        return "TEXT"
    return col_type.compile(dialect=_DIALECT)


@lru_cache(maxsize=64)
def _statement(table: Table, same: tuple[str, ...], varying: tuple[str, ...]) -> TextClause:
    exprs = []
    for name in same:
        exprs.append(f"CAST(:same_{name} AS {_sql_type(table, name)})")
    for i, name in enumerate(varying):
        if _is_json(table, name):
            exprs.append(f"NULLIF(e -> {i}, 'null'::jsonb)")  # JSON null → SQL NULL
        else:
            exprs.append(f"CAST(e ->> {i} AS {_sql_type(table, name)})")
    names = ", ".join(f'"{n}"' for n in same + varying)
    return text(
        f'INSERT INTO "{table.name}" ({names}) '
        f"SELECT {', '.join(exprs)} FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS e"
    )


def _split(rows: Sequence[dict[str, Any]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(columns equal in every row, the others), in the rows' key order."""
    first, last = rows[0], rows[-1]
    same = tuple(c for c in first if first[c] == last[c] and all(r[c] == first[c] for r in rows))
    return same, tuple(c for c in first if c not in same)


def insert(session: Session, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert rows that all have the same keys (column names); None becomes NULL.

    Rows are inserted in order (one function scan), so identity columns follow it.
    """
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[start : start + CHUNK_ROWS]
        same, varying = _split(chunk)
        params: dict[str, Any] = {}
        for name in same:
            value = chunk[0][name]
            if _is_json(table, name) and value is not None:
                value = json.dumps(value, separators=(",", ":"))
            params[f"same_{name}"] = value
        params["rows"] = json.dumps(
            [[r[c] for c in varying] for r in chunk], default=_default, separators=(",", ":")
        )
        session.execute(_statement(table, same, varying), params)
