"""The vectorised checker agrees with RowChecker row for row (no database).

Every row the columnar checker accepts must get exactly the external id, canonical payload, digest and
label that RowChecker gives it; every row RowChecker refuses must be refused with RowChecker's words.
The inputs are built to hit the edges: numbers Python parses but pyarrow does not, non-finite values,
integers beyond 2**53, booleans spelled every way, control characters, NUL, labels outside the set,
repeated ids, mixed JSON types, lone surrogates, Parquet NaN and narrow types.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from reviewapp.demo import payments
from reviewapp.ingest import columnar, parsing, readers

SCHEMA: dict[str, Any] = json.loads(json.dumps(payments.SCHEMA))
SCHEMA["properties"]["code"] = {"type": "string", "pattern": "^[A-Z]{2}$"}
SCHEMA["properties"]["score"] = {"type": "number", "exclusiveMinimum": -5.5, "maximum": 1e12}
SCHEMA["properties"]["meta"] = {"type": "object"}  # not vectorised: rows carrying it take the slow way
KW = {"json_schema": SCHEMA, "id_field": "payment_id", "label_field": "is_fraud", "labels": ["legit", "fraud"]}


def compare(path: Path, fmt: str, **options: Any) -> int:
    """Check every chunk both ways; return how many rows the fast path decided alone."""
    rows = parsing.RowChecker(**KW)
    fast = columnar.ColumnarChecker(**KW)
    alone = 0
    for frame in readers.iter_frames(path, fmt, chunk_size=300, id_field="payment_id", **options):
        checked = fast.check(frame, build=True)
        alone += len(frame) - checked.fallback_rows
        expected_good: dict[int, tuple] = {}
        expected_bad: dict[int, list[tuple[str, str]]] = {}
        for i, number in enumerate(frame.numbers.tolist()):
            row, problems = rows.check(number, frame.values(i))
            if row is not None:
                expected_good[number] = (row.external_id, parsing.canonical_json(row.payload), row.digest, row.label)
            else:
                expected_bad[number] = [(p.field, p.message) for p in problems]
        good = {n: (e, p, d, lab) for n, e, p, d, lab in zip(
            checked.good.numbers, checked.good.external_ids, checked.good.payloads, checked.good.digests,
            checked.good.labels, strict=True)}
        repeated = {r.number for r in checked.repeats}
        for number, expected in expected_good.items():
            if number in repeated:
                continue
            assert good.get(number) == expected, number
        assert set(good) | repeated == set(expected_good)
        bad = {b.number: [(p.field, p.message) for p in b.problems] for b in checked.bad}
        broken = {b.number for b in frame.broken}
        assert {n: v for n, v in bad.items() if n not in broken} == expected_bad
    return alone


NUMBERS = ["1.5", " 2 ", "1_000", "0x10", "1e5", "-0", "+7", "١٢", "nan", "inf", "1e400", "NaN", "", "abc",
           "12345678901234567890", "9007199254740993", "5.0", "-1", "1e-7", "0.1", "1E3", "-0.0", "\u00a03"]
INTEGERS = ["5", "5.0", "1e2", " 7 ", "+3", "-0", "007", "1.5", "x", "", "23", "24", "99999999999999999999", "1_0"]
BOOLEANS = ["True", "false", "1", "0", "TRUE", " yes", " true ", "", "tRuE", "2", "true\u00a0"]
TEXTS = ["a\nb", 'q"uote', "back\\slash", "tab\there", "nul\x00", "é ü 中", "\u2028", "x" * 2100, "\x01ctl"]


def test_csv_edges(tmp_path):
    rng = random.Random(5)
    frame = payments.generate_payments(1200, seed=3).astype(object)
    for i in range(len(frame)):
        if rng.random() < 0.3:
            frame.loc[i, "amount"] = rng.choice(NUMBERS)
        if rng.random() < 0.2:
            frame.loc[i, "hour"] = rng.choice(INTEGERS)
        if rng.random() < 0.2:
            frame.loc[i, "card_present"] = rng.choice(BOOLEANS)
        if rng.random() < 0.1:
            frame.loc[i, "currency"] = rng.choice(["USD", "usd", "", "EUR ", "GBP", "X" * 70])
        if rng.random() < 0.05:
            frame.loc[i, "payment_id"] = rng.choice(["", "  ", "dup-1", "dup-1", " sp ", "x" * 201])
        if rng.random() < 0.1:
            frame.loc[i, "is_fraud"] = rng.choice(["", "fraud", "legit", "maybe", "Fraud", " fraud"])
        if rng.random() < 0.1:
            frame.loc[i, "description"] = rng.choice(TEXTS)
    frame["code"] = [rng.choice(["AB", "ab", "ABC", "", "ZZ"]) for _ in range(len(frame))]
    frame["score"] = [rng.choice(["-5.5", "-5.4", "1e12", "1e13", "3", ""]) for _ in range(len(frame))]
    frame["extra_field"] = [rng.choice(["", "v", "1", "x\\y", "nul\x00"]) for _ in range(len(frame))]
    path = tmp_path / "edges.csv"
    frame.to_csv(path, index=False)
    dialect = parsing.sniff_csv(path.read_bytes()[: parsing.SNIFF_BYTES], encoding="utf-8", complete=True)
    assert compare(path, "csv", header=dialect.columns) > 0


def test_clean_files_never_take_the_slow_way(tmp_path):
    frame = payments.generate_payments(500, seed=9)
    for fmt in ("csv", "jsonl", "parquet"):
        path = tmp_path / f"clean.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        elif fmt == "jsonl":
            frame.to_json(path, orient="records", lines=True)
        else:
            frame.to_parquet(path, index=False)
        options = {}
        if fmt == "csv":
            options = {"header": parsing.sniff_csv(path.read_bytes(), encoding="utf-8", complete=True).columns}
        assert compare(path, fmt, **options) == 500, fmt


def test_jsonl_edges(tmp_path):
    rng = random.Random(7)
    lines = []
    for i in range(900):
        record = {
            "payment_id": rng.choice([f"j{i}", f"j{i}", i, "", None, " pad ", "dup"]),
            "amount": rng.choice([1, 1.5, 5.0, -2, "3.5", "x", None, True, 2**60, 1e300, 1e16, [1]]),
            "currency": rng.choice(["USD", "EUR", 5, None, "", "usd"]), "merchant_category": "fuel", "country": "US",
            "card_present": rng.choice([True, False, "true", 1, None, "0"]),
            "hour": rng.choice([1, 2.0, 2.5, "3", 25, -1, None, 2**63 - 1]),
            "extra": rng.choice([None, 1, 1.0, "s", True, {"a": 1}, 1e16, "nul\x00"]),
            "is_fraud": rng.choice([None, "fraud", "x", "legit"]),
        }
        if rng.random() < 0.1:
            record["meta"] = {"ip": "1.2.3.4"}
        lines.append(json.dumps(record))
    lines[5:5] = ["{broken", "[1,2]", '{"payment_id": "sur\\ud800", "amount": 1, "currency": "USD", '
                  '"merchant_category": "fuel", "country": "US", "card_present": true, "hour": 1}']
    path = tmp_path / "edges.jsonl"
    path.write_text("\n".join(lines) + "\n")
    compare(path, "jsonl")


def test_parquet_edges(tmp_path):
    n = 800
    table = pa.table({
        "payment_id": [f"q{i}" if i % 50 else None for i in range(n)],
        "amount": [float(i) / 3 if i % 97 else float("nan") for i in range(n)],
        "currency": pa.array(["USD", "EUR"] * (n // 2)).dictionary_encode(),
        "merchant_category": ["fuel"] * n, "country": ["US"] * n,
        "card_present": [bool(i % 2) for i in range(n)],
        "hour": pa.array([i % 30 for i in range(n)], pa.int32()),
        "account_age_days": [float(i % 5) if i % 7 else 2.5 for i in range(n)],
        "txn_count_24h": pa.array([i % 200 for i in range(n)], pa.uint8()),
        "extra": pa.array([i * 1.1 for i in range(n)], pa.float32()),
        "when": pa.array([i * 1000 for i in range(n)], pa.timestamp("ms")),
    })
    path = tmp_path / "edges.parquet"
    pq.write_table(table, path)
    compare(path, "parquet")


@pytest.mark.parametrize("text", ["1.5", "+1.5", "-.5", "5.", "1e5", "1E-7", "007", "-0", "1e400", "4.9e-325",
                                  "0.1", "123456789.123456789", "1_000", "0x10", " 1", "١٢", "1d", ".", "1e"])
def test_pyarrow_float_parsing_is_a_subset_of_python(text):
    """The fast path relies on this: what pyarrow parses, Python parses to the very same float."""
    try:
        parsed = pc.cast(pa.array([text]), pa.float64())[0].as_py()
    except pa.ArrowInvalid:
        return
    assert parsed == float(text) or (parsed != parsed and float(text) != float(text))
