"""The schema registry's rules, without Django: compatibility between versions, the diff shown on the
schema page, and a first schema inferred from a sample file for an admin to review.

Compatibility is judged the way a reader of old data sees it: a new version is backward compatible
when every payload valid under the old version is still valid under the new one. So new optional
properties, widened types and enums and relaxed bounds pass; anything that could refuse an old
payload is breaking. Keywords whose effect we do not model are breaking when added or changed (we
cannot prove them harmless) and compatible when removed (removing a constraint only widens).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly", "$schema",
    "$id", "$anchor",
})
_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties", "minContains")
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties", "maxContains")
_MODELLED = frozenset({
    "type", "enum", "const", "properties", "required", "additionalProperties", "items", "pattern", "format",
    "multipleOf", "uniqueItems", *_LOWER_BOUNDS, *_UPPER_BOUNDS,
})


@dataclass(frozen=True, slots=True)
class Change:
    path: str  # the property, dotted ("" for the payload itself)
    text: str
    breaking: bool


def schema_changes(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every difference that matters for validation, compatible or breaking, in words."""
    return _node_changes(old, new, "")


def schema_breaking_changes(old: dict[str, Any], new: dict[str, Any], path: str = "") -> list[str]:
    """Every change that could make data valid under ``old`` invalid under ``new``, in words."""
    return [c.text for c in _node_changes(old, new, path) if c.breaking]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _types(node: Any) -> list[str]:
    declared = node.get("type") if isinstance(node, dict) else None
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return [t for t in declared if isinstance(t, str)]
    return []


def _covers(new_types: list[str], old_type: str) -> bool:
    return old_type in new_types or (old_type == "integer" and "number" in new_types)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan


def _node_changes(old: dict[str, Any], new: dict[str, Any], path: str) -> list[Change]:
    changes: list[Change] = []
    where = f"'{path}'" if path else "the payload"
    changes += _object_changes(old, new, path, where)
    if path:  # the root's type is fixed to "object" by the service
        changes += _type_changes(old, new, path)
    changes += _value_changes(old, new, path, where)
    old_items, new_items = old.get("items"), new.get("items")
    if isinstance(old_items, dict) and isinstance(new_items, dict):
        changes += _node_changes(old_items, new_items, f"{path or '(root)'}[]")
    elif new_items != old_items and "items" in new:
        changes.append(Change(path, f"items of {where} changed", True))
    for key in sorted((set(old) | set(new)) - _MODELLED - ANNOTATIONS):
        if key not in new:
            changes.append(Change(path, f"{key} of {where} was removed", False))
        elif old.get(key) != new[key]:
            changes.append(Change(path, f"{key} of {where} changed; its effect cannot be checked, so it counts as "
                                        "breaking", True))
    for key in sorted(ANNOTATIONS & (set(old) | set(new)) - {"$schema", "$id"}):
        if old.get(key) != new.get(key):
            changes.append(Change(path, f"{key} of {where} changed", False))
    return changes


def _object_changes(old: dict[str, Any], new: dict[str, Any], path: str, where: str) -> list[Change]:
    changes: list[Change] = []
    old_props = old.get("properties") or {}
    new_props = new.get("properties") or {}
    old_required = set(old.get("required") or [])
    new_required = set(new.get("required") or [])
    for name in sorted(set(old_props) - set(new_props)):
        changes.append(Change(_join(path, name), f"property '{_join(path, name)}' was removed", True))
    for name in sorted(set(new_props) - set(old_props)):
        if name not in new_required:
            changes.append(Change(_join(path, name), f"property '{_join(path, name)}' was added (optional)", False))
    for name in sorted(new_required - old_required):
        changes.append(Change(_join(path, name), f"property '{_join(path, name)}' is now required", True))
    for name in sorted(old_required - new_required):
        changes.append(Change(_join(path, name), f"property '{_join(path, name)}' is no longer required", False))
    old_extra, new_extra = old.get("additionalProperties", True), new.get("additionalProperties", True)
    if new_extra is False and old_extra is not False:
        changes.append(Change(path, f"{where} no longer allows additional properties", True))
    elif isinstance(new_extra, dict) and new_extra != old_extra and old_extra is not False:
        changes.append(Change(path, f"additional properties of {where} are now constrained", True))
    elif new_extra != old_extra:
        changes.append(Change(path, f"{where} allows more additional properties", False))
    for name in sorted(set(old_props) & set(new_props)):
        before, after = old_props[name], new_props[name]
        if isinstance(before, dict) and isinstance(after, dict):
            changes += _node_changes(before, after, _join(path, name))
        elif before != after:
            changes.append(Change(_join(path, name), f"'{_join(path, name)}' changed", after is not True))
    return changes


