from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from reviewapp.core.audit import audit_verify
from reviewapp.core.errors import Conflict, ValidationFailed
from reviewapp.core.models import AuditEvent
from reviewapp.ingest.models import Item
from reviewapp.review import services
from reviewapp.review.models import Decision, Label, Policy, ReviewTask, Verdict
from reviewapp.review.services import (
    AUTO_NONE_TARGET_ERROR,
    QA_REASON,
    items_route,
    items_route_unscored,
    leases_release_expired,
    policy_create,
    task_claim_next,
    task_release,
    task_renew_lease,
    verdict_submit,
)
from tests.factories import UserFactory, make_payments_source
from tests.review.helpers import champion, make_scored_items, payment

pytestmark = pytest.mark.django_db


def _task(item: Item) -> ReviewTask:
    return ReviewTask.objects.get(item=item)


# --- Routing ---------------------------------------------------------------------------------------

def test_threshold_routing_auto_decides_above_threshold_and_queues_the_rest():
    source = make_payments_source(thresholds={"legit": 0.9})  # fraud has no threshold
    auto, below, no_threshold = make_scored_items(source, [("legit", 0.95), ("legit", 0.71), ("fraud", 0.999)])
    policy = services.policy_current(source=source)

    assert auto.state == Item.State.AUTO_DECIDED
    decision = Decision.objects.get(item=auto)
    assert (decision.origin, decision.label, decision.is_current) == ("model", "legit", True)
    assert decision.prediction_id == auto.prediction_id and decision.policy_id == policy.pk
    assert decision.model_version_id == auto.prediction.model_version_id
    assert not ReviewTask.objects.filter(item=auto).exists()

    assert below.state == Item.State.QUEUED
    assert below.route_reason == "legit 0.71 below its threshold 0.9"
    task = _task(below)
    assert (task.kind, task.state, task.reason) == ("review", "open", below.route_reason)
    assert task.priority == pytest.approx(0.71)

    assert no_threshold.state == Item.State.QUEUED
    assert no_threshold.route_reason == "no threshold for label fraud"
    assert {i.policy_id for i in (auto, below, no_threshold)} == {policy.pk}
    assert not Decision.objects.filter(item__in=[below, no_threshold]).exists()


def test_routing_is_idempotent_and_writes_one_audit_event():
    source = make_payments_source(thresholds={"legit": 0.9})
    items = make_scored_items(source, [("legit", 0.95), ("legit", 0.5)], route=False)
    first = items_route(item_ids=[i.pk for i in items])
    assert first == {"routed": 2, "auto_decided": 1, "queued": 1, "qa_sampled": 0, "double_review": 0, "skipped": 0}
    events = AuditEvent.objects.filter(verb="items.routed")
    assert events.count() == 1
    assert events.get().after["policy_versions"] == {str(source.pk): 1}
    second = items_route(item_ids=[i.pk for i in items])
    assert second["routed"] == 0 and second["skipped"] == 2
    assert ReviewTask.objects.count() == 1 and Decision.objects.count() == 1
    assert list(audit_verify()) == []


def test_routing_query_count_does_not_grow_with_items():
    source = make_payments_source(thresholds={"legit": 0.9})
    few = make_scored_items(source, [("legit", 0.95), ("legit", 0.5)] * 2, route=False)
    many = make_scored_items(source, [("legit", 0.95), ("legit", 0.5)] * 40, route=False)
    with CaptureQueriesContext(connection) as small:
        items_route(item_ids=[i.pk for i in few])
    with CaptureQueriesContext(connection) as large:
        items_route(item_ids=[i.pk for i in many])
    assert len(large.captured_queries) == len(small.captured_queries)


