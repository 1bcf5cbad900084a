"""Policy editor services: versions with diffs, restore, target-error thresholds, re-route, promise check."""

from __future__ import annotations

import pytest

from reviewapp.core.models import AuditEvent
from reviewapp.ingest.models import Item
from reviewapp.review.models import Decision, Label, Policy, ReviewTask
from reviewapp.review.policy_selectors import policy_diff, policy_history, promise_check, reroute_progress
from reviewapp.review.policy_services import (
    policy_reroute_waiting,
    policy_restore,
    policy_update,
    promise_breach_metrics,
)
from scoring.models import ModelVersion
from tests.review.helpers import make_scored_items
from tests.review.policy_helpers import add_labeled, block, make_champion, source_setup

pytestmark = pytest.mark.django_db


def test_update_makes_a_version_with_diff_and_audit(admin_user) -> None:
    source = source_setup(thresholds={"legit": 0.9, "fraud": 0.99})
    saved = policy_update(source=source, actor=admin_user, thresholds={"legit": 0.95}, qa_sample_rate=0.05,
                          comment="tighter")
    assert saved.policy.version == 2 and saved.policy.created_by == admin_user and saved.policy.comment == "tighter"
    fields = {c["field"]: (c["before"], c["after"]) for c in saved.diff}
    assert fields == {"thresholds.legit": (0.9, 0.95), "thresholds.fraud": (0.99, None), "qa_sample_rate": (0.0, 0.05)}
    verbs = list(AuditEvent.objects.filter(object_type="policy", object_id=str(saved.policy.pk))
                 .values_list("verb", flat=True))
    assert verbs == ["policy.created", "policy.applied"]
    history = policy_history(source=source)
    assert [r.policy.version for r in history] == [2, 1] and history[0].is_current
    assert history[0].diff == saved.diff


def test_restore_is_a_new_version(admin_user) -> None:
    source = source_setup(thresholds={"legit": 0.9})
    policy_update(source=source, actor=admin_user, thresholds={"legit": 0.8}, qa_sample_rate=0.0, comment="looser")
    restored = policy_restore(source=source, actor=admin_user, version=1)
    assert restored.policy.version == 3 and restored.policy.thresholds == {"legit": 0.9}
    assert restored.policy.comment == "restore of version 1"
    assert Policy.objects.filter(source=source).count() == 3
    assert restored.diff == [{"field": "thresholds.legit", "before": 0.8, "after": 0.9}]


def test_validation_errors_name_the_field(admin_user) -> None:
    from reviewapp.core.errors import ValidationFailed

    source = source_setup()
    with pytest.raises(ValidationFailed) as exc:
        policy_update(source=source, actor=admin_user, thresholds={"nope": 0.5})
    assert exc.value.errors[0]["field"] == "thresholds.nope"


def test_diff_of_mode_change() -> None:
    a = {"mode": "threshold", "thresholds": {"legit": 0.9}, "target_error": None, "confidence": 0.95,
         "qa_sample_rate": 0.02, "priority": "uncertainty"}
    b = {**a, "mode": "target_error", "target_error": 0.02}
    assert policy_diff(before=a, after=b) == [
        {"field": "mode", "before": "threshold", "after": "target_error"},
        {"field": "target_error", "before": None, "after": 0.02},
    ]


def test_target_error_uses_matching_stored_risk_control(admin_user) -> None:
    source = source_setup()
    stored = {"target_error": 0.02, "confidence": 0.95, "thresholds": {"legit": 0.97}, "evidence": {}}
    model = make_champion(source, risk_control=stored)
    saved = policy_update(source=source, actor=admin_user, mode="target_error", target_error=0.02, confidence=0.95)
    assert saved.derived_thresholds == {"legit": 0.97} and not saved.risk_control_stored
    model.refresh_from_db()
    assert model.risk_control == stored


