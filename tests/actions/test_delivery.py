"""Delivery through a live Celery worker to a real HTTP receiver on loopback: exactly once in effect,
retries with the same idempotency key, Retry-After, dead-lettering and replay, the approval gate."""

from __future__ import annotations

import hashlib
import json

import pytest

from actions.models import ActionRun
from actions.services import action_runs_reconcile
from reviewapp.core.models import AuditEvent
from tests.actions.helpers import Reply, decide, docs_recipe, make_config, make_item, wait_state
from tests.conftest import api_client_for

# The actions API and pages, mounted the way the lead wires them (see tests/actions/urls.py).
pytestmark = pytest.mark.urls("tests.actions.urls")


def _fast(**extra):  # type: ignore[no-untyped-def]
    return {"backoff_base_seconds": 0.2, "backoff_max_seconds": 1.0, "read_timeout_seconds": 5, **extra}


def test_webhook_delivered_exactly_once_and_signed(live_worker, receiver, loopback_allowed, source, admin_user):
    config, secret = make_config(source, admin_user, url=f"{receiver.url}/hook", label="fraud", **_fast())
    make_config(source, admin_user, url=f"{receiver.url}/legit-only", label="legit", **_fast())
    log_config, _ = make_config(source, admin_user, kind="log", name="log every decision")
    item = make_item(source, "tx-1")
    decision = decide(item, label="fraud")

    runs = {r.config_id: r for r in ActionRun.objects.filter(decision=decision)}
    assert set(runs) == {config.pk, log_config.pk}  # the legit-only action does not match
    hook_run = wait_state(runs[config.pk].pk, "delivered")
    wait_state(runs[log_config.pk].pk, "delivered")

    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    key = hashlib.sha256(f"{decision.pk}:{config.pk}".encode()).hexdigest()
    assert hook_run.idempotency_key == key and request.key == key
    assert receiver.effects[key] == 1
    assert request.path == "/hook"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("reviewapp-actions/")
    body = request.json()
    assert body["type"] == "decision.action"
    assert body["decision_id"] == decision.pk and body["external_id"] == "tx-1"
    assert body["source"] == "payments" and body["label"] == "fraud" and body["origin"] == "model"
    assert body["is_compensation"] is False and body["idempotency_key"] == key
    assert {"decided_at", "model_version", "policy_version"} <= set(body)

    # The documented receiver recipe verifies it; a tampered body or another secret does not.
    verify = docs_recipe()["verify_signature"]
    signature = request.headers["X-Reviewapp-Signature"]
    assert verify(secret, request.body, signature)
    assert not verify(secret, request.body.replace(b"fraud", b"legit"), signature)
    assert not verify("whsec_other", request.body, signature)

    assert hook_run.attempts == 1 and hook_run.last_status_code == 200 and hook_run.delivered_at is not None
    assert AuditEvent.objects.filter(verb="action_run.delivered", object_id=str(hook_run.pk)).count() == 1
    logged = AuditEvent.objects.filter(verb="action.logged")
    assert logged.count() == 1 and logged.get().after["decision_id"] == decision.pk

    # A second call for the same decision creates nothing (unique idempotency key).
    from actions.services import action_runs_create_for_decision

    assert action_runs_create_for_decision(decision=decision) == []
    assert ActionRun.objects.filter(decision=decision).count() == 2

    runs_api = api_client_for(admin_user).get(f"/api/v1/decisions/{decision.pk}/actions/")
    assert runs_api.status_code == 200
    by_action = {r["action"]: r for r in runs_api.json()}
    assert by_action[config.name]["status"] == "delivered"
    assert by_action[config.name]["response_code"] == 200 and by_action[config.name]["attempts"] == 1


def test_receiver_down_then_up_delivers_once_with_the_same_key(live_worker, receiver, loopback_allowed, source,
                                                               admin_user):
    receiver.reply(Reply(503, body="down"), Reply(503, body="still down"))
    make_config(source, admin_user, url=f"{receiver.url}/hook", **_fast())
    decision = decide(make_item(source), label="legit")
    run = ActionRun.objects.get(decision=decision)

    run = wait_state(run.pk, "delivered")
    assert run.attempts == 3 and run.last_status_code == 200 and run.last_error == ""
    assert len(receiver.requests) == 3
    assert {r.key for r in receiver.requests} == {run.idempotency_key}
    assert receiver.effects == {run.idempotency_key: 1}
    assert AuditEvent.objects.filter(verb="action_run.retry_scheduled", object_id=str(run.pk)).count() == 2


def test_429_retry_after_is_honoured(live_worker, receiver, loopback_allowed, source, admin_user):
    receiver.reply(Reply(429, headers={"Retry-After": "2"}, body="slow down"))
    # A backoff this small would retry at once: the 2 s gap can only come from Retry-After.
    make_config(source, admin_user, url=f"{receiver.url}/hook", **_fast(backoff_base_seconds=0.01))
    run = ActionRun.objects.get(decision=decide(make_item(source), label="fraud"))

    run = wait_state(run.pk, "delivered")
    first, second = receiver.requests
    assert second.at - first.at >= 1.9
    assert run.attempts == 2 and first.key == second.key


