"""Fault-injection plumbing: workers of our own (killable, pausable), the ledger of accepted items, and the
checks that every accepted item rests in exactly one state with no effect duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.db.models import Count

from reviewapp.celery import app
from tests.conftest import ROOT, database_url_for_worker
from tests.reliability.helpers import RESTING_STATES

# Full size under `make chaos` (CHAOS_FULL=1); bounded in the normal suite.
FULL = os.environ.get("CHAOS_FULL") == "1"
BATCH_ITEMS = int(os.environ.get("CHAOS_ITEMS", "10000" if FULL else "3000"))


def spawn_worker(queues: str, log_path: Path, **env_extra: str) -> tuple[subprocess.Popen, str]:
    """A celery worker of our own, in its own process group so that it can be killed or paused whole."""
    env = {**os.environ, "DATABASE_URL": database_url_for_worker(), "REVIEWAPP_ENV": "test", **env_extra}
    env.pop("PYTEST_VERSION", None)
    name = f"chaos-{uuid.uuid4().hex[:8]}@%h"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "reviewapp", "worker", "-Q", queues, "-c", "1", "-n", name,
             "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return proc, name.replace("%h", os.uname().nodename)


def wait_ready(workers: list[tuple[subprocess.Popen, str]], log_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    pending = dict(workers)
    while pending:
        for proc, hostname in list(pending.items()):
            if app.control.ping(destination=[hostname], timeout=0.5):
                del pending[proc]
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker {hostname} did not start:\n{log_path.read_text()[-3000:]}")


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    if sig == signal.SIGKILL:
        proc.wait(timeout=10)


class Ledger:
    """The driver's own record of every item the system accepted, written before any fault."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: list[int] = []

    def add(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        with open(self.path, "a") as f:
            f.write("".join(f"{i}\n" for i in ids))
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[int]:
        return [int(line) for line in self.path.read_text().split()]


def not_resting(ids: list[int]) -> int:
    from reviewapp.ingest.models import Item

    return Item.objects.filter(pk__in=ids).exclude(state__in=RESTING_STATES).count()


def audit_ledger(ids: list[int]) -> dict[str, int]:
    """Lost = accepted but missing or not at rest (or failed without a reason); duplicated = any effect twice."""
    from actions.models import ActionRun
    from reviewapp.ingest.models import Item
    from reviewapp.review.models import Decision, ReviewTask, Verdict
    from scoring.models import Prediction

    items = Item.objects.filter(pk__in=ids)
    present = items.count()
    lost = (len(set(ids)) - present) + items.exclude(state__in=RESTING_STATES).count()
    lost += items.filter(state="failed", last_error="").count()

    def dupes(qs: Any, *fields: str) -> int:
        return qs.values(*fields).annotate(n=Count("id")).filter(n__gt=1).count()

    duplicated = (
        dupes(Prediction.objects.filter(item_id__in=ids), "item_id", "model_version_id")
        + dupes(Verdict.objects.filter(item_id__in=ids, withdrawn_at__isnull=True), "task_id")
        + dupes(ReviewTask.objects.filter(item_id__in=ids), "item_id", "kind", "round")
        + dupes(Decision.objects.filter(item_id__in=ids, is_current=True), "item_id")
        + dupes(ActionRun.objects.filter(decision__item_id__in=ids), "idempotency_key")
    )
    states = dict(items.values_list("state").annotate(n=Count("id")))
    return {"tried": len(ids), "lost": lost, "duplicated": duplicated, **{f"state_{k}": v for k, v in states.items()}}
