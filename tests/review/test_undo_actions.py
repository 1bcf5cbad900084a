"""Undo and the actions of the withdrawn decision: runs that have not acted are cancelled; delivered ones
cannot be withdrawn, which the audit event, the API and the work page say (with the compensation queued
where the action has one); a run in flight at the undo is compensated when it lands."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from actions.handlers import DeliveryResult, Outcome
from actions.models import ActionRun
from actions.services import _record, action_config_create, action_run_deliver
from reviewapp.core.audit import audit_verify
from reviewapp.core.models import AuditEvent
from reviewapp.ingest.models import Item
from reviewapp.review.models import Decision, ReviewTask
from reviewapp.review.services import task_claim_next, verdict_submit, verdict_withdraw
from tests.factories import make_payments_source
from tests.review.helpers import make_scored_items

pytestmark = pytest.mark.django_db
HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def source(admin_user):
    """Four log actions on fraud (no network; the log handler records an audit event per delivery):
    freeze (compensated by unfreeze), record (no compensation), notify, and a high-risk escalate."""
    src = make_payments_source(thresholds={})
    unfreeze, _ = action_config_create(
        source=src, actor=admin_user, kind="log", name="unfreeze", compensation_only=True
    )
    action_config_create(
        source=src, actor=admin_user, kind="log", name="freeze", label="fraud", compensating_config=unfreeze
    )
    action_config_create(source=src, actor=admin_user, kind="log", name="record", label="fraud")
    action_config_create(source=src, actor=admin_user, kind="log", name="notify", label="fraud")
    action_config_create(source=src, actor=admin_user, kind="log", name="escalate", label="fraud", high_risk=True)
    return src


def _decide_fraud(analyst, source) -> tuple[Decision, dict[str, ActionRun]]:
    make_scored_items(source, [("legit", 0.6)])
    task = task_claim_next(user=analyst)
    item = Item.objects.select_related("source").get(pk=task.item_id)
    verdict, _ = verdict_submit(user=analyst, item=item, label="fraud")
    decision = Decision.objects.get(verdict=verdict, is_current=True)
    runs = {r.config.name: r for r in ActionRun.objects.filter(decision=decision).select_related("config")}
    assert set(runs) == {"freeze", "record", "notify", "escalate"}
    return decision, runs


def test_undo_cancels_unsent_runs_and_reports_the_delivered_ones(analyst, source):
    decision, runs = _decide_fraud(analyst, source)
    assert action_run_deliver(run_id=runs["freeze"].pk) == "delivered"
    assert action_run_deliver(run_id=runs["record"].pk) == "delivered"

    result = verdict_withdraw(user=analyst)

    assert result.task.state == "claimed" and result.task.claimed_by == analyst
    actions = result.actions
    assert sorted(r["action"] for r in actions.cancelled) == ["escalate", "notify"]
    delivered = {r["action"]: r for r in actions.delivered}
    assert set(delivered) == {"freeze", "record"} and actions.in_flight == []
    comp = ActionRun.objects.get(is_compensation=True)
    assert delivered["freeze"]["compensation"] == comp.pk and delivered["freeze"]["compensation_action"] == "unfreeze"
    assert delivered["record"]["compensation"] is None
    assert "cannot be withdrawn" in result.actions_summary and "'record'" in result.actions_summary

    for name in ("notify", "escalate"):
        run = ActionRun.objects.get(pk=runs[name].pk)
        assert run.state == "rejected" and "withdrawn" in run.rejection_reason and run.next_attempt_at is None
        # A late wake-up finds it cancelled and sends nothing.
        assert action_run_deliver(run_id=run.pk) == "skipped:rejected"
    assert ActionRun.objects.get(pk=runs["freeze"].pk).state == "delivered"

    # Nothing is current again (a plain review decision): the compensation hangs on the withdrawn decision
    # and is still sent, since it repairs what freeze did.
    assert comp.decision_id == decision.pk and comp.compensates_id == runs["freeze"].pk and comp.state == "pending"
    assert not Decision.objects.filter(item=decision.item, is_current=True).exists()
    assert action_run_deliver(run_id=comp.pk) == "delivered"

    event = AuditEvent.objects.get(verb="verdict.withdrawn")
    assert event.actor_id == analyst.pk
    assert {r["action"] for r in event.after["actions"]["delivered"]} == {"freeze", "record"}
    assert {r["action"] for r in event.after["actions"]["cancelled"]} == {"notify", "escalate"}
    runs_event = AuditEvent.objects.get(verb="action_runs.withdrawn")
    assert (
        runs_event.object_id == str(decision.pk)
        and runs_event.after["delivered"] == event.after["actions"]["delivered"]
    )
    assert list(audit_verify()) == []


def test_undo_of_a_qa_override_restores_the_model_decision_and_compensates_on_it(analyst, admin_user):
    """QA override then undo: the reviewer's runs are withdrawn and the compensation of a delivered one
    goes on the model's decision, current again."""
    src = make_payments_source(slug="qa-actions", thresholds={"legit": 0.5}, qa_sample_rate=1.0)
    unfreeze, _ = action_config_create(
        source=src, actor=admin_user, kind="log", name="unfreeze", compensation_only=True
    )
    action_config_create(
        source=src, actor=admin_user, kind="log", name="freeze", label="fraud", compensating_config=unfreeze
    )
    (item,) = make_scored_items(src, [("legit", 0.9)])
    model_decision = Decision.objects.get(item=item, is_current=True)
    task = task_claim_next(user=analyst)
    assert task.kind == ReviewTask.Kind.QA
    verdict_submit(user=analyst, item=Item.objects.select_related("source").get(pk=item.pk), label="fraud")
    override = Decision.objects.get(item=item, is_current=True)
    freeze = ActionRun.objects.get(decision=override, config__name="freeze")
    assert action_run_deliver(run_id=freeze.pk) == "delivered"

    result = verdict_withdraw(user=analyst)

    model_decision.refresh_from_db()
    assert model_decision.is_current and Item.objects.get(pk=item.pk).state == Item.State.AUTO_DECIDED
    (delivered,) = result.actions.delivered
    comp = ActionRun.objects.get(pk=delivered["compensation"])
    assert comp.decision_id == model_decision.pk and comp.compensates_id == freeze.pk