def test_4xx_fails_without_retry(live_worker, receiver, loopback_allowed, source, admin_user):
    receiver.reply(Reply(400, body='{"error": "unknown account"}'))
    make_config(source, admin_user, url=f"{receiver.url}/hook", **_fast())
    run = ActionRun.objects.get(decision=decide(make_item(source), label="fraud"))

    run = wait_state(run.pk, "failed")
    assert run.attempts == 1 and run.last_status_code == 400
    assert "unknown account" in run.last_error
    assert run.next_attempt_at is None
    assert len(receiver.requests) == 1


def test_dead_after_max_attempts_then_replay_delivers(live_worker, receiver, loopback_allowed, source, admin_user):
    receiver.reply(*[Reply(503)] * 3)
    make_config(source, admin_user, url=f"{receiver.url}/hook", max_attempts=3, **_fast())
    run = ActionRun.objects.get(decision=decide(make_item(source), label="fraud"))

    run = wait_state(run.pk, "dead")
    assert run.attempts == 3 and run.last_status_code == 503 and "gave up after 3 attempts" in run.last_error
    assert receiver.effects == {}

    listed = api_client_for(admin_user).get("/api/v1/action-runs/").json()
    assert [r["id"] for r in listed] == [run.pk] and listed[0]["status"] == "dead"
    response = api_client_for(admin_user).post(f"/api/v1/action-runs/{run.pk}/replay/")
    assert response.status_code == 200, response.content
    assert response.json()["status"] in ("pending", "delivering", "delivered")

    run = wait_state(run.pk, "delivered")
    assert run.attempts == 1
    assert len(receiver.requests) == 4 and {r.key for r in receiver.requests} == {run.idempotency_key}
    assert receiver.effects == {run.idempotency_key: 1}
    assert AuditEvent.objects.filter(verb="action_run.replayed", object_id=str(run.pk), actor_id=admin_user.pk).exists()


def test_lost_message_is_only_a_delay(live_worker, receiver, loopback_allowed, source, admin_user, settings):
    """A pending run whose message never reached the broker is sent by the reconciler."""
    config, _ = make_config(source, admin_user, url=f"{receiver.url}/hook", **_fast())
    decision = decide(make_item(source), label="fraud")
    run = ActionRun.objects.get(decision=decision)
    wait_state(run.pk, "delivered")
    # Simulate the lost message: a due pending run with no message anywhere.
    lost = ActionRun.objects.create(decision=decision, config=config, idempotency_key="f" * 64, state="pending",
                                    next_attempt_at=run.created_at)
    settings.ACTIONS_RECONCILE_GRACE_SECONDS = 0
    assert action_runs_reconcile()["requeued"] == 1
    wait_state(lost.pk, "delivered")
    assert [r.key for r in receiver.requests] == [run.idempotency_key, "f" * 64]


def test_approval_gate_holds_until_a_second_admin_approves(live_worker, receiver, loopback_allowed, source,
                                                           admin_user, bea):
    make_config(source, admin_user, url=f"{receiver.url}/gated", high_risk=True, name="freeze", **_fast())
    make_config(source, admin_user, url=f"{receiver.url}/open", name="notify", **_fast())
    # adam (an admin) reviewed the item himself.
    decision = decide(make_item(source), label="fraud", reviewer=admin_user)
    gated = ActionRun.objects.get(decision=decision, config__name="freeze")
    open_run = ActionRun.objects.get(decision=decision, config__name="notify")
    assert gated.state == "pending_approval" and gated.next_attempt_at is None

    # The worker handled this decision's messages, and the reconciler ran: the gated run still waits.
    wait_state(open_run.pk, "delivered")
    action_runs_reconcile(stuck_seconds=0)
    gated.refresh_from_db()
    assert gated.state == "pending_approval" and gated.attempts == 0
    assert receiver.on("/gated") == []

    own = api_client_for(admin_user).post(f"/api/v1/action-runs/{gated.pk}/approve/")
    assert own.status_code == 403, own.content
    assert "second person" in own.json()["detail"]
    gated.refresh_from_db()
    assert gated.state == "pending_approval"

    approved = api_client_for(bea).post(f"/api/v1/action-runs/{gated.pk}/approve/")
    assert approved.status_code == 200, approved.content
    assert approved.json()["approved_by"] == "bea"
    gated = wait_state(gated.pk, "delivered")
    assert len(receiver.on("/gated")) == 1 and gated.approved_by_id == bea.pk
    event = AuditEvent.objects.get(verb="action_run.approved", object_id=str(gated.pk))
    assert event.actor_id == bea.pk and json.dumps(event.after)
    again = api_client_for(bea).post(f"/api/v1/action-runs/{gated.pk}/approve/")
    assert again.status_code == 409
