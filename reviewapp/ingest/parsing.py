"""Recognising uploaded files and turning one row into a validated, JSON-safe payload.

No Django imports, so it can be tested and benchmarked on its own. This module holds the reference,
row-at-a-time semantics (``RowChecker``): the ordinary path and single items use it directly, and the
vectorised checker of the bulk path (``columnar.py``) must agree with it row for row, falling back to
it for every row it cannot decide on its own. File readers live in ``readers.py``; schema
compatibility, diffs and inference in ``schemas.py``.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import datetime as dt
import decimal
import hashlib
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

FORMATS = ("csv", "jsonl", "parquet")
EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
FILE_SUFFIX = {"csv": "csv", "jsonl": "jsonl", "parquet": "parquet"}
HEAD_BYTES = 64 * 1024
# How much of a text file the encoding and delimiter guesses look at.
SNIFF_BYTES = 1024 * 1024
# One row larger than this is refused: it protects memory against a file with no line breaks.
MAX_ROW_BYTES = 16 * 1024 * 1024
# One value longer than this is a row error, whatever the schema says: a 10 MB "description" is an
# accident or an attack, never a payment.
MAX_FIELD_CHARS = 1024 * 1024
MAX_MESSAGE_CHARS = 500
MAX_RAW_CHARS = 10_000
MAX_EXTERNAL_ID_CHARS = 200

_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"PK\x03\x04": "zip",
    b"PK\x05\x06": "zip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"(\xb5/\xfd": "zstd",
    b"7z\xbc\xaf\x27\x1c": "7z",
    b"Rar!\x1a\x07": "rar",
}
_PARQUET_MAGIC = b"PAR1"
_INT_RE = re.compile(r"^[+-]?\d+$")
_NON_FINITE = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}
_TRUE = {"true", "1"}
_FALSE = {"false", "0"}
# A well-formed UTF-8 multi-byte sequence (RFC 3629): its presence means the sender meant UTF-8.
_UTF8_MULTIBYTE = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
    rb"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2}"
)
# C0 controls other than tab, line feed, form feed and carriage return: text files do not carry them.
_BINARY_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")
_CSV_DELIMITERS = ",;\t|"
_DELIMITER_NAMES = {",": "commas", ";": "semicolons", "\t": "tabs", "|": "pipes"}


class FileRejected(Exception):
    """The file as a whole cannot be read. The message is written for the person who sent it."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON value")


# --- format and text detection --------------------------------------------------------------------


def compressed_kind(head: bytes) -> str | None:
    for magic, kind in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            return kind
    return None


def detect_format(filename: str, head: bytes) -> str:
    """Decide csv/jsonl/parquet from the name and the first bytes; refuse anything else or a lie.

    Compressed uploads are refused outright rather than inflated: a ratio cap would still let a
    zip bomb cost a worker its disk and minutes, and no sender needs compression for what we accept
    (Parquet compresses its own pages, and those are bounded when read)."""
    suffix = Path(filename or "").suffix.lower()
    kind = compressed_kind(head)
    if kind:
        raise FileRejected(f"Compressed files ({kind}) are not accepted; send the uncompressed CSV, JSONL or "
                           "Parquet file.")
    is_parquet = head.startswith(_PARQUET_MAGIC)
    claimed = EXTENSIONS.get(suffix)
    if suffix and claimed is None:
        raise FileRejected(f"Unsupported file type {suffix!r}; send CSV (.csv, .tsv), JSON Lines (.jsonl, .ndjson) "
                           "or Parquet (.parquet).")
    if is_parquet:
        if claimed not in (None, "parquet"):
            raise FileRejected(f"The file is Parquet but its name says {suffix}; rename it to .parquet.")
        return "parquet"
    if claimed == "parquet":
        raise FileRejected("The file's name says Parquet but its content is not a Parquet file.")
    encoding = detect_encoding(head, complete=False)
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if claimed is None:
        claimed = "jsonl" if first == b"{" else "csv"
    if claimed == "jsonl" and first not in (b"{", b""):
        raise FileRejected("The file's name says JSON Lines but its first line is not a JSON object.")
    if claimed == "csv" and first == b"{":
        raise FileRejected("The file's name says CSV but it looks like JSON Lines; rename it to .jsonl.")
    if claimed == "jsonl" and encoding.name not in ("utf-8", "utf-8-sig"):
        raise FileRejected("JSON Lines must be UTF-8 (RFC 8259); this file is not valid UTF-8.")
    return claimed