def test_a_route_planned_before_its_predictions_exist_is_written_pointing_at_them():
    """Scoring plans the routing from its new predictions (to know which items to explain), inserts them, then
    fills their ids into the plan and writes it: same states, decisions, tasks and event as routing them."""
    from django.db import transaction

    source = make_payments_source(thresholds={"legit": 0.9})
    items = make_scored_items(source, [("legit", 0.95), ("legit", 0.5), ("fraud", 0.99)], route=False)
    rows = [(i.pk, i.source_id, None, i.prediction.top_label, i.prediction.confidence,
             i.prediction.model_version_id) for i in items]
    with transaction.atomic():
        planned = services.route_rows_plan(rows=rows, set_prediction=True)
        assert planned is not None and planned.open_task_items() == {items[1].pk, items[2].pk}
        assert not ReviewTask.objects.exists() and not Decision.objects.exists()  # nothing written yet
        planned.with_predictions({i.pk: i.prediction_id for i in items})
        result, entry = services.route_rows_write(planned)
    assert result == {"routed": 3, "auto_decided": 1, "queued": 2, "qa_sampled": 0, "double_review": 0, "skipped": 0}
    assert entry.verb == "items.routed" and entry.after["first_item_id"] == items[0].pk
    for item in items:
        item.refresh_from_db()
    assert [i.state for i in items] == [Item.State.AUTO_DECIDED, Item.State.QUEUED, Item.State.QUEUED]
    assert Decision.objects.get().prediction_id == items[0].prediction_id
    assert sorted(ReviewTask.objects.values_list("item_id", flat=True)) == [items[1].pk, items[2].pk]
    assert services.route_rows_plan(rows=[]) is None


def test_oldest_priority_gives_zero_priority():
    source = make_payments_source(thresholds={"legit": 0.99})
    policy_create(source=source, actor=None, thresholds={"legit": 0.99}, priority="oldest", qa_sample_rate=0)
    (item,) = make_scored_items(source, [("legit", 0.6)])
    assert _task(item).priority == 0.0


def test_target_error_policy_without_risk_control_auto_decides_nothing():
    source = make_payments_source()
    policy_create(source=source, actor=None, mode="target_error", target_error=0.02, qa_sample_rate=0)
    items = make_scored_items(source, [("legit", 0.9999), ("fraud", 0.9999)])
    assert {i.state for i in items} == {Item.State.QUEUED}
    assert {i.route_reason for i in items} == {AUTO_NONE_TARGET_ERROR}


def test_target_error_policy_uses_the_model_risk_control_thresholds():
    source = make_payments_source()
    champion(source, risk_control={"thresholds": {"legit": 0.97}, "target_error": 0.02})
    policy_create(source=source, actor=None, mode="target_error", target_error=0.02, qa_sample_rate=0)
    auto, queued = make_scored_items(source, [("legit", 0.98), ("legit", 0.96)])
    assert auto.state == Item.State.AUTO_DECIDED
    assert queued.route_reason == "legit 0.96 below its threshold 0.97"


@pytest.mark.parametrize(("rate", "expected"), [(1.0, 3), (0.0, 0)])
def test_qa_sampling_of_auto_decisions(rate, expected):
    source = make_payments_source(thresholds={"legit": 0.9}, qa_sample_rate=rate)
    items = make_scored_items(source, [("legit", 0.95), ("legit", 0.96), ("legit", 0.97), ("legit", 0.5)])
    qa = ReviewTask.objects.filter(kind="qa")
    assert qa.count() == expected
    assert all(t.reason == QA_REASON and t.item.state == Item.State.AUTO_DECIDED for t in qa)
    assert ReviewTask.objects.filter(kind="review").count() == 1
    assert Decision.objects.filter(item__in=items[:3], origin="model").count() == 3


def test_qa_draw_is_deterministic_and_near_the_rate():
    source = make_payments_source(qa_sample_rate=0.1)
    policy = services.policy_current(source=source)
    draws = [services.qa_draw(item_id=i, policy=policy) for i in range(5000)]
    assert draws == [services.qa_draw(item_id=i, policy=policy) for i in range(5000)]
    share = sum(d < 0.1 for d in draws) / len(draws)
    assert 0.08 < share < 0.12