def test_a_run_in_flight_at_the_undo_is_compensated_when_it_lands(analyst, source):
    decision, runs = _decide_fraud(analyst, source)
    # A worker has claimed freeze (the same conditional UPDATE action_run_deliver makes) and is sending it.
    assert ActionRun.objects.filter(pk=runs["freeze"].pk, state="pending").update(state="delivering", attempts=1)

    result = verdict_withdraw(user=analyst)
    assert [r["action"] for r in result.actions.in_flight] == ["freeze"]
    assert "being sent right now" in result.actions_summary
    assert not ActionRun.objects.filter(is_compensation=True).exists()

    # The receiver answers: the worker records the delivery, and since the decision was withdrawn (and
    # nothing is current) the compensation goes on the run's own decision.
    assert _record(run_id=runs["freeze"].pk, attempt=1, queue=None, result=DeliveryResult(Outcome.DELIVERED)) == (
        "delivered"
    )
    comp = ActionRun.objects.get(is_compensation=True)
    assert comp.compensates_id == runs["freeze"].pk and comp.decision_id == decision.pk
    assert action_run_deliver(run_id=comp.pk) == "delivered"


def test_the_work_page_and_the_api_show_what_could_not_be_withdrawn(analyst, analyst_api, source):
    client = Client()
    client.force_login(analyst)
    first, _second = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    client.post(reverse("review:claim"), **HX)
    client.post(reverse("review:verdict", args=[first.pk]), {"label": "fraud"}, **HX)
    decision = Decision.objects.get(item=first, is_current=True)
    record = ActionRun.objects.get(decision=decision, config__name="record")
    assert action_run_deliver(run_id=record.pk) == "delivered"

    html = client.post(reverse("review:undo"), **HX).content.decode()
    assert 'id="undo-actions"' in html
    assert "record (log): already delivered — cannot be withdrawn" in html
    assert "no compensating action is configured" in html
    assert 'data-outcome="withdrawn"' in html and "notify (log): not sent yet — withdrawn" in html

    # The API says the same, as data.
    verdict = analyst_api.post(f"/api/v1/items/{first.pk}/verdicts/", {"label": "fraud"}, format="json").json()
    again = Decision.objects.get(item=first, is_current=True)
    assert action_run_deliver(run_id=ActionRun.objects.get(decision=again, config__name="freeze").pk) == "delivered"
    body = analyst_api.post("/api/v1/verdicts/undo/", {"verdict": verdict["id"]}, format="json").json()
    assert [r["action"] for r in body["actions"]["delivered"]] == ["freeze"]
    assert body["actions"]["delivered"][0]["compensation_action"] == "unfreeze"
    assert "cannot be withdrawn" in body["actions_summary"]