def _type_changes(old: dict[str, Any], new: dict[str, Any], path: str) -> list[Change]:
    old_types, new_types = _types(old), _types(new)
    if old_types == new_types:
        return []
    was = "/".join(old_types) or "any type"
    now = "/".join(new_types) or "any type"
    if new_types and (not old_types or not all(_covers(new_types, t) for t in old_types)):
        return [Change(path, f"type of '{path}' changed from {was} to {now}", True)]
    return [Change(path, f"type of '{path}' widened from {was} to {now}", False)]


def _value_changes(old: dict[str, Any], new: dict[str, Any], path: str, where: str) -> list[Change]:
    changes: list[Change] = []
    if "enum" in new:
        if "enum" not in old:
            changes.append(Change(path, f"'{path}' is now limited to an enum", True))
        else:
            dropped = [v for v in old["enum"] if v not in new["enum"]]
            added = [v for v in new["enum"] if v not in old["enum"]]
            if dropped:
                changes.append(Change(path, f"enum of '{path}' no longer allows {', '.join(repr(v) for v in dropped)}",
                                      True))
            if added:
                changes.append(Change(path, f"enum of '{path}' now also allows {', '.join(repr(v) for v in added)}",
                                      False))
    elif "enum" in old:
        changes.append(Change(path, f"'{path}' is no longer limited to an enum", False))
    if "const" in new and new.get("const") != old.get("const"):
        changes.append(Change(path, f"'{path}' is now limited to a constant", True))
    elif "const" in old and "const" not in new:
        changes.append(Change(path, f"'{path}' is no longer limited to a constant", False))
    for key in _LOWER_BOUNDS + _UPPER_BOUNDS:
        lower = key in _LOWER_BOUNDS
        if key in new and key not in old:
            changes.append(Change(path, f"{key} of {where} tightened from none to {new[key]}", True))
        elif key in old and key not in new:
            changes.append(Change(path, f"{key} of {where} relaxed from {old[key]} to none", False))
        elif key in new and new[key] != old[key]:
            before, after = _num(old[key]), _num(new[key])
            tighter = not (after <= before if lower else after >= before)  # NaN (not a number) counts as tighter
            verb = "tightened" if tighter else "relaxed"
            changes.append(Change(path, f"{key} of {where} {verb} from {old[key]} to {new[key]}", tighter))
    for key in ("pattern", "format"):
        if key in new and new[key] != old.get(key):
            changes.append(Change(path, f"{key} of {where} changed from {old.get(key, 'none')!r} to {new[key]!r}",
                                  True))
        elif key in old and key not in new:
            changes.append(Change(path, f"{key} of {where} was removed", False))
    if "multipleOf" in new and new["multipleOf"] != old.get("multipleOf"):
        relaxed = "multipleOf" in old and _divides(new["multipleOf"], old["multipleOf"])
        changes.append(Change(path, f"multipleOf of {where} changed from {old.get('multipleOf', 'none')} to "
                                    f"{new['multipleOf']}", not relaxed))
    elif "multipleOf" in old and "multipleOf" not in new:
        changes.append(Change(path, f"multipleOf of {where} was removed", False))
    if new.get("uniqueItems") is True and old.get("uniqueItems") is not True:
        changes.append(Change(path, f"items of {where} must now be unique", True))
    return changes


def _divides(new: Any, old: Any) -> bool:
    """Every multiple of ``old`` is a multiple of ``new`` (so the new rule is looser)."""
    try:
        ratio = Decimal(str(old)) / Decimal(str(new))
    except (InvalidOperation, ArithmeticError):
        return False
    return ratio == ratio.to_integral_value()


# --- the diff shown side by side ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiffLine:
    tag: str  # "equal", "replace", "delete" (left only), "insert" (right only)
    left_number: int | None
    left: str
    right_number: int | None
    right: str


def schema_text(json_schema: dict[str, Any]) -> str:
    return json.dumps(json_schema, indent=2, sort_keys=True, ensure_ascii=False)


