"""Periodic observability work: drift reports and alert evaluation (beat schedules both; see settings)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from django.db import OperationalError

from reviewapp.ingest.models import Source
from reviewapp.observability import services

logger = logging.getLogger(__name__)


def _backoff(retries: int) -> int:
    return min(2**retries * 10, 300)


# Drift reads at most OBSERVABILITY_DRIFT_MAX_ROWS payloads twice per source: minutes at worst.
@shared_task(name="observability.compute_drift", bind=True, max_retries=3, soft_time_limit=900, time_limit=960)
def compute_drift(self: Task, source_id: int | None = None, window_days: int | None = None,
                  correlation_id: str | None = None) -> dict[str, Any]:
    """One new drift report per source (or for ``source_id``). ``correlation_id`` only ties the logs of
    a run started from the dashboard to its request; the signal handlers bind it."""
    try:
        if source_id is not None:
            reports = [services.drift_compute(source_id=source_id, window_days=window_days)]
        else:
            reports = services.drift_compute_all(window_days=window_days)
    except Source.DoesNotExist:
        logger.warning("drift requested for a source that no longer exists", extra={"source_id": source_id})
        return {"reports": []}
    except OperationalError as exc:  # the database is briefly unreachable; a rerun writes a fresh report
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from exc
    return {"reports": [r.pk for r in reports]}


@shared_task(name="observability.evaluate_alerts", bind=True, max_retries=2, soft_time_limit=110, time_limit=120)
def evaluate_alerts(self: Task) -> dict[str, int]:
    try:
        statuses = services.alerts_evaluate()
        changed = services.alerts_record(statuses=statuses)
    except OperationalError as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from exc
    return {"rules": len(statuses), "firing": sum(s.firing for s in statuses), **changed}