def test_unscored_items_go_to_review_with_the_reason():
    source = make_payments_source()
    items = make_scored_items(source, [("legit", 0.5)] * 2, route=False)
    Item.objects.filter(pk__in=[i.pk for i in items]).update(state=Item.State.RECEIVED, prediction=None)
    reason = "no model yet: every item is reviewed"
    assert items_route_unscored(item_ids=[i.pk for i in items], reason=reason) == 2
    assert items_route_unscored(item_ids=[i.pk for i in items], reason=reason) == 0
    assert set(Item.objects.values_list("state", "route_reason")) == {("queued", reason)}
    assert set(ReviewTask.objects.values_list("kind", "reason")) == {("review", reason)}
    assert AuditEvent.objects.filter(verb="items.routed_unscored").count() == 1


# --- Claims ----------------------------------------------------------------------------------------

def test_claims_are_distinct_ordered_and_leased(settings):
    source = make_payments_source(thresholds={"legit": 0.99})
    _high, low, mid = make_scored_items(source, [("legit", 0.9), ("legit", 0.5), ("legit", 0.7)])
    alice, bob = UserFactory(role="analyst"), UserFactory(role="analyst")

    first = task_claim_next(user=alice)
    assert first.item_id == low.pk  # most uncertain first
    assert first.state == "claimed" and first.claimed_by == alice
    assert first.lease_expires_at - first.claimed_at == timedelta(seconds=settings.CLAIM_LEASE_SECONDS)
    assert Item.objects.get(pk=low.pk).state == Item.State.IN_REVIEW
    # Asking again returns the claim already held, not a second item.
    assert task_claim_next(user=alice).pk == first.pk
    second = task_claim_next(user=bob)
    assert second.item_id == mid.pk
    assert AuditEvent.objects.filter(verb="task.claimed").count() == 2


def test_claim_filters_by_source_and_returns_none_when_empty():
    payments = make_payments_source(thresholds={})
    other = make_payments_source(slug="cards", thresholds={})
    make_scored_items(payments, [("legit", 0.5)])
    user = UserFactory(role="analyst")
    assert task_claim_next(user=user, source=other) is None
    assert task_claim_next(user=user, source=payments).source_id == payments.pk


def test_qa_claim_keeps_item_auto_decided():
    source = make_payments_source(thresholds={"legit": 0.9}, qa_sample_rate=1.0)
    (item,) = make_scored_items(source, [("legit", 0.95)])
    task = task_claim_next(user=UserFactory(role="analyst"))
    assert task.kind == "qa"
    assert Item.objects.get(pk=item.pk).state == Item.State.AUTO_DECIDED


def test_release_and_renew():
    source = make_payments_source(thresholds={})
    (item,) = make_scored_items(source, [("legit", 0.5)])
    holder, other = UserFactory(role="analyst"), UserFactory(role="analyst")
    task = task_claim_next(user=holder)
    with pytest.raises(Conflict):
        task_release(user=other, item=item)
    with pytest.raises(Conflict):
        task_renew_lease(user=other, task=task)
    before = task.lease_expires_at
    ReviewTask.objects.filter(pk=task.pk).update(lease_expires_at=timezone.now() + timedelta(seconds=5))
    renewed = task_renew_lease(user=holder, task=task)
    assert renewed.lease_expires_at >= before
    task_release(user=holder, item=item)
    task.refresh_from_db()
    assert (task.state, task.claimed_by, task.lease_expires_at) == ("open", None, None)
    assert Item.objects.get(pk=item.pk).state == Item.State.QUEUED
    with pytest.raises(Conflict):
        task_release(user=holder, item=item)


