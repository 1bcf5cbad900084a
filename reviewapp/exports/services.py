"""Labeled feedback out of the system: streamed, typed, with provenance, reproducible by snapshot.

One query shape serves every door (API stream, export job, CLI). A *snapshot* pins the rows: labels that
existed at the cut-off (id and time) and were not withdrawn by then, in label-id order, so the same
filters at the same cut-off give the same bytes. On PostgreSQL the rows leave the database through
``COPY ... TO STDOUT`` (CSV and JSON lines built by the server; Parquet through pyarrow's CSV reader),
never materialised; elsewhere (the embedded SQLite default) an ORM iterator produces the same columns.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from reviewapp.core.audit import audit_record
from reviewapp.core.errors import ValidationFailed
from reviewapp.core.models import AuditEvent
from reviewapp.exports.models import ExportJob
from reviewapp.ingest.models import Source
from reviewapp.review.models import Label, ReviewTask

FORMATS = ("csv", "jsonl", "parquet")
CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}
# Cells starting with these are read as formulas by spreadsheet programs.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_JSON_TYPES = {"number": "float64", "integer": "int64", "boolean": "bool"}
OnRows = Callable[[int], None] | None


@dataclass(frozen=True)
class ExportFilters:
    since: datetime | None = None
    until: datetime | None = None
    label: str | None = None
    origin: str | None = None
    reviewer: str | None = None
    model_version: int | None = None
    qa_only: bool = False
    agreed_only: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("since", "until"):
            if data[key] is not None:
                data[key] = data[key].isoformat()
        return {k: v for k, v in data.items() if v not in (None, False)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportFilters:
        values = dict(data)
        for key in ("since", "until"):
            if isinstance(values.get(key), str):
                values[key] = parse_datetime(values[key])
        return cls(**values)


@dataclass(frozen=True)
class Snapshot:
    cutoff: datetime
    max_label_id: int
    last_audit_event_id: int | None

    @classmethod
    def now(cls) -> Snapshot:
        return cls(
            cutoff=timezone.now(),
            max_label_id=Label.objects.order_by("-id").values_list("id", flat=True).first() or 0,
            last_audit_event_id=AuditEvent.objects.order_by("-id").values_list("id", flat=True).first(),
        )


@dataclass(frozen=True)
class Column:
    name: str
    arrow_type: str  # string, float64, int64, bool, timestamp, list<string>
    # An expression over the aliases in _from(); for a list<string> column, a text[] (CSV joins it with ";").
    sql: str
    is_text: bool = field(default=False)


def _payload_fields(source: Source) -> list[tuple[str, str]]:
    schema = source.schema_versions.order_by("-major", "-minor").first()
    props = (schema.json_schema if schema else {}).get("properties", {})
    skip = {source.id_field, source.label_field}
    return [(name, _JSON_TYPES.get(spec.get("type"), "string")) for name, spec in props.items() if name not in skip]


def _quote_key(name: str) -> str:
    """A SQL string literal for a name. Every statement here goes through psycopg's parameter formatting,
    so a % is doubled too."""
    return "'" + name.replace("'", "''").replace("%", "%%") + "'"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""').replace("%", "%%") + '"'


# --- reviewers: everyone who answered in the round that produced the label ------------------------------

LIST_OF_STRINGS = "list<string>"
# How a list column travels inside a CSV cell on its way to Parquet: a byte no username holds.
_LIST_SEP = "\x1f"
# The two tasks of a double review share an item and a round (reviewapp.review.services.PAIR_KINDS);
# adjudications and escalations point at the task they came from (``parent``).
_PAIR_KINDS_SQL = f"('{ReviewTask.Kind.REVIEW.value}', '{ReviewTask.Kind.DOUBLE.value}')"
_ADMIN_KINDS_SQL = f"('{ReviewTask.Kind.ADJUDICATION.value}', '{ReviewTask.Kind.ESCALATION.value}')"
_ADMIN_KINDS = (ReviewTask.Kind.ADJUDICATION, ReviewTask.Kind.ESCALATION)
# The round whose pair answered: the label's verdict's own when its task is one of a double review's pair,
# else the round of the paired task an adjudication or escalation came from (t: the verdict's task, pt:
# its parent). NULL for a single review, a QA sample and an import.
_PAIR_ROUND_SQL = "CASE WHEN {t}.paired THEN {t}.round WHEN {t}.kind IN {admin} AND {pt}.paired THEN {pt}.round END"
# The pair's names (in order of their verdicts) and then the label's verdict's reviewer (the adjudicator,
# who answers last) unless already among them; one name when there was no pair; NULL for an import, like
# ``reviewer``.
_REVIEWERS_SQL = (
    "CASE WHEN v.id IS NULL THEN NULL WHEN rv.names IS NULL THEN ARRAY[u.username::text]"
    " WHEN u.username = ANY(rv.names) THEN rv.names ELSE rv.names || u.username::text END"
)


def _final_round_sql(spec: ExportSpec, label_ids: list[int] | None = None) -> tuple[str, list[Any]]:
    """Rows (label_id, username, first_at): each person who gave a verdict in the final round of a label of
    the snapshot that more than one verdict may have produced (a double review, an adjudication or an
    escalation): the pair's verdicts of _PAIR_ROUND_SQL's round and the label's own. Verdicts count as of
    the cut-off (withdrawn after it still count), so a snapshot reproduces. Portable SQL: the SQLite path
    and the reviewer filter use it; the COPY path's _from gives the same names from a cheaper join."""
    snap = spec.snapshot
    pair_round = _PAIR_ROUND_SQL.format(t="lt", pt="pt", admin=_ADMIN_KINDS_SQL)
    # Only constants are interpolated (the kinds); every value is a parameter.
    sql = f"""
SELECT fl.id AS label_id, fu.username AS username, min(fv.created_at) AS first_at
FROM review_label fl
JOIN review_verdict lv ON lv.id = fl.verdict_id
JOIN review_reviewtask lt ON lt.id = lv.task_id
LEFT JOIN review_reviewtask pt ON pt.id = lt.parent_id
JOIN review_verdict fv ON fv.item_id = fl.item_id
JOIN review_reviewtask ft ON ft.id = fv.task_id
JOIN auth_user fu ON fu.id = fv.reviewer_id
WHERE fl.source_id = %s AND fl.id <= %s AND fl.created_at <= %s AND (fl.withdrawn_at IS NULL OR fl.withdrawn_at > %s)
  AND (lt.paired OR lt.kind IN {_ADMIN_KINDS_SQL})
  AND fv.created_at <= %s AND (fv.withdrawn_at IS NULL OR fv.withdrawn_at > %s)
  AND (fv.id = lv.id OR (ft.paired AND ft.round = {pair_round}))"""  # noqa: S608
    params: list[Any] = [spec.source.pk, snap.max_label_id, snap.cutoff, snap.cutoff, snap.cutoff, snap.cutoff]
    if label_ids is not None:
        sql += f"\n  AND fl.id IN ({', '.join(['%s'] * len(label_ids))})"
        params += label_ids
    return sql + "\nGROUP BY fl.id, fu.username", params


