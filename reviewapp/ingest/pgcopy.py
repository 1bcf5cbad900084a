"""COPY rows into a session-temporary staging table, for set-based writes on PostgreSQL hot paths.

Routing and scoring write thousands of rows per chunk. Django's ``bulk_update`` builds a ``CASE WHEN`` per
row and field, and even a multi-row INSERT or an ``unnest`` of arrays is slow to build on the client
(psycopg quotes array elements in Python under client-side binding). ``COPY`` rows are formatted in C by
psycopg, so a chunk is staged with one COPY and then moved with one ``INSERT ... SELECT`` or
``UPDATE ... FROM`` per target table, however many rows it has.

The staging tables live per database session (``ON COMMIT DELETE ROWS``) and are emptied before each use,
so two uses in one transaction (a test's outer transaction, a caller that routes twice) never see each
other's rows. PostgreSQL only; callers keep the ORM path for other databases.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from django.db import connection
from django.db.models.expressions import RawSQL

_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


def copy_stage(cursor: Any, *, table: str, columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]]) -> None:
    """(Create and) fill the temp table ``table`` with ``rows``; ``columns`` are (name, SQL type) pairs.

    ``cursor`` is a Django cursor on PostgreSQL inside the caller's transaction. Names are checked against a
    plain identifier pattern because they are interpolated (they are constants in the callers).
    """
    names = [name for name, _ in columns]
    if not all(_NAME.match(n) for n in [table, *names]):
        raise ValueError(f"bad staging identifier in {table}({', '.join(names)})")
    definition = ", ".join(f"{name} {sql_type}" for name, sql_type in columns)
    cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} ({definition}) ON COMMIT DELETE ROWS")
    cursor.execute(f"DELETE FROM {table}")  # noqa: S608 - constant identifiers, checked above
    with cursor.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def id_set(ids: Iterable[int]) -> Any:
    """A value for ``filter(pk__in=...)`` over thousands of ids. On PostgreSQL it is one array parameter
    (``IN (SELECT unnest(...))``): Django and psycopg spend milliseconds per thousand placeholders building and
    splitting ``IN (%s, %s, ...)``, several times per scoring chunk. Elsewhere, the plain list."""
    values = [int(i) for i in ids]
    if connection.vendor != "postgresql":
        return values
    return RawSQL("SELECT unnest(%s::bigint[])", ["{" + ",".join(map(str, values)) + "}"])


def id_array(ids: Iterable[int]) -> str:
    """Ids as one PostgreSQL array literal, for ``WHERE id = ANY(%s::bigint[])`` in raw SQL on a hot path.

    Unlike ``IN (SELECT unnest(...))`` (``id_set``), ``= ANY`` lets the planner probe the column's index for
    exactly these ids, with a row estimate of their number. The subquery form is estimated at 200 rows and
    joined by hash: with statistics that lag behind a bulk load it scanned every ``received`` item per chunk."""
    return "{" + ",".join(map(str, map(int, ids))) + "}"
