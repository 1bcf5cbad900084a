"""Fault injection (bounded here; `make chaos` runs the full sizes). The driver records every accepted item
in its own ledger before the fault; afterwards, with the queues drained and the reconciler run, every item
must rest in exactly one state and no effect may be duplicated.

Covered elsewhere and referenced, not repeated: a poison item that crashes the scorer
(tests/scoring/test_services.py::test_a_poison_row_fails_alone), SIGKILL during an action delivery
(tests/actions/test_killed_worker.py), CSV formula injection (tests/exports), oversized and malformed
uploads (tests/ingest), SSRF targets for webhooks (tests/actions/test_security.py)."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings
from django.core.files.uploadedfile import SimpleUploadedFile

from reviewapp.celery import app
from reviewapp.demo import payments
from reviewapp.ingest.models import IngestBatch, Item
from scoring import services as scoring_services
from scoring.models import Prediction
from tests.conftest import api_client_for, wait_for
from tests.reliability.chaos import (
    BATCH_ITEMS,
    Ledger,
    audit_ledger,
    not_resting,
    signal_group,
    spawn_worker,
    wait_ready,
)
from tests.reliability.helpers import record_figures, run_together
from tests.scoring.helpers import add_labeled_history, add_received

pytestmark = pytest.mark.skipif(not django_settings.IS_POSTGRES, reason="fault injection runs on PostgreSQL")
CHUNK = 500


def test_sigkill_of_a_worker_mid_scoring_loses_and_duplicates_nothing(
    rel_source: Any, settings: Any, tmp_path: Path
) -> None:
    scoring_services.model_cache_clear()
    add_labeled_history(rel_source, payments.generate_payments(1200, seed=71))
    champion = scoring_services.model_train(source=rel_source, actor=None)
    assert champion.is_champion
    ledger = Ledger(tmp_path / "ledger.txt")
    items = add_received(rel_source, payments.generate_payments(BATCH_ITEMS, seed=72, start=5_000_000))
    ledger.add([i.pk for i in items])

    log_path = tmp_path / "workers.log"
    private = f"chaos-scoring-{uuid.uuid4().hex[:6]}"
    victim = spawn_worker(private, log_path)
    rescue = spawn_worker("scoring", log_path)
    try:
        wait_ready([victim, rescue], log_path)
        ids = sorted(ledger.ids)
        for start in range(0, len(ids), CHUNK):
            app.send_task("scoring.score_items", kwargs={"item_ids": ids[start:start + CHUNK]}, queue=private)
        # Kill in the middle: after the first chunk committed, long before the last.
        wait_for(lambda: Prediction.objects.filter(item_id__in=ids).count() >= CHUNK, timeout=120,
                 what="the first chunk scored")
        scored_at_kill = Prediction.objects.filter(item_id__in=ids).count()
        signal_group(victim[0], signal.SIGKILL)
        killed_at = time.monotonic()
        assert scored_at_kill < len(ids), "the worker finished before it could be killed; raise CHAOS_ITEMS"
        # The killed worker's messages stay unacknowledged (visibility timeout): only the reconciler helps.
        settings.RECONCILE_STUCK_SECONDS = 1

        def reconciled() -> bool:
            scoring_services.items_reconcile()
            return not_resting(ids) == 0

        wait_for(reconciled, timeout=240, interval=1.0, what="every item to come to rest after the reconciler")
        recovery = time.monotonic() - killed_at
    finally:
        signal_group(victim[0], signal.SIGKILL)
        signal_group(rescue[0], signal.SIGKILL)
        redis.Redis.from_url(django_settings.CELERY_BROKER_URL).delete(private)

    figures = audit_ledger(ledger.read())
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert Prediction.objects.filter(item_id__in=ids).count() == len(ids)
    record_figures("sigkill_worker_mid_scoring", **figures, scored_before_kill=scored_at_kill,
                   recovery_seconds=round(recovery, 1))


def test_a_duplicate_upload_racing_itself_makes_one_batch(rel_source: Any, make_reviewers: Any,
                                                          celery_worker_process: Any) -> None:
    from tests.factories import UserFactory

    # The default upload root: the live worker processes the batch from there. (A per-test root would be
    # invisible to the worker, which would fail the batch and let a late racer create a second one.)
    uploader = UserFactory(username="uploader", role="ml_engineer")
    content = payments.generate_payments(200, seed=73, start=7_000_000).to_csv(index=False).encode()
    racers = 8

    def upload() -> tuple[int, int]:
        client = api_client_for(uploader)
        response = client.post(f"/api/v1/sources/{rel_source.slug}/batches/",
                               {"file": SimpleUploadedFile("same.csv", content, "text/csv")}, format="multipart")
        return response.status_code, response.json()["id"]

    results = run_together([upload] * racers)
    codes = sorted(code for code, _ in results)
    assert len({batch_id for _, batch_id in results}) == 1, results
    assert codes == [200] * (racers - 1) + [202], codes  # one created, the others told it exists
    assert IngestBatch.objects.filter(source=rel_source).count() == 1
    batch = IngestBatch.objects.get(source=rel_source)
    wait_for(lambda: IngestBatch.objects.get(pk=batch.pk).status in ("done", "failed"), timeout=120, interval=0.5,
             what="the worker to load the batch")
    assert IngestBatch.objects.get(pk=batch.pk).status == "done"
    assert Item.objects.filter(source=rel_source).count() == 200
    record_figures("duplicate_upload_race", tried=racers, batches=1, lost=0, duplicated=0)
