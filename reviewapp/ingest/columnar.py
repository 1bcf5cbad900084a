"""Vectorised validation and payload building for the bulk path. No Django imports.

The schema is compiled once per batch into per-column rules for the shapes a source schema usually has
(string / integer / number / boolean properties with enum, numeric bounds, lengths and patterns, plus
required fields). Each chunk is checked a column at a time with pyarrow and numpy; a row any rule
cannot vouch for is *flagged* and goes through ``parsing.RowChecker`` (jsonschema), which has the
final word and writes the exact messages. So the fast path may be conservative but never lenient:
every row it accepts on its own gets the payload, digest, id and label RowChecker would give it
(tests/ingest/test_columnar.py checks this row for row). Schemas with shapes we do not vectorise
(nested objects, formats, anyOf, ...) simply send the affected rows, or all rows, down that path.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from json.encoder import encode_basestring  # the C encoder json.dumps(ensure_ascii=False) uses
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reviewapp.ingest.parsing import (
    MAX_EXTERNAL_ID_CHARS,
    MAX_FIELD_CHARS,
    Invalid,
    RowChecker,
    RowProblem,
    canonical_json,
    text_problem,
)
from reviewapp.ingest.readers import Column, FrameChunk
from reviewapp.ingest.schemas import ANNOTATIONS

_EXACT = 2**53  # beyond this a float64 no longer holds every integer: such rows go the slow way
_ROOT_KEYS = frozenset({"type", "properties", "required", "additionalProperties"}) | ANNOTATIONS
_KEYS = {
    "string": frozenset({"type", "enum", "minLength", "maxLength", "pattern"}) | ANNOTATIONS,
    "integer": frozenset({"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}) | ANNOTATIONS,
    "number": frozenset({"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}) | ANNOTATIONS,
    "boolean": frozenset({"type"}) | ANNOTATIONS,
}
_BOUND_OPS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "minimum": np.greater_equal,
    "maximum": np.less_equal,
    "exclusiveMinimum": np.greater,
    "exclusiveMaximum": np.less,
}


@dataclass(slots=True)
class _Rule:
    type: str
    enum: pa.Array | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: re.Pattern[str] | None = None
    bounds: list[tuple[str, float]] = field(default_factory=list)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _compile_rule(prop: Any) -> _Rule | None:
    """A rule for one property, or None when its shape is not one we vectorise."""
    if not isinstance(prop, dict):
        return None
    declared = prop.get("type")
    if isinstance(declared, list) and len(declared) == 1:
        declared = declared[0]
    if declared not in _KEYS or set(prop) - _KEYS[declared]:
        return None
    rule = _Rule(declared)
    if "enum" in prop:
        values = prop["enum"]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return None
        rule.enum = pa.array(sorted(set(values)), type=pa.string())
    for key in ("minLength", "maxLength"):
        if key in prop:
            if not isinstance(prop[key], int) or isinstance(prop[key], bool) or prop[key] < 0:
                return None
            setattr(rule, "min_length" if key == "minLength" else "max_length", prop[key])
    if "pattern" in prop:
        try:
            rule.pattern = re.compile(prop["pattern"])
        except (re.error, TypeError):
            return None
    for key in _BOUND_OPS:
        if key in prop:
            if not _is_number(prop[key]) or abs(prop[key]) >= _EXACT:
                return None
            rule.bounds.append((key, float(prop[key])))
    return rule


@dataclass(slots=True)
class GoodRows:
    numbers: list[int] = field(default_factory=list)
    external_ids: list[str] = field(default_factory=list)
    payloads: list[str] = field(default_factory=list)  # canonical JSON (empty when only validating)
    digests: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.numbers)


@dataclass(slots=True)
class BadRow:
    number: int
    problems: list[RowProblem]
    raw: str


@dataclass(slots=True)
class Repeat:
    """A row whose id already appeared earlier in the same chunk."""

    number: int
    external_id: str
    first_number: int
    same_payload: bool
    index: int  # into the frame, for the raw text of a conflict


@dataclass
class Checked:
    received: int
    good: GoodRows
    bad: list[BadRow]
    drift: Counter[str]
    repeats: list[Repeat] = field(default_factory=list)
    good_index: list[int] = field(default_factory=list)  # frame index of each good row (-1: unknown)
    fallback_rows: int = 0


@dataclass(slots=True)
class _ColumnResult:
    ok: np.ndarray
    text: Callable[[], np.ndarray] | None  # JSON text of each value ("" where missing or not ok)
    strings: Callable[[], np.ndarray] | None = None  # the coerced value as text (id and label columns)


def _objects(array: pa.Array, missing: np.ndarray) -> np.ndarray:
    values = array.to_numpy(zero_copy_only=False).astype(object, copy=True)
    values[missing] = ""
    return values


def _lengths(array: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.utf8_length(array), 0).to_numpy(zero_copy_only=False)


def _has_nul(array: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.match_substring(array, "\x00"), False).to_numpy(zero_copy_only=False)


def _encode(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(map(encode_basestring, values))
    return out


def _as_text(array: pa.Array) -> pa.Array:
    return pc.cast(array, pa.string())


def _floats_from_text(array: pa.Array, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values and parse-ok mask. pyarrow's parser accepts a subset of Python's float() syntax (checked in
    the tests) and rounds the same way; anything it refuses is parsed with float() itself."""
    n = len(array)
    trimmed = pc.ascii_trim_whitespace(array)
    nulled = pc.if_else(pa.array(missing), pa.scalar(None, pa.string()), trimmed)
    try:
        values = pc.fill_null(pc.cast(nulled, pa.float64()), 0.0).to_numpy(zero_copy_only=False)
        return values, np.ones(n, bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    values = np.zeros(n)
    ok = np.ones(n, bool)
    for i, text in enumerate(_objects(array, missing)):
        if missing[i]:
            continue
        try:
            values[i] = float(text)
        except ValueError:
            ok[i] = False
    return values, ok


def _number_text(values: np.ndarray, integral: np.ndarray) -> np.ndarray:
    """JSON text of numbers as parsing._normalise_number leaves them: integral values below 2**53 as
    integers, the rest as Python's float repr."""
    out = np.empty(len(values), dtype=object)
    as_int = integral & (np.abs(values) < _EXACT)
    out[as_int] = list(map(str, values[as_int].astype(np.int64).tolist()))
    rest = ~as_int
    out[rest] = list(map(float.__repr__, values[rest].tolist()))
    return out


def _apply(rule: _Rule, column: Column) -> _ColumnResult:
    n = len(column.missing)
    kind, array, missing = column.kind, column.array, column.missing
    if kind in ("object", "null"):
        return _ColumnResult(np.zeros(n, bool), None)
    if rule.type == "string":
        if kind not in ("str", "int"):
            return _ColumnResult(np.zeros(n, bool), None)
        text_array = array if kind == "str" else _as_text(array)  # an int where text is expected: str(int)
        lengths = _lengths(text_array)
        ok = (lengths <= MAX_FIELD_CHARS) & ~_has_nul(text_array)
        if rule.min_length is not None:
            ok &= lengths >= rule.min_length
        if rule.max_length is not None:
            ok &= lengths <= rule.max_length
        if rule.enum is not None:
            ok &= pc.fill_null(pc.is_in(text_array, value_set=rule.enum), False).to_numpy(zero_copy_only=False)
        cache: dict[str, np.ndarray] = {}

        def strings() -> np.ndarray:
            if "s" not in cache:
                cache["s"] = _objects(text_array, missing)
            return cache["s"]

        if rule.pattern is not None:
            search = rule.pattern.search
            ok &= np.fromiter((gone or search(v) is not None for v, gone in zip(strings(), missing, strict=True)),
                              bool, n)
        return _ColumnResult(ok, lambda: _encode(strings()), strings)
    if rule.type in ("integer", "number"):
        if kind == "str":
            values, ok = _floats_from_text(array, missing)
            ok &= np.isfinite(values) & (np.abs(values) < _EXACT)
            integral = np.equal(values, np.floor(values))
        elif kind == "int":
            ints = pc.fill_null(array, 0).to_numpy(zero_copy_only=False)
            values = ints.astype(np.float64)
            ok = np.abs(ints) < _EXACT
            integral = np.ones(n, bool)
        elif kind == "float":
            values = pc.fill_null(array, 0.0).to_numpy(zero_copy_only=False)
            ok = np.isfinite(values)
            integral = np.equal(values, np.floor(values))
        else:
            return _ColumnResult(np.zeros(n, bool), None)
        if rule.type == "integer":
            ok &= integral & (np.abs(values) < _EXACT)
        with np.errstate(invalid="ignore"):
            for key, bound in rule.bounds:
                ok &= _BOUND_OPS[key](values, bound)
        if kind == "int":
            text = lambda: np.array(list(map(str, ints.tolist())), dtype=object)  # noqa: E731
        else:
            text = lambda: _number_text(values, integral)  # noqa: E731
        return _ColumnResult(ok, text, text)
    # boolean
    if kind == "str":
        lowered = pc.ascii_lower(pc.ascii_trim_whitespace(array))
        truthy = pc.fill_null(pc.is_in(lowered, value_set=pa.array(["true", "1"])), False).to_numpy(
            zero_copy_only=False)
        falsy = pc.fill_null(pc.is_in(lowered, value_set=pa.array(["false", "0"])), False).to_numpy(
            zero_copy_only=False)
        ok, flags = truthy | falsy, truthy
    elif kind == "bool":
        flags = pc.fill_null(array, False).to_numpy(zero_copy_only=False)
        ok = np.ones(n, bool)
    else:
        return _ColumnResult(np.zeros(n, bool), None)
    return _ColumnResult(ok, lambda: np.where(flags, "true", "false").astype(object))


def _apply_extra(column: Column) -> _ColumnResult:
    """A field outside the schema: kept as it came (no coercion), as RowChecker keeps it."""
    n = len(column.missing)
    kind, array, missing = column.kind, column.array, column.missing
    if kind == "str":
        ok = (_lengths(array) <= MAX_FIELD_CHARS) & ~_has_nul(array)
        return _ColumnResult(ok, lambda: _encode(_objects(array, missing)))
    if kind == "int":
        ints = pc.fill_null(array, 0).to_numpy(zero_copy_only=False)
        return _ColumnResult(np.ones(n, bool), lambda: np.array(list(map(str, ints.tolist())), dtype=object))
    if kind == "float":
        values = pc.fill_null(array, 0.0).to_numpy(zero_copy_only=False)
        return _ColumnResult(np.isfinite(values),
                             lambda: np.array(list(map(float.__repr__, values.tolist())), dtype=object))
    if kind == "bool":
        flags = pc.fill_null(array, False).to_numpy(zero_copy_only=False)
        return _ColumnResult(np.ones(n, bool), lambda: np.where(flags, "true", "false").astype(object))
    return _ColumnResult(np.zeros(n, bool), None)


def _key_ok(key: str) -> bool:
    try:
        text_problem(key)
    except Invalid:
        return False
    return True


class ColumnarChecker:
    """Checks whole chunks; compile it once per batch (the JSON Schema validator inside too)."""

    def __init__(self, *, json_schema: dict[str, Any], id_field: str, label_field: str, labels: Sequence[str]):
        self.row_checker = RowChecker(json_schema=json_schema, id_field=id_field, label_field=label_field,
                                      labels=labels)
        self.id_field = id_field
        self.label_field = label_field
        self.labels = pa.array(sorted(set(labels)), type=pa.string())
        self.properties: dict[str, Any] = json_schema.get("properties") or {}
        self.rules = {name: _compile_rule(prop) for name, prop in self.properties.items()}
        required = json_schema.get("required") or []
        self.required = {*([r for r in required if isinstance(r, str)]), id_field}
        extra = json_schema.get("additionalProperties", True)
        self.extras_plain = extra is True
        # Keywords at the root we do not model (patternProperties, anyOf, ...): every row the slow way.
        self.every_row = (
            bool(set(json_schema) - _ROOT_KEYS) or json_schema.get("type") != "object"
            or not isinstance(required, list)
        )
        id_rule = self.rules.get(id_field)
        self.id_vectorised = id_rule is not None and id_rule.type in ("string", "integer", "number")

    def check(self, frame: FrameChunk, *, build: bool) -> Checked:
        n = len(frame)
        flag = np.full(n, self.every_row)
        drift: Counter[str] = Counter()
        results: dict[str, _ColumnResult] = {}
        present: dict[str, np.ndarray] = {}
        for name, column in frame.columns.items():
            there = ~column.missing
            if name not in self.properties:
                count = int(there.sum())
                if count:
                    drift[name] = count
            if not there.any():
                continue
            if not _key_ok(name):
                flag |= there
                continue
            if name in self.properties:
                rule = self.rules[name]
                if rule is None:
                    flag |= there
                    continue
                result = _apply(rule, column)
            elif self.extras_plain:
                result = _apply_extra(column)
            else:
                flag |= there
                continue
            flag |= there & ~result.ok
            results[name] = result
            present[name] = there
        for name in self.required:
            if name in present:
                flag |= ~present[name]
            else:
                flag[:] = True
        external_ids = np.full(n, "", dtype=object)
        if self.id_vectorised and self.id_field in results and results[self.id_field].strings is not None:
            raw_ids = results[self.id_field].strings()  # type: ignore[misc]
            external_ids = np.array([v.strip() for v in raw_ids], dtype=object)
            id_lengths = np.fromiter(map(len, external_ids), np.int64, n)
            flag |= (id_lengths == 0) | (id_lengths > MAX_EXTERNAL_ID_CHARS)
        else:
            flag[:] = True
        labels = np.full(n, None, dtype=object)
        if self.label_field in present and self.label_field in results:
            label_result = results[self.label_field]
            if label_result.strings is None:
                flag |= present[self.label_field]
            else:
                label_text = label_result.strings()
                known = pc.fill_null(pc.is_in(pa.array(label_text, type=pa.string()), value_set=self.labels),
                                     False).to_numpy(zero_copy_only=False)
                flag |= present[self.label_field] & ~known
                labels = np.where(present[self.label_field], label_text, None)
        elif self.label_field in frame.columns and (~frame.columns[self.label_field].missing).any():
            flag |= ~frame.columns[self.label_field].missing

        good_index = np.flatnonzero(~flag)
        good = GoodRows(
            numbers=frame.numbers[good_index].tolist(),
            external_ids=external_ids[good_index].tolist(),
            labels=labels[good_index].tolist(),
        )
        if build and len(good_index):
            good.payloads = self._payloads(good_index, results, present)
            good.digests = [hashlib.sha256(p.encode()).hexdigest() for p in good.payloads]
        index_of_good = good_index.tolist()
        bad: list[BadRow] = [BadRow(b.number, [RowProblem("(row)" if frame.fmt == "csv" else "(root)", b.message)],
                                    b.raw) for b in frame.broken]
        flagged = np.flatnonzero(flag)
        if len(flagged):
            self._fallback(frame, flagged, good, bad, index_of_good, build)
        checked = Checked(frame.received, good, bad, drift, good_index=index_of_good, fallback_rows=len(flagged))
        if build:
            _dedupe(checked)
        return checked

    def _payloads(self, rows: np.ndarray, results: dict[str, _ColumnResult],
                  present: dict[str, np.ndarray]) -> list[str]:
        """Canonical JSON (sorted keys, no spaces) of each good row, built column by column: one join
        per row over prebuilt key prefixes and value texts, no dict and no json.dumps per row."""
        parts: list[Any] = []
        opened = False  # whether the first part carries the "{" (else the first comma is swapped for it)
        for position, name in enumerate(sorted(n for n in results if n != self.label_field)):
            text = results[name].text
            if text is None:
                continue
            values = text()[rows].tolist()
            there = present[name][rows]
            key = encode_basestring(name) + ":"
            if there.all():
                first = position == 0 or not parts
                parts.append(repeat(("{" if first else ",") + key))
                opened = opened or first
                parts.append(values)
            else:
                prefix = "," + key
                parts.append([prefix + v if p else "" for v, p in zip(values, there.tolist(), strict=True)])
        parts.append(repeat("}"))
        joined = list(map("".join, zip(*parts, strict=False)))
        if not opened:
            joined = ["{" + text[1:] for text in joined]
        return joined

    def _fallback(self, frame: FrameChunk, flagged: np.ndarray, good: GoodRows, bad: list[BadRow],
                  index_of_good: list[int], build: bool) -> None:
        """Rows the vectorised rules could not vouch for: RowChecker decides and words the problems."""
        everything = frame.all_values() if len(flagged) > len(frame) // 4 else None
        for index in flagged.tolist():
            number = int(frame.numbers[index])
            values = everything[index] if everything is not None else frame.values(index)
            checked, problems = self.row_checker.check(number, values)
            if checked is None:
                bad.append(BadRow(number, problems, frame.raw(index)))
                continue
            good.numbers.append(number)
            good.external_ids.append(checked.external_id)
            good.labels.append(checked.label)
            index_of_good.append(index)
            if build:
                good.payloads.append(canonical_json(checked.payload))
                good.digests.append(checked.digest)
        bad.sort(key=lambda b: b.number)
        if len(good) and good.numbers != sorted(good.numbers):
            order = sorted(range(len(good)), key=good.numbers.__getitem__)
            for name in ("numbers", "external_ids", "labels", "payloads", "digests"):
                values = getattr(good, name)
                if values:
                    setattr(good, name, [values[i] for i in order])
            index_of_good[:] = [index_of_good[i] for i in order]


def _dedupe(checked: Checked) -> None:
    """Keep the first row of each id in the chunk; later ones are duplicates (same payload) or conflicts."""
    good = checked.good
    seen: dict[str, int] = {}
    keep: list[int] = []
    for position, external_id in enumerate(good.external_ids):
        first = seen.get(external_id)
        if first is None:
            seen[external_id] = position
            keep.append(position)
            continue
        checked.repeats.append(Repeat(good.numbers[position], external_id, good.numbers[first],
                                      good.digests[position] == good.digests[first],
                                      checked.good_index[position]))
    if len(keep) == len(good):
        return
    for name in ("numbers", "external_ids", "labels", "payloads", "digests"):
        values = getattr(good, name)
        setattr(good, name, [values[i] for i in keep])
    checked.good_index = [checked.good_index[i] for i in keep]
