"""Celery tasks for scoring and training. They take ids, re-read state and call one service; both are
idempotent (items no longer ``received`` and versions no longer ``training`` are left alone). Only
transient database errors are retried; everything else is recorded on the rows by the services."""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

from celery import Task, shared_task
from celery.signals import worker_process_init
from django.conf import settings
from django.db import connection

from scoring.services import (
    TRANSIENT_DB_ERRORS,
    items_score,
    model_train_version,
    model_version_mark_failed,
    models_check_retraining,
    models_warm,
)

logger = logging.getLogger(__name__)


@worker_process_init.connect
def _warm_on_start(**_: Any) -> None:
    """Warm each new worker process in the background: imports and champion models load before work arrives.
    A thread, because worker_process_init must return within a few seconds; SCORING_WARM_ON_START=False skips it."""
    if getattr(settings, "SCORING_WARM_ON_START", True):
        threading.Thread(target=_warm, name="scoring-warm-up", daemon=True).start()


def _warm() -> None:
    started = time.monotonic()
    try:
        loaded = models_warm()
        _gc_freeze()
        logger.info("scoring warm-up done in %.1fs: model versions %s", time.monotonic() - started, loaded)
    except Exception:  # a warm-up that fails costs latency only: the first task loads what it needs
        logger.exception("scoring warm-up failed")
    finally:
        connection.close()  # this thread's own connection


def _gc_freeze() -> None:
    """Move everything alive after the warm-up (Django, pandas, scikit-learn, the loaded models: millions of
    objects) out of the cyclic collector's reach. A scoring chunk allocates tens of thousands of containers,
    which triggers collections, and each full one walked all of those objects again: 0.8-1.0 s of the 2.5 s of
    Python CPU per 40,000 items. Frozen objects are still freed by reference counting; only cycles among them
    (a model evicted from the cache) are kept."""
    gc.collect()
    gc.freeze()


def _backoff(retries: int) -> int:
    return min(60, 2 ** (retries + 1))


@shared_task(name="scoring.score_items", bind=True, max_retries=5)
def score_items(self: Task, item_ids: list[int]) -> dict[str, Any]:
    try:
        return items_score(item_ids=item_ids)
    except TRANSIENT_DB_ERRORS as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from exc


class TrainTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict, einfo: Any) -> None:
        """Retries exhausted or a hard error: the version must not stay ``training`` forever."""
        model_version_id = kwargs.get("model_version_id", args[0] if args else None)
        if model_version_id is None:
            return
        try:
            model_version_mark_failed(model_version_id=int(model_version_id),
                                      reason=f"training task failed: {type(exc).__name__}: {exc}")
        except TRANSIENT_DB_ERRORS:
            # The database is down too; the reconciler (models_reconcile) marks the version later.
            logger.exception("could not mark model version %s failed", model_version_id)


@shared_task(name="scoring.train_model", bind=True, base=TrainTask, max_retries=3)
def train_model(self: Task, model_version_id: int) -> str | None:
    try:
        mv = model_train_version(model_version_id=model_version_id)
    except TRANSIENT_DB_ERRORS as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from exc
    return mv.status if mv is not None else None


@shared_task(name="scoring.check_retraining", bind=True, max_retries=3)
def check_retraining(self: Task) -> dict[str, Any]:
    """Periodic (celery beat): start a training run for each source with enough new labels."""
    try:
        return models_check_retraining()
    except TRANSIENT_DB_ERRORS as exc:
        raise self.retry(exc=exc, countdown=_backoff(self.request.retries)) from exc
