"""The worker process is killed while the receiver is handling the request: the reconciler takes the
run back, another worker sends it again with the same idempotency key, and the receiver applies the
effect once."""

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
import redis

from actions.models import ActionRun
from actions.services import action_runs_reconcile
from reviewapp.celery import app
from tests.actions.helpers import Reply, decide, make_config, make_item, wait_state
from tests.conftest import ROOT, database_url_for_worker, wait_for


def _spawn_worker(queue: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    """A worker of our own on a private queue, in its own process group so that it can be killed whole."""
    env = {**os.environ, "DATABASE_URL": database_url_for_worker(), "REVIEWAPP_ENV": "test"}
    env.pop("PYTEST_VERSION", None)
    name = f"actions-kill-{uuid.uuid4().hex[:8]}@%h"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "reviewapp", "worker", "-Q", queue, "-c", "1", "-n", name,
             "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return proc, name.replace("%h", os.uname().nodename)


def _wait_ready(workers: list[tuple[subprocess.Popen, str]], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    pending = dict(workers)
    while pending:
        for proc, hostname in list(pending.items()):
            if app.control.ping(destination=[hostname], timeout=0.5):
                del pending[proc]
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker {hostname} did not start:\n{log_path.read_text()[-3000:]}")


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait(timeout=10)


def test_worker_killed_mid_delivery_redelivers_with_same_key_and_one_effect(
    transactional_db: None, receiver: Any, loopback_allowed: Any, source: Any, admin_user: Any,
    private_queue: str, settings: Any, tmp_path: Path,
) -> None:
    log_path = tmp_path / "workers.log"
    # Two workers, started together to save time: the first takes the delivery and is killed; the
    # second reads another queue, where the reconciler's message goes.
    rescue_queue = f"{private_queue}-rescue"
    first = _spawn_worker(private_queue, log_path)
    second = _spawn_worker(rescue_queue, log_path)
    try:
        _wait_ready([first, second], log_path)
        # The receiver applies the effect, then hangs before answering: the worker is killed right then.
        receiver.reply(Reply(200, block=True))
        make_config(source, admin_user, url=f"{receiver.url}/hook", read_timeout_seconds=30)
        run = ActionRun.objects.get(decision=decide(make_item(source), label="fraud"))
        wait_for(lambda: len(receiver.requests) == 1, timeout=20, what="the first delivery to reach the receiver")
        run.refresh_from_db()
        assert run.state == "delivering" and run.attempts == 1

        _kill(first[0])
        # Nothing comes back by itself: the dead worker's message stays unacknowledged for the broker's
        # visibility timeout. The reconciler finds the run stuck past ACTIONS_STUCK_SECONDS.
        settings.ACTIONS_QUEUE = rescue_queue
        settings.ACTIONS_STUCK_SECONDS = 0.5
        wait_for(lambda: action_runs_reconcile()["stuck_redelivered"] == 1, timeout=10, what="the run reclaimed")
        run = wait_state(run.pk, "delivered", timeout=30)
    finally:
        receiver.release.set()
        _kill(first[0])
        _kill(second[0])
        redis.Redis.from_url(settings.CELERY_BROKER_URL).delete(rescue_queue)

    assert run.attempts == 2 and run.last_status_code == 200
    assert [r.key for r in receiver.requests] == [run.idempotency_key, run.idempotency_key]
    assert receiver.effects == {run.idempotency_key: 1}