def _from(spec: ExportSpec) -> tuple[str, list[Any]]:
    """_FROM and, for the reviewers, the label's verdict's task and a join to one aggregate of the source's
    double reviews, by (item, round): the names of the pair in order of their verdicts, then by code point,
    so the same snapshot gives the same list. A subquery per row (or an aggregate keyed by label, which
    scans the labels and verdicts again) cost 2.5x and 1.5x the export's time; this about 1.25x on reviewed
    rows and 1.1x on imports (docs/benchmarks.md)."""
    snap = spec.snapshot
    pair_round = _PAIR_ROUND_SQL.format(t="t", pt="pt", admin=_ADMIN_KINDS_SQL)
    names = 'array_agg(y.username::text ORDER BY y.first_at, y.username COLLATE "C")'
    join = f"""LEFT JOIN review_reviewtask t ON t.id = v.task_id
LEFT JOIN review_reviewtask pt ON pt.id = t.parent_id
LEFT JOIN (SELECT y.item_id, y.round, {names} AS names FROM (
  SELECT ft.item_id, ft.round, fu.username, min(fv.created_at) AS first_at
  FROM review_reviewtask ft
  JOIN review_verdict fv ON fv.task_id = ft.id
  JOIN auth_user fu ON fu.id = fv.reviewer_id
  WHERE ft.source_id = %s AND ft.paired AND fv.created_at <= %s AND (fv.withdrawn_at IS NULL OR fv.withdrawn_at > %s)
  GROUP BY ft.item_id, ft.round, fu.username) y GROUP BY y.item_id, y.round
) rv ON rv.item_id = l.item_id AND rv.round = {pair_round}
"""  # noqa: S608
    return _FROM + join, [spec.source.pk, snap.cutoff, snap.cutoff]


def export_columns(source: Source, *, include_raw: bool = False) -> list[Column]:
    iso = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
    cols = [Column("source", "string", "s.slug", True), Column("external_id", "string", "i.external_id", True)]
    for name, arrow_type in _payload_fields(source):
        cols.append(Column(name, arrow_type, f"(i.payload ->> {_quote_key(name)})", arrow_type == "string"))
    cols += [
        Column("label", "string", "l.label", True),
        Column("label_origin", "string", "l.origin"),
        Column("reviewer", "string", "u.username", True),
        Column("reviewers", LIST_OF_STRINGS, _REVIEWERS_SQL, True),
        Column("verdict_at", "timestamp", iso.format("v.created_at")),
        Column("handling_ms", "int64", "v.handling_ms"),
        Column("model_version", "int64", "mv.version"),
        Column("predicted_label", "string", "p.top_label", True),
        Column("confidence", "float64", "p.confidence"),
        Column("prediction_set", "string", "p.prediction_set::text", True),
        Column("policy_version", "int64", "pol.version"),
        Column("schema_version", "string", "(sv.major || '.' || sv.minor)"),
        Column("batch_id", "int64", "i.batch_id"),
        Column("labeled_at", "timestamp", iso.format("l.created_at")),
    ]
    if include_raw:
        cols.append(Column("payload_json", "string", "i.payload::text", True))
    return cols