def side_by_side(old: dict[str, Any], new: dict[str, Any]) -> list[DiffLine]:
    """The two schemas as pretty JSON, line by line, aligned with difflib."""
    left, right = schema_text(old).splitlines(), schema_text(new).splitlines()
    out: list[DiffLine] = []
    matcher = difflib.SequenceMatcher(a=left, b=right, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        span = max(i2 - i1, j2 - j1)
        for k in range(span):
            li, rj = i1 + k, j1 + k
            has_left, has_right = li < i2, rj < j2
            line_tag = tag
            if tag == "replace" and not has_left:
                line_tag = "insert"
            elif tag == "replace" and not has_right:
                line_tag = "delete"
            out.append(DiffLine(
                line_tag, li + 1 if has_left else None, left[li] if has_left else "",
                rj + 1 if has_right else None, right[rj] if has_right else "",
            ))
    return out


# --- inference from a sample --------------------------------------------------------------------------

ENUM_MAX_VALUES = 20
ENUM_MAX_LENGTH = 64
LABEL_NAMES = frozenset({"label", "labels", "class", "target", "outcome", "verdict", "y"})
_INT_RE = re.compile(r"^[+-]?\d+$")
_BOOL_WORDS = {"true": True, "false": False}


@dataclass
class Inferred:
    schema: dict[str, Any]
    rows: int
    id_field: str = ""
    label_field: str = ""
    labels: list[str] = field(default_factory=list)
    text_fields: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "rows": self.rows, "id_field": self.id_field, "label_field": self.label_field,
                "labels": self.labels, "text_fields": self.text_fields, "notes": self.notes}


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _infer_column(values: list[Any]) -> tuple[dict[str, Any], list[Any]]:
    """A property for one column and the column's values as that type (for enums and ranges)."""
    kinds = {type(v) for v in values}
    if kinds == {bool}:
        return {"type": "boolean"}, values
    if kinds <= {int}:
        return {"type": "integer", "minimum": min(values), "maximum": max(values)}, values
    if kinds <= {int, float} and all(math.isfinite(v) for v in values):
        return {"type": "number", "minimum": min(values), "maximum": max(values)}, values
    if kinds == {str}:
        stripped = [v.strip() for v in values]
        lowered = {v.lower() for v in stripped}
        if lowered <= set(_BOOL_WORDS):
            return {"type": "boolean"}, [_BOOL_WORDS[v.lower()] for v in stripped]
        if all(_INT_RE.match(v) for v in stripped):
            ints = [int(v) for v in stripped]
            return {"type": "integer", "minimum": min(ints), "maximum": max(ints)}, ints
        numbers = [_float(v) for v in stripped]
        if all(n is not None and math.isfinite(n) for n in numbers):
            floats = [float(n) for n in numbers if n is not None]
            return {"type": "number", "minimum": _tidy(min(floats)), "maximum": _tidy(max(floats))}, floats
        return {"type": "string"}, values
    return {}, values  # mixed types: any value, and the admin decides


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _tidy(number: float) -> float | int:
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def infer_schema(columns: dict[str, list[Any]], *, rows: int) -> Inferred:
    """Infer types, enums for low-cardinality strings, numeric ranges and required properties (never
    missing in the sample) from a sample, plus guesses for the id and label fields."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    notes: list[str] = []
    uniques: list[str] = []
    label_candidates: list[tuple[str, list[str]]] = []
    text_fields: list[str] = []
    for name, raw in columns.items():
        present = [v for v in raw if not _missing(v)]
        if not present:
            properties[name] = {"type": "string"}
            notes.append(f"'{name}' is empty in the whole sample; typed as string.")
            continue
        prop, typed = _infer_column(present)
        if not prop:
            notes.append(f"'{name}' mixes value types in the sample; any value is accepted until you choose a type.")
        distinct = Counter(json.dumps(v, sort_keys=True, default=str) for v in typed)
        if len(distinct) == len(present) == len(raw) and prop.get("type") in ("string", "integer"):
            uniques.append(name)
        if prop.get("type") == "string":
            longest = max(len(v) for v in present)
            if len(distinct) <= ENUM_MAX_VALUES and longest <= ENUM_MAX_LENGTH and len(present) >= 2 * len(distinct):
                prop["enum"] = sorted({str(v) for v in present})
                if name.lower() in LABEL_NAMES or name.lower().startswith("is_"):
                    label_candidates.append((name, prop["enum"]))
            elif longest > 20:
                text_fields.append(name)
        properties[name] = prop
        if len(present) == len(raw) and rows > 0:
            required.append(name)
    id_field = next((n for n in uniques if n.lower() == "id" or n.lower().endswith(("_id", "id"))),
                    uniques[0] if uniques else "")
    for name in uniques:
        properties[name].pop("minimum", None)
        properties[name].pop("maximum", None)
    label_field, labels = ("", [])
    if label_candidates:
        label_field, labels = label_candidates[0]
        # History rows carry a label, new items never do: the label column must stay optional.
        if label_field in required:
            required.remove(label_field)
    schema: dict[str, Any] = {"$schema": SCHEMA_DIALECT, "type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if not id_field:
        notes.append("No column has a distinct value in every row; choose the id field yourself.")
    return Inferred(schema, rows, id_field, label_field, list(labels),
                    [t for t in text_fields if t not in (id_field, label_field)], notes)


def infer_from_rows(column_order: Sequence[str], records: Sequence[dict[str, Any]]) -> Inferred:
    """Convenience for row-shaped samples (JSON Lines): gather each column, missing where absent."""
    columns = {name: [r.get(name) for r in records] for name in column_order}
    return infer_schema(columns, rows=len(records))
