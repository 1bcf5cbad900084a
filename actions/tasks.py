"""Celery tasks of the action plane. They take ids, re-read the run and call one service."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task

from actions import services

logger = logging.getLogger(__name__)


def _arrival_queue(task: Task) -> str | None:
    """Retries go back to the queue the message came from (tests run a worker on a private queue)."""
    info = getattr(task.request, "delivery_info", None) or {}
    return info.get("routing_key") or None


class DeliverRunTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # A crash mid-delivery (a bug, the time limit) must not leave the run in `delivering` until
        # the reconciler finds it: count it as a transient failure now.
        run_id = (args or [kwargs.get("run_id")])[0]
        if run_id is not None:
            services.action_run_release_after_error(
                run_id=int(run_id), error=f"{exc.__class__.__name__}: {exc}", queue=_arrival_queue(self)
            )


# Request timeouts are capped at 30 s + 60 s per attempt (services.MAX_*_TIMEOUT); the limits sit above.
@shared_task(name="actions.deliver_run", bind=True, base=DeliverRunTask, soft_time_limit=110, time_limit=120)
def deliver_run(self: Task, run_id: int) -> str:
    outcome = services.action_run_deliver(run_id=int(run_id), queue=_arrival_queue(self))
    logger.info("action run %s: %s", run_id, outcome)
    return outcome


@shared_task(name="actions.reconcile")
def reconcile() -> dict[str, int]:
    """Also reachable from review.reconcile (RECONCILERS); scheduling either one is enough."""
    return services.action_runs_reconcile()