_FROM = """
FROM review_label l
JOIN ingest_item i ON i.id = l.item_id
JOIN ingest_source s ON s.id = l.source_id
JOIN ingest_schemaversion sv ON sv.id = i.schema_version_id
LEFT JOIN review_verdict v ON v.id = l.verdict_id
LEFT JOIN auth_user u ON u.id = v.reviewer_id
LEFT JOIN review_decision d ON d.id = l.decision_id
LEFT JOIN scoring_prediction p ON p.id = d.prediction_id
LEFT JOIN scoring_modelversion mv ON mv.id = p.model_version_id
LEFT JOIN review_policy pol ON pol.id = d.policy_id
"""


@dataclass(frozen=True)
class ExportSpec:
    source: Source
    fmt: str
    filters: ExportFilters
    snapshot: Snapshot
    include_raw: bool = False

    @property
    def columns(self) -> list[Column]:
        return export_columns(self.source, include_raw=self.include_raw)


def _where(spec: ExportSpec) -> tuple[str, list[Any]]:
    f, snap = spec.filters, spec.snapshot
    clauses = [
        "l.source_id = %s",
        "l.id <= %s",
        "l.created_at <= %s",
        "(l.withdrawn_at IS NULL OR l.withdrawn_at > %s)",
    ]
    params: list[Any] = [spec.source.pk, snap.max_label_id, snap.cutoff, snap.cutoff]
    if f.since:
        clauses.append("l.created_at >= %s")
        params.append(f.since)
    if f.until:
        clauses.append("l.created_at < %s")
        params.append(f.until)
    if f.label:
        clauses.append("l.label = %s")
        params.append(f.label)
    if f.origin:
        clauses.append("l.origin = %s")
        params.append(f.origin)
    if f.qa_only:
        clauses.append("l.origin = 'qa'")
    if f.reviewer:
        # Any of the label's reviewers: the verdict's own, or one of its final round's.
        final, final_params = _final_round_sql(spec)
        in_final = f"SELECT fr.label_id FROM ({final}) fr WHERE fr.username = %s"  # noqa: S608
        clauses.append(f"(u.username = %s OR l.id IN ({in_final}))")
        params += [f.reviewer, *final_params, f.reviewer]
    if f.model_version is not None:
        clauses.append("mv.version = %s")
        params.append(f.model_version)
    if f.agreed_only:
        # At least two reviewers answered the item, all with the same label.
        clauses.append(
            "(SELECT count(DISTINCT av.reviewer_id) FROM review_verdict av"
            " WHERE av.item_id = i.id AND (av.withdrawn_at IS NULL OR av.withdrawn_at > %s)"
            " AND av.created_at <= %s) >= 2"
            " AND NOT EXISTS (SELECT 1 FROM review_verdict dv WHERE dv.item_id = i.id"
            " AND (dv.withdrawn_at IS NULL OR dv.withdrawn_at > %s) AND dv.created_at <= %s AND dv.label <> l.label)"
        )
        # Verdicts as they stood at the cut-off (a later withdrawal changes nothing): same bytes at the same cut-off.
        params += [snap.cutoff, snap.cutoff, snap.cutoff, snap.cutoff]
    return " AND ".join(clauses), params


def count_rows(spec: ExportSpec) -> int:
    where, params = _where(spec)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) {_FROM} WHERE {where}", params)
        return int(cursor.fetchone()[0])


def _neutralised(expr: str) -> str:
    return f"CASE WHEN left({expr}, 1) IN ('=', '+', '-', '@', E'\\t', E'\\r') THEN '''' || {expr} ELSE {expr} END"


def _select_sql(spec: ExportSpec, *, csv_safe: bool) -> tuple[str, list[Any]]:
    """One text value per column (a list joined with ";" for CSV, with _LIST_SEP on its way to Parquet)."""
    exprs = []
    for col in spec.columns:
        expr = col.sql
        if col.arrow_type == LIST_OF_STRINGS:
            expr = f"array_to_string({expr}, {_quote_key(';' if csv_safe else _LIST_SEP)})"
        expr = _neutralised(expr) if csv_safe and col.is_text else expr
        exprs.append(f"{expr} AS {_quote_ident(col.name)}")
    from_sql, from_params = _from(spec)
    where, params = _where(spec)
    return f"SELECT {', '.join(exprs)} {from_sql} WHERE {where} ORDER BY l.id", from_params + params