def test_target_error_computes_and_stores_risk_control_when_not_matching(admin_user) -> None:
    source = source_setup()
    model = make_champion(source, risk_control={"target_error": 0.1, "confidence": 0.9,
                                                "thresholds": {"legit": 0.6}, "evidence": {}})
    # 600 legit predictions at 0.99 with 1 error: supports a 5% promise at 90%; fraud has too few labels.
    add_labeled(source, block("legit", 0.99, 600, 1, "fraud") + block("fraud", 0.9, 10, 0, "legit"), model=model)
    saved = policy_update(source=source, actor=admin_user, mode="target_error", target_error=0.05, confidence=0.9)
    assert saved.risk_control_stored
    assert set(saved.derived_thresholds) == {"legit"}
    model.refresh_from_db()
    rc = model.risk_control
    assert rc["target_error"] == 0.05 and rc["confidence"] == pytest.approx(0.9)
    assert rc["thresholds"] == saved.derived_thresholds
    assert rc["computed_for_policy_version"] == saved.policy.version
    assert rc["evidence"]["per_label"]["legit"]["n_auto"] == 600
    assert AuditEvent.objects.filter(verb="model.risk_control_set", object_id=str(model.pk)).exists()
    # Routing now uses them: a 0.995 legit is auto-decided, a 0.9 fraud goes to review.
    auto, queued = make_scored_items(source, [("legit", 0.995), ("fraud", 0.9)], model=model)
    assert auto.state == Item.State.AUTO_DECIDED and queued.state == Item.State.QUEUED


def _waiting(source, specs, model):
    items = make_scored_items(source, specs, model=model)
    assert all(i.state == Item.State.QUEUED for i in items)
    return items


def test_reroute_auto_decides_items_now_inside_the_auto_region(admin_user) -> None:
    source = source_setup(thresholds={"legit": 0.99})
    model = make_champion(source)
    high, low, _fraud = _waiting(source, [("legit", 0.95), ("legit", 0.7), ("fraud", 0.97)], model)
    saved = policy_update(source=source, actor=admin_user, thresholds={"legit": 0.9}, qa_sample_rate=1.0,
                          priority="oldest", reroute=True)
    result = policy_reroute_waiting(policy_id=saved.policy.pk, run_id=saved.reroute_run_id, chunk_size=2)
    assert result["status"] == "done" and result["auto_decided"] == 1 and result["kept"] == 2
    high.refresh_from_db()
    low.refresh_from_db()
    assert high.state == Item.State.AUTO_DECIDED and high.policy_id == saved.policy.pk
    decision = Decision.objects.get(item=high, is_current=True)
    assert decision.origin == Decision.Origin.MODEL and decision.policy_id == saved.policy.pk
    assert "re-routed under policy v2" in decision.reason
    tasks = dict(ReviewTask.objects.filter(item=high).values_list("kind", "state"))
    assert tasks == {"review": "cancelled", "qa": "open"}  # QA share 100%: drawn for QA
    assert low.state == Item.State.QUEUED and low.policy_id == saved.policy.pk
    low_task = ReviewTask.objects.get(item=low)
    assert low_task.state == "open" and low_task.priority == 0.0 and "below its threshold 0.9" in low_task.reason
    progress = reroute_progress(policy=saved.policy, run_id=saved.reroute_run_id)
    assert progress["status"] == "done" and progress["total"] == 3 and progress["examined"] == 3
    assert progress["auto_decided"] == 1 and progress["percent"] == 100
    # Idempotent: running again finds the run finished.
    assert policy_reroute_waiting(policy_id=saved.policy.pk, run_id=saved.reroute_run_id)["status"] == \
        "already_finished"


def test_reroute_leaves_claimed_items_and_stops_when_superseded(admin_user, analyst) -> None:
    from reviewapp.review.services import task_claim_next

    source = source_setup(thresholds={"legit": 0.99})
    model = make_champion(source)
    claimed, waiting = _waiting(source, [("legit", 0.95), ("legit", 0.96)], model)
    task = task_claim_next(user=analyst, source=source)
    assert task.item_id == claimed.pk
    saved = policy_update(source=source, actor=admin_user, thresholds={"legit": 0.9}, reroute=True)
    newer = policy_update(source=source, actor=admin_user, thresholds={"legit": 0.99})
    result = policy_reroute_waiting(policy_id=saved.policy.pk, run_id=saved.reroute_run_id)
    assert result["status"] == "superseded" and result["examined"] == 0
    waiting.refresh_from_db()
    assert waiting.state == Item.State.QUEUED
    newer_run = policy_update(source=source, actor=admin_user, thresholds={"legit": 0.9}, reroute=True)
    result = policy_reroute_waiting(policy_id=newer_run.policy.pk, run_id=newer_run.reroute_run_id)
    assert result["auto_decided"] == 1
    claimed.refresh_from_db()
    waiting.refresh_from_db()
    assert claimed.state == Item.State.IN_REVIEW and waiting.state == Item.State.AUTO_DECIDED
    assert newer.policy.version == 3


