"""The task wrapper and the progress heartbeat (committed rows: transactional tests)."""

from __future__ import annotations

from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection, transaction

from reviewapp.ingest import services
from reviewapp.ingest.models import BatchRowError, IngestBatch
from reviewapp.ingest.tasks import process_batch
from tests.ingest.conftest import payments_frame, to_bytes


def test_progress_is_published_while_the_batch_transaction_is_open(transactional_db, admin_user, source):
    batch, _ = services.batch_submit(actor=admin_user, source=source, enqueue=False,
                                     uploaded_file=SimpleUploadedFile("p.csv", to_bytes(payments_frame(2), "csv")))
    IngestBatch.objects.filter(pk=batch.pk).update(status="running")
    seen: list[tuple[int, float | None]] = []
    progress = services._Progress(batch.pk, lambda rows, fraction: seen.append((rows, fraction)))
    try:
        with transaction.atomic():
            # Rows referencing the batch hold a key-share lock on it, as during real processing; the
            # progress update goes through another connection and must neither wait nor roll back.
            BatchRowError.objects.create(batch=batch, row_number=1, field="x", message="y")
            progress.update(17, 0.5)
            transaction.set_rollback(True)
    finally:
        progress.close()
    assert seen == [(17, 0.5)]
    # PostgreSQL gets live progress (and a heartbeat); SQLite has one writer, so it waits for the end.
    expected = 17 if connection.vendor == "postgresql" else 0
    assert IngestBatch.objects.get(pk=batch.pk).rows_processed == expected


def test_task_failure_marks_the_batch_failed(transactional_db, admin_user, source):
    batch, _ = services.batch_submit(actor=admin_user, source=source, enqueue=False,
                                     uploaded_file=SimpleUploadedFile("p.csv", to_bytes(payments_frame(2), "csv")))
    process_batch.on_failure(RuntimeError("boom"), "task-id", (), {"batch_id": batch.pk}, None)
    batch.refresh_from_db()
    assert batch.status == "failed" and "RuntimeError: boom" in batch.error

