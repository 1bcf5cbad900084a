"""Broker faults: a Redis restarted with its data lost, and RabbitMQ as the second broker with a worker killed
mid-scoring. Each runs a broker connection of its own (a throwaway redis-server; private queues on the shared
RabbitMQ) with a private worker and this process as the producer; the shared brokers are never restarted.

Messages are wake-up calls, never the only record of work: what a broker loses, the reconciler
(``items_reconcile``) sends again from the rows, so every item in the driver's ledger must come to rest with
nothing duplicated."""

from __future__ import annotations

import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings

from reviewapp.celery import app
from reviewapp.demo import payments
from scoring import services as scoring_services
from scoring.models import Prediction
from tests.conftest import wait_for
from tests.reliability.chaos import FULL, Ledger, audit_ledger, not_resting, signal_group, spawn_worker, wait_ready
from tests.reliability.helpers import record_figures
from tests.reliability.infra import ThrowawayRedis, producer_on
from tests.scoring.helpers import add_labeled_history, add_received

pytestmark = pytest.mark.skipif(not django_settings.IS_POSTGRES, reason="fault injection runs on PostgreSQL")
ITEMS = 6000 if FULL else 1000
CHUNK = 200
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _champion(source: Any) -> None:
    scoring_services.model_cache_clear()
    add_labeled_history(source, payments.generate_payments(1200, seed=81))
    assert scoring_services.model_train(source=source, actor=None).is_champion


def _reconcile_until_rest(ids: list[int], timeout: float) -> None:
    def reconciled() -> bool:
        scoring_services.items_reconcile()
        return not_resting(ids) == 0

    wait_for(reconciled, timeout=timeout, interval=1.0, what="every item to come to rest after the reconciler")


def test_redis_restarted_with_its_data_lost(rel_source: Any, settings: Any, tmp_path: Path) -> None:
    _champion(rel_source)
    ledger = Ledger(tmp_path / "ledger.txt")
    ledger.add([i.pk for i in add_received(rel_source, payments.generate_payments(ITEMS, seed=82, start=8_000_000))])
    ids = sorted(ledger.ids)

    broker = ThrowawayRedis(tmp_path / "redis")
    broker.start()
    log_path = tmp_path / "worker.log"
    worker = spawn_worker("scoring", log_path, CELERY_BROKER_URL=broker.url)
    try:
        with producer_on(broker.url):
            wait_ready([worker], log_path)
            for start in range(0, len(ids), CHUNK):
                app.send_task("scoring.score_items", kwargs={"item_ids": ids[start : start + CHUNK]})
            wait_for(
                lambda: Prediction.objects.filter(item_id__in=ids).count() >= CHUNK,
                timeout=120,
                what="the first chunk scored",
            )
            # kill -9 and start again on the same port: every queued and unacknowledged message is gone.
            broker.kill()
            scored_at_crash = Prediction.objects.filter(item_id__in=ids).count()
            crashed_at = time.monotonic()
            assert scored_at_crash < len(ids), "the worker finished before the crash; raise ITEMS"
            time.sleep(1.0)
            broker.start()
            import redis

            assert redis.Redis.from_url(broker.url).dbsize() == 0  # the data really is lost
            settings.RECONCILE_STUCK_SECONDS = 1
            # The same worker reconnects by itself; the reconciler re-sends what the broker forgot.
            _reconcile_until_rest(ids, timeout=240)
            recovery = time.monotonic() - crashed_at
    finally:
        signal_group(worker[0], signal.SIGKILL)
        broker.kill()

    figures = audit_ledger(ledger.read())
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert Prediction.objects.filter(item_id__in=ids).count() == len(ids)
    assert "Connection to broker lost" in log_path.read_text() or "Cannot connect" in log_path.read_text()
    record_figures(
        "redis_restarted_data_lost", **figures, scored_before_crash=scored_at_crash, recovery_seconds=round(recovery, 1)
    )


def _rabbitmq_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


def test_rabbitmq_sigkill_of_a_worker_mid_scoring(rel_source: Any, settings: Any, tmp_path: Path) -> None:
    if not _rabbitmq_reachable():
        pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672 (the second broker this suite proves)")
    _champion(rel_source)
    ledger = Ledger(tmp_path / "ledger.txt")
    ledger.add([i.pk for i in add_received(rel_source, payments.generate_payments(ITEMS, seed=83, start=9_000_000))])
    ids = sorted(ledger.ids)

    # Private queues on the shared RabbitMQ: other runs' workers never see these messages, nor we theirs.
    tag = uuid.uuid4().hex[:8]
    victim_queue, rescue_queue = f"chaos-rmq-victim-{tag}", f"chaos-rmq-rescue-{tag}"
    log_path = tmp_path / "workers.log"
    # The reconciler's re-sends (and anything else this process sends) go to the rescue worker's queue.
    routes = {"*": {"queue": rescue_queue}}
    victim = spawn_worker(victim_queue, log_path, CELERY_BROKER_URL=RABBITMQ_URL)
    rescue = spawn_worker(rescue_queue, log_path, CELERY_BROKER_URL=RABBITMQ_URL)
    try:
        with producer_on(RABBITMQ_URL, routes=routes):
            wait_ready([victim, rescue], log_path)
            for start in range(0, len(ids), CHUNK):
                app.send_task(
                    "scoring.score_items", kwargs={"item_ids": ids[start : start + CHUNK]}, queue=victim_queue
                )
            wait_for(
                lambda: Prediction.objects.filter(item_id__in=ids).count() >= CHUNK,
                timeout=120,
                what="the first chunk scored",
            )
            signal_group(victim[0], signal.SIGKILL)
            scored_at_kill = Prediction.objects.filter(item_id__in=ids).count()
            killed_at = time.monotonic()
            assert scored_at_kill < len(ids), "the worker finished before it could be killed; raise ITEMS"
            # RabbitMQ requeues the dead consumer's unacknowledged message at once (no visibility timeout),
            # but nobody consumes the victim's queue any more: only the reconciler brings those items back.
            settings.RECONCILE_STUCK_SECONDS = 1
            _reconcile_until_rest(ids, timeout=240)
            recovery = time.monotonic() - killed_at
            with app.connection_for_write() as conn:
                left_in_victim_queue = conn.default_channel.queue_declare(victim_queue, passive=True).message_count
    finally:
        signal_group(victim[0], signal.SIGKILL)
        signal_group(rescue[0], signal.SIGKILL)
        with producer_on(RABBITMQ_URL), app.connection_for_write() as conn:
            for queue in (victim_queue, rescue_queue):
                conn.default_channel.queue_delete(queue)

    figures = audit_ledger(ledger.read())
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert Prediction.objects.filter(item_id__in=ids).count() == len(ids)
    record_figures(
        "rabbitmq_sigkill_worker_mid_scoring",
        **figures,
        scored_before_kill=scored_at_kill,
        orphaned_messages=left_in_victim_queue,
        recovery_seconds=round(recovery, 1),
    )
