"""Periodic review jobs (celery beat, see CELERY_BEAT_SCHEDULE). Both are idempotent: they read the
ledger (rows with states and deadlines) and fix what is stuck, so running them twice is harmless."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from celery import shared_task

from reviewapp.review.services import leases_release_expired

logger = logging.getLogger(__name__)

# Reconcilers owned by other areas, looked up at run time so this module imports without them.
RECONCILERS: tuple[tuple[str, str], ...] = (
    ("reviewapp.ingest.services", "batches_reconcile"),
    ("scoring.services", "items_reconcile"),
    ("scoring.services", "models_reconcile"),
    ("actions.services", "action_runs_reconcile"),
    ("reviewapp.exports.services", "exports_reconcile"),
)


def _resolve(module_name: str, function_name: str) -> Callable[[], Any] | None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the module exists but one of its own imports is broken: that must be loud
        logger.warning("reconcile: %s is not installed yet; %s skipped", module_name, function_name)
        return None
    function = getattr(module, function_name, None)
    if function is None:
        logger.warning("reconcile: %s.%s does not exist yet; skipped", module_name, function_name)
    return function


@shared_task(name="review.release_expired_leases")
def release_expired_leases() -> int:
    released = leases_release_expired()
    if released:
        logger.info("released %d expired claim(s)", released)
    return released


@shared_task(name="review.reconcile")
def reconcile() -> dict[str, Any]:
    """Re-enqueue stuck ingest batches and scoring work, then return abandoned claims to the queue."""
    report: dict[str, Any] = {}
    failed: list[str] = []
    for module_name, function_name in RECONCILERS:
        name = f"{module_name}.{function_name}"
        function = _resolve(module_name, function_name)
        if function is None:
            report[name] = "missing"
            continue
        try:
            report[name] = function()
        except Exception:
            # One area's failure must not stop the others; the task still fails loudly below.
            logger.exception("reconcile: %s failed", name)
            failed.append(name)
    report["leases_released"] = leases_release_expired()
    logger.info("reconcile: %s", report)
    if failed:
        raise RuntimeError(f"reconcile: {', '.join(failed)} failed (see the log); the rest ran")
    return report
from reviewapp.review import policy_tasks  # noqa: E402,F401
