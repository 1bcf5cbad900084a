"""Issue 5 services and selectors: double review and adjudication, escalation, undo, bulk verdicts,
keyset pagination, live counts, explanations and per-analyst figures."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection, connections
from django.utils import timezone

from reviewapp.core.audit import audit_verify
from reviewapp.core.errors import Conflict, PermissionDeniedError, ValidationFailed
from reviewapp.core.models import AuditEvent
from reviewapp.ingest.models import Item
from reviewapp.review import selectors, services
from reviewapp.review.models import Decision, Label, Policy, ReviewTask, Verdict
from reviewapp.review.selectors import QueueFilters
from reviewapp.review.services import (
    task_claim_next,
    task_escalate,
    task_release,
    verdict_submit,
    verdict_undo,
    verdicts_bulk_submit,
)
from tests.factories import UserFactory, make_payments_source
from tests.review.helpers import make_batch, make_scored_items

pytestmark = pytest.mark.django_db


def _double(source, rate: float = 1.0) -> None:
    Policy.objects.filter(source=source).update(double_review_rate=rate)


def _claim(user, **kw):
    task = task_claim_next(user=user, **kw)
    assert task is not None
    return task


def _item(task: ReviewTask) -> Item:
    return Item.objects.select_related("source").get(pk=task.item_id)


# --- Double review ---------------------------------------------------------------------------------

def test_double_review_routes_two_tasks_of_one_round():
    source = make_payments_source(thresholds={})
    _double(source)
    (item,) = make_scored_items(source, [("legit", 0.6)])
    tasks = list(ReviewTask.objects.filter(item=item).order_by("kind"))
    assert [(t.kind, t.round, t.state) for t in tasks] == [("double", 1, "open"), ("review", 1, "open")]
    assert all(t.reason.endswith("double review") for t in tasks)
    assert AuditEvent.objects.get(verb="items.routed").after["double_review"] == 1


def test_double_review_rate_draws_a_share():
    source = make_payments_source(thresholds={})
    _double(source, 0.3)
    items = make_scored_items(source, [("legit", 0.6)] * 200)
    doubled = ReviewTask.objects.filter(item__in=items, kind="double").count()
    assert 35 <= doubled <= 85  # deterministic per item; near 60


def test_agreeing_double_review_decides_and_neither_reviewer_gets_both_tasks():
    source = make_payments_source(thresholds={})
    _double(source)
    (item,) = make_scored_items(source, [("legit", 0.6)])
    a, b = UserFactory(role="analyst"), UserFactory(role="analyst")
    first = _claim(a)
    verdict_submit(user=a, item=_item(first), label="fraud")
    item.refresh_from_db()
    assert item.state == Item.State.QUEUED  # waits for the second, independent answer
    assert not Decision.objects.filter(item=item).exists() and not Label.objects.filter(item=item).exists()
    assert task_claim_next(user=a) is None  # the twin never goes back to the first reviewer
    second = _claim(b)
    assert second.item_id == item.pk and second.pk != first.pk
    assert Item.objects.get(pk=item.pk).state == Item.State.IN_REVIEW
    verdict, _ = verdict_submit(user=b, item=_item(second), label="fraud")
    item.refresh_from_db()
    decision = Decision.objects.get(item=item, is_current=True)
    assert item.state == Item.State.DECIDED and decision.label == "fraud" and decision.verdict == verdict
    label = Label.objects.get(item=item, is_active=True)
    assert (label.label, label.origin) == ("fraud", Label.Origin.REVIEW)
    outcomes = [e.after["outcome"] for e in AuditEvent.objects.filter(verb="verdict.submitted").order_by("id")]
    assert outcomes == ["awaiting_peer", "agreed"]


def test_disagreement_goes_to_adjudication_for_admins_only():
    source = make_payments_source(thresholds={})
    _double(source)
    (item,) = make_scored_items(source, [("legit", 0.6)])
    a, b = UserFactory(role="analyst"), UserFactory(role="analyst")
    admin = UserFactory(role="admin")
    verdict_submit(user=a, item=_item(_claim(a)), label="fraud", note="odd merchant")
    verdict_submit(user=b, item=_item(_claim(b)), label="legit")
    adjudication = ReviewTask.objects.get(item=item, kind="adjudication")
    assert adjudication.state == "open" and adjudication.reason == services.DISAGREEMENT_REASON
    assert Item.objects.get(pk=item.pk).state == Item.State.QUEUED
    assert not Decision.objects.filter(item=item).exists()
    # Analysts never get it: not from the review queue, and the admin queue refuses them.
    assert task_claim_next(user=UserFactory(role="analyst")) is None
    with pytest.raises(PermissionDeniedError):
        task_claim_next(user=a, queue="adjudication")
    task = _claim(admin, queue="adjudication")
    assert task.pk == adjudication.pk
    view = selectors.item_view_data(item_id=item.pk, task=task, user=admin)
    assert sorted(v.label for v in view.peer_verdicts) == ["fraud", "legit"]
    verdict_submit(user=admin, item=_item(task), label="fraud")
    decision = Decision.objects.get(item=item, is_current=True)
    assert decision.label == "fraud" and decision.reason == services.ADJUDICATED_REASON
    label = Label.objects.get(item=item, is_active=True)
    assert (label.label, label.origin, label.created_by) == ("fraud", Label.Origin.ADJUDICATION, admin)
    assert Item.objects.get(pk=item.pk).state == Item.State.DECIDED
    assert list(audit_verify()) == []


def test_analyst_cannot_resolve_an_admin_task_even_if_assigned():
    source = make_payments_source(thresholds={})
    (item,) = make_scored_items(source, [("legit", 0.6)])
    analyst = UserFactory(role="analyst")
    task_escalate(user=analyst, item=_item(_claim(analyst)), note="")
    escalation = ReviewTask.objects.get(item=item, kind="escalation")
    # Force a claim that the queue would never hand out: the verdict still refuses.
    ReviewTask.objects.filter(pk=escalation.pk).update(state="claimed", claimed_by=analyst,
                                                        lease_expires_at=timezone.now() + timedelta(minutes=5))
    with pytest.raises(PermissionDeniedError):
        verdict_submit(user=analyst, item=item, label="legit")
    assert not Verdict.objects.exists()


def test_releasing_one_twin_keeps_the_item_in_review_while_the_other_is_held():
    source = make_payments_source(thresholds={})
    _double(source)
    (item,) = make_scored_items(source, [("legit", 0.6)])
    a, b = UserFactory(role="analyst"), UserFactory(role="analyst")
    _claim(a)
    _claim(b)
    task_release(user=a, item=item)
    assert Item.objects.get(pk=item.pk).state == Item.State.IN_REVIEW
    task_release(user=b, item=item)
    assert Item.objects.get(pk=item.pk).state == Item.State.QUEUED


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_never_give_both_twins_to_one_reviewer():
    assert connection.vendor == "postgresql", "this test needs PostgreSQL (set DATABASE_URL)"
    source = make_payments_source(thresholds={})
    _double(source)
    make_scored_items(source, [("legit", 0.5 + i / 200) for i in range(24)])
    users = [UserFactory(role="analyst") for _ in range(32)]
    seen: list[tuple[int, int, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(user) -> None:
        try:
            while True:
                task = task_claim_next(user=user)
                if task is None:
                    return
                with lock:
                    seen.append((task.pk, task.item_id, user.pk))
                verdict_submit(user=user, item=Item.objects.select_related("source").get(pk=task.item_id),
                               label="legit")
        except BaseException as exc:  # collected and asserted on below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert len(seen) == len({t for t, _, _ in seen}) == 48
    per_item: dict[int, set[int]] = {}
    for _task, item_id, user_id in seen:
        per_item.setdefault(item_id, set()).add(user_id)
    assert all(len(users_) == 2 for users_ in per_item.values())
    assert Item.objects.filter(state=Item.State.DECIDED).count() == 24
    assert list(audit_verify()) == []


# --- Escalation ------------------------------------------------------------------------------------

def test_escalation_moves_the_item_to_the_admin_queue_with_the_note():
    source = make_payments_source(thresholds={})
    _double(source)
    (item, other) = make_scored_items(source, [("legit", 0.6), ("legit", 0.7)])
    analyst, admin = UserFactory(role="analyst"), UserFactory(role="admin")
    task = _claim(analyst)
    assert task.item_id == item.pk
    escalation = task_escalate(user=analyst, item=_item(task), note="<b>card looks cloned</b>")
    assert (escalation.kind, escalation.state, escalation.note) == ("escalation", "open", "<b>card looks cloned</b>")
    assert escalation.parent_id == task.pk and escalation.reason == f"Escalated by {analyst.username}"
    assert set(ReviewTask.objects.filter(item=item).exclude(kind="escalation").values_list("state", flat=True)) == {
        "cancelled"}  # the open twin goes too
    assert Item.objects.get(pk=item.pk).state == Item.State.QUEUED
    event = AuditEvent.objects.get(verb="task.escalated")
    assert event.after["note"] == "<b>card looks cloned</b>" and event.actor_id == analyst.pk
    # The review queue goes on with other items; the escalation waits for an admin.
    assert _claim(analyst).item_id == other.pk
    held = _claim(admin, queue="adjudication")
    assert held.pk == escalation.pk
    verdict_submit(user=admin, item=_item(held), label="fraud")
    label = Label.objects.get(item=item, is_active=True)
    assert (label.origin, label.label) == (Label.Origin.ADJUDICATION, "fraud")
    assert Decision.objects.get(item=item, is_current=True).reason.startswith("escalation resolved")


def test_escalating_a_qa_sample_keeps_the_model_decision_until_an_admin_overrides():
    source = make_payments_source(thresholds={"legit": 0.9}, qa_sample_rate=1.0)
    (item,) = make_scored_items(source, [("legit", 0.95)])
    analyst, admin = UserFactory(role="analyst"), UserFactory(role="admin")
    task_escalate(user=analyst, item=_item(_claim(analyst)))
    assert Item.objects.get(pk=item.pk).state == Item.State.AUTO_DECIDED
    verdict_submit(user=admin, item=_item(_claim(admin, queue="adjudication")), label="fraud")
    decision = Decision.objects.get(item=item, is_current=True)
    assert decision.label == "fraud" and decision.supersedes.origin == "model"
    assert Item.objects.get(pk=item.pk).state == Item.State.DECIDED


def test_escalation_needs_a_held_review_task():
    source = make_payments_source(thresholds={})
    (item,) = make_scored_items(source, [("legit", 0.6)])
    with pytest.raises(Conflict):
        task_escalate(user=UserFactory(role="analyst"), item=item)


# --- Undo ------------------------------------------------------------------------------------------

def test_undo_withdraws_label_and_decision_and_hands_the_item_back():
    source = make_payments_source(thresholds={})
    (item,) = make_scored_items(source, [("legit", 0.6)])
    analyst = UserFactory(role="analyst")
    task = _claim(analyst)
    verdict, _ = verdict_submit(user=analyst, item=_item(task), label="fraud")
    reopened = verdict_undo(user=analyst)
    assert reopened.pk == task.pk and reopened.state == "claimed" and reopened.claimed_by == analyst
    verdict.refresh_from_db()
    assert verdict.withdrawn_at is not None
    label = Label.objects.get(verdict=verdict)
    assert not label.is_active and label.withdrawn_at is not None
    decision = Decision.objects.get(verdict=verdict)
    assert not decision.is_current and decision.withdrawn_at is not None
    assert Item.objects.get(pk=item.pk).state == Item.State.IN_REVIEW
    event = AuditEvent.objects.get(verb="verdict.withdrawn")
    assert event.after["decision_withdrawn"] == decision.pk and event.actor_id == analyst.pk
    # Answer again: a fresh verdict, decision and label.
    again, created = verdict_submit(user=analyst, item=_item(task), label="legit")
    assert created and Decision.objects.get(item=item, is_current=True).verdict == again
    assert Label.objects.get(item=item, is_active=True).label == "legit"
    assert list(audit_verify()) == []


def test_undo_window_and_ownership():
    source = make_payments_source(thresholds={})
    make_scored_items(source, [("legit", 0.6)])
    analyst, other = UserFactory(role="analyst"), UserFactory(role="analyst")
    verdict, _ = verdict_submit(user=analyst, item=_item(_claim(analyst)), label="fraud")
    with pytest.raises(Conflict, match="Nothing to undo"):
        verdict_undo(user=other)
    with pytest.raises(Conflict, match="Nothing to undo"):
        verdict_undo(user=other, verdict_id=verdict.pk)
    Verdict.objects.filter(pk=verdict.pk).update(created_at=timezone.now() - timedelta(minutes=6))
    with pytest.raises(Conflict, match="5 minutes"):
        verdict_undo(user=analyst)


def test_undo_of_a_qa_override_restores_the_model_decision():
    source = make_payments_source(thresholds={"legit": 0.9}, qa_sample_rate=1.0)
    (item,) = make_scored_items(source, [("legit", 0.95)])
    imported = Label.objects.create(item=item, source=source, label="legit", origin=Label.Origin.IMPORT)
    analyst = UserFactory(role="analyst")
    verdict_submit(user=analyst, item=_item(_claim(analyst)), label="fraud")
    assert Item.objects.get(pk=item.pk).state == Item.State.DECIDED
    imported.refresh_from_db()
    assert not imported.is_active
    verdict_undo(user=analyst)
    current = Decision.objects.get(item=item, is_current=True)
    assert current.origin == "model" and current.label == "legit"
    assert Item.objects.get(pk=item.pk).state == Item.State.AUTO_DECIDED
    imported.refresh_from_db()
    assert imported.is_active and imported.withdrawn_at is None  # the label the verdict replaced is back


def test_undo_refused_once_a_peer_answered_and_cancels_an_untouched_adjudication():
    source = make_payments_source(thresholds={})
    _double(source)
    (item,) = make_scored_items(source, [("legit", 0.6)])
    a, b = UserFactory(role="analyst"), UserFactory(role="analyst")
    verdict_submit(user=a, item=_item(_claim(a)), label="fraud")
    verdict_submit(user=b, item=_item(_claim(b)), label="legit")
    with pytest.raises(Conflict, match="answered"):
        verdict_undo(user=a)
    # b's answer opened the adjudication: undoing it cancels that and b answers again.
    verdict_undo(user=b)
    assert ReviewTask.objects.get(item=item, kind="adjudication").state == "cancelled"
    verdict_submit(user=b, item=item, label="fraud")
    assert Decision.objects.get(item=item, is_current=True).label == "fraud"


# --- Bulk ------------------------------------------------------------------------------------------

def test_bulk_verdicts_report_per_item_and_skip_items_others_hold():
    source = make_payments_source(thresholds={})
    items = make_scored_items(source, [("legit", 0.5), ("legit", 0.6), ("legit", 0.7)])
    analyst, other = UserFactory(role="analyst"), UserFactory(role="analyst")
    held = _claim(other)  # holds items[0]
    outcomes = verdicts_bulk_submit(user=analyst, item_ids=[i.pk for i in items] + [999_999], label="fraud",
                                    note="same merchant")
    by_id = {o.item_id: o for o in outcomes}
    assert by_id[held.item_id].status == "skipped" and "another reviewer" in by_id[held.item_id].detail
    assert by_id[999_999].status == "skipped"
    recorded = [o for o in outcomes if o.status == "recorded"]
    assert {o.item_id for o in recorded} == {items[1].pk, items[2].pk}
    for o in recorded:
        v = Verdict.objects.get(pk=o.verdict_id)
        assert (v.label, v.note, v.reviewer) == ("fraud", "same merchant", analyst)
        assert Item.objects.get(pk=o.item_id).state == Item.State.DECIDED
    event = AuditEvent.objects.get(verb="verdicts.bulk_submitted")
    assert (event.after["recorded"], event.after["skipped"]) == (2, 2)
    assert not AuditEvent.objects.filter(verb="verdict.submitted").exists()  # one event for the request
    assert list(audit_verify()) == []


def test_bulk_validation():
    source = make_payments_source(thresholds={})
    (item,) = make_scored_items(source, [("legit", 0.5)])
    analyst = UserFactory(role="analyst")
    with pytest.raises(ValidationFailed):
        verdicts_bulk_submit(user=analyst, item_ids=[], label="fraud")
    with pytest.raises(ValidationFailed):
        verdicts_bulk_submit(user=analyst, item_ids=range(1, 300), label="fraud")
    (outcome,) = verdicts_bulk_submit(user=analyst, item_ids=[item.pk], label="spam")
    assert outcome.status == "skipped" and "not a label" in outcome.detail


# --- Queue: keyset pages and counts --------------------------------------------------------------------

def test_keyset_pages_cover_the_queue_once_in_order():
    source = make_payments_source(thresholds={})
    # Ties on priority make the created_at/id tiebreak matter.
    make_scored_items(source, [("legit", 0.5)] * 4 + [("legit", 0.3), ("legit", 0.7), ("legit", 0.5)])
    expected = list(ReviewTask.objects.order_by("priority", "created_at", "id").values_list("pk", flat=True))
    for sort, order in (("priority", expected),
                        ("oldest", list(ReviewTask.objects.order_by("created_at", "id").values_list("pk", flat=True)))):
        seen, cursor = [], None
        while True:
            page = selectors.queue_page(filters=QueueFilters(sort=sort), cursor=cursor, limit=3)
            seen += [t.pk for t in page.tasks]
            if not page.next_cursor:
                break
            cursor = page.next_cursor
        assert seen == order
    # A broken cursor is page one, not an error.
    assert [t.pk for t in selectors.queue_page(filters=QueueFilters(), cursor="!!bad", limit=3).tasks] == expected[:3]


def test_queue_filters_kind_batch_and_age():
    source = make_payments_source(thresholds={"legit": 0.9}, qa_sample_rate=1.0)
    batch = make_batch(source)
    review, qa = make_scored_items(source, [("legit", 0.5), ("legit", 0.95)], batch=batch)
    make_scored_items(source, [("legit", 0.6)])  # no batch
    def ids(**kw):
        return {t.item_id for t in selectors.queue_page(filters=QueueFilters(**kw)).tasks}
    assert ids(kind="qa") == {qa.pk}
    assert ids(batch_id=batch.pk) == {review.pk, qa.pk}
    assert ids(kind="review", batch_id=batch.pk) == {review.pk}
    assert ids(min_age_hours=1) == set()
    ReviewTask.objects.filter(item=review).update(created_at=timezone.now() - timedelta(hours=2))
    assert ids(min_age_hours=1) == {review.pk}


def test_live_counts_are_exact_below_the_cap_and_estimated_above():
    source = make_payments_source(thresholds={"legit": 0.9})
    make_scored_items(source, [("legit", 0.5)] * 5 + [("legit", 0.95)])
    counts = selectors.queue_counts(source=source)
    assert counts.states["queued"].n == 5 and counts.states["queued"].exact
    assert counts.states["auto_decided"].n == 1 and counts.waiting["review"].n == 5
    assert counts.claimed.n == 0
    _claim(UserFactory(role="analyst"))
    assert selectors.queue_counts(source=None).claimed.n == 1
    if connection.vendor == "postgresql":
        capped = selectors.queue_counts(source=source, cap=2)
        assert capped.states["in_review"].exact and capped.states["in_review"].n == 1
        assert capped.states["queued"].exact is False and capped.states["queued"].display.startswith("≈")
        assert capped.states["auto_decided"].exact and capped.states["auto_decided"].n == 1


# --- Explanations and figures ------------------------------------------------------------------------

def test_explanation_bars_and_highlighted_tokens():
    explanation = {"method": "linear", "target": "fraud", "base": -3.1,
                   "features": [["amount", 1.2], ["country", -0.4], ["description", 0.6]],
                   "tokens": [["description:refund", 0.5], ["description:weekly shop", -0.2], ["description:x", "bad"]]}
    data = selectors.explanation_data(explanation, titles={"amount": "Amount"})
    assert [r["title"] for r in data["toward"]] == ["Amount", "description"]
    assert [r["name"] for r in data["against"]] == ["country"] and data["toward"][0]["pct"] == 100.0
    assert data["weights"]["description"] == {"refund": 0.5, "weekly": -0.2, "shop": -0.2}
    runs = selectors.highlight_tokens("Refund <b>weekly</b> shop!", data["weights"]["description"], "fraud")
    assert runs[0] == ("Refund", "tok-pos", "+0.500 toward fraud")
    assert ("weekly", "tok-neg", "-0.200 against fraud") in runs
    assert "".join(r[0] for r in runs) == "Refund <b>weekly</b> shop!"
    assert selectors.explanation_data(None, titles={}) is None
    assert selectors.explanation_data({"features": "junk"}, titles={}) is None


def test_cohen_kappa():
    assert selectors.cohen_kappa({}) is None
    assert selectors.cohen_kappa({("a", "a"): 5}) is None  # both raters constant: undefined
    assert selectors.cohen_kappa({("a", "a"): 5, ("b", "b"): 5}) == pytest.approx(1.0)
    # Textbook: po = 0.7, pe = 0.5 -> 0.4
    assert selectors.cohen_kappa({("a", "a"): 35, ("b", "b"): 35, ("a", "b"): 15, ("b", "a"): 15}) == pytest.approx(0.4)


def test_analyst_figures():
    source = make_payments_source(thresholds={})
    _double(source)
    items = make_scored_items(source, [("legit", 0.5 + i / 100) for i in range(4)])
    a, b, admin = UserFactory(role="analyst"), UserFactory(role="analyst"), UserFactory(role="admin")
    answers = {items[0].pk: ("fraud", "fraud"), items[1].pk: ("legit", "legit"), items[2].pk: ("fraud", "legit"),
               items[3].pk: ("legit", "legit")}
    for _ in items:
        ta = _claim(a)
        verdict_submit(user=a, item=_item(ta), label=answers[ta.item_id][0], handling_ms=1000)
        tb = _claim(b)
        verdict_submit(user=b, item=_item(tb), label=answers[tb.item_id][1], handling_ms=3000)
    verdict_submit(user=admin, item=_item(_claim(admin, queue="adjudication")), label="fraud")
    figures = {f.username: f for f in selectors.analyst_figures()}
    fa, fb = figures[a.username], figures[b.username]
    assert (fa.items, fa.median_handling_s, fb.median_handling_s) == (4, 1.0, 3.0)
    assert fa.peer_pairs == fb.peer_pairs == 4 and fa.peer_agreement == pytest.approx(0.75)
    assert fa.kappa == pytest.approx(0.5)  # po .75, pe .5
    # a's answers were all decided by b's (second) verdict or the admin: 4 items, 4 agree with the final.
    assert (fa.final_n, fa.final_agreement) == (4, 1.0)
    # b decided three items themselves; the adjudicated one went against b.
    assert (fb.final_n, fb.final_agreement) == (1, 0.0)
    own = selectors.analyst_figures(reviewer_ids=[a.pk])
    assert [f.username for f in own] == [a.username]
