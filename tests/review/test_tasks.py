from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.utils import timezone

from reviewapp.ingest.models import Item
from reviewapp.review import tasks
from reviewapp.review.models import ReviewTask
from reviewapp.review.services import task_claim_next
from tests.conftest import wait_for
from tests.factories import UserFactory, make_payments_source
from tests.review.helpers import make_scored_items


def _expired_claim() -> ReviewTask:
    source = make_payments_source(thresholds={})
    make_scored_items(source, [("legit", 0.5)])
    task = task_claim_next(user=UserFactory(role="analyst"))
    ReviewTask.objects.filter(pk=task.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    return task


def test_release_expired_leases_runs_on_a_real_worker(live_worker):
    task = _expired_claim()
    tasks.release_expired_leases.delay()
    wait_for(lambda: ReviewTask.objects.get(pk=task.pk).state == "open", timeout=30, what="lease released")
    assert Item.objects.get(pk=task.item_id).state == Item.State.QUEUED


@pytest.mark.django_db
def test_reconcile_releases_leases_and_reports_other_areas(caplog):
    task = _expired_claim()
    with caplog.at_level(logging.INFO, logger="reviewapp.review.tasks"):
        report = tasks.reconcile()
    assert report["leases_released"] == 1
    assert set(report) == {"reviewapp.ingest.services.batches_reconcile", "scoring.services.items_reconcile",
                           "scoring.services.models_reconcile",
                           "actions.services.action_runs_reconcile", "reviewapp.exports.services.exports_reconcile",
                           "leases_released"}
    assert ReviewTask.objects.get(pk=task.pk).state == "open"


def test_missing_reconciler_is_reported_not_fatal(caplog):
    with caplog.at_level(logging.WARNING, logger="reviewapp.review.tasks"):
        assert tasks._resolve("reviewapp.no_such_module", "x") is None
        assert tasks._resolve("reviewapp.review.services", "no_such_function") is None
    assert "not installed yet" in caplog.text and "does not exist yet" in caplog.text