def _qa(source, model, policy, rows):
    """Auto-decided items under ``policy`` with a QA label each: rows of (predicted, qa_label)."""
    items = make_scored_items(source, [(p, 0.999) for p, _ in rows], model=model)
    for item, (_, qa_label) in zip(items, rows, strict=True):
        assert item.state == Item.State.AUTO_DECIDED and item.policy_id == policy.pk
        Label.objects.create(item=item, source=source, label=qa_label, origin=Label.Origin.QA)
    return items


def test_promise_check_and_breach_metric(admin_user) -> None:
    source = source_setup()
    model = make_champion(source, risk_control={"target_error": 0.02, "confidence": 0.95,
                                                "thresholds": {"legit": 0.99}, "evidence": {}})
    saved = policy_update(source=source, actor=admin_user, mode="target_error", target_error=0.02, confidence=0.95)
    _qa(source, model, saved.policy, [("legit", "legit")] * 40)
    check = promise_check(source=source)
    assert check["qa_samples"] == 40 and check["qa_errors"] == 0 and check["status"] == "ok" and not check["breach"]
    _qa(source, model, saved.policy, [("legit", "fraud")] * 10)
    check = promise_check(source=source)
    assert check["qa_errors"] == 10 and check["measured_error"] == pytest.approx(0.2)
    assert check["interval"][0] > 0.02 and check["breach"] and check["status"] == "breach"
    families = {m.name: m for m in promise_breach_metrics()}
    breach = {s.labels["source"]: s.value for s in families["reviewapp_policy_promise_breach"].samples}
    assert breach == {"payments": 1.0}
    measured = {s.labels["source"]: s.value for s in families["reviewapp_policy_measured_auto_error"].samples}
    assert measured["payments"] == pytest.approx(0.2)
    # A new policy version starts its own record.
    policy_update(source=source, actor=admin_user, mode="target_error", target_error=0.02, confidence=0.95)
    assert promise_check(source=source)["status"] == "no_data"


def test_promise_check_counts_only_model_decisions_of_that_version(admin_user) -> None:
    source = source_setup(thresholds={"legit": 0.9})
    model = make_champion(source)
    policy = Policy.objects.get(source=source)
    _qa(source, model, policy, [("legit", "legit"), ("legit", "fraud")])
    check = promise_check(source=source)
    assert check["qa_samples"] == 2 and check["promised_error"] is None and not check["breach"]
    assert check["status"] == "too_few"
    assert ModelVersion.objects.count() == 1


def test_reroute_cancels_a_double_review_twin_but_leaves_escalated_items(admin_user) -> None:
    source = source_setup(thresholds={"legit": 0.99})
    model = make_champion(source)
    twin_item, escalated = _waiting(source, [("legit", 0.95), ("legit", 0.95)], model)
    ReviewTask.objects.create(item=escalated, source=source, kind=ReviewTask.Kind.ESCALATION, reason="unsure")
    has_twin = "double" in ReviewTask.Kind.values  # the workspace's double review (issue 5)
    if has_twin and not ReviewTask.objects.filter(item=twin_item, kind="double").exists():
        round_ = ReviewTask.objects.get(item=twin_item, kind=ReviewTask.Kind.REVIEW).round
        ReviewTask.objects.create(item=twin_item, source=source, kind="double", round=round_)
    saved = policy_update(source=source, actor=admin_user, thresholds={"legit": 0.9}, qa_sample_rate=0.0,
                          reroute=True)
    result = policy_reroute_waiting(policy_id=saved.policy.pk, run_id=saved.reroute_run_id)
    assert result["auto_decided"] == 1 and result["busy"] == 1
    twin_item.refresh_from_db()
    escalated.refresh_from_db()
    assert twin_item.state == Item.State.AUTO_DECIDED and escalated.state == Item.State.QUEUED
    assert not ReviewTask.objects.filter(item=twin_item, state=ReviewTask.State.OPEN).exists()
    assert ReviewTask.objects.filter(item=escalated, state=ReviewTask.State.OPEN).count() == 2