@dataclass(frozen=True, slots=True)
class TextEncoding:
    name: str  # a Python codec name
    note: str = ""


def detect_encoding(sample: bytes, *, complete: bool) -> TextEncoding:
    """UTF-8 (with or without a BOM) when the bytes are UTF-8; Windows-1252, then Latin-1, with a note
    for legacy text that contains no UTF-8 at all. Binary data, UTF-16 and UTF-8 broken in the middle
    (valid multi-byte sequences next to invalid bytes) are refused. ``complete`` says whether the
    sample is the whole file (else a character cut at its end is not an error)."""
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise FileRejected("The file is UTF-16 text; save it as UTF-8 and send it again.")
    if b"\x00" in sample:
        raise FileRejected("The file contains binary data (NUL bytes), not UTF-8 text; send UTF-8 CSV, JSON Lines "
                           "or Parquet.")
    has_bom = sample.startswith(b"\xef\xbb\xbf")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=complete)
    except UnicodeDecodeError as exc:
        if has_bom or _UTF8_MULTIBYTE.search(sample):
            raise FileRejected(
                f"The file is not valid UTF-8: it contains UTF-8 text but also an invalid byte sequence at byte "
                f"{exc.start}. Re-save it as UTF-8 and send it again."
            ) from exc
    else:
        return TextEncoding("utf-8-sig" if has_bom else "utf-8")
    control = _BINARY_CONTROL.search(sample)
    if control is not None:
        raise FileRejected(f"The file contains binary data (control byte 0x{control.group()[0]:02x} at byte "
                           f"{control.start()}), not UTF-8 text; send UTF-8 CSV, JSON Lines or Parquet.")
    try:
        sample.decode("cp1252")
    except UnicodeDecodeError:
        return TextEncoding("latin-1", "The file is not UTF-8; it was read as Latin-1 (ISO-8859-1). Send UTF-8 to "
                                       "be sure that accents and symbols arrive as meant.")
    return TextEncoding("cp1252", "The file is not UTF-8; it was read as Windows-1252 (cp1252). Send UTF-8 to be "
                                  "sure that accents and symbols arrive as meant.")


@dataclass(frozen=True, slots=True)
class CsvDialect:
    delimiter: str
    columns: list[str]
    note: str = ""


def sniff_csv(sample: bytes, *, encoding: str, filename: str = "", complete: bool = False) -> CsvDialect:
    """The delimiter (csv.Sniffer on a sample, checked against consistent field counts) and the header."""
    text = codecs.getincrementaldecoder(encoding)(errors="replace").decode(sample, final=complete)
    text = text.lstrip("\ufeff")
    if not complete and "\n" in text:
        text = text[: text.rindex("\n") + 1]  # no half record at the end of the sample
    if not text.strip():
        raise FileRejected("The CSV file has no header row.")
    candidates: list[str] = []
    if Path(filename).suffix.lower() == ".tsv":
        candidates.append("\t")
    # The sniffer gives up on some files (csv.Error); the field-count test below still decides.
    with contextlib.suppress(csv.Error):
        candidates.append(csv.Sniffer().sniff(text[:64 * 1024], delimiters=_CSV_DELIMITERS).delimiter)
    scored = {d: _delimiter_score(text, d) for d in _CSV_DELIMITERS}
    best = max(_CSV_DELIMITERS, key=lambda d: (scored[d], d == ","))
    delimiter = next((d for d in candidates if scored[d] >= scored[best] and scored[d][0]), best)
    header = _first_record(text, delimiter)
    columns = [c.strip() for c in header]
    if any(not c for c in columns):
        raise FileRejected("The CSV header has an empty column name.")
    if any("\n" in c or "\r" in c for c in columns):
        raise FileRejected("A CSV column name spans several lines; the header must be one line.")
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise FileRejected(f"The CSV header repeats column(s): {', '.join(duplicated)}.")
    note = "" if delimiter == "," else f"Columns are separated by {_DELIMITER_NAMES[delimiter]}."
    return CsvDialect(delimiter, columns, note)