def test_undo_of_a_decision_without_actions_says_nothing_about_actions(analyst):
    client = Client()
    client.force_login(analyst)
    src = make_payments_source(slug="no-actions", thresholds={})
    (item,) = make_scored_items(src, [("legit", 0.5)])
    client.post(reverse("review:claim"), **HX)
    client.post(reverse("review:verdict", args=[item.pk]), {"label": "fraud"}, **HX)
    html = client.post(reverse("review:undo"), **HX).content.decode()
    assert "withdrawn" in html and 'id="undo-actions"' not in html
    assert AuditEvent.objects.get(verb="verdict.withdrawn").after["actions"] == {
        "cancelled": [],
        "delivered": [],
        "in_flight": [],
        "reinstated": [],
    }


def test_undo_of_an_override_queues_the_restored_decisions_cancelled_runs_again(analyst, admin_user):
    """QA override cancels the model decision's unsent runs; undoing the override puts them back as they
    were (pending, or waiting for approval), with their keys, and they deliver once. A run an admin rejected
    by hand stays rejected."""
    src = make_payments_source(slug="qa-reinstate", thresholds={"legit": 0.5}, qa_sample_rate=1.0)
    action_config_create(source=src, actor=admin_user, kind="log", name="settle", label="legit")
    action_config_create(source=src, actor=admin_user, kind="log", name="notify", label="legit", high_risk=True)
    action_config_create(source=src, actor=admin_user, kind="log", name="payout", label="legit", high_risk=True)
    (item,) = make_scored_items(src, [("legit", 0.9)])
    model_decision = Decision.objects.get(item=item, is_current=True)
    before = {r.config.name: r for r in ActionRun.objects.filter(decision=model_decision).select_related("config")}
    assert {n: r.state for n, r in before.items()} == {
        "settle": "pending", "notify": "pending_approval", "payout": "pending_approval"}
    from actions.services import action_run_reject

    action_run_reject(run=before["notify"], actor=admin_user, reason="not for this merchant")

    task_claim_next(user=analyst)
    verdict_submit(user=analyst, item=Item.objects.select_related("source").get(pk=item.pk), label="fraud")
    states = dict(ActionRun.objects.filter(decision=model_decision).values_list("config__name", "state"))
    assert states == {"settle": "rejected", "notify": "rejected", "payout": "rejected"}

    result = verdict_withdraw(user=analyst)

    runs = {r.config.name: r for r in ActionRun.objects.filter(decision=model_decision).select_related("config")}
    assert runs["settle"].state == "pending" and runs["settle"].next_attempt_at is not None
    assert runs["settle"].idempotency_key == before["settle"].idempotency_key
    assert runs["payout"].state == "pending_approval" and runs["payout"].rejected_at is None
    assert runs["notify"].state == "rejected" and runs["notify"].rejection_reason == "not for this merchant"
    assert sorted(r["action"] for r in result.actions.reinstated) == ["payout", "settle"]
    assert "queued again" in result.actions_summary
    assert action_run_deliver(run_id=runs["settle"].pk) == "delivered"
    assert action_run_deliver(run_id=runs["settle"].pk) != "delivered"  # once only
    event = AuditEvent.objects.filter(verb="action_runs.withdrawn").latest("id")
    assert sorted(r["run"] for r in event.after["reinstated"]) == sorted([runs["settle"].pk, runs["payout"].pk])
    assert list(audit_verify()) == []
