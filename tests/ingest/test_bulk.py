"""The PostgreSQL bulk path: chunks, checkpoint and resume, fan-out, drift, parity with the ordinary
path, and the bad inputs that only show up while reading a file."""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.db import OperationalError, connection

from reviewapp.core.models import AuditEvent
from reviewapp.ingest import bulk, readers, services
from reviewapp.ingest.models import BatchRowError, IngestBatch, Item
from reviewapp.review.models import Decision, Label
from tests.ingest.conftest import payments_frame, to_bytes, upload

pytestmark = pytest.mark.django_db


def run(actor: Any, source: Any, content: bytes, name: str, mode: str = "all_or_nothing") -> IngestBatch:
    batch, _ = services.batch_submit(actor=actor, source=source, uploaded_file=upload(content, name), mode=mode)
    services.batch_process(batch_id=batch.pk)
    batch.refresh_from_db()
    return batch


def test_the_bulk_path_runs_on_postgresql_chunk_by_chunk(admin_user, source, monkeypatch):
    assert connection.vendor == "postgresql"
    monkeypatch.setattr(services, "CHUNK_ROWS", 10)
    loads: list[int] = []
    real = bulk.load
    monkeypatch.setattr(bulk, "load", lambda **kw: loads.append(kw["prepared"].staged) or real(**kw))
    batch = run(admin_user, source, to_bytes(payments_frame(25, labeled=True), "csv"), "p.csv")
    assert batch.status == "done" and loads == [10, 10, 5]
    assert (batch.received, batch.accepted, batch.labeled, batch.total_rows, batch.rows_loaded) == (25, 25, 25, 25, 25)
    assert (batch.phase, batch.progress) == ("", 1.0)
    assert AuditEvent.objects.filter(verb="batch.chunk_loaded", object_id=str(batch.pk)).count() == 3
    assert AuditEvent.objects.filter(verb="batch.validated", object_id=str(batch.pk)).count() == 1
    assert Decision.objects.filter(origin="import").count() == Label.objects.filter(origin="import").count() == 25
    ids = list(Item.objects.filter(batch=batch).order_by("id").values_list("external_id", flat=True))
    assert ids == sorted(ids)  # items are inserted in file order


def test_scoring_fans_out_as_each_chunk_lands(admin_user, source, monkeypatch, django_capture_on_commit_callbacks):
    monkeypatch.setattr(services, "CHUNK_ROWS", 10)
    sent: list[list[int]] = []
    monkeypatch.setattr(services, "_send", lambda name, kwargs: sent.append(kwargs["item_ids"]) or True)
    batch, _ = services.batch_submit(actor=admin_user, source=source,
                                     uploaded_file=upload(to_bytes(payments_frame(25), "csv"), "p.csv"))
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        services.batch_process(batch_id=batch.pk)
    assert [len(ids) for ids in sent] == [10, 10, 5] and len(callbacks) == 3
    assert sorted(i for ids in sent for i in ids) == sorted(Item.objects.values_list("id", flat=True))