def _delimiter_score(text: str, delimiter: str) -> tuple[int, int]:
    """(is every record of the sample as wide as the header, header width): consistent and wide wins."""
    try:
        records = [r for r in csv.reader(io.StringIO(text[:256 * 1024]), delimiter=delimiter) if r][:200]
    except csv.Error:
        return (0, 0)
    if not records:
        return (0, 0)
    width = len(records[0])
    consistent = sum(len(r) == width for r in records) >= max(1, int(0.9 * len(records)))
    return (int(consistent and width > 1), width)


def _first_record(text: str, delimiter: str) -> list[str]:
    for record in csv.reader(io.StringIO(text), delimiter=delimiter):
        if record:
            return record
    raise FileRejected("The CSV file has no header row.")


# --- rows ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    number: int  # 1-based data row (the CSV header is row 0); the line number for JSON Lines
    values: dict[str, Any] | None  # None when the row itself could not be parsed
    line: str | None = None  # the original text, where it is at hand
    error: str = ""


@dataclass(slots=True)
class Chunk:
    rows: list[Row]
    columns: list[str] = field(default_factory=list)
    fraction: float | None = None  # how much of the file has been read, when known


def raw_text(row: Row, columns: Sequence[str], fmt: str, delimiter: str = ",") -> str:
    """The row as the sender could fix and re-send it: a CSV line, the JSON line, or JSON."""
    if row.line is not None:
        return row.line[:MAX_RAW_CHARS]
    values = row.values or {}
    if fmt == "csv" and columns:
        buffer = io.StringIO()
        csv.writer(buffer, delimiter=delimiter or ",", lineterminator="").writerow(
            ["" if values.get(c) is None else values.get(c) for c in columns]
        )
        return buffer.getvalue()[:MAX_RAW_CHARS]
    return json.dumps(values, default=str, ensure_ascii=False)[:MAX_RAW_CHARS]


# --- coercion and validation ---------------------------------------------------------------------


def _types(prop: Any) -> list[str]:
    if not isinstance(prop, dict):
        return []
    declared = prop.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return [t for t in declared if isinstance(t, str)]
    return []


class _Invalid(Exception):
    pass


Invalid = _Invalid


