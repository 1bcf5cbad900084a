"""batch_submit and batch_process: formats, validation, modes, idempotency, labels, bad files."""

from __future__ import annotations

import io
import os
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from django.utils import timezone

from reviewapp.core.errors import PayloadTooLarge, ValidationFailed
from reviewapp.core.models import AuditEvent
from reviewapp.ingest import parsing, services
from reviewapp.ingest.models import BatchRowError, IngestBatch, Item
from reviewapp.review.models import Decision, Label
from tests.ingest.conftest import payments_frame, to_bytes, upload

pytestmark = pytest.mark.django_db


def submit_and_process(actor: Any, source: Any, content: bytes, name: str, mode: str = "all_or_nothing"):
    batch, created = services.batch_submit(actor=actor, source=source, uploaded_file=upload(content, name), mode=mode)
    services.batch_process(batch_id=batch.pk)
    batch.refresh_from_db()
    return batch, created


def errors_of(batch: IngestBatch) -> list[tuple[int, str, str]]:
    return list(batch.row_errors.order_by("row_number", "id").values_list("row_number", "field", "message"))


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_each_format_is_ingested(admin_user, source, fmt, django_capture_on_commit_callbacks):
    frame = payments_frame(30)
    with django_capture_on_commit_callbacks() as callbacks:
        batch, created = services.batch_submit(
            actor=admin_user, source=source, uploaded_file=upload(to_bytes(frame, fmt), f"p.{fmt}")
        )
    assert created and batch.status == "queued" and batch.file_format == fmt
    assert len(callbacks) == 1  # the process_batch task goes out after commit
    services.batch_process(batch_id=batch.pk)
    batch.refresh_from_db()
    assert batch.status == "done", batch.error
    assert (batch.received, batch.accepted, batch.rejected, batch.duplicates, batch.labeled) == (30, 30, 0, 0, 0)
    assert batch.rows_processed == 30 and batch.attempts == 1
    item = Item.objects.get(source=source, external_id=frame.payment_id[0])
    assert item.state == "received" and item.batch == batch and item.schema_version.label == "1.0"
    assert item.payload["hour"] == int(frame.hour[0]) and isinstance(item.payload["hour"], int)
    assert item.payload["card_present"] is bool(frame.card_present[0])
    assert item.payload["amount"] == pytest.approx(float(frame.amount[0]))
    assert "is_fraud" not in item.payload
    assert AuditEvent.objects.filter(verb="batch.processed", object_id=str(batch.pk)).exists()


def test_same_rows_in_another_format_are_duplicates(admin_user, source):
    frame = payments_frame(20)
    first, _ = submit_and_process(admin_user, source, to_bytes(frame, "csv"), "p.csv")
    second, created = submit_and_process(admin_user, source, to_bytes(frame, "parquet"), "p.parquet")
    assert created and second.pk != first.pk
    assert (second.accepted, second.duplicates, second.conflicts) == (0, 20, 0)
    assert Item.objects.count() == 20


def test_scoring_is_enqueued_in_chunks_after_commit(admin_user, source, settings, django_capture_on_commit_callbacks,
                                                    monkeypatch):
    settings.SCORING_CHUNK_SIZE = 7
    sent: list[dict] = []
    monkeypatch.setattr(services, "_send", lambda name, kwargs: sent.append({"name": name, **kwargs}) or True)
    batch, _ = services.batch_submit(actor=admin_user, source=source,
                                     uploaded_file=upload(to_bytes(payments_frame(20), "csv"), "p.csv"))
    with django_capture_on_commit_callbacks(execute=True):
        services.batch_process(batch_id=batch.pk)
    assert [m["name"] for m in sent] == ["scoring.score_items"] * 3
    assert [len(m["item_ids"]) for m in sent] == [7, 7, 6]
    assert sorted(i for m in sent for i in m["item_ids"]) == sorted(Item.objects.values_list("id", flat=True))


def _csv_with_bad_rows() -> bytes:
    frame = payments_frame(10).astype(object)
    frame.loc[2, "amount"] = "abc"  # row 3
    frame.loc[4, "currency"] = "XXX"  # row 5
    frame.loc[6, "payment_id"] = ""  # row 7
    return frame.to_csv(index=False).encode()


