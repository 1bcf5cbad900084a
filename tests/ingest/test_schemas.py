"""The schema registry's rules without the database: compatibility case by case, the diff, inference."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from reviewapp.demo import payments
from reviewapp.ingest import schemas


def base() -> dict[str, Any]:
    schema = copy.deepcopy(payments.SCHEMA)
    schema["properties"]["tags"] = {"type": "array", "items": {"type": "string", "maxLength": 10}}
    schema["properties"]["meta"] = {"type": "object", "properties": {"ip": {"type": "string"}}, "required": ["ip"]}
    schema["properties"]["ratio"] = {"type": "number", "multipleOf": 0.5}
    return schema


def changed(edit: Any) -> dict[str, Any]:
    schema = base()
    edit(schema)
    return schema


P = "properties"
COMPATIBLE = {
    "new optional property": lambda s: s[P].update(channel={"type": "string"}),
    "widened enum": lambda s: s[P]["currency"]["enum"].append("JPY"),
    "enum removed": lambda s: s[P]["currency"].pop("enum"),
    "integer widened to number": lambda s: s[P]["hour"].update(type="number"),
    "type list widened": lambda s: s[P]["description"].update(type=["string", "null"]),
    "type removed": lambda s: s[P]["description"].pop("type"),
    "maximum raised": lambda s: s[P]["amount"].update(maximum=5_000_000),
    "maximum removed": lambda s: s[P]["amount"].pop("maximum"),
    "minimum lowered": lambda s: s[P]["hour"].update(minimum=-1),
    "maxLength raised": lambda s: s[P]["description"].update(maxLength=5000),
    "required dropped": lambda s: s["required"].remove("hour"),
    "nested required dropped": lambda s: s[P]["meta"].pop("required"),
    "nested optional property": lambda s: s[P]["meta"][P].update(port={"type": "integer"}),
    "array item bound relaxed": lambda s: s[P]["tags"]["items"].update(maxLength=20),
    "multipleOf relaxed to a divisor": lambda s: s[P]["ratio"].update(multipleOf=0.25),
    "multipleOf removed": lambda s: s[P]["ratio"].pop("multipleOf"),
    "description changed": lambda s: s[P]["amount"].update(description="in the payment's currency"),
    "title added": lambda s: s.update(title="Payments"),
    "additionalProperties false relaxed": lambda s: None,  # see test below (needs a closed base)
}
BREAKING = {
    "property removed": (lambda s: s[P].pop("txn_count_24h"), "'txn_count_24h' was removed"),
    "property now required": (lambda s: s["required"].append("account_age_days"),
                               "'account_age_days' is now required"),
    "new required property": (lambda s: (s[P].update(channel={"type": "string"}), s["required"].append("channel")),
                              "'channel' is now required"),
    "enum narrowed": (lambda s: s[P]["currency"].update(enum=["USD", "EUR"]), "no longer allows 'GBP'"),
    "enum added": (lambda s: s[P]["description"].update(enum=["a", "b"]), "'description' is now limited to an enum"),
    "type changed": (lambda s: s[P]["card_present"].update(type="string"), "type of 'card_present' changed"),
    "number narrowed to integer": (lambda s: s[P]["amount"].update(type="integer"), "type of 'amount' changed"),
    "maximum lowered": (lambda s: s[P]["amount"].update(maximum=1000), "maximum of 'amount' tightened"),
    "minimum added": (lambda s: s[P]["txn_count_24h"].update(minimum=1), "minimum of 'txn_count_24h' tightened"),
    "exclusiveMinimum added": (lambda s: s[P]["amount"].update(exclusiveMinimum=0),
                               "exclusiveMinimum of 'amount' tightened"),
    "maxLength lowered": (lambda s: s[P]["description"].update(maxLength=10), "maxLength of 'description' tightened"),
    "minLength raised": (lambda s: s[P]["payment_id"].update(minLength=5), "minLength of 'payment_id' tightened"),
    "pattern added": (lambda s: s[P]["payment_id"].update(pattern="^pay-"), "pattern of 'payment_id' changed"),
    "format added": (lambda s: s[P]["description"].update(format="email"), "format of 'description' changed"),
    "const added": (lambda s: s[P]["currency"].update(const="USD"), "'currency' is now limited to a constant"),
    "multipleOf tightened": (lambda s: s[P]["ratio"].update(multipleOf=1), "multipleOf of 'ratio' changed"),
    "closed to additional properties": (lambda s: s.update(additionalProperties=False),
                                        "no longer allows additional properties"),
    "additional properties constrained": (lambda s: s.update(additionalProperties={"type": "string"}),
                                          "additional properties of the payload are now constrained"),
    "nested property now required": (lambda s: s[P]["meta"]["required"].append("port"),
                                     "'meta.port' is now required"),
    "nested type changed": (lambda s: s[P]["meta"][P]["ip"].update(type="integer"), "type of 'meta.ip' changed"),
    "array items tightened": (lambda s: s[P]["tags"]["items"].update(maxLength=5),
                              "maxLength of 'tags[]' tightened"),
    "uniqueItems added": (lambda s: s[P]["tags"].update(uniqueItems=True), "must now be unique"),
    "unmodelled keyword added": (lambda s: s[P]["amount"].update(anyOf=[{"minimum": 1}]),
                                 "anyOf of 'amount' changed; its effect cannot be checked"),
}


@pytest.mark.parametrize("name", sorted(k for k in COMPATIBLE if "false relaxed" not in k))
def test_compatible_change(name):
    new = changed(COMPATIBLE[name])
    assert schemas.schema_breaking_changes(base(), new) == []
    assert schemas.schema_changes(base(), new), "a compatible change is still listed on the schema page"


@pytest.mark.parametrize("name", sorted(BREAKING))
def test_breaking_change(name):
    edit, words = BREAKING[name]
    breaking = schemas.schema_breaking_changes(base(), changed(edit))
    assert len(breaking) >= 1 and any(words in b for b in breaking), breaking


def test_opening_a_closed_schema_is_compatible():
    closed = {**base(), "additionalProperties": False}
    assert schemas.schema_breaking_changes(closed, base()) == []
    assert schemas.schema_breaking_changes(base(), closed) == ["the payload no longer allows additional properties"]


def test_every_breaking_change_is_listed_at_once():
    # All edits in one version (the removal last, the two additionalProperties edits would overwrite).
    names = [n for n in BREAKING if n not in ("property removed", "additional properties constrained")]
    names.append("property removed")

    def edit(s):
        for name in names:
            BREAKING[name][0](s)

    breaking = schemas.schema_breaking_changes(base(), changed(edit))
    for name in names:
        words = BREAKING[name][1]
        if "txn_count_24h" in words and name != "property removed":
            continue  # its minimum went with the property
        assert any(words in b for b in breaking), words


def test_side_by_side_diff_aligns_lines():
    new = changed(lambda s: s[P]["currency"]["enum"].append("JPY"))
    lines = schemas.side_by_side(base(), new)
    inserted = [line for line in lines if line.tag == "insert"]
    assert any('"JPY"' in line.right for line in inserted)
    assert all(line.left_number is None for line in inserted)
    assert sum(line.tag == "equal" for line in lines) > 20


def test_inference_from_text_columns():
    columns = {
        "payment_id": [f"p-{i}" for i in range(40)],
        "amount": [f"{i * 1.5:.2f}" for i in range(40)],
        "hour": [str(i % 24) for i in range(40)],
        "card_present": ["True" if i % 2 else "False" for i in range(40)],
        "currency": ["USD", "EUR"] * 20,
        "note": [("some free text that varies " + str(i)) if i % 3 else "" for i in range(40)],
        "is_fraud": ["legit"] * 30 + ["fraud"] * 5 + [""] * 5,
    }
    inferred = schemas.infer_schema(columns, rows=40)
    props = inferred.schema["properties"]
    assert props["payment_id"] == {"type": "string"}
    assert props["amount"] == {"type": "number", "minimum": 0, "maximum": 58.5}
    assert props["hour"] == {"type": "integer", "minimum": 0, "maximum": 23}
    assert props["card_present"] == {"type": "boolean"}
    assert props["currency"] == {"type": "string", "enum": ["EUR", "USD"]}
    assert "enum" not in props["note"]
    assert inferred.schema["required"] == ["payment_id", "amount", "hour", "card_present", "currency"]
    assert (inferred.id_field, inferred.label_field, inferred.labels) == ("payment_id", "is_fraud", ["fraud", "legit"])
    assert inferred.text_fields == ["note"]


def test_inference_from_typed_columns_and_mixed_types():
    inferred = schemas.infer_schema({"id": [1, 2, 3], "x": [1, 2.5, None], "flag": [True, False, True],
                                     "odd": [1, "a", None], "empty": [None, "", None]}, rows=3)
    props = inferred.schema["properties"]
    assert props["id"] == {"type": "integer"} and inferred.id_field == "id"
    assert props["x"] == {"type": "number", "minimum": 1, "maximum": 2.5}
    assert props["flag"] == {"type": "boolean"} and props["odd"] == {} and props["empty"] == {"type": "string"}
    assert inferred.schema["required"] == ["id", "flag"]
    assert any("'odd' mixes value types" in n for n in inferred.notes)