def test_expired_leases_are_released():
    source = make_payments_source(thresholds={})
    expired_item, live_item = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    a, b = UserFactory(role="analyst"), UserFactory(role="analyst")
    expired = task_claim_next(user=a)
    live = task_claim_next(user=b)
    ReviewTask.objects.filter(pk=expired.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert leases_release_expired() == 1
    expired.refresh_from_db()
    live.refresh_from_db()
    assert expired.state == "open" and expired.claimed_by is None
    assert live.state == "claimed"
    assert Item.objects.get(pk=expired_item.pk).state == Item.State.QUEUED
    assert Item.objects.get(pk=live_item.pk).state == Item.State.IN_REVIEW
    assert AuditEvent.objects.filter(verb="tasks.leases_expired").count() == 1
    assert leases_release_expired() == 0
    # The former holder can no longer record a verdict on it.
    with pytest.raises(Conflict):
        verdict_submit(user=a, item=expired_item, label="legit")


# --- Verdicts --------------------------------------------------------------------------------------

def test_verdict_decides_the_item_and_records_a_label():
    source = make_payments_source(thresholds={})
    (item,) = make_scored_items(source, [("fraud", 0.7)])
    user = UserFactory(role="analyst")
    task = task_claim_next(user=user)
    verdict, created = verdict_submit(user=user, item=item, label="legit", note="known customer", handling_ms=4200)
    assert created
    assert (verdict.label, verdict.handling_ms, verdict.task_id, verdict.note) == ("legit", 4200, task.pk,
                                                                                     "known customer")
    task.refresh_from_db()
    assert task.state == "done" and task.completed_at is not None
    decision = Decision.objects.get(item=item, is_current=True)
    assert (decision.origin, decision.label, decision.verdict_id, decision.decided_by_id) == (
        "reviewer", "legit", verdict.pk, user.pk)
    assert decision.prediction_id == item.prediction_id
    assert decision.model_version_id == item.prediction.model_version_id
    assert decision.policy_id == item.policy_id
    label = Label.objects.get(item=item, is_active=True)
    assert (label.origin, label.label, label.verdict_id, label.decision_id) == ("review", "legit", verdict.pk,
                                                                                 decision.pk)
    assert Item.objects.get(pk=item.pk).state == Item.State.DECIDED
    event = AuditEvent.objects.get(verb="verdict.submitted")
    assert event.before["item_state"] == "in_review" and event.after["item_state"] == "decided"


def test_verdict_conflicts():
    source = make_payments_source(thresholds={})
    (item,) = make_scored_items(source, [("legit", 0.5)])
    holder, other = UserFactory(role="analyst"), UserFactory(role="analyst")
    with pytest.raises(Conflict, match="claim it first"):
        verdict_submit(user=holder, item=item, label="legit")
    task_claim_next(user=holder)
    with pytest.raises(Conflict, match="claimed by someone else"):
        verdict_submit(user=other, item=item, label="legit")
    verdict_submit(user=holder, item=item, label="legit")
    with pytest.raises(Conflict, match="already decided"):
        verdict_submit(user=holder, item=item, label="fraud")
    with pytest.raises(Conflict, match="already decided"):
        verdict_submit(user=other, item=item, label="fraud")
    assert Verdict.objects.count() == 1


def test_label_outside_the_set_is_refused():
    source = make_payments_source(thresholds={})
    (item,) = make_scored_items(source, [("legit", 0.5)])
    user = UserFactory(role="analyst")
    task_claim_next(user=user)
    with pytest.raises(ValidationFailed) as exc:
        verdict_submit(user=user, item=item, label="maybe")
    assert exc.value.errors[0]["field"] == "label"
    assert exc.value.status_code == 400


def test_idempotency_key_replay_returns_the_earlier_verdict():
    source = make_payments_source(thresholds={})
    (item,) = make_scored_items(source, [("legit", 0.5)])
    user = UserFactory(role="analyst")
    task_claim_next(user=user)
    first, created = verdict_submit(user=user, item=item, label="fraud", idempotency_key="k-1")
    again, created_again = verdict_submit(user=user, item=item, label="fraud", idempotency_key="k-1")
    assert created and not created_again and again.pk == first.pk
    assert Verdict.objects.count() == 1 and Decision.objects.count() == 1 and Label.objects.count() == 1
    assert AuditEvent.objects.filter(verb="verdict.submitted").count() == 1
    (other_item,) = make_scored_items(source, [("legit", 0.6)])
    with pytest.raises(Conflict):
        verdict_submit(user=user, item=other_item, label="fraud", idempotency_key="k-1")


def test_qa_override_creates_a_superseding_decision():
    source = make_payments_source(thresholds={"legit": 0.9}, qa_sample_rate=1.0)
    overridden, confirmed = make_scored_items(source, [("legit", 0.95), ("legit", 0.96)])
    user = UserFactory(role="analyst")
    model_decision = Decision.objects.get(item=overridden)

    task = task_claim_next(user=user)
    assert task.item_id == overridden.pk and task.kind == "qa"
    verdict, _ = verdict_submit(user=user, item=overridden, label="fraud")
    model_decision.refresh_from_db()
    assert not model_decision.is_current
    new = Decision.objects.get(item=overridden, is_current=True)
    assert (new.origin, new.label, new.reason, new.supersedes_id, new.verdict_id) == (
        "reviewer", "fraud", "QA override", model_decision.pk, verdict.pk)
    assert Label.objects.get(item=overridden).origin == "qa"
    assert Item.objects.get(pk=overridden.pk).state == Item.State.DECIDED

    task_claim_next(user=user)
    verdict_submit(user=user, item=confirmed, label="legit")
    kept = Decision.objects.get(item=confirmed)
    assert kept.is_current and kept.origin == "model"
    label = Label.objects.get(item=confirmed)
    assert (label.origin, label.decision_id) == ("qa", kept.pk)
    assert Item.objects.get(pk=confirmed.pk).state == Item.State.AUTO_DECIDED


def test_policy_create_still_validates():
    source = make_payments_source()
    with pytest.raises(ValidationFailed):
        policy_create(source=source, actor=None, thresholds={"nope": 0.5})
    assert Policy.objects.filter(source=source).count() == 1


def test_payload_helper_is_schema_shaped():
    assert set(payment("x")) <= set(make_payments_source().schema_versions.first().json_schema["properties"])


# --- Concurrency against PostgreSQL ---------------------------------------------------------------

def _run_threads(n: int, target) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            target(index)
        except BaseException as exc:  # collected and asserted on by the test
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_never_hand_out_a_task_twice():
    assert connection.vendor == "postgresql", "this test needs PostgreSQL (set DATABASE_URL)"
    source = make_payments_source(thresholds={})
    make_scored_items(source, [("legit", 0.5 + i / 200) for i in range(60)])
    users = [UserFactory(role="analyst") for _ in range(32)]
    claimed: list[tuple[int, int]] = []
    lock = threading.Lock()

    def work(index: int) -> None:
        user = users[index]
        while True:
            task = task_claim_next(user=user)
            if task is None:
                return
            with lock:
                claimed.append((task.pk, user.pk))
            verdict_submit(user=user, item=task.item, label="legit")

    assert _run_threads(len(users), work) == []
    task_ids = [t for t, _ in claimed]
    assert len(task_ids) == len(set(task_ids)) == 60
    assert ReviewTask.objects.filter(state="done").count() == 60
    assert Verdict.objects.count() == 60
    assert Item.objects.filter(state=Item.State.DECIDED).count() == 60
    assert len({u for _, u in claimed}) > 1
    assert list(audit_verify()) == []


@pytest.mark.django_db(transaction=True)
def test_racing_verdicts_have_exactly_one_winner():
    assert connection.vendor == "postgresql", "this test needs PostgreSQL (set DATABASE_URL)"
    source = make_payments_source(thresholds={})
    (item,) = make_scored_items(source, [("legit", 0.5)])
    user = UserFactory(role="analyst")
    task_claim_next(user=user)
    outcomes: list[str] = []

    def submit(index: int) -> None:
        try:
            _, created = verdict_submit(user=user, item=Item.objects.get(pk=item.pk), label="legit",
                                        idempotency_key=f"key-{index}")
            outcomes.append("created" if created else "replayed")
        except Conflict:
            outcomes.append("conflict")

    assert _run_threads(8, submit) == []
    assert sorted(outcomes) == ["conflict"] * 7 + ["created"]
    assert Verdict.objects.count() == 1 and Decision.objects.filter(is_current=True).count() == 1