def test_all_or_nothing_stores_nothing_and_reports_rows(admin_user, source):
    batch, _ = submit_and_process(admin_user, source, _csv_with_bad_rows(), "bad.csv")
    assert batch.status == "failed"
    assert (batch.received, batch.rejected, batch.accepted) == (10, 3, 0)
    assert "nothing was stored" in batch.error and "row 3" in batch.error
    errors = errors_of(batch)
    assert [(row, field) for row, field, _ in errors] == [(3, "amount"), (5, "currency"), (7, "payment_id")]
    assert "not of type 'number'" in errors[0][2]
    assert Item.objects.count() == 0


def test_all_or_nothing_undoes_earlier_chunks(admin_user, source, monkeypatch):
    monkeypatch.setattr(services, "CHUNK_ROWS", 10)
    frame = payments_frame(30, labeled=True).astype(object)
    frame.loc[25, "hour"] = "25"  # out of range, in the third chunk
    batch, _ = submit_and_process(admin_user, source, frame.to_csv(index=False).encode(), "late.csv")
    assert batch.status == "failed" and batch.rejected == 1
    assert errors_of(batch)[0][:2] == (26, "hour")
    assert Item.objects.count() == 0 and Decision.objects.count() == 0 and Label.objects.count() == 0


def test_quarantine_keeps_good_rows_and_raw_bad_ones(admin_user, source):
    batch, _ = submit_and_process(admin_user, source, _csv_with_bad_rows(), "bad.csv", mode="quarantine")
    assert batch.status == "done"
    assert (batch.received, batch.accepted, batch.rejected) == (10, 7, 3)
    assert Item.objects.count() == 7
    bad = BatchRowError.objects.get(batch=batch, row_number=3)
    assert bad.field == "amount" and ",abc," in bad.raw


def test_identical_file_returns_the_earlier_batch(admin_user, source):
    content = to_bytes(payments_frame(15), "csv")
    first, created = submit_and_process(admin_user, source, content, "a.csv")
    assert created
    again, created_again = services.batch_submit(actor=admin_user, source=source,
                                                 uploaded_file=upload(content, "renamed.csv"))
    assert not created_again and again.pk == first.pk
    assert IngestBatch.objects.count() == 1 and Item.objects.count() == 15


def test_failed_batch_may_be_sent_again(admin_user, source):
    content = _csv_with_bad_rows()
    first, _ = submit_and_process(admin_user, source, content, "bad.csv")
    assert first.status == "failed"
    second, created = services.batch_submit(actor=admin_user, source=source, uploaded_file=upload(content, "bad.csv"))
    assert created and second.pk != first.pk


def test_changed_row_is_a_conflict_and_never_overwritten(admin_user, source):
    frame = payments_frame(10)
    submit_and_process(admin_user, source, to_bytes(frame, "csv"), "a.csv")
    original = Item.objects.get(external_id=frame.payment_id[4]).payload
    frame.loc[4, "amount"] = 123456.5
    batch, _ = submit_and_process(admin_user, source, to_bytes(frame, "csv"), "b.csv")
    assert batch.status == "done"
    assert (batch.accepted, batch.duplicates, batch.conflicts, batch.rejected) == (0, 9, 1, 0)
    error = BatchRowError.objects.get(batch=batch)
    assert (error.row_number, error.field) == (5, "payment_id") and error.message.startswith("conflict:")
    assert Item.objects.get(external_id=frame.payment_id[4]).payload == original


def test_repeated_ids_inside_one_file(admin_user, source):
    frame = payments_frame(5)
    frame = frame._append([frame.iloc[0], frame.iloc[1].replace({frame.iloc[1].amount: 1.25})], ignore_index=True)
    batch, _ = submit_and_process(admin_user, source, to_bytes(frame, "csv"), "dup.csv")
    assert (batch.received, batch.accepted, batch.duplicates, batch.conflicts) == (7, 5, 1, 1)
    assert errors_of(batch)[0][0] == 7