def _bound(sql: str, params: list[Any]) -> str:
    """COPY takes no server-side parameters: bind them client-side, quoted by psycopg."""
    from psycopg import ClientCursor

    raw = connection.connection  # the psycopg connection behind Django's wrapper
    with ClientCursor(raw) as cursor:
        return cursor.mogrify(sql, params)


def _raw_connection() -> Any:
    """The psycopg connection behind Django's, taken in the calling thread (pyarrow reads from another)."""
    connection.ensure_connection()
    return connection.connection


def _copy_blocks(statement: str, raw: Any = None) -> Iterator[bytes]:
    raw = raw or _raw_connection()
    with raw.cursor() as cursor, cursor.copy(statement) as copy:
        for block in copy:
            yield bytes(block)


def _copy_chunks(statement: str, raw: Any, size: int = 1 << 18) -> Iterator[bytes]:
    """The COPY output in chunks of about ``size`` bytes. PostgreSQL sends one message per row; the
    consumers (pyarrow's reader, the HTTP response, the job's file, hash and progress) pay per chunk."""
    pending: list[bytes] = []
    held = 0
    with raw.cursor() as cursor, cursor.copy(statement) as copy:
        for block in copy:
            pending.append(block)
            held += len(block)
            if held >= size:
                yield b"".join(pending)
                pending, held = [], 0
    if pending:
        yield b"".join(pending)


def _csv_batches(statement: str, read: Any, convert: Any) -> Iterator[Any]:
    """Record batches of a ``COPY ... (FORMAT csv)``, read by pyarrow as the stream arrives; none when the
    query has no rows (pyarrow refuses an empty file)."""
    import pyarrow.csv as pacsv

    chunks = _copy_chunks(statement, _raw_connection(), 1 << 20)
    first = next(chunks, None)
    if first is None:
        return
    source = io.BufferedReader(_BlockReader(itertools.chain([first], chunks)), buffer_size=1 << 20)
    yield from pacsv.open_csv(
        source, read_options=read, convert_options=convert, parse_options=pacsv.ParseOptions(newlines_in_values=True)
    )


def _pg_csv(spec: ExportSpec) -> Iterator[bytes]:
    sql, params = _select_sql(spec, csv_safe=True)
    yield from _copy_chunks(f"COPY ({_bound(sql, params)}) TO STDOUT WITH (FORMAT csv, HEADER true)", _raw_connection())


def jsonl_values(spec: ExportSpec) -> list[tuple[str, str]]:
    """(name, SQL expression of the JSON value) per key, in column order. Payload values keep their JSON
    type (jsonb), the prediction set and the raw payload stay JSON, integers are JSON numbers as they are,
    and text, timestamps and floats go through ``to_json`` (escaping, and NaN or Infinity as strings)."""
    values = []
    for col in spec.columns:
        if col.sql.startswith("(i.payload ->>"):
            values.append((col.name, col.sql.replace("->>", "->", 1) + "::text"))
        elif col.name == "prediction_set":
            values.append((col.name, "p.prediction_set::text"))
        elif col.name == "payload_json":
            values.append((col.name, "i.payload::text"))
        elif col.arrow_type == "int64":
            values.append((col.name, f"({col.sql})::text"))
        elif col.arrow_type == LIST_OF_STRINGS:  # a JSON array, as json_build_object writes a text[]
            values.append((col.name, f"to_json({col.sql})::text"))
        else:
            values.append((col.name, f"to_json({col.sql})::text"))
    return values


def pg_json_escape(text: str) -> str:
    """A JSON string literal exactly as PostgreSQL's escape_json writes it (non-ASCII kept as UTF-8)."""
    return '"' + "".join(_JSON_ESCAPES.get(ch, ch) for ch in text) + '"'


_JSON_ESCAPES = {chr(n): f"\\u{n:04x}" for n in range(0x20)} | {
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    '"': '\\"',
    "\\": "\\\\",
}


def _pg_jsonl(spec: ExportSpec) -> Iterator[bytes]:
    """JSON lines, byte for byte what ``json_build_object(...)::text`` writes, at nearly the speed of a COPY.

    Each line is one text value concatenated in SQL: the keys as literals, each value as its JSON text.
    json_build_object sorts out every argument's type again on every row, which made it run at about half
    the speed of the plain COPY; concatenation costs PostgreSQL a few percent more than the CSV text does.
    Python only passes the bytes on.
    """
    parts = []
    for n, (name, value) in enumerate(jsonl_values(spec)):
        parts += [_quote_key(("{" if n == 0 else ", ") + pg_json_escape(name) + " : "), f"coalesce({value}, 'null')"]
    from_sql, from_params = _from(spec)
    where, params = _where(spec)
    sql = f"SELECT {' || '.join(parts)} || '}}' {from_sql} WHERE {where} ORDER BY l.id"
    # CSV format with quote and delimiter bytes that JSON text never holds raw: each line is the JSON as is.
    yield from _copy_chunks(
        f"COPY ({_bound(sql, from_params + params)}) TO STDOUT WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')",
        _raw_connection(),
    )


