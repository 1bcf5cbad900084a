"""Background work of the policy editor: re-route waiting items under a newly applied policy."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from django.db import InterfaceError, OperationalError

from reviewapp.review.policy_services import policy_reroute_mark_failed, policy_reroute_waiting

logger = logging.getLogger(__name__)


class RerouteTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        # Retries exhausted or a bug: the run must end visibly failed, never "running" forever.
        policy_id, run_id = kwargs.get("policy_id"), kwargs.get("run_id")
        if policy_id is not None and run_id:
            policy_reroute_mark_failed(policy_id=int(policy_id), run_id=str(run_id),
                                       reason=f"{type(exc).__name__}: {exc}")


@shared_task(name="review.reroute_waiting", base=RerouteTask, bind=True, max_retries=3)
def reroute_waiting(self: Task, policy_id: int, run_id: str) -> dict[str, Any]:
    """Idempotent: only items still queued are touched, and a finished run is not run again."""
    try:
        result = policy_reroute_waiting(policy_id=policy_id, run_id=run_id)
    except (OperationalError, InterfaceError) as exc:
        raise self.retry(exc=exc, countdown=2 ** self.request.retries) from exc
    logger.info("re-route of policy %s (run %s): %s", policy_id, run_id, result)
    return result
