"""An upload through the API, processed by a real Celery worker process (no eager mode)."""

from __future__ import annotations

from typing import Any

from django.core.files.uploadedfile import SimpleUploadedFile

from reviewapp.ingest import services
from reviewapp.ingest.models import IngestBatch, Item
from tests.conftest import wait_for
from tests.ingest.conftest import payments_frame, to_bytes


def _settled(batch_id: int) -> bool:
    """No item of the batch still waits for the worker (so the test ends with the worker idle)."""
    return not Item.objects.filter(batch_id=batch_id, state__in=["received", "scored"]).exists()


def _status(batch_id: int) -> str | None:
    status = IngestBatch.objects.filter(pk=batch_id).values_list("status", flat=True).first()
    return status if status in ("done", "failed") else None


def test_worker_processes_uploaded_batches(live_worker, admin_api, source):
    frame = payments_frame(40, labeled=True)
    frame.loc[0:29, "is_fraud"] = ""  # 30 new items for scoring, 10 labeled history rows
    response = admin_api.post("/api/v1/sources/payments/batches/",
                              {"file": SimpleUploadedFile("live.csv", to_bytes(frame, "csv"))}, format="multipart")
    assert response.status_code == 202, response.content
    batch_id = response.json()["id"]
    assert wait_for(lambda: _status(batch_id), timeout=60, what="the worker to process the batch") == "done"
    batch = IngestBatch.objects.get(pk=batch_id)
    assert (batch.received, batch.accepted, batch.labeled, batch.attempts) == (40, 40, 10, 1)
    assert Item.objects.filter(batch=batch).count() == 40
    assert Item.objects.filter(batch=batch, state="decided").count() >= 10
    assert admin_api.get(f"/api/v1/batches/{batch_id}/").json()["progress"] == 1.0

    bad = frame.astype(object)
    bad.loc[3, "hour"] = "99"
    response = admin_api.post("/api/v1/sources/payments/batches/",
                              {"file": SimpleUploadedFile("bad.csv", to_bytes(bad, "csv"))}, format="multipart")
    bad_id = response.json()["id"]
    assert wait_for(lambda: _status(bad_id), timeout=60, what="the worker to refuse the batch") == "failed"
    errors = admin_api.get(f"/api/v1/batches/{bad_id}/errors/").json()["results"]
    assert errors[0]["row"] == 4 and errors[0]["field"] == "hour"
    assert Item.objects.count() == 40
    wait_for(lambda: _settled(batch_id), timeout=60, what="scoring of the batch to settle")


def test_reconciler_requeues_a_lost_message(live_worker, admin_user, source, settings):
    # A batch whose message never reached the broker: only the ledger knows about it.
    batch, _ = services.batch_submit(actor=admin_user, source=source, enqueue=False,
                                     uploaded_file=SimpleUploadedFile("lost.csv", to_bytes(payments_frame(5), "csv")))
    settings.RECONCILE_STUCK_SECONDS = 0
    assert services.batches_reconcile() == 1
    assert wait_for(lambda: _status(batch.pk), timeout=60, what="the re-enqueued batch") == "done"
    assert Item.objects.filter(batch=batch).count() == 5
    wait_for(lambda: _settled(batch.pk), timeout=60, what="scoring of the batch to settle")


def test_scoring_starts_before_the_batch_is_done(live_worker, admin_user, source, monkeypatch):
    """Items fan out to scoring as each chunk commits: the worker routes the first chunk's items
    while this process is still loading the batch."""
    monkeypatch.setattr(services, "CHUNK_ROWS", 10)
    batch, _ = services.batch_submit(actor=admin_user, source=source, enqueue=False,
                                     uploaded_file=SimpleUploadedFile("f.csv", to_bytes(payments_frame(30), "csv")))
    seen: list[str] = []
    real = services._bulk_chunk

    def after_each_chunk(*args: Any, **kwargs: Any) -> int:
        last = real(*args, **kwargs)  # committed: its scoring message has left
        if not seen:
            wait_for(lambda: Item.objects.filter(batch=batch).exclude(state="received").exists(), timeout=60,
                     what="the worker to pick up the first chunk")
            seen.append(IngestBatch.objects.get(pk=batch.pk).status)
        return last

    monkeypatch.setattr(services, "_bulk_chunk", after_each_chunk)
    services.batch_process(batch_id=batch.pk)
    assert seen == ["running"]
    assert IngestBatch.objects.get(pk=batch.pk).status == "done"
    wait_for(lambda: _settled(batch.pk), timeout=60, what="scoring of the batch to settle")