class _BlockReader(io.RawIOBase):
    """A read-only file over an iterator of byte blocks, for pyarrow's streaming CSV reader."""

    def __init__(self, blocks: Iterator[bytes], on_bytes: Callable[[bytes], None] | None = None) -> None:
        self._blocks, self._pending, self._on_bytes = blocks, b"", on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._blocks)
            except StopIteration:
                return 0
            if self._on_bytes:
                self._on_bytes(self._pending)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _arrow_schema(cols: list[Column]) -> Any:
    import pyarrow as pa

    types = {
        "string": pa.string(),
        "float64": pa.float64(),
        "int64": pa.int64(),
        "bool": pa.bool_(),
        "timestamp": pa.timestamp("us", tz="UTC"),
        LIST_OF_STRINGS: pa.list_(pa.string()),
    }
    return pa.schema([(c.name, types[c.arrow_type]) for c in cols])


class _Sink(io.RawIOBase):
    """Collects what the Parquet writer writes so a generator can hand it on chunk by chunk."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        out, self.chunks = b"".join(self.chunks), []
        return out


def _parquet_from_batches(schema: Any, batches: Iterator[Any], on_rows: OnRows = None) -> Iterator[bytes]:
    import pyarrow.parquet as pq

    sink = _Sink()
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        for batch in batches:
            writer.write_batch(batch)
            if on_rows is not None:
                on_rows(batch.num_rows)
            data = sink.drain()
            if data:
                yield data
    yield sink.drain()


def _pg_parquet(spec: ExportSpec, on_rows: OnRows = None) -> Iterator[bytes]:
    import pyarrow.csv as pacsv

    cols = spec.columns
    schema = _arrow_schema(cols)
    # CSV has no lists: a list column arrives as text joined with _LIST_SEP and is split per batch.
    text_schema = _arrow_schema([Column(c.name, "string", "") if c.arrow_type == LIST_OF_STRINGS else c for c in cols])
    sql, params = _select_sql(spec, csv_safe=False)
    reader = _csv_batches(
        f"COPY ({_bound(sql, params)}) TO STDOUT WITH (FORMAT csv, HEADER false)",
        pacsv.ReadOptions(column_names=[c.name for c in cols], block_size=8 << 20),
        pacsv.ConvertOptions(
            column_types=text_schema,
            check_utf8=False,
            # Only an unquoted empty field is SQL NULL; text such as "NA" or "null" stays text.
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    lists = [n for n, c in enumerate(cols) if c.arrow_type == LIST_OF_STRINGS]
    yield from _parquet_from_batches(schema, (_split_lists(batch, schema, lists) for batch in reader), on_rows)


def _split_lists(batch: Any, schema: Any, positions: list[int]) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    arrays = batch.columns
    for n in positions:  # a null stays null (no verdict); a name never holds the separator
        arrays[n] = pc.split_pattern(arrays[n], _LIST_SEP)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# --- the portable path (SQLite and anything else) -------------------------------------------------------


def _final_round_names(spec: ExportSpec, labels: list[Label]) -> dict[int, list[str]]:
    """The reviewers of those of ``labels`` that went through more than one verdict, in the COPY path's order."""
    ids = [
        lab.pk for lab in labels if lab.verdict and (lab.verdict.task.paired or lab.verdict.task.kind in _ADMIN_KINDS)
    ]
    if not ids:
        return {}
    sql, params = _final_round_sql(spec, ids)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        found = cursor.fetchall()
    names: dict[int, list[str]] = {}
    # Code point order of the names, as COLLATE "C" on PostgreSQL; SQLite gives the time back as text in
    # one fixed format, which sorts as the time does.
    for label_id, username, _ in sorted(found, key=lambda r: (r[0], r[2], r[1])):
        names.setdefault(label_id, []).append(username)
    return names


