"""Streaming readers: a stored upload in, chunks of rows out, memory flat in the file's size.

No Django imports. CSV goes through pyarrow's streaming CSV reader (every cell read as text, the schema
coerces it): its block size bounds any one record, so an unclosed quote or a 1 GB field cannot take
the worker's memory, and ragged rows come back one by one with their row numbers instead of being
padded silently (pandas' C parser pads short rows with empty cells). Parquet goes through pyarrow
record batches (types kept), JSON Lines line by line with the standard library (exact line numbers;
one bad line is one bad row, not a broken file).

``iter_frames`` yields columnar chunks for the bulk path; ``iter_rows`` turns the same chunks into
row dicts for the ordinary path, so both paths see identical values.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from reviewapp.ingest.parsing import MAX_ROW_BYTES, FileRejected, Row, _reject_constant, _short, raw_text

MIB = 1024 * 1024
# The largest CSV record (pyarrow needs a whole record inside one block, so this is also the cap; a
# bigger one fails the batch with its row number). Memory grows with it: with 4 MB blocks the ingest
# process peaks around 240 MB whatever the file's size (docs/benchmarks.md).
CSV_BLOCK_BYTES = 4 * MIB
CSV_BLOCKS_AHEAD = 2  # how far pyarrow may read ahead of us, in blocks
# A chunk of JSON Lines or Parquet is cut early when its rows add up to this much.
MAX_CHUNK_BYTES = 64 * MIB
# A Parquet file declaring more rows than this is refused before reading: a few KB of run-length
# encoded pages can claim billions of rows (a decompression bomb of another kind).
MAX_PARQUET_ROWS = 50_000_000
MAX_PARQUET_EXPANSION = 200  # uncompressed page bytes per stored byte beyond which a file is refused ...
MIN_BOMB_BYTES = 256 * MIB  # ... once it expands to at least this much
# pyarrow reads a row group's pages at once: a larger one is refused rather than held in memory.
MAX_PARQUET_ROW_GROUP_BYTES = 256 * MIB


def _size(n: int) -> str:
    return f"{n // MIB} MB" if n >= MIB else f"{n:,} bytes"


@dataclass(slots=True)
class Column:
    kind: str  # "str", "int", "float", "bool", "null" (all missing) or "object" (anything else)
    array: Any  # a pyarrow array, or a list of Python values for "object"
    missing: np.ndarray  # True where the value is absent: null, or "" for text


@dataclass(slots=True)
class BrokenRow:
    number: int
    message: str
    raw: str


@dataclass
class FrameChunk:
    """A slice of the file: parsed rows as columns, plus rows that could not be parsed at all."""

    fmt: str
    numbers: np.ndarray  # data row numbers of the parsed rows (int64), ascending
    columns: dict[str, Column]
    broken: list[BrokenRow] = field(default_factory=list)
    fraction: float | None = None
    header: list[str] = field(default_factory=list)
    delimiter: str = ","
    _batch: pa.RecordBatch | None = None
    _dicts: list[dict[str, Any]] | None = None
    _lines: list[str] | None = None

    def __len__(self) -> int:
        return len(self.numbers)

    @property
    def received(self) -> int:
        return len(self.numbers) + len(self.broken)

    @property
    def last_number(self) -> int:
        last = int(self.numbers[-1]) if len(self.numbers) else 0
        return max([last, *(b.number for b in self.broken)])

    def values(self, index: int) -> dict[str, Any]:
        """The row as the row-at-a-time checker takes it (original values, "" for empty CSV cells)."""
        if self._dicts is not None:
            return self._dicts[index]
        assert self._batch is not None
        record = self._batch.slice(index, 1).to_pylist()[0]
        if self.fmt == "csv":
            return dict(zip(self.header, record.values(), strict=True))
        return record

    def all_values(self) -> list[dict[str, Any]]:
        if self._dicts is not None:
            return self._dicts
        assert self._batch is not None
        records = self._batch.to_pylist()
        if self.fmt == "csv":
            return [dict(zip(self.header, r.values(), strict=True)) for r in records]
        return records

    def raw(self, index: int) -> str:
        if self._lines is not None:
            return self._lines[index]
        return raw_text(Row(int(self.numbers[index]), self.values(index)), self.header, self.fmt, self.delimiter)


def iter_frames(
    path: Path,
    fmt: str,
    *,
    chunk_size: int,
    id_field: str,
    encoding: str = "utf-8",
    delimiter: str = ",",
    header: list[str] | None = None,
) -> Iterator[FrameChunk]:
    """Yield the file in chunks of at most ``chunk_size`` rows. Raises FileRejected for a file that
    cannot be read (at once, or at the point where it breaks)."""
    if fmt == "csv":
        if header is None:
            raise ValueError("CSV needs its header (see parsing.sniff_csv)")
        if id_field not in header:
            raise FileRejected(f"The CSV header has no {id_field!r} column (the source's id field).")
        yield from _csv_frames(path, chunk_size=chunk_size, encoding=encoding, delimiter=delimiter, header=header)
    elif fmt == "jsonl":
        yield from _jsonl_frames(path, chunk_size=chunk_size)
    elif fmt == "parquet":
        yield from _parquet_frames(path, chunk_size=chunk_size, id_field=id_field)
    else:
        raise FileRejected(f"Unsupported format {fmt!r}.")


def iter_rows(path: Path, fmt: str, **kwargs: Any) -> Iterator[tuple[list[Row], list[str], float | None]]:
    """The same chunks as rows (for the ordinary, row-at-a-time path): (rows, columns, fraction)."""
    for frame in iter_frames(path, fmt, **kwargs):
        rows = [Row(int(n), v, frame._lines[i] if frame._lines is not None else None)
                for i, (n, v) in enumerate(zip(frame.numbers, frame.all_values(), strict=True))]
        rows += [Row(b.number, None, b.raw, b.message) for b in frame.broken]
        rows.sort(key=lambda r: r.number)
        yield rows, frame.header, frame.fraction


# --- CSV -------------------------------------------------------------------------------------------


class _CountingReader(io.RawIOBase):
    """Feeds pyarrow from our own handle: we know how far it has read, and we hold it back.

    pyarrow's streaming CSV reader reads blocks ahead on its IO threads, as fast as the disk allows;
    left alone it holds a burst of a dozen blocks or more and peak memory grows with the file up to
    that. Its reads wait here while it is more than ``ahead`` blocks in front of what we consumed."""

    def __init__(self, handle: BinaryIO, *, block: int, ahead: int) -> None:
        self.handle = handle
        self.position = 0
        self.consumed = 0
        self._limit = block * ahead
        self._cond = threading.Condition()
        self._released = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        with self._cond:
            while not self._released and self.position - self.consumed > self._limit:
                self._cond.wait(timeout=0.5)
        data = self.handle.read(len(buffer))
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def advance(self, nbytes: int) -> None:
        with self._cond:
            self.consumed += nbytes
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._released = True
            self._cond.notify_all()


def _csv_frames(path: Path, *, chunk_size: int, encoding: str, delimiter: str,
                header: list[str]) -> Iterator[FrameChunk]:
    names = [f"c{i}" for i in range(len(header))]
    invalid: list[BrokenRow] = []

    def on_invalid(row: Any) -> str:
        # Ragged rows become row errors with their own number; the file goes on.
        number = (row.number - 1) if row.number is not None else -1
        invalid.append(BrokenRow(number, f"the row has {row.actual_columns} fields; the header has "
                                         f"{row.expected_columns}", _short(row.text or "", 10_000)))
        return "skip"

    arrow_encoding = {"utf-8": "utf8", "utf-8-sig": "utf8"}.get(encoding, encoding)
    size = max(path.stat().st_size, 1)
    done = 0  # data rows handed out so far (for messages)
    with open(path, "rb") as handle:
        counter = _CountingReader(handle, block=CSV_BLOCK_BYTES, ahead=CSV_BLOCKS_AHEAD)
        try:
            reader = pacsv.open_csv(
                counter,
                read_options=pacsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES, column_names=names,
                                               skip_rows=1, encoding=arrow_encoding),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"', double_quote=True,
                                                 escape_char=False, newlines_in_values=True, ignore_empty_lines=True,
                                                 invalid_row_handler=on_invalid),
                convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()),
                                                     strings_can_be_null=False, quoted_strings_can_be_null=False),
            )
            next_number = 1
            for batch in reader:
                broken = sorted(invalid, key=lambda b: b.number)
                invalid.clear()
                numbers = _allocate_numbers(next_number, batch.num_rows, broken)
                last = max([int(numbers[-1]) if len(numbers) else 0, *(b.number for b in broken)])
                next_number = last + 1
                fraction = min(counter.position / size, 1.0)
                yield from _slices(batch, numbers, broken, chunk_size, "csv", header, delimiter, fraction)
                counter.advance(CSV_BLOCK_BYTES)
                done = last
            if invalid:
                yield FrameChunk("csv", np.zeros(0, np.int64), {}, sorted(invalid, key=lambda b: b.number), 1.0,
                                 header, delimiter)
        except pa.ArrowInvalid as exc:
            raise FileRejected(_csv_problem(str(exc), done, encoding)) from exc
        except UnicodeDecodeError as exc:
            raise FileRejected(f"The file is not valid {encoding} text after data row {done}.") from exc
        finally:
            counter.release()


def _csv_problem(message: str, done: int, encoding: str) -> str:
    if "straddl" in message:
        return (f"A CSV record after data row {done} is larger than {_size(CSV_BLOCK_BYTES)}, or a quote is "
                "never closed.")
    if "UTF8" in message or "UTF-8" in message:
        return f"The file is not valid UTF-8 text after data row {done}; re-save it as UTF-8."
    return f"Malformed CSV after data row {done}: {_short(message, 300)}"


def _allocate_numbers(start: int, count: int, broken: list[BrokenRow]) -> np.ndarray:
    """Numbers of the rows pyarrow delivered: the next ``count`` numbers from ``start`` that are not
    taken by the rows it skipped (which carry their own numbers)."""
    taken = np.array([b.number for b in broken if b.number >= start], dtype=np.int64)
    candidates = np.arange(start, start + count + len(taken), dtype=np.int64)
    if len(taken):
        candidates = candidates[~np.isin(candidates, taken)]
    unknown = [b for b in broken if b.number < start]
    for i, b in enumerate(unknown):  # pyarrow did not know the row's number: put it after this block
        b.number = int(candidates[-1] if count else start) + 1 + i
    return candidates[:count]


def _slices(batch: pa.RecordBatch, numbers: np.ndarray, broken: list[BrokenRow], chunk_size: int, fmt: str,
            header: list[str], delimiter: str, fraction: float | None) -> Iterator[FrameChunk]:
    rows = batch.num_rows
    starts = list(range(0, rows, chunk_size)) or [0]
    for k, start in enumerate(starts):
        part = batch.slice(start, chunk_size)
        part_numbers = numbers[start:start + chunk_size]
        if k == len(starts) - 1:
            mine, broken = broken, []
        else:
            bound = int(part_numbers[-1])
            mine = [b for b in broken if b.number <= bound]
            broken = [b for b in broken if b.number > bound]
        columns = {name: _column(part.column(i), fmt == "csv") for i, name in enumerate(header)}
        yield FrameChunk(fmt, part_numbers, columns, mine, fraction if k == len(starts) - 1 else None, header,
                         delimiter, _batch=part)


def _column(array: pa.Array, text_only: bool = False) -> Column:
    """Map an arrow column to one of the kinds the checker knows."""
    if text_only or pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        missing = pc.fill_null(pc.or_(pc.is_null(array), pc.equal(array, "")), True)
        return Column("str", array, missing.to_numpy(zero_copy_only=False))
    if pa.types.is_dictionary(array.type) and (pa.types.is_string(array.type.value_type)
                                               or pa.types.is_large_string(array.type.value_type)):
        return _column(array.dictionary_decode())
    missing = pc.is_null(array).to_numpy(zero_copy_only=False)
    if pa.types.is_null(array.type):
        return Column("null", array, np.ones(len(array), bool))
    if pa.types.is_boolean(array.type):
        return Column("bool", array, missing)
    if pa.types.is_integer(array.type):
        if pa.types.is_uint64(array.type) and (pc.max(array).as_py() or 0) >= 2**63:
            return Column("object", array.to_pylist(), missing)
        return Column("int", array.cast(pa.int64()), missing)
    if pa.types.is_floating(array.type):
        return Column("float", array.cast(pa.float64()), missing)
    return Column("object", array.to_pylist(), missing)


# --- Parquet ---------------------------------------------------------------------------------------


def _parquet_frames(path: Path, *, chunk_size: int, id_field: str) -> Iterator[FrameChunk]:
    try:
        pf = pq.ParquetFile(path)
        columns = [c for c in pf.schema_arrow.names if not c.startswith("__index_level_")]
        meta = pf.metadata
        total = meta.num_rows
        expanded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        stored_groups = [sum(meta.row_group(i).column(j).total_compressed_size for j in range(meta.num_columns))
                         for i in range(meta.num_row_groups)]
    except (pa.ArrowException, OSError) as exc:
        raise FileRejected(f"The Parquet file cannot be read: {_short(str(exc))}") from exc
    if id_field not in columns:
        raise FileRejected(f"The Parquet file has no {id_field!r} column (the source's id field).")
    if total > MAX_PARQUET_ROWS:
        raise FileRejected(f"The Parquet file declares {total:,} rows; the limit is {MAX_PARQUET_ROWS:,} per file.")
    stored = max(path.stat().st_size, 1)
    if expanded > MAX_PARQUET_EXPANSION * stored and expanded > MIN_BOMB_BYTES:
        raise FileRejected(f"The Parquet file expands to {expanded:,} bytes from {stored:,} (more than "
                           f"{MAX_PARQUET_EXPANSION}x): refused as a decompression bomb.")
    if stored_groups and max(stored_groups) > MAX_PARQUET_ROW_GROUP_BYTES:
        raise FileRejected(f"A row group of the Parquet file holds {_size(max(stored_groups))}; the limit is "
                           f"{_size(MAX_PARQUET_ROW_GROUP_BYTES)}. Write it with smaller row groups (e.g. 100,000 "
                           "rows).")
    per_row = expanded / max(total, 1)
    batch_size = int(max(100, min(chunk_size, MAX_CHUNK_BYTES // max(per_row, 1))))
    number = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            numbers = np.arange(number + 1, number + batch.num_rows + 1, dtype=np.int64)
            number += batch.num_rows
            frame_columns = {name: _column(batch.column(i)) for i, name in enumerate(batch.schema.names)}
            yield FrameChunk("parquet", numbers, frame_columns, [], min(number / max(total, 1), 1.0), columns,
                             _batch=batch)
    except (pa.ArrowException, OSError) as exc:
        raise FileRejected(f"The Parquet file is damaged after row {number}: {_short(str(exc))}") from exc


# --- JSON Lines ------------------------------------------------------------------------------------


def _bounded_lines(fh: BinaryIO) -> Iterator[bytes]:
    number = 0
    while True:
        line = fh.readline(MAX_ROW_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_ROW_BYTES:
            raise FileRejected(f"Line {number} is longer than {_size(MAX_ROW_BYTES)}.")
        yield line


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _jsonl_frames(path: Path, *, chunk_size: int) -> Iterator[FrameChunk]:
    size = max(path.stat().st_size, 1)
    dicts: list[dict[str, Any]] = []
    numbers: list[int] = []
    lines: list[str] = []
    broken: list[BrokenRow] = []
    held = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(_bounded_lines(fh), start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FileRejected(f"Line {number} is not valid UTF-8; send UTF-8 text.") from exc
            if number == 1:
                text = text.lstrip("\ufeff")
            text = text.strip()
            if not text:
                continue
            held += len(raw)
            try:
                value = _DECODER.decode(text)
            except ValueError as exc:
                broken.append(BrokenRow(number, f"invalid JSON: {_short(str(exc))}", text[:10_000]))
            else:
                if isinstance(value, dict):
                    dicts.append(value)
                    numbers.append(number)
                    lines.append(text[:10_000])
                else:
                    broken.append(BrokenRow(number, "each line must be a JSON object", text[:10_000]))
            if len(dicts) + len(broken) >= chunk_size or held >= MAX_CHUNK_BYTES:
                yield _jsonl_chunk(dicts, numbers, lines, broken, min(fh.tell() / size, 1.0))
                dicts, numbers, lines, broken, held = [], [], [], [], 0
        if dicts or broken:
            yield _jsonl_chunk(dicts, numbers, lines, broken, 1.0)


def _jsonl_chunk(dicts: list[dict[str, Any]], numbers: list[int], lines: list[str], broken: list[BrokenRow],
                 fraction: float) -> FrameChunk:
    keys: dict[str, None] = {}
    for record in dicts:
        for key in record:
            keys.setdefault(key)
    columns = {key: _python_column([record.get(key) for record in dicts]) for key in keys}
    return FrameChunk("jsonl", np.array(numbers, dtype=np.int64), columns, broken, fraction, list(keys),
                      _dicts=dicts, _lines=lines)


def _python_column(values: list[Any]) -> Column:
    """Python values of one JSON key across a chunk: a typed column when they agree on a type."""
    kinds = set(map(type, values))
    kinds.discard(type(None))
    if str in kinds and len(kinds) > 1 and "" in values:
        # "" is an absent value whatever the column's type: drop it before typing the column.
        values = [None if v == "" else v for v in values]
        kinds = set(map(type, values))
        kinds.discard(type(None))
        if str in kinds and "" in values:
            kinds.add(object)
    try:
        if not kinds:
            return Column("null", pa.nulls(len(values)), np.ones(len(values), bool))
        if kinds == {str}:
            array = pa.array(values, type=pa.string())
            missing = pc.fill_null(pc.or_(pc.is_null(array), pc.equal(array, "")), True)
            return Column("str", array, missing.to_numpy(zero_copy_only=False))
        kind, arrow_type = {bool: ("bool", pa.bool_()), int: ("int", pa.int64()), float: ("float", pa.float64())}.get(
            next(iter(kinds)) if len(kinds) == 1 else object, ("object", None))
        if arrow_type is not None:
            array = pa.array(values, type=arrow_type)
            return Column(kind, array, pc.is_null(array).to_numpy(zero_copy_only=False))
    except (pa.ArrowException, OverflowError, UnicodeEncodeError):
        pass  # huge integers or lone surrogates: every row goes through the row-at-a-time checker
    missing = np.fromiter((v is None or v == "" for v in values), bool, len(values))
    return Column("object", values, missing)


# --- samples (schema inference) ---------------------------------------------------------------------


def read_sample(path: Path, fmt: str, *, max_rows: int, encoding: str = "utf-8", delimiter: str = ",",
                header: list[str] | None = None) -> tuple[dict[str, list[Any]], int]:
    """The first ``max_rows`` parsed rows as Python values per column (for schema inference)."""
    columns: dict[str, list[Any]] = {}
    rows = 0
    id_field = (header or [""])[0] if fmt == "csv" else ""
    frames: Iterator[FrameChunk]
    if fmt == "parquet":
        frames = _parquet_frames(path, chunk_size=max_rows, id_field=_first_parquet_column(path))
    else:
        frames = iter_frames(path, fmt, chunk_size=max_rows, id_field=id_field, encoding=encoding,
                             delimiter=delimiter, header=header)
    for frame in frames:
        take = min(len(frame), max_rows - rows)
        records = frame.all_values()[:take]
        for name in ([*frame.header] if frame.fmt != "jsonl" else list(frame.columns)):
            columns.setdefault(name, [None] * rows)
        for name, values in columns.items():
            values.extend(r.get(name) for r in records)
        rows += take
        if rows >= max_rows:
            break
    return columns, rows


def _first_parquet_column(path: Path) -> str:
    try:
        names = pq.ParquetFile(path).schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        raise FileRejected(f"The Parquet file cannot be read: {_short(str(exc))}") from exc
    return names[0] if names else ""


ProgressCallback = Callable[[int, float | None], None]
