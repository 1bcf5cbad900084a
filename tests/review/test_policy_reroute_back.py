"""Re-route on apply, the reverse direction: auto-decisions that a new policy puts in the review band go back to
review while nothing irreversible has happened to them (see policy_selectors: the rule), with the counts shown
before applying (the what-if) and after (the run's progress), all against PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from actions.models import ActionConfig, ActionRun
from actions.services import action_run_deliver
from reviewapp.core.audit import audit_verify
from reviewapp.core.models import AuditEvent
from reviewapp.ingest.models import Item
from reviewapp.review.models import Decision, ReviewTask
from reviewapp.review.policy_selectors import reroute_preview, reroute_progress
from reviewapp.review.policy_services import policy_reroute_start, policy_reroute_waiting, policy_update
from reviewapp.review.services import task_claim_next, verdict_submit
from tests.review.helpers import make_scored_items
from tests.review.policy_helpers import make_champion, source_setup

pytestmark = pytest.mark.django_db


def _auto_decided(source, model, specs):
    items = make_scored_items(source, specs, model=model)
    assert all(i.state == Item.State.AUTO_DECIDED for i in items)
    return items


def _run(policy_id: int, run_id: str | None, chunk_size: int = 500) -> dict:
    assert run_id
    return policy_reroute_waiting(policy_id=policy_id, run_id=run_id, chunk_size=chunk_size)


def test_runs_on_postgresql() -> None:
    assert connection.vendor == "postgresql"


def test_auto_decisions_in_the_new_review_band_go_back_unless_acted_on(admin_user, analyst, client) -> None:
    source = source_setup(thresholds={"legit": 0.9})
    model = make_champion(source)
    ActionConfig.objects.create(source=source, kind="log", name="log decisions")
    back, stays_auto, delivered, pending = _auto_decided(
        source, model, [("legit", 0.95), ("legit", 0.99), ("legit", 0.94), ("legit", 0.93)]
    )
    old = {i.pk: Decision.objects.get(item=i, is_current=True) for i in (back, stays_auto, delivered, pending)}
    delivered_run = ActionRun.objects.get(decision=old[delivered.pk])
    assert action_run_deliver(run_id=delivered_run.pk) == ActionRun.State.DELIVERED
    waiting = make_scored_items(source, [("legit", 0.98)], model=model)[0]
    assert waiting.state == Item.State.AUTO_DECIDED  # under v1 (0.9)

    # Before applying: the what-if counts for the candidate, from the live rows.
    preview = reroute_preview(source=source, thresholds={"legit": 0.97})
    assert preview["auto_to_review"] == 2  # back and pending
    assert preview["auto_kept_acted_on"] == 1  # delivered: an action has acted on it
    assert preview["waiting_to_auto"] == 0

    saved = policy_update(source=source, actor=admin_user, thresholds={"legit": 0.97}, qa_sample_rate=0.0, reroute=True)
    result = _run(saved.policy.pk, saved.reroute_run_id, chunk_size=1)
    assert result["status"] == "done"
    assert (result["to_review"], result["auto_kept"]) == (2, 1)

    for item in (back, pending):
        item.refresh_from_db()
        assert item.state == Item.State.QUEUED and item.policy_id == saved.policy.pk
        assert "auto-decision withdrawn" in item.route_reason and "policy v2" in item.route_reason
        withdrawn = Decision.objects.get(pk=old[item.pk].pk)
        assert not withdrawn.is_current and withdrawn.withdrawn_at is not None
        assert not Decision.objects.filter(item=item, is_current=True).exists()
        task = ReviewTask.objects.get(item=item, kind=ReviewTask.Kind.REVIEW)
        assert task.state == ReviewTask.State.OPEN and task.reason == item.route_reason
    pending_run = ActionRun.objects.get(decision=old[pending.pk])
    assert pending_run.state == ActionRun.State.REJECTED and "withdrawn" in pending_run.rejection_reason
    for item in (stays_auto, delivered, waiting):
        item.refresh_from_db()
        assert item.state == Item.State.AUTO_DECIDED
        assert Decision.objects.filter(item=item, is_current=True, origin=Decision.Origin.MODEL).count() == 1
    delivered_run.refresh_from_db()
    assert delivered_run.state == ActionRun.State.DELIVERED

    # Audited, and each item traces back to the decision (its prediction and policy version) that was withdrawn.
    events = AuditEvent.objects.filter(verb="policy.reroute_auto_back", correlation_id=saved.reroute_run_id)
    assert sorted(i for e in events for i in e.after["items"]) == sorted([back.pk, pending.pk])
    assert sorted(d for e in events for d in e.after["withdrawn_decisions"]) == sorted(
        [old[back.pk].pk, old[pending.pk].pk]
    )
    back_run = ActionRun.objects.get(decision=old[back.pk])
    assert back_run.state == ActionRun.State.REJECTED
    assert sorted(r for e in events for r in e.after["rejected_action_runs"]) == sorted([back_run.pk, pending_run.pk])
    assert all(
        Decision.objects.get(pk=old[i].pk).prediction_id == Item.objects.get(pk=i).prediction_id
        for i in (back.pk, pending.pk)
    )
    assert list(audit_verify()) == []

    # After: the run's progress shows the counts; the what-if for the policy in force has nothing left to move.
    progress = reroute_progress(policy=saved.policy, run_id=saved.reroute_run_id)
    assert progress["status"] == "done" and progress["to_review"] == 2 and progress["auto_kept"] == 1
    assert progress["percent"] == 100
    client.force_login(admin_user)
    page = client.get(reverse("review:policy_reroute_progress", args=[source.slug]), {"run": saved.reroute_run_id})
    assert page.status_code == 200
    assert 'id="reroute-to-review">2 auto-decided sent back to review<' in page.content.decode()
    after = reroute_preview(source=source, thresholds={"legit": 0.97})
    assert (after["auto_to_review"], after["auto_kept_acted_on"]) == (0, 1)

    # Idempotent: another run under the same policy moves nothing.
    again = policy_reroute_start(source=source, actor=admin_user)
    second = _run(saved.policy.pk, again)
    assert (second["to_review"], second["auto_decided"]) == (0, 0)

    # A reviewer now decides the item; exactly one current decision, the reviewer's.
    task = task_claim_next(user=analyst, source=source)
    verdict_submit(user=analyst, item=Item.objects.get(pk=task.item_id), label="fraud")
    current = Decision.objects.get(item_id=task.item_id, is_current=True)
    assert current.origin == Decision.Origin.REVIEWER and current.label == "fraud"


def test_seen_claimed_or_old_auto_decisions_stay_decided(admin_user, analyst) -> None:
    source = source_setup(thresholds={"legit": 0.9}, qa_sample_rate=1.0)  # every auto-decision drawn for QA
    model = make_champion(source)
    seen, held, old, free = _auto_decided(source, model, [("legit", 0.95)] * 4)
    # A QA reviewer answered one (agreeing: it stays auto-decided) and holds another.
    task = task_claim_next(user=analyst, source=source)
    assert task.item_id == seen.pk and task.kind == ReviewTask.Kind.QA
    verdict_submit(user=analyst, item=seen, label="legit")
    assert task_claim_next(user=analyst, source=source).item_id == held.pk
    # And one was decided longer ago than the window (24 h by default).
    Decision.objects.filter(item=old).update(created_at=timezone.now() - timedelta(hours=25))

    preview = reroute_preview(source=source, thresholds={"legit": 0.99})
    assert preview["auto_to_review"] == 1 and preview["auto_kept_acted_on"] == 2  # the old one is out of scope
    saved = policy_update(source=source, actor=admin_user, thresholds={"legit": 0.99}, qa_sample_rate=0.0, reroute=True)
    result = _run(saved.policy.pk, saved.reroute_run_id)
    assert result["to_review"] == 1
    for item in (seen, held, old, free):
        item.refresh_from_db()
    assert seen.state == Item.State.AUTO_DECIDED and old.state == Item.State.AUTO_DECIDED
    assert held.state in (Item.State.AUTO_DECIDED, Item.State.IN_REVIEW)
    assert ReviewTask.objects.get(item=held, kind=ReviewTask.Kind.QA).state == ReviewTask.State.CLAIMED
    assert free.state == Item.State.QUEUED
    # Its open QA task is cancelled: the item now gets a full review instead.
    assert ReviewTask.objects.get(item=free, kind=ReviewTask.Kind.QA).state == ReviewTask.State.CANCELLED
    assert ReviewTask.objects.get(item=free, kind=ReviewTask.Kind.REVIEW).state == ReviewTask.State.OPEN


def test_simulate_api_and_editor_show_the_reroute_counts(admin_user, admin_api, client) -> None:
    source = source_setup(thresholds={"legit": 0.9})
    model = make_champion(source)
    _auto_decided(source, model, [("legit", 0.95), ("legit", 0.99)])
    queued = make_scored_items(source, [("legit", 0.85)], model=model)[0]
    assert queued.state == Item.State.QUEUED
    response = admin_api.post(
        f"/api/v1/sources/{source.slug}/policy/simulate/", {"thresholds": {"legit": 0.97}}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["reroute_preview"] == {
        "waiting": 1,
        "waiting_to_auto": 0,
        "auto_to_review": 1,
        "auto_kept_acted_on": 0,
        "window_hours": 24.0,
    }
    response = admin_api.post(
        f"/api/v1/sources/{source.slug}/policy/simulate/", {"thresholds": {"legit": 0.8}}, format="json"
    )
    assert response.json()["reroute_preview"]["waiting_to_auto"] == 1
    client.force_login(admin_user)
    legit = source.labels.index("legit")
    page = client.get(
        reverse("review:policy_simulate", args=[source.slug]),
        {"thresholds_sent": "1", "mode": "threshold", f"auto_{legit}": "1", f"thr_{legit}": "0.97"},
        HTTP_HX_REQUEST="true",
    )
    assert page.status_code == 200
    body = page.content.decode()
    assert 'id="whatif-reroute-to-review">1<' in body