def _python_rows(spec: ExportSpec) -> Iterator[dict[str, Any]]:
    from django.db.models import Q
    from django.db.models.expressions import RawSQL

    f, snap = spec.filters, spec.snapshot
    qs = Label.objects.filter(
        Q(withdrawn_at__isnull=True) | Q(withdrawn_at__gt=snap.cutoff),
        source=spec.source,
        id__lte=snap.max_label_id,
        created_at__lte=snap.cutoff,
    ).select_related(
        "item__schema_version",
        "verdict__reviewer",
        "verdict__task",
        "decision__prediction__model_version",
        "decision__policy",
    )
    if f.since:
        qs = qs.filter(created_at__gte=f.since)
    if f.until:
        qs = qs.filter(created_at__lt=f.until)
    if f.label:
        qs = qs.filter(label=f.label)
    if f.origin:
        qs = qs.filter(origin=f.origin)
    if f.qa_only:
        qs = qs.filter(origin=Label.Origin.QA)
    if f.reviewer:
        final, final_params = _final_round_sql(spec)
        # The same portable SQL as the COPY path's filter; values are parameters.
        in_final = RawSQL(  # noqa: S611
            f"SELECT fr.label_id FROM ({final}) fr WHERE fr.username = %s",  # noqa: S608
            [*final_params, f.reviewer],
        )
        qs = qs.filter(Q(verdict__reviewer__username=f.reviewer) | Q(id__in=in_final))
    if f.model_version is not None:
        qs = qs.filter(decision__prediction__model_version__version=f.model_version)
    payload_names = [name for name, _ in _payload_fields(spec.source)]
    for chunk in _chunks(qs.order_by("id").iterator(chunk_size=2000), 2000):
        names = _final_round_names(spec, chunk)
        for lab in chunk:
            row = _python_row(spec, lab, payload_names, names)
            if row is not None:
                yield row


def _chunks(rows: Iterator[Label], size: int) -> Iterator[list[Label]]:
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def _python_row(
    spec: ExportSpec, lab: Label, payload_names: list[str], names: dict[int, list[str]]
) -> dict[str, Any] | None:
    f, snap = spec.filters, spec.snapshot
    item, verdict, decision = lab.item, lab.verdict, lab.decision
    if f.agreed_only:
        answers = item.verdicts.filter(
            Q(withdrawn_at__isnull=True) | Q(withdrawn_at__gt=snap.cutoff), created_at__lte=snap.cutoff
        )
        if answers.values("reviewer").distinct().count() < 2 or answers.exclude(label=lab.label).exists():
            return None
    prediction = decision.prediction if decision else None
    row: dict[str, Any] = {"source": spec.source.slug, "external_id": item.external_id}
    row.update({name: item.payload.get(name) for name in payload_names})
    row.update(
        label=lab.label,
        label_origin=lab.origin,
        reviewer=verdict.reviewer.get_username() if verdict else None,
        reviewers=names.get(lab.pk, [verdict.reviewer.get_username()]) if verdict else None,
        verdict_at=verdict.created_at if verdict else None,
        handling_ms=verdict.handling_ms if verdict else None,
        model_version=prediction.model_version.version if prediction else None,
        predicted_label=prediction.top_label if prediction else None,
        confidence=prediction.confidence if prediction else None,
        prediction_set=prediction.prediction_set if prediction else None,
        policy_version=decision.policy.version if decision and decision.policy else None,
        schema_version=item.schema_version.label,
        batch_id=item.batch_id,
        labeled_at=lab.created_at,
    )
    if spec.include_raw:
        row["payload_json"] = item.payload
    return row


