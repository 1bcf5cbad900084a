"""Celery tasks of the ingest app. They carry ids only; the batch row is the record of the work."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from django.db import DatabaseError, OperationalError

from reviewapp.ingest import services

logger = logging.getLogger(__name__)

MAX_RETRIES = 5


class BatchTask(Task):
    """Marks the batch failed, with the reason, when the task gives up."""

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        batch_id = kwargs.get("batch_id") if kwargs else None
        if batch_id is None and args:
            batch_id = args[0]
        if batch_id is None:
            return
        reason = f"processing failed: {exc.__class__.__name__}: {exc}"[:2000]
        try:
            services.batch_mark_failed(batch_id=int(batch_id), reason=reason)
        except DatabaseError:
            # The database is down too; the reconciler fails or retries the batch once it is back.
            logger.exception("could not mark batch %s failed", batch_id)


@shared_task(name="ingest.process_batch", bind=True, base=BatchTask, acks_late=True, max_retries=MAX_RETRIES)
def process_batch(self: Task, batch_id: int) -> None:
    try:
        services.batch_process(batch_id=batch_id)
    except OperationalError as exc:
        # Transient database trouble (connection lost, lock timeout): back off and try again.
        raise self.retry(exc=exc, countdown=min(5 * 2**self.request.retries, 300)) from exc
