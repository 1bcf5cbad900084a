"""With a real worker: the periodic tasks run, their logs carry the correlation id, the task ledger counts
runs, and /metrics shows Celery task latency."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from reviewapp.core.logging import bind_correlation_id
from reviewapp.observability.models import DriftReport, TaskStat
from reviewapp.observability.tasks import compute_drift, evaluate_alerts
from tests.conftest import wait_for
from tests.observability.helpers import build_sequence


def _wait(worker, predicate, what: str):
    try:
        return wait_for(predicate, timeout=60, what=what)
    except pytest.fail.Exception:
        pytest.fail(f"timed out waiting for {what}; worker log:\n{worker.log_path.read_text()[-4000:]}")


def test_worker_tasks_are_correlated_and_counted(live_worker, client):
    seq = build_sequence(now=timezone.now() - timedelta(minutes=1), slug="live")
    # An explicit correlation_id argument, e.g. from a dashboard request.
    compute_drift.apply_async(kwargs={"source_id": seq.source.pk, "correlation_id": "live-drift-1"})
    _wait(live_worker, lambda: DriftReport.objects.filter(source=seq.source).exists(), "a drift report")
    # A task published while an id is bound carries it in a header.
    with bind_correlation_id("live-alerts-1"):
        evaluate_alerts.apply_async()
    _wait(live_worker, lambda: TaskStat.objects.filter(task="observability.evaluate_alerts", successes__gte=1).exists(),
          "the alert evaluation to be counted")
    stat = _wait(live_worker,
                 lambda: TaskStat.objects.filter(task="observability.compute_drift", successes__gte=1).first(),
                 "the drift run to be counted")
    assert stat.runs >= 1 and stat.le_1800 >= 1 and stat.duration_sum > 0
    log = live_worker.log_path.read_text()
    # The drift service logs once per report; the alert evaluation logs each rule that starts firing.
    assert any("live-drift-1" in line and "drift computed" in line for line in log.splitlines()), log[-3000:]
    assert any("live-alerts-1" in line and "alert.fired" in line for line in log.splitlines()), log[-3000:]
    text = client.get("/metrics").content.decode()
    assert 'reviewapp_celery_task_runs_total{outcome="success",task="observability.compute_drift"}' in text
    assert 'reviewapp_celery_task_duration_seconds_bucket{le="+Inf",task="observability.compute_drift"}' in text