def neutralise_cell(value: Any) -> Any:
    """Defuse spreadsheet formula injection in a text cell with a leading quote."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def _iso(value: Any) -> Any:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if isinstance(value, datetime) else value


def _csv_cell(value: Any, is_text: bool) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        value = json.dumps(value)
    value = _iso(value)
    return neutralise_cell(value) if is_text else value


def _flat(row: dict[str, Any], lists: set[str]) -> dict[str, Any]:
    """Parquet keeps nested values as JSON text columns, except the typed list columns."""
    return {k: json.dumps(v) if isinstance(v, list | dict) and k not in lists else v for k, v in row.items()}


def _python_stream(spec: ExportSpec, on_rows: OnRows = None) -> Iterator[bytes]:
    cols = spec.columns
    names = [c.name for c in cols]
    text_cols = {c.name for c in cols if c.is_text}
    lists = {c.name for c in cols if c.arrow_type == LIST_OF_STRINGS}
    if spec.fmt == "parquet":
        import pyarrow as pa

        schema = _arrow_schema(cols)

        def batches() -> Iterator[Any]:
            chunk: list[dict[str, Any]] = []
            for row in _python_rows(spec):
                chunk.append(row)
                if len(chunk) >= 20000:
                    yield pa.RecordBatch.from_pylist([_flat(r, lists) for r in chunk], schema=schema)
                    chunk = []
            if chunk:
                yield pa.RecordBatch.from_pylist([_flat(r, lists) for r in chunk], schema=schema)

        yield from _parquet_from_batches(schema, batches(), on_rows)
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if spec.fmt == "csv":
        writer.writerow(names)
    for n, row in enumerate(_python_rows(spec), start=1):
        if spec.fmt == "csv":
            cells = {c: ";".join(row[c]) if c in lists and row[c] is not None else row[c] for c in names}
            writer.writerow([_csv_cell(cells[c], c in text_cols) for c in names])
        else:
            buffer.write(json.dumps({c: _iso(row[c]) for c in names}, separators=(",", ":")) + "\n")
        if n % 1000 == 0:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()


def stream_export(spec: ExportSpec, *, on_rows: OnRows = None) -> Iterator[bytes]:
    """The export's bytes, chunk by chunk, in constant memory. ``on_rows`` hears each Parquet batch's row
    count as it is written (a binary file has no lines for a progress bar to count)."""
    if spec.fmt not in FORMATS:
        raise ValidationFailed("Unsupported export format.", [{"field": "format", "message": f"one of {FORMATS}"}])
    if connection.vendor != "postgresql":
        return _python_stream(spec, on_rows)
    if spec.fmt == "parquet":
        return _pg_parquet(spec, on_rows)
    return {"csv": _pg_csv, "jsonl": _pg_jsonl}[spec.fmt](spec)


# --- services: the three doors call these ----------------------------------------------------------------


def _validate(source: Source, fmt: str, filters: ExportFilters) -> None:
    errors = []
    if fmt not in FORMATS:
        errors.append({"field": "format", "message": f"must be one of {', '.join(FORMATS)}"})
    if filters.label and filters.label not in source.labels:
        errors.append({"field": "label", "message": f"{filters.label!r} is not in the label set"})
    if filters.origin and filters.origin not in Label.Origin.values:
        errors.append({"field": "origin", "message": f"must be one of {', '.join(Label.Origin.values)}"})
    if filters.since and filters.until and filters.since >= filters.until:
        errors.append({"field": "until", "message": "must be after since"})
    if errors:
        raise ValidationFailed("Invalid export request.", errors)


def labels_export_stream(
    *,
    actor: Any,
    source: Source,
    fmt: str,
    filters: ExportFilters,
    snapshot: Snapshot | None = None,
    include_raw: bool = False,
) -> tuple[ExportSpec, Iterator[bytes]]:
    """A streamed export (API and CLI): audited, then produced lazily."""
    _validate(source, fmt, filters)
    snapshot = snapshot or Snapshot.now()
    spec = ExportSpec(source=source, fmt=fmt, filters=filters, snapshot=snapshot, include_raw=include_raw)
    with transaction.atomic():
        audit_record(
            actor=actor,
            verb="labels.exported",
            object_type="source",
            object_id=source.pk,
            after={
                "format": fmt,
                "filters": filters.to_dict(),
                "cutoff": snapshot.cutoff.isoformat(),
                "max_label_id": snapshot.max_label_id,
                "streamed": True,
            },
        )
    return spec, stream_export(spec)


def export_job_create(
    *,
    actor: Any,
    source: Source,
    fmt: str,
    filters: ExportFilters,
    include_raw: bool = False,
    snapshot: Snapshot | None = None,
) -> ExportJob:
    """An asynchronous export: the snapshot is taken now, the file is written by a worker."""
    _validate(source, fmt, filters)
    snapshot = snapshot or Snapshot.now()
    with transaction.atomic():
        job = ExportJob.objects.create(
            source=source,
            file_format=fmt,
            filters=filters.to_dict(),
            include_raw=include_raw,
            cutoff=snapshot.cutoff,
            max_label_id=snapshot.max_label_id,
            last_audit_event_id=snapshot.last_audit_event_id,
            created_by=actor if getattr(actor, "pk", None) else None,
        )
        audit_record(
            actor=actor,
            verb="export.requested",
            object_type="export",
            object_id=job.pk,
            after={"format": fmt, "filters": job.filters, "cutoff": snapshot.cutoff.isoformat()},
        )
        transaction.on_commit(lambda: _enqueue(job.pk))
    return job


def _enqueue(job_id: int) -> None:
    from reviewapp.exports.tasks import run_export

    run_export.delay(job_id=job_id)


def job_spec(job: ExportJob) -> ExportSpec:
    return ExportSpec(
        source=job.source,
        fmt=job.file_format,
        filters=ExportFilters.from_dict(job.filters),
        snapshot=Snapshot(job.cutoff, job.max_label_id, job.last_audit_event_id),
        include_raw=job.include_raw,
    )


def export_file_path(job: ExportJob) -> Path:
    return Path(settings.EXPORT_ROOT) / f"export-{job.pk}.{job.file_format}"


def export_job_run(*, job_id: int) -> ExportJob:
    """Write the job's file (task body). Safe to run twice: a finished job is left alone, and a rerun
    rewrites the same bytes from the same snapshot."""
    with transaction.atomic():
        job = ExportJob.objects.select_for_update().select_related("source").get(pk=job_id)
        if job.status in (ExportJob.Status.DONE, ExportJob.Status.FAILED):
            return job
        job.status, job.attempts, job.state_changed_at = ExportJob.Status.RUNNING, job.attempts + 1, timezone.now()
        job.save(update_fields=["status", "attempts", "state_changed_at"])
    spec = job_spec(job)
    total = count_rows(spec)
    ExportJob.objects.filter(pk=job.pk).update(total_rows=total)
    path = export_file_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    digest, size, lines = hashlib.sha256(), 0, 0
    with partial.open("wb") as out, _ProgressReporter(job.pk) as progress:

        def advance(rows: int) -> None:
            nonlocal lines
            lines += rows
            progress.report(min(lines, total))

        for chunk in stream_export(spec, on_rows=advance):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            if spec.fmt != "parquet":
                lines += chunk.count(b"\n")
                progress.report(min(lines, total))
    partial.replace(path)  # the finished file appears whole or not at all
    manifest = build_manifest(job, spec, rows=total, sha256=digest.hexdigest(), size=size)
    path.with_suffix(path.suffix + ".manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with transaction.atomic():
        ExportJob.objects.filter(pk=job.pk).update(
            status=ExportJob.Status.DONE,
            rows_written=total,
            file_path=str(path),
            size_bytes=size,
            sha256=digest.hexdigest(),
            manifest=manifest,
            finished_at=timezone.now(),
            state_changed_at=timezone.now(),
        )
        audit_record(
            actor=job.created_by,
            verb="export.finished",
            object_type="export",
            object_id=job.pk,
            after={"rows": total, "sha256": digest.hexdigest(), "bytes": size},
        )
    return ExportJob.objects.get(pk=job.pk)


class _ProgressReporter:
    """Writes a job's live row count at most twice a second. On PostgreSQL it needs its own connection:
    the export's connection is busy streaming the COPY and would deadlock on a second statement."""

    def __init__(self, job_id: int, interval: float = 0.5) -> None:
        self.job_id, self.interval, self._last, self._conn = job_id, interval, 0.0, None

    def __enter__(self) -> _ProgressReporter:
        if connection.vendor == "postgresql":
            import psycopg

            params = connection.get_connection_params()
            params.pop("cursor_factory", None)
            self._conn = psycopg.connect(**params, autocommit=True)
        return self

    def report(self, rows: int) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        if self._conn is not None:
            self._conn.execute("UPDATE exports_exportjob SET rows_written = %s WHERE id = %s", [rows, self.job_id])
        else:
            ExportJob.objects.filter(pk=self.job_id).update(rows_written=rows)

    def __exit__(self, *exc: object) -> None:
        if self._conn is not None:
            self._conn.close()


