"""Outbox services: runs created with their decision, approvals, rejections, overrides and their
compensations, reconciliation of stuck runs, backoff."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.template.loader import render_to_string
from django.utils import timezone

from actions import selectors
from actions.models import ActionRun
from actions.services import (
    action_run_approve,
    action_run_deliver,
    action_run_reject,
    action_run_replay,
    action_runs_create_for_decisions,
    action_runs_reconcile,
    backoff_delay,
    idempotency_key_for,
)
from reviewapp.core.errors import Conflict, PermissionDeniedError, ValidationFailed
from reviewapp.core.models import AuditEvent
from reviewapp.review.models import Decision
from tests.actions.helpers import Reply, decide, make_config, make_item, wait_state
from tests.conftest import wait_for


def test_runs_are_created_with_their_decision_and_roll_back_with_it(source, admin_user):
    fraud, _ = make_config(source, admin_user, url="https://hooks.example.com/a", label="fraud")
    anything, _ = make_config(source, admin_user, kind="log", label="")
    gated, _ = make_config(source, admin_user, url="https://hooks.example.com/b", label="fraud", high_risk=True)
    make_config(source, admin_user, url="https://hooks.example.com/c", label="fraud", enabled=False)
    make_config(source, admin_user, url="https://hooks.example.com/d", compensation_only=True)
    item = make_item(source)

    with pytest.raises(RuntimeError), transaction.atomic():
        decide(item, label="fraud")
        raise RuntimeError("the decision's transaction fails")
    assert not ActionRun.objects.exists()

    decision = decide(item, label="fraud")
    runs = {r.config_id: r for r in ActionRun.objects.filter(decision=decision)}
    assert set(runs) == {fraud.pk, anything.pk, gated.pk}
    assert runs[fraud.pk].state == "pending" and runs[fraud.pk].next_attempt_at is not None
    assert runs[gated.pk].state == "pending_approval" and runs[gated.pk].next_attempt_at is None
    key = runs[fraud.pk].idempotency_key
    assert key == idempotency_key_for(decision_id=decision.pk, config_id=fraud.pk) and len(key) == 64
    assert AuditEvent.objects.filter(verb="action_runs.created", object_id=str(decision.pk)).count() == 1

    legit = decide(make_item(source), label="legit")
    assert [r.config_id for r in ActionRun.objects.filter(decision=legit)] == [anything.pk]


def test_bulk_auto_decisions_get_runs_in_one_statement(source, admin_user, django_assert_max_num_queries):
    make_config(source, admin_user, kind="log")
    items = [make_item(source) for _ in range(5)]
    decisions = Decision.objects.bulk_create(
        [Decision(item=i, label="legit", origin=Decision.Origin.MODEL) for i in items]
    )
    imported = Decision.objects.create(item=make_item(source), label="legit", origin=Decision.Origin.IMPORT)
    with django_assert_max_num_queries(10):
        created = action_runs_create_for_decisions(decisions=[*decisions, imported])
    assert len(created) == 5 and imported.action_runs.count() == 0
    assert action_runs_create_for_decisions(decisions=decisions) == []


def test_approval_rules(source, admin_user, bea, analyst):
    make_config(source, admin_user, url="https://hooks.example.com/a", high_risk=True)
    run = ActionRun.objects.get(decision=decide(make_item(source), label="fraud", reviewer=bea))
    with pytest.raises(PermissionDeniedError):
        action_run_approve(run=run, actor=analyst)
    with pytest.raises(PermissionDeniedError, match="second person"):
        action_run_approve(run=run, actor=bea)
    approved = action_run_approve(run=run, actor=admin_user)
    assert approved.state == "pending" and approved.approved_by == admin_user and approved.next_attempt_at
    with pytest.raises(Conflict):
        action_run_approve(run=run, actor=admin_user)
    # A model's decision has no reviewer: any admin may approve.
    model_run = ActionRun.objects.get(decision=decide(make_item(source), label="fraud"))
    assert action_run_approve(run=model_run, actor=bea).state == "pending"


def test_rejection_is_recorded(source, admin_user, bea):
    make_config(source, admin_user, url="https://hooks.example.com/a", high_risk=True)
    run = ActionRun.objects.get(decision=decide(make_item(source), label="fraud"))
    with pytest.raises(ValidationFailed):
        action_run_reject(run=run, actor=bea, reason="  ")
    rejected = action_run_reject(run=run, actor=bea, reason="customer is a known VIP")
    assert rejected.state == "rejected" and rejected.rejected_by == bea
    assert rejected.rejection_reason == "customer is a known VIP" and rejected.rejected_at
    event = AuditEvent.objects.get(verb="action_run.rejected", object_id=str(run.pk))
    assert event.actor_id == bea.pk and event.after["reason"] == "customer is a known VIP"
    with pytest.raises(Conflict):
        action_run_approve(run=run, actor=admin_user)
    with pytest.raises(Conflict):
        action_run_replay(run=run, actor=admin_user)


def test_override_queues_the_compensating_action_and_history_shows_both(source, admin_user, receiver,
                                                                        loopback_allowed):
    unfreeze, _ = make_config(source, admin_user, url=f"{receiver.url}/unfreeze", name="unfreeze",
                              compensation_only=True)
    freeze, _ = make_config(source, admin_user, url=f"{receiver.url}/freeze", name="freeze", label="fraud",
                            compensating_config=unfreeze)
    notify, _ = make_config(source, admin_user, url=f"{receiver.url}/notify", name="notify", label="fraud",
                            high_risk=True)
    item = make_item(source, "tx-9")
    first = decide(item, label="fraud")
    freeze_run = ActionRun.objects.get(decision=first, config=freeze)
    assert action_run_deliver(run_id=freeze_run.pk) == "delivered"

    # QA overrides the decision: the delivered freeze is compensated, the unapproved notify is cancelled.
    second = decide(item, label="legit", reviewer=admin_user)
    comp = ActionRun.objects.get(decision=second)
    assert comp.config == unfreeze and comp.is_compensation and comp.compensates == freeze_run
    assert comp.state == "pending"
    notify_run = ActionRun.objects.get(decision=first, config=notify)
    assert notify_run.state == "rejected" and "overridden" in notify_run.rejection_reason
    assert AuditEvent.objects.filter(verb="action_runs.override", object_id=str(first.pk)).exists()

    assert action_run_deliver(run_id=comp.pk) == "delivered"
    body = receiver.on("/unfreeze")[0].json()
    assert body["is_compensation"] is True and body["compensates_run_id"] == freeze_run.pk
    assert body["compensates_label"] == "fraud" and body["label"] == "legit"
    assert receiver.on("/unfreeze")[0].key not in {freeze_run.idempotency_key}

    history = list(selectors.action_runs_for_item(item_id=item.pk))
    assert [r.pk for r in history] == [freeze_run.pk, notify_run.pk, comp.pk]
    html = render_to_string("actions/_decision_runs.html", {"runs": history})
    assert "freeze" in html and "unfreeze" in html and "compensation of run" in html
    # A second override back to fraud does not compensate the compensation; freeze acts again.
    third = decide(item, label="fraud", reviewer=admin_user)
    assert set(ActionRun.objects.filter(decision=third).values_list("config__name", flat=True)) == {"freeze", "notify"}
    # The overridden decision's dead run cannot be replayed.
    ActionRun.objects.filter(pk=freeze_run.pk).update(state="dead")
    with pytest.raises(Conflict, match="overridden"):
        action_run_replay(run=freeze_run, actor=admin_user)


def test_a_run_in_flight_during_an_override_is_compensated_when_it_lands(
    transactional_db, source, admin_user, receiver, loopback_allowed, private_queue
):
    unfreeze, _ = make_config(source, admin_user, url=f"{receiver.url}/unfreeze", compensation_only=True)
    make_config(source, admin_user, url=f"{receiver.url}/freeze", label="fraud", compensating_config=unfreeze)
    item = make_item(source)
    run = ActionRun.objects.get(decision=decide(item, label="fraud"))
    receiver.reply(Reply(200, block=True))
    outcome: list[str] = []

    def deliver() -> None:
        try:
            outcome.append(action_run_deliver(run_id=run.pk))
        finally:
            connection.close()

    thread = threading.Thread(target=deliver)
    thread.start()
    wait_for(lambda: receiver.requests, timeout=10, what="the request in flight")
    new = decide(item, label="legit", reviewer=admin_user)
    assert not ActionRun.objects.filter(decision=new).exists()  # still delivering: nothing known yet
    receiver.release.set()
    thread.join(10)
    assert outcome == ["delivered"]
    comp = ActionRun.objects.get(decision=new)
    assert comp.is_compensation and comp.compensates_id == run.pk and comp.state == "pending"


def test_a_run_of_an_overridden_decision_is_not_sent(source, admin_user, receiver, loopback_allowed):
    make_config(source, admin_user, url=f"{receiver.url}/hook")
    decision = decide(make_item(source), label="fraud")
    run = ActionRun.objects.get(decision=decision)
    Decision.objects.filter(pk=decision.pk).update(is_current=False)  # overridden between claim and send
    assert action_run_deliver(run_id=run.pk) == "rejected"
    assert receiver.requests == []
    # Duplicate messages for a finished run change nothing.
    assert action_run_deliver(run_id=run.pk) == "skipped:rejected"
    assert action_run_deliver(run_id=10**9) == "missing"


def test_reconcile_takes_back_stuck_runs_or_dead_letters_them(source, admin_user, settings):
    make_config(source, admin_user, url="https://hooks.example.com/a", max_attempts=2)
    long_ago = timezone.now() - timedelta(hours=1)
    runs = []
    for attempts in (1, 2):
        run = ActionRun.objects.get(decision=decide(make_item(source), label="fraud"))
        ActionRun.objects.filter(pk=run.pk).update(state="delivering", attempts=attempts, state_changed_at=long_ago,
                                                   next_attempt_at=None)
        runs.append(run)
    fresh = ActionRun.objects.get(decision=decide(make_item(source), label="fraud"))
    ActionRun.objects.filter(pk=fresh.pk).update(state="delivering", attempts=1, state_changed_at=timezone.now())

    settings.ACTIONS_RECONCILE_GRACE_SECONDS = 3600  # leave due pending runs alone here
    assert action_runs_reconcile() == {"requeued": 0, "stuck_redelivered": 1, "stuck_dead": 1}
    retried, dead = (ActionRun.objects.get(pk=r.pk) for r in runs)
    assert retried.state == "pending" and "same idempotency key" in retried.last_error
    assert dead.state == "dead" and "worker lost" in dead.last_error
    assert ActionRun.objects.get(pk=fresh.pk).state == "delivering"  # within ACTIONS_STUCK_SECONDS
    assert AuditEvent.objects.filter(verb="action_run.reclaimed").count() == 2
    assert action_runs_reconcile() == {"requeued": 0, "stuck_redelivered": 0, "stuck_dead": 0}


def test_backoff_is_exponential_with_full_jitter():
    for attempts, ceiling in ((1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)):
        delays = [backoff_delay(attempts=attempts, base=2.0, cap=60.0) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 2  # spread over the whole range, not a fixed delay


def test_log_action_logs_once_per_idempotency_key(source, admin_user):
    """The log action de-duplicates by idempotency key like a receiver: sending twice logs once."""
    make_config(source, admin_user, kind="log")
    run = ActionRun.objects.get(decision=decide(make_item(source), label="legit"))
    assert action_run_deliver(run_id=run.pk) == "delivered"
    ActionRun.objects.filter(pk=run.pk).update(state="pending", next_attempt_at=timezone.now())
    assert action_run_deliver(run_id=run.pk) == "delivered"  # sent again (as after a lost worker)
    assert AuditEvent.objects.filter(verb="action.logged", correlation_id=run.idempotency_key).count() == 1


def test_wait_state_helper_sees_committed_rows(source, admin_user):
    make_config(source, admin_user, kind="log")
    run = ActionRun.objects.get(decision=decide(make_item(source), label="legit"))
    action_run_deliver(run_id=run.pk)
    assert wait_state(run.pk, "delivered", timeout=1).pk == run.pk


def test_long_waits_are_left_to_the_reconciler(source, admin_user, receiver, loopback_allowed,
                                               django_capture_on_commit_callbacks):
    receiver.reply(Reply(503, headers={"Retry-After": "2"}), Reply(429, headers={"Retry-After": "3600"}))
    make_config(source, admin_user, url=f"{receiver.url}/hook")
    run = ActionRun.objects.get(decision=decide(make_item(source), label="fraud"))
    with django_capture_on_commit_callbacks() as short:
        assert action_run_deliver(run_id=run.pk) == "pending"
    assert len(short) == 1  # a 2 s wait: the broker holds the message
    ActionRun.objects.filter(pk=run.pk).update(next_attempt_at=timezone.now())
    with django_capture_on_commit_callbacks() as long:
        assert action_run_deliver(run_id=run.pk) == "pending"
    assert long == []  # an hour: no message; the reconciler sends the run once due
    run.refresh_from_db()
    assert run.attempts == 2 and run.last_status_code == 429
    assert timedelta(minutes=59) < run.next_attempt_at - timezone.now() <= timedelta(hours=1)
