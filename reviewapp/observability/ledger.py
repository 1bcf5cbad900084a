"""The Celery task-run ledger: cumulative counters per task name, one UPDATE per finished run."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.db import DatabaseError
from django.db.models import F
from django.utils import timezone

from reviewapp.observability.models import TASK_LATENCY_BUCKETS, TaskStat

logger = logging.getLogger(__name__)


def task_stat_record(*, task: str, state: str, seconds: float, at: datetime | None = None) -> None:
    """Count one finished task run: one UPDATE (autocommit) of the task's counter row.

    Why a table and not prometheus_client's multiprocess mode: workers run on other processes and often
    other hosts than the web process that serves /metrics, and multiprocess mode needs one shared
    directory per host and per restart. The database is already shared, the counters survive restarts,
    and the row per task name keeps the label set bounded. Never raises: a lost count must not fail a task.
    """
    at = at or timezone.now()
    outcome = {"SUCCESS": "successes", "FAILURE": "failures", "RETRY": "retries"}.get(state)
    updates: dict[str, Any] = {"runs": F("runs") + 1, "duration_sum": F("duration_sum") + seconds, "last_run_at": at}
    if outcome:
        updates[outcome] = F(outcome) + 1
    if outcome == "failures":
        updates["last_failure_at"] = at
    for bound, column in TASK_LATENCY_BUCKETS:
        if seconds <= bound:
            updates[column] = F(column) + 1
    name = task[:200]
    try:
        if not TaskStat.objects.filter(task=name).update(**updates):
            TaskStat.objects.bulk_create([TaskStat(task=name)], ignore_conflicts=True)
            TaskStat.objects.filter(task=name).update(**updates)
    except DatabaseError:
        logger.warning("could not record the run of task %s", name, exc_info=True)