def test_labeled_rows_become_decided_with_imported_labels(admin_user, source):
    frame = payments_frame(12, labeled=True)
    frame.loc[0:3, "is_fraud"] = ""  # four unlabeled rows
    batch, _ = submit_and_process(admin_user, source, to_bytes(frame, "csv"), "history.csv")
    assert batch.status == "done" and batch.accepted == 12 and batch.labeled == 8
    assert Item.objects.filter(state="decided").count() == 8
    assert Item.objects.filter(state="received").count() == 4
    item = Item.objects.get(external_id=frame.payment_id[5])
    decision = Decision.objects.get(item=item)
    assert (decision.origin, decision.label, decision.is_current) == ("import", frame.is_fraud[5], True)
    label = Label.objects.get(item=item)
    assert (label.origin, label.label, label.decision_id) == ("import", frame.is_fraud[5], decision.pk)
    assert "is_fraud" not in item.payload


def test_label_outside_the_set_is_a_row_error(admin_user, source):
    frame = payments_frame(4, labeled=True)
    frame.loc[1, "is_fraud"] = "maybe"
    batch, _ = submit_and_process(admin_user, source, to_bytes(frame, "jsonl"), "l.jsonl")
    assert batch.status == "failed"
    assert [(r, f) for r, f, _ in errors_of(batch)] == [(2, "is_fraud")]