def json_safe(value: Any) -> Any:
    """Turn what pyarrow or json hand us into JSON values; NaN and Infinity are refused."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid("NaN and Infinity are not allowed")
        return value
    if isinstance(value, decimal.Decimal):
        return json_safe(float(value))
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Invalid("binary value is not UTF-8 text") from exc
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    # numpy scalars and the like
    if hasattr(value, "item"):
        return json_safe(value.item())
    return str(value)


def coerce_value(value: Any, prop: Any) -> Any:
    """Coerce one cell to the property's declared type where that is unambiguous. Values that do not
    fit are returned unchanged so that schema validation reports them with its usual message."""
    types = _types(prop)
    value = json_safe(value)
    if isinstance(value, str):
        if not types or types == ["string"]:
            return value
        text = value.strip()
        lowered = text.lower()
        if lowered in _NON_FINITE and {"number", "integer"} & set(types):
            raise _Invalid("NaN and Infinity are not allowed")
        for kind in ("integer", "number", "boolean", "object", "array"):
            if kind not in types:
                continue
            if kind == "integer":
                if _INT_RE.match(text):
                    return int(text)
                # "71.0": pandas writes integer columns with gaps as floats; JSON Schema calls it an integer.
                number = _float_or_none(text)
                if number is not None and math.isfinite(number) and number.is_integer():
                    return _normalise_number(number)
            if kind == "number":
                if _INT_RE.match(text):
                    return int(text)
                try:
                    number = float(text)
                except ValueError:
                    continue
                return _normalise_number(number)
            if kind == "boolean":
                if lowered in _TRUE:
                    return True
                if lowered in _FALSE:
                    return False
            if kind in ("object", "array") and text[:1] in "{[":
                try:
                    return json_safe(json.loads(text, parse_constant=_reject_constant))
                except ValueError:
                    continue
        return value
    if isinstance(value, float) and ({"number", "integer"} & set(types)):
        return _normalise_number(value)
    if isinstance(value, int) and not isinstance(value, bool) and types == ["string"]:
        # Ids and codes often arrive as numbers from Parquet or JSON; the schema says text.
        return str(value)
    return value


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _normalise_number(number: float) -> float | int:
    if not math.isfinite(number):
        raise _Invalid("NaN and Infinity are not allowed")
    # 100.0 and 100 are the same JSON number; one spelling keeps content hashes format-independent.
    if number.is_integer() and abs(number) < 2**53:
        return int(number)
    return number


def _is_missing(value: Any) -> bool:
    # Empty CSV cells and nulls are absent values. An explicit NaN is not: it is refused as a value.
    return value is None or (isinstance(value, str) and value == "")


def canonical_json(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def payload_digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


@dataclass(slots=True)
class CheckedRow:
    number: int
    external_id: str
    payload: dict[str, Any]
    digest: str
    label: str | None


@dataclass(slots=True)
class RowProblem:
    field: str
    message: str


_REQUIRED_RE = re.compile(r"^'(.+)' is a required property$")


class RowChecker:
    """Coerces and validates one row at a time against a source's schema, id field and label set."""

    def __init__(self, *, json_schema: dict[str, Any], id_field: str, label_field: str, labels: Sequence[str]):
        self.schema = json_schema
        self.properties: dict[str, Any] = json_schema.get("properties") or {}
        self.validator = Draft202012Validator(json_schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
        self.id_field = id_field
        self.label_field = label_field
        self.labels = list(labels)
        self._label_set = set(labels)

    def check(self, number: int, values: dict[str, Any]) -> tuple[CheckedRow | None, list[RowProblem]]:
        """Return the checked row, or None and every problem found in it."""
        problems: list[RowProblem] = []
        payload: dict[str, Any] = {}
        for key, value in values.items():
            key = str(key)
            if _is_missing(value):
                continue
            try:
                text_problem(key)
                payload[key] = coerce_value(value, self.properties.get(key))
                _check_texts(payload[key])
            except _Invalid as exc:
                payload.pop(key, None)
                problems.append(RowProblem(key, str(exc)))
        external_id = payload.get(self.id_field)
        id_text = "" if external_id is None or isinstance(external_id, dict | list) else str(external_id).strip()
        if not id_text:
            problems.append(RowProblem(self.id_field, f"the id field {self.id_field!r} is missing or empty"))
        elif len(id_text) > MAX_EXTERNAL_ID_CHARS:
            problems.append(RowProblem(self.id_field, f"the id is longer than {MAX_EXTERNAL_ID_CHARS} characters"))
        for error in self.validator.iter_errors(payload):
            path = [str(p) for p in error.absolute_path]
            name = ".".join(path) if path else "(root)"
            if error.validator == "required" and not path:
                match = _REQUIRED_RE.match(error.message)
                name = match.group(1) if match else name
                if name == self.id_field:
                    continue  # already reported above in plainer words
            if any(p.field == name for p in problems):
                continue  # a coercion problem already named this field
            problems.append(RowProblem(name, _short(error.message)))
        label: str | None = None
        if self.label_field and self.label_field in payload:
            raw_label = payload.pop(self.label_field)
            if isinstance(raw_label, str) and raw_label in self._label_set:
                label = raw_label
            elif not any(p.field == self.label_field for p in problems):
                allowed = ", ".join(self.labels)
                problems.append(
                    RowProblem(self.label_field, f"{_short(repr(raw_label), 80)} is not in the label set ({allowed})")
                )
        if problems:
            return None, problems
        return CheckedRow(number, id_text, payload, payload_digest(payload), label), []


def text_problem(text: str) -> None:
    """Refuse text that PostgreSQL's jsonb cannot hold (NUL, lone surrogates) or that is absurdly long."""
    if len(text) > MAX_FIELD_CHARS:
        raise _Invalid(f"the value is {len(text):,} characters long; the limit is {MAX_FIELD_CHARS:,}")
    if "\x00" in text:
        raise _Invalid("the value contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Invalid("the value contains an invalid Unicode escape (a lone surrogate)") from exc


def _check_texts(value: Any) -> None:
    if isinstance(value, str):
        text_problem(value)
    elif isinstance(value, dict):
        for key, inner in value.items():
            text_problem(key)
            _check_texts(inner)
    elif isinstance(value, list):
        for inner in value:
            _check_texts(inner)


def _short(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- schema compatibility (kept here for callers of the first version; see schemas.py) ---------------


def schema_breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    from reviewapp.ingest.schemas import schema_breaking_changes as breaking

    return breaking(old, new)
