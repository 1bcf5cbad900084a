"""A worker paused (SIGSTOP) while it holds work, for longer than the work's lease: the reconciler's deadline
(RECONCILE_STUCK_SECONDS, 1 s here) after which items still ``received`` are sent again. The broker's own
lease (Redis visibility timeout, an hour) never comes into play: the rows are the ledger. While the worker
is frozen a rescue worker scores everything; then the worker is resumed (SIGCONT) and finishes its stale
message late. That late completion must change nothing: one prediction per item and model version, one
routing, no second decision."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings

from reviewapp.celery import app
from reviewapp.demo import payments
from scoring import services as scoring_services
from scoring.models import Prediction
from tests.conftest import database_url_for_worker, wait_for
from tests.reliability.chaos import FULL, Ledger, audit_ledger, not_resting, signal_group, spawn_worker, wait_ready
from tests.reliability.helpers import record_figures
from tests.reliability.infra import ThrowawayRedis, producer_on
from tests.scoring.helpers import add_labeled_history, add_received

pytestmark = pytest.mark.skipif(not django_settings.IS_POSTGRES, reason="fault injection runs on PostgreSQL")
ITEMS = 3000 if FULL else 1200
# Should the pause land inside the worker's write transaction, its row locks would stall everyone; the
# database ends such a session after this long (the lock-holder's lease), so recovery never waits for SIGCONT.
IDLE_IN_TRANSACTION_MS = 3000


def test_a_worker_paused_past_its_lease_does_not_duplicate_late_work(
    rel_source: Any, settings: Any, tmp_path: Path
) -> None:
    scoring_services.model_cache_clear()
    add_labeled_history(rel_source, payments.generate_payments(1200, seed=91))
    assert scoring_services.model_train(source=rel_source, actor=None).is_champion
    ledger = Ledger(tmp_path / "ledger.txt")
    ledger.add([i.pk for i in add_received(rel_source, payments.generate_payments(ITEMS, seed=92, start=9_500_000))])
    ids = sorted(ledger.ids)

    broker = ThrowawayRedis(tmp_path / "redis")
    broker.start()
    victim_log, rescue_log = tmp_path / "victim.log", tmp_path / "rescue.log"
    victim_db = (
        f"{database_url_for_worker()}?options=-c%20idle_in_transaction_session_timeout%3D{IDLE_IN_TRANSACTION_MS}"
    )
    victim = spawn_worker("scoring-victim", victim_log, CELERY_BROKER_URL=broker.url, DATABASE_URL=victim_db)
    rescue = spawn_worker("scoring", rescue_log, CELERY_BROKER_URL=broker.url)
    paused = False
    try:
        with producer_on(broker.url):
            wait_ready([victim, rescue], victim_log)
            # One message holding every item: the victim owns all of the work when it is frozen.
            app.send_task("scoring.score_items", kwargs={"item_ids": ids}, queue="scoring-victim")
            wait_for(
                lambda: re.search(r"score_items\[[^\]]+\] received", victim_log.read_text()),
                timeout=60,
                interval=0.02,
                what="the victim to take the message",
            )
            time.sleep(1.0)  # into the task: reading the items, predicting
            signal_group(victim[0], signal.SIGSTOP)
            paused, paused_at = True, time.monotonic()
            scored_at_pause = Prediction.objects.filter(item_id__in=ids).count()

            settings.RECONCILE_STUCK_SECONDS = 1

            def reconciled() -> bool:
                scoring_services.items_reconcile()
                return not_resting(ids) == 0

            wait_for(reconciled, timeout=240, interval=1.0, what="every item at rest while the victim is frozen")
            recovery = time.monotonic() - paused_at
            predictions_before_resume = Prediction.objects.filter(item_id__in=ids).count()
            figures_before_resume = audit_ledger(ids)
            time.sleep(2.0)  # well past the lease
            signal_group(victim[0], signal.SIGCONT)
            paused = False
            pause_seconds = time.monotonic() - paused_at
            # The stale message completes (or retries and then completes): either way it is finished.
            wait_for(
                lambda: re.search(r"score_items\[[^\]]+\] (succeeded|retry)", victim_log.read_text()),
                timeout=120,
                what="the resumed victim to finish its stale message",
            )
            outcome = re.search(r"score_items\[[^\]]+\] (succeeded|retry)[^\n]*", victim_log.read_text()).group(0)
            time.sleep(1.0)
    finally:
        if paused:
            signal_group(victim[0], signal.SIGCONT)
        signal_group(victim[0], signal.SIGKILL)
        signal_group(rescue[0], signal.SIGKILL)
        broker.kill()

    figures = audit_ledger(ledger.read())
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    # Nothing moved when the late worker finished: same predictions, same resting states.
    assert Prediction.objects.filter(item_id__in=ids).count() == predictions_before_resume == len(ids)
    assert figures == figures_before_resume
    assert "'scored': 0" in outcome or "retry" in outcome, outcome
    record_figures(
        "worker_paused_past_lease",
        **figures,
        scored_before_pause=scored_at_pause,
        pause_seconds=round(pause_seconds, 1),
        recovery_seconds=round(recovery, 1),
        late_completion=("retried" if "retry" in outcome else "no-op"),
    )