def test_nan_and_infinity_are_rejected_in_every_format(admin_user, source):
    frame = payments_frame(3).astype(object)
    frame.loc[0, "amount"] = "NaN"
    frame.loc[2, "amount"] = "inf"
    csv_batch, _ = submit_and_process(admin_user, source, frame.to_csv(index=False).encode(), "n.csv",
                                      mode="quarantine")
    assert [(r, f) for r, f, _ in errors_of(csv_batch)] == [(1, "amount"), (3, "amount")]
    assert "NaN and Infinity" in errors_of(csv_batch)[0][2]

    jsonl = b'{"payment_id": "j1", "amount": NaN, "currency": "USD", "merchant_category": "fuel", ' \
            b'"country": "US", "card_present": true, "hour": 3}\n'
    jsonl_batch, _ = submit_and_process(admin_user, source, jsonl, "n.jsonl")
    assert jsonl_batch.status == "failed" and "invalid JSON" in errors_of(jsonl_batch)[0][2]

    table = pa.table({"payment_id": ["q1"], "amount": [float("inf")], "currency": ["USD"],
                      "merchant_category": ["fuel"], "country": ["US"], "card_present": [True], "hour": [3]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    parquet_batch, _ = submit_and_process(admin_user, source, buffer.getvalue(), "n.parquet")
    assert parquet_batch.status == "failed" and errors_of(parquet_batch)[0][:2] == (1, "amount")
    assert Item.objects.count() == 1  # the one good CSV row, quarantine mode


def test_missing_values_are_absent_not_null(admin_user, source):
    frame = payments_frame(2)
    frame["description"] = frame["description"].astype(object)
    frame.loc[0, "description"] = None
    frame.loc[0, "account_age_days"] = None
    for fmt in ("csv", "parquet"):
        Item.objects.all().delete()
        batch, _ = submit_and_process(admin_user, source, to_bytes(frame, fmt), f"m.{fmt}")
        assert batch.status == "done", batch.error
        payload = Item.objects.get(external_id=frame.payment_id[0]).payload
        assert "description" not in payload and "account_age_days" not in payload


@pytest.mark.parametrize(
    ("content", "name", "words"),
    [
        (b"", "empty.csv", "empty"),
        (b"\n\n  \n", "blank.csv", "empty"),
        (os.urandom(4096), "garbage.csv", "UTF-8"),
        (b"\x00\x01binary\x00" * 10, "nul.csv", "binary"),
        (b"PAR1" + os.urandom(100), "lying.csv", "Parquet"),
        (b"payment_id,amount\n1,2\n", "data.parquet", "not a Parquet file"),
        (b"\x1f\x8b\x08\x00" + os.urandom(50), "p.csv", "Compressed"),
        (b"\x1f\x8b\x08\x00" + os.urandom(50), "p.csv.gz", "Compressed files (gzip)"),
        (b"PK\x03\x04" + os.urandom(50), "p.zip", "Compressed files (zip)"),
        (b"PK\x03\x04" + os.urandom(50), "p.csv", "Compressed files (zip)"),
        (b"\xff\xfep\x00a\x00", "p.csv", "UTF-16"),
        (b"payment_id,amount\n\x81\x02\xfe\x03,4\n", "ctl.csv", "binary data (control byte"),
        (b"a,b\n1,2\n", "sheet.xlsx", "Unsupported"),
        (b"payment_id,amount\n1,2\n", "p.jsonl", "JSON Lines"),
    ],
)
def test_refused_files_create_nothing(admin_user, source, content, name, words):
    with pytest.raises(ValidationFailed) as excinfo:
        services.batch_submit(actor=admin_user, source=source, uploaded_file=upload(content, name))
    assert words in excinfo.value.detail
    assert excinfo.value.errors[0]["field"] == "file"
    assert IngestBatch.objects.count() == 0


def test_upload_limit_is_enforced_while_streaming(admin_user, source, settings, upload_root):
    settings.MAX_UPLOAD_BYTES = 100
    content = to_bytes(payments_frame(5), "csv")

    class Stream(io.BytesIO):
        name = "big.csv"  # no size attribute: only streaming can tell

    with pytest.raises(PayloadTooLarge):
        services.batch_submit(actor=admin_user, source=source, uploaded_file=Stream(content))
    assert IngestBatch.objects.count() == 0
    assert not [p for p in upload_root.rglob("*") if p.is_file()]  # the partial copy is gone


def test_missing_id_column_fails_the_batch(admin_user, source):
    frame = payments_frame(5).drop(columns=["payment_id"])
    batch, _ = submit_and_process(admin_user, source, to_bytes(frame, "csv"), "noid.csv")
    assert batch.status == "failed" and "'payment_id' column" in batch.error
    assert errors_of(batch)[0][:2] == (0, "(file)")
    parquet, _ = submit_and_process(admin_user, source, to_bytes(frame, "parquet"), "noid.parquet")
    assert parquet.status == "failed" and "'payment_id' column" in parquet.error
    assert Item.objects.count() == 0


def test_bad_utf8_deep_in_the_file_fails_the_batch(admin_user, source, monkeypatch):
    # The encoding is judged on the first SNIFF_BYTES; invalid UTF-8 after that fails the batch.
    monkeypatch.setattr(parsing, "SNIFF_BYTES", 4096)
    content = to_bytes(payments_frame(1500), "csv") + b"pay-x,1.0,USD,fuel,US,True,3,1,1,caf\xe9 \xff\n"
    batch, _ = submit_and_process(admin_user, source, content, "late.csv")
    assert batch.status == "failed" and "UTF-8" in batch.error
    assert Item.objects.count() == 0


def test_utf8_broken_in_the_middle_is_refused(admin_user, source):
    content = "payment_id,description\np-1,café\n".encode() + b"p-2,caf\xe9\n"
    with pytest.raises(ValidationFailed) as excinfo:
        services.batch_submit(actor=admin_user, source=source, uploaded_file=upload(content, "mixed.csv"))
    assert "not valid UTF-8" in excinfo.value.detail and IngestBatch.objects.count() == 0


def test_windows_1252_is_read_with_a_note(admin_user, source):
    frame = payments_frame(3)
    frame.loc[1, "description"] = "café crème – 5€"
    batch, _ = submit_and_process(admin_user, source, frame.to_csv(index=False).encode("cp1252"), "legacy.csv")
    assert batch.status == "done" and batch.encoding == "cp1252", batch.error
    assert any("Windows-1252" in note for note in batch.notes)
    assert Item.objects.get(external_id=frame.payment_id[1]).payload["description"] == "café crème – 5€"


def test_ragged_csv_rows_are_row_errors(admin_user, source):
    content = to_bytes(payments_frame(3), "csv") + b"a,b,c,d,e,f,g,h,i,j,k,l,m\npay-short,1.5\n"
    batch, _ = submit_and_process(admin_user, source, content, "ragged.csv")
    assert batch.status == "failed" and "the row has 13 fields; the header has 10" in batch.error
    assert [(r, f) for r, f, _ in errors_of(batch)] == [(4, "(row)"), (5, "(row)")]
    assert Item.objects.count() == 0
    kept, _ = submit_and_process(admin_user, source, content + b"\n", "ragged2.csv", mode="quarantine")
    assert (kept.status, kept.accepted, kept.rejected) == ("done", 3, 2)
    assert BatchRowError.objects.get(batch=kept, row_number=5).raw == "pay-short,1.5"


def test_semicolon_csv_and_multiline_fields(admin_user, source):
    frame = payments_frame(3)
    frame.loc[1, "description"] = "two\nlines; with separators"
    content = frame.to_csv(index=False, sep=";").encode()
    batch, _ = submit_and_process(admin_user, source, content, "semi.csv")
    assert batch.status == "done" and batch.accepted == 3, batch.error
    assert Item.objects.get(external_id=frame.payment_id[1]).payload["description"] == "two\nlines; with separators"


def test_processing_twice_changes_nothing(admin_user, source):
    batch, _ = submit_and_process(admin_user, source, to_bytes(payments_frame(5), "csv"), "a.csv")
    events = AuditEvent.objects.count()
    services.batch_process(batch_id=batch.pk)
    batch.refresh_from_db()
    assert batch.attempts == 1 and Item.objects.count() == 5 and AuditEvent.objects.count() == events


def test_reconcile_requeues_stuck_batches_and_fails_exhausted_ones(admin_user, source, settings, monkeypatch,
                                                                   django_capture_on_commit_callbacks):
    sent: list[int] = []
    monkeypatch.setattr(services, "_enqueue_batch", sent.append)
    stuck, _ = services.batch_submit(actor=admin_user, source=source, uploaded_file=upload(b"payment_id\n1\n", "a.csv"))
    tired, _ = services.batch_submit(actor=admin_user, source=source, uploaded_file=upload(b"payment_id\n2\n", "b.csv"))
    fresh, _ = services.batch_submit(actor=admin_user, source=source, uploaded_file=upload(b"payment_id\n3\n", "c.csv"))
    old = timezone.now() - timedelta(seconds=settings.RECONCILE_STUCK_SECONDS + 5)
    IngestBatch.objects.filter(pk=stuck.pk).update(state_changed_at=old)
    IngestBatch.objects.filter(pk=tired.pk).update(state_changed_at=old, status="running",
                                                   attempts=settings.MAX_TASK_ATTEMPTS)
    with django_capture_on_commit_callbacks(execute=True):
        touched = services.batches_reconcile()
    assert touched == 2
    assert sent == [stuck.pk]
    tired.refresh_from_db()
    fresh.refresh_from_db()
    assert tired.status == "failed" and "gave up" in tired.error
    assert fresh.status == "queued"


def test_exhausted_batch_is_failed_instead_of_run(admin_user, source, settings):
    batch, _ = services.batch_submit(actor=admin_user, source=source,
                                     uploaded_file=upload(to_bytes(payments_frame(3), "csv"), "a.csv"))
    IngestBatch.objects.filter(pk=batch.pk).update(attempts=settings.MAX_TASK_ATTEMPTS, status="running")
    services.batch_process(batch_id=batch.pk)
    batch.refresh_from_db()
    assert batch.status == "failed" and "gave up" in batch.error and Item.objects.count() == 0


def test_stored_errors_are_capped_but_all_bad_rows_counted(admin_user, source, monkeypatch):
    monkeypatch.setattr(services, "MAX_STORED_ERRORS", 5)
    frame = payments_frame(12).astype(object)
    frame["currency"] = "XXX"
    batch, _ = submit_and_process(admin_user, source, frame.to_csv(index=False).encode(), "all-bad.csv")
    assert batch.status == "failed" and batch.rejected == 12
    assert BatchRowError.objects.filter(batch=batch).count() == 5


def test_jsonl_rows_are_numbered_by_line(admin_user, source):
    good = to_bytes(payments_frame(2), "jsonl").decode().splitlines()
    content = "\n".join([good[0], "", "{broken", '["not", "an", "object"]', good[1]]).encode()
    batch, _ = submit_and_process(admin_user, source, content, "lines.jsonl", mode="quarantine")
    assert (batch.received, batch.accepted, batch.rejected) == (4, 2, 2)
    errors = errors_of(batch)
    assert [(r, f) for r, f, _ in errors] == [(3, "(root)"), (4, "(root)")]
    assert "invalid JSON" in errors[0][2] and "JSON object" in errors[1][2]
    assert BatchRowError.objects.get(batch=batch, row_number=3).raw == "{broken"