def build_manifest(job: ExportJob, spec: ExportSpec, *, rows: int, sha256: str, size: int) -> dict[str, Any]:
    return {
        "export_id": job.pk,
        "source": spec.source.slug,
        "format": spec.fmt,
        "filters": spec.filters.to_dict(),
        "include_raw": spec.include_raw,
        "cutoff": spec.snapshot.cutoff.isoformat(),
        "max_label_id": spec.snapshot.max_label_id,
        "last_audit_event_id": spec.snapshot.last_audit_event_id,
        "row_count": rows,
        "columns": [{"name": c.name, "type": c.arrow_type} for c in spec.columns],
        "sha256": sha256,
        "size_bytes": size,
        "created_by": job.created_by.get_username() if job.created_by else None,
        "created_at": job.created_at.isoformat(),
    }


def export_job_fail(*, job_id: int, reason: str) -> None:
    with transaction.atomic():
        updated = (
            ExportJob.objects.filter(pk=job_id)
            .exclude(status=ExportJob.Status.DONE)
            .update(
                status=ExportJob.Status.FAILED,
                error=reason[:2000],
                finished_at=timezone.now(),
                state_changed_at=timezone.now(),
            )
        )
        if updated:
            audit_record(
                actor=None, verb="export.failed", object_type="export", object_id=job_id, after={"reason": reason[:500]}
            )


def export_verify(job: ExportJob) -> bool:
    """True when the file on disk is still exactly the one the manifest describes."""
    path = Path(job.file_path)
    if job.status != ExportJob.Status.DONE or not path.exists():
        return False
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest() == job.sha256 == job.manifest.get("sha256")


def exports_reconcile() -> int:
    """Re-enqueue jobs stuck queued or running (a lost message or a killed worker); fail them after N tries."""
    stale = timezone.now() - timedelta(seconds=settings.RECONCILE_STUCK_SECONDS)
    count = 0
    for job in ExportJob.objects.filter(status__in=["queued", "running"], state_changed_at__lt=stale):
        if job.attempts >= settings.MAX_TASK_ATTEMPTS:
            export_job_fail(job_id=job.pk, reason=f"export did not complete after {job.attempts} attempts")
            continue
        ExportJob.objects.filter(pk=job.pk).update(status=ExportJob.Status.QUEUED, state_changed_at=timezone.now())
        _enqueue(job.pk)
        count += 1
    return count