def test_a_failure_half_way_resumes_from_the_checkpoint(admin_user, source, monkeypatch):
    monkeypatch.setattr(services, "CHUNK_ROWS", 10)
    real = bulk.load
    calls = {"n": 0}

    def flaky(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OperationalError("connection to the database was lost")
        return real(**kwargs)

    monkeypatch.setattr(bulk, "load", flaky)
    frame = payments_frame(30, labeled=True)
    frame.loc[0:19, "is_fraud"] = ""
    batch, _ = services.batch_submit(actor=admin_user, source=source,
                                     uploaded_file=upload(to_bytes(frame, "csv"), "p.csv"))
    with pytest.raises(OperationalError):
        services.batch_process(batch_id=batch.pk)  # the task would retry with backoff
    batch.refresh_from_db()
    assert (batch.status, batch.phase, batch.rows_loaded, batch.accepted) == ("running", "loading", 10, 10)
    assert Item.objects.count() == 10  # chunk 1 is in; chunk 2 is all out

    services.batch_process(batch_id=batch.pk)
    batch.refresh_from_db()
    assert (batch.status, batch.attempts, batch.rows_loaded) == ("done", 2, 30)
    assert (batch.received, batch.accepted, batch.duplicates, batch.labeled) == (30, 30, 0, 10)
    assert Item.objects.count() == 30 and Label.objects.count() == 10
    started = AuditEvent.objects.filter(verb="batch.started", object_id=str(batch.pk)).order_by("id")
    assert [e.after["resume_after_row"] for e in started] == [None, 10]


def test_the_reconciler_failing_a_loading_batch_says_what_is_in(admin_user, source, monkeypatch):
    batch, _ = services.batch_submit(actor=admin_user, source=source,
                                     uploaded_file=upload(to_bytes(payments_frame(5), "csv"), "p.csv"))
    IngestBatch.objects.filter(pk=batch.pk).update(status="running", phase="loading", rows_loaded=3, total_rows=5)
    assert services.batch_mark_failed(batch_id=batch.pk, reason="gave up")
    batch.refresh_from_db()
    assert batch.status == "failed" and "3 of 5 rows had been loaded" in batch.error and batch.phase == ""


def test_repeated_ids_across_chunks(admin_user, source, monkeypatch):
    monkeypatch.setattr(services, "CHUNK_ROWS", 4)
    frame = payments_frame(8)
    twin = frame.iloc[[1]].copy()
    changed = frame.iloc[[2]].copy()
    changed["amount"] = 999.5
    content = to_bytes(frame._append([twin, changed], ignore_index=True), "csv")
    batch = run(admin_user, source, content, "dups.csv")
    assert (batch.received, batch.accepted, batch.duplicates, batch.conflicts) == (10, 8, 1, 1)
    error = BatchRowError.objects.get(batch=batch)
    assert (error.row_number, error.kind) == (10, "conflict")
    assert "an earlier row of this file" in error.message and ",999.5," in error.raw


def test_ordinary_path_agrees_with_the_bulk_path(admin_user, source, monkeypatch):
    frame = payments_frame(40, labeled=True).astype(object)
    frame.loc[0:29, "is_fraud"] = ""
    frame.loc[3, "amount"] = "lots"
    frame.loc[7, "currency"] = "XXX"
    frame["channel"] = ["web" if i % 3 else "" for i in range(40)]
    content = to_bytes(frame, "csv")
    fast = run(admin_user, source, content, "fast.csv", mode="quarantine")
    fast_items = dict(Item.objects.filter(batch=fast).values_list("external_id", "payload_sha256"))
    fast_errors = list(BatchRowError.objects.filter(batch=fast).values_list("row_number", "field", "message", "raw"))
    Label.objects.all().delete()
    Decision.objects.all().delete()
    Item.objects.all().delete()

    monkeypatch.setattr(services, "BULK_PATH", False)
    slow = run(admin_user, source, content + b"\n", "slow.csv", mode="quarantine")
    counts = ("received", "accepted", "duplicates", "conflicts", "rejected", "labeled")
    assert [getattr(slow, c) for c in counts] == [getattr(fast, c) for c in counts] == [40, 38, 0, 0, 2, 10]
    assert dict(Item.objects.filter(batch=slow).values_list("external_id", "payload_sha256")) == fast_items
    slow_errors = list(BatchRowError.objects.filter(batch=slow).values_list("row_number", "field", "message", "raw"))
    assert slow_errors == fast_errors
    assert slow.drift == fast.drift == {"channel": 26}


def test_unknown_fields_are_kept_and_counted_as_drift(admin_user, source):
    frame = payments_frame(6)
    frame["channel"] = ["web", "app", "", "web", "", "pos"]
    frame["ip"] = "10.0.0.1"
    batch = run(admin_user, source, to_bytes(frame, "csv"), "drift.csv")
    assert batch.status == "done" and batch.drift == {"ip": 6, "channel": 4}
    payload = Item.objects.get(external_id=frame.payment_id[0]).payload
    assert (payload["channel"], payload["ip"]) == ("web", "10.0.0.1")
    assert "channel" not in Item.objects.get(external_id=frame.payment_id[2]).payload

    jsonl = b'{"payment_id": "j1", "amount": 1, "currency": "USD", "merchant_category": "fuel", "country": "US", ' \
            b'"card_present": true, "hour": 3, "device": {"os": "ios"}}\n'
    nested = run(admin_user, source, jsonl, "nested.jsonl")
    assert nested.drift == {"device": 1} and Item.objects.get(external_id="j1").payload["device"] == {"os": "ios"}


@pytest.mark.parametrize(("content", "delimiter"), [
    (b"payment_id\tamount\tcurrency\tmerchant_category\tcountry\tcard_present\thour\np1\t1.5\tUSD\tfuel\tUS\ttrue\t1\n",
     "\t"),
    (b"payment_id|amount|currency|merchant_category|country|card_present|hour\np1|1.5|USD|fuel|US|true|1\n", "|"),
    (b"\xef\xbb\xbfpayment_id,amount,currency,merchant_category,country,card_present,hour\n"
     b"p1,\"1.5\",USD,fuel,US,true,1\n", ","),
])
def test_delimiters_and_bom_are_detected(admin_user, source, content, delimiter):
    batch = run(admin_user, source, content, "p.csv")
    assert batch.status == "done" and batch.delimiter == delimiter and batch.accepted == 1, batch.error
    assert Item.objects.get(external_id="p1").payload["amount"] == 1.5


def test_a_10_mb_field(admin_user, source):
    ten_mb = 10 * 1024 * 1024
    # CSV: a record larger than the reader's block fails the batch, with its place, in every mode.
    frame = payments_frame(3).astype(object)
    frame.loc[1, "description"] = "x" * ten_mb
    batch = run(admin_user, source, to_bytes(frame, "csv"), "big.csv", mode="quarantine")
    assert batch.status == "failed" and "after data row 1 is larger than 4 MB" in batch.error
    # JSON Lines and Parquet: the value is a row error (whatever the schema allows), the rest goes in.
    frame = payments_frame(3).astype(object)
    frame.loc[0, "description"] = "x" * ten_mb  # the schema allows 2000 characters
    frame["notes"] = ["", "y" * ten_mb, ""]  # outside the schema: the hard cap applies
    for fmt in ("jsonl", "parquet"):
        batch = run(admin_user, source, to_bytes(frame, fmt), f"big.{fmt}", mode="quarantine")
        assert (batch.status, batch.accepted, batch.rejected) == ("done", 1, 2), batch.error
        errors = {e.row_number: e for e in BatchRowError.objects.filter(batch=batch)}
        assert errors[1].field == "description" and "the limit is 1,048,576" in errors[1].message
        assert errors[2].field == "notes" and "the limit is 1,048,576" in errors[2].message
        assert len(errors[1].raw) == 10_000  # kept short; the quarantine page marks it cut
        Item.objects.all().delete()


def test_a_record_that_never_ends_fails_the_batch(admin_user, source, monkeypatch):
    monkeypatch.setattr(readers, "CSV_BLOCK_BYTES", 64 * 1024)
    content = to_bytes(payments_frame(3), "csv") + b'p9,1,USD,fuel,US,true,1,1,1,"unclosed ' + b"z" * 200_000 + b"\n"
    content += to_bytes(payments_frame(500, start=10), "csv").split(b"\n", 1)[1]
    batch = run(admin_user, source, content, "quote.csv", mode="quarantine")
    assert batch.status == "failed" and "a quote is never closed" in batch.error
    assert Item.objects.count() == 0  # validation reads the whole file first, in every mode


def test_a_parquet_file_claiming_too_many_rows_is_refused(admin_user, source, monkeypatch):
    monkeypatch.setattr(readers, "MAX_PARQUET_ROWS", 10)
    batch = run(admin_user, source, to_bytes(payments_frame(20), "parquet"), "many.parquet")
    assert batch.status == "failed" and "declares 20 rows" in batch.error and Item.objects.count() == 0


def test_a_parquet_row_group_too_big_to_hold_is_refused(admin_user, source, monkeypatch):
    monkeypatch.setattr(readers, "MAX_PARQUET_ROW_GROUP_BYTES", 1000)
    batch = run(admin_user, source, to_bytes(payments_frame(200), "parquet"), "groups.parquet")
    assert batch.status == "failed" and "smaller row groups" in batch.error and Item.objects.count() == 0


def test_a_parquet_decompression_bomb_is_refused(admin_user, source, monkeypatch):
    monkeypatch.setattr(readers, "MIN_BOMB_BYTES", 1024)
    monkeypatch.setattr(readers, "MAX_PARQUET_EXPANSION", 20)
    table = pa.table({"payment_id": [f"p{i}" for i in range(50_000)], "note": ["a" * 100] * 50_000})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", use_dictionary=False)
    batch = run(admin_user, source, buffer.getvalue(), "bomb.parquet")
    assert batch.status == "failed" and "decompression bomb" in batch.error and Item.objects.count() == 0


def test_a_jsonl_line_longer_than_the_cap_fails_the_batch(admin_user, source, monkeypatch):
    monkeypatch.setattr(readers, "MAX_ROW_BYTES", 1000)
    content = to_bytes(payments_frame(2), "jsonl") + b'{"payment_id": "' + b"x" * 5000 + b'"}\n'
    batch = run(admin_user, source, content, "long.jsonl", mode="quarantine")
    assert batch.status == "failed" and "Line 3 is longer than 1,000 bytes" in batch.error
    assert Item.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_parallel_loaders_commit_in_order_and_resume(admin_user, source, monkeypatch):
    """Committed for real (no test transaction), so two loader sessions run; chunk 2 fails, chunk 3 (in
    flight beside it) must not commit, and the retry finishes from chunk 1's checkpoint."""
    monkeypatch.setattr(services, "CHUNK_ROWS", 10)
    monkeypatch.setattr(services, "_send", lambda name, kwargs: True)
    real = bulk.load
    threads: set[str] = set()

    def flaky(**kwargs: Any) -> Any:
        import threading

        threads.add(threading.current_thread().name)
        if kwargs["prepared"].frame.last_number == 20:
            raise OperationalError("lost the connection")
        return real(**kwargs)

    monkeypatch.setattr(bulk, "load", flaky)
    batch, _ = services.batch_submit(actor=admin_user, source=source,
                                     uploaded_file=upload(to_bytes(payments_frame(40), "csv"), "p.csv"))
    with pytest.raises(OperationalError):
        services.batch_process(batch_id=batch.pk)
    batch.refresh_from_db()
    assert (batch.status, batch.rows_loaded, batch.accepted) == ("running", 10, 10)
    assert Item.objects.count() == 10 and all(t.startswith("ingest-load") for t in threads)

    monkeypatch.setattr(bulk, "load", real)
    services.batch_process(batch_id=batch.pk)
    batch.refresh_from_db()
    assert (batch.status, batch.rows_loaded, batch.accepted, batch.duplicates) == ("done", 40, 40, 0)
    assert Item.objects.count() == 40
