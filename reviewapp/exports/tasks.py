from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from django.db import OperationalError

from reviewapp.exports.services import export_job_fail, export_job_run, exports_reconcile


class ExportTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        job_id = kwargs.get("job_id") if kwargs else (args[0] if args else None)
        if job_id is not None:
            export_job_fail(job_id=job_id, reason=f"{exc.__class__.__name__}: {exc}")


@shared_task(name="exports.run_export", base=ExportTask, bind=True, max_retries=5)
def run_export(self: Task, *, job_id: int) -> None:
    try:
        export_job_run(job_id=job_id)
    except OperationalError as exc:  # database briefly unreachable: retry, the job row keeps the state
        raise self.retry(exc=exc, countdown=min(2**self.request.retries * 5, 300)) from exc


@shared_task(name="exports.reconcile")
def reconcile_exports() -> int:
    return exports_reconcile()
