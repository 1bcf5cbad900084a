"""The learning loop against the database: the retraining check, candidate against champion on the same held-out
labels, shadow scoring with its comparison, risk control for other targets, similar past decisions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reviewapp.core.errors import Conflict, ValidationFailed
from reviewapp.core.models import AuditEvent
from reviewapp.demo import payments
from reviewapp.ingest.models import Item
from reviewapp.review.models import Label
from scoring import services
from scoring.estimators import get_family
from scoring.models import ModelVersion, Prediction
from scoring.selectors import shadow_comparison
from tests.factories import make_payments_source
from tests.scoring.helpers import add_labeled_history, add_received

pytestmark = pytest.mark.django_db


@pytest.fixture
def source(artifact_root: Path):
    src = make_payments_source()
    src.retrain_min_new_labels = 300
    src.save(update_fields=["retrain_min_new_labels"])
    return src


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    """Tasks the services would publish (run on commit here, so the list fills as in production)."""
    calls: list[tuple[str, dict]] = []
    monkeypatch.setattr(services, "_send", lambda name, kwargs: calls.append((name, kwargs)) or True)
    return calls


def _crippled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worse logistic regression: so regularised it predicts the majority class for everyone."""
    family = get_family("logreg")
    real = family.params
    monkeypatch.setattr(family, "params", lambda *, seed: {**real(seed=seed), "C": 1e-6})


def test_retraining_check_cold_start_then_new_labels(source, sent, django_capture_on_commit_callbacks) -> None:
    add_labeled_history(source, payments.generate_payments(200, seed=51))
    assert services.models_check_retraining()["waiting"]["payments"] == "200 new labels since label 0; needs 300"
    add_labeled_history(source, payments.generate_payments(1300, seed=52, start=10_000))
    with django_capture_on_commit_callbacks(execute=True):
        started = services.models_check_retraining()["started"]
    first = ModelVersion.objects.get(pk=started[0])
    assert first.trigger == "retraining_check" and first.algorithm == "logreg" and first.status == "training"
    assert first.label_watermark == Label.objects.order_by("-id").first().pk
    assert sent == [(services.TRAIN_TASK, {"model_version_id": first.pk})]
    # While it trains, nothing else starts.
    assert services.models_check_retraining()["waiting"]["payments"] == "a version is training"
    first = services.model_train_version(model_version_id=first.pk)
    assert first.is_champion and first.metrics["promotion"]["reason"] == "first model of the source"
    assert services.models_check_retraining()["started"] == []
    # Enough new labels since the champion's snapshot: a candidate trains with the champion's algorithm.
    add_labeled_history(source, payments.generate_payments(300, seed=53, start=20_000))
    with django_capture_on_commit_callbacks(execute=True):
        second_id = services.models_check_retraining()["started"][0]
    second = services.model_train_version(model_version_id=second_id)
    assert second.status == "ready" and second.trigger == "retraining_check"
    assert "model.retraining_due" in AuditEvent.objects.values_list("verb", flat=True)
    # Whatever the outcome, the same labels do not start another run.
    assert services.models_check_retraining()["started"] == []


def test_a_failed_run_waits_for_new_labels(source, sent, django_capture_on_commit_callbacks) -> None:
    add_labeled_history(source, payments.generate_payments(300, seed=54).assign(is_fraud="legit"))
    with django_capture_on_commit_callbacks(execute=True):
        mv_id = services.models_check_retraining()["started"][0]
    failed = services.model_train_version(model_version_id=mv_id)
    assert failed.status == "failed" and "2 classes" in failed.error
    assert services.models_check_retraining()["started"] == []  # not retried every tick on the same labels


def test_candidate_and_champion_are_judged_on_the_same_unseen_labels(source) -> None:
    add_labeled_history(source, payments.generate_payments(2000, seed=21))
    v1 = services.model_train(source=source, actor=None)
    assert v1.label_snapshot["fit_until"][1] == Label.objects.order_by("created_at", "id")[1599].pk
    # Pretend the champion had been fitted on later labels: those must leave the comparison.
    rows = list(Label.objects.order_by("created_at", "id"))
    boundary = rows[1799]
    v1.label_snapshot = {**v1.label_snapshot, "fit_until": [boundary.created_at.isoformat(), boundary.pk]}
    v1.save(update_fields=["label_snapshot"])
    v2 = services.model_train(source=source, actor=None)
    comparison = v2.metrics["promotion"]["comparison"]
    assert comparison["n_candidate_heldout"] == 400 and comparison["excluded_seen_by_champion"] == 200
    assert comparison["n"] == 200
    assert comparison["candidate_macro_f1"] == pytest.approx(comparison["champion_macro_f1"])


def test_promotion_needs_the_margin_and_calibration_no_worse(settings: Any) -> None:
    champion = ModelVersion(version=3)
    decide = services._promotion_decision
    base = {"candidate_macro_f1": 0.80, "champion_macro_f1": 0.78, "n": 500}
    assert decide(promote=None, champion=champion, comparison={**base, "candidate_ece": 0.01,
                                                               "champion_ece": 0.02})[0] is True
    promoted, why = decide(promote=None, champion=champion, comparison={**base, "candidate_ece": 0.03,
                                                                        "champion_ece": 0.02})
    assert promoted is False and "calibration is worse" in why and "waits for an ML engineer" in why
    settings.PROMOTION_MAX_ECE_INCREASE = 0.02
    assert decide(promote=None, champion=champion, comparison={**base, "candidate_ece": 0.03,
                                                               "champion_ece": 0.02})[0] is True
    settings.PROMOTION_MIN_MACRO_F1_GAIN = 0.05
    promoted, why = decide(promote=None, champion=champion, comparison={**base, "candidate_ece": 0.01,
                                                                        "champion_ece": 0.02})
    assert promoted is False and "margin 0.05" in why


def test_shadow_scores_beside_the_champion_and_is_compared(source, monkeypatch: pytest.MonkeyPatch,
                                                           client: Any, ml_engineer: Any) -> None:
    add_labeled_history(source, payments.generate_payments(1500, seed=61))
    champion = services.model_train(source=source, actor=None)
    _crippled(monkeypatch)
    candidate = services.model_train(source=source, actor=None)
    assert candidate.is_shadow and not candidate.is_champion
    fresh = payments.generate_payments(200, seed=62, start=700_000)
    items = add_received(source, fresh)
    result = services.items_score(item_ids=[i.pk for i in items])
    assert result["scored"] == 200 and result["shadow_scored"] == 200
    # Every item is routed by the champion; the shadow's predictions sit beside it.
    assert set(Item.objects.filter(pk__in=[i.pk for i in items]).values_list("prediction__model_version_id",
                                                                            flat=True)) == {champion.pk}
    assert Prediction.objects.filter(model_version=candidate).count() == 200
    assert not Prediction.objects.filter(model_version=candidate, explanation__isnull=False).exists()
    # Humans label 80 of them (the generator's truth); the comparison counts them.
    truth = dict(zip(fresh[payments.ID_FIELD], fresh[payments.LABEL_FIELD], strict=True))
    Label.objects.bulk_create([Label(item=i, source=source, label=truth[i.external_id], origin=Label.Origin.REVIEW)
                               for i in items[:80]])
    report = shadow_comparison(model_version=candidate)
    shadow_top = dict(Prediction.objects.filter(model_version=candidate).values_list("item_id", "top_label"))
    champ_top = dict(Prediction.objects.filter(model_version=champion).values_list("item_id", "top_label"))
    assert report["n"] == 200 and report["n_labeled"] == 80
    assert report["agreement"] == pytest.approx(sum(shadow_top[i] == champ_top[i] for i in shadow_top) / 200)
    assert report["shadow_accuracy"] == pytest.approx(
        sum(shadow_top[i.pk] == truth[i.external_id] for i in items[:80]) / 80)
    assert report["routing_accuracy"] == pytest.approx(
        sum(champ_top[i.pk] == truth[i.external_id] for i in items[:80]) / 80)
    # The card shows it; stopping and starting shadow is one action each.
    client.force_login(ml_engineer)
    html = client.get(f"/models/{candidate.pk}/").content.decode()
    assert 'id="shadow-comparison"' in html and 'id="shadow-badge"' in html and "Stop shadow scoring" in html
    client.post(f"/models/{candidate.pk}/shadow/", {"enabled": "0"})
    candidate.refresh_from_db()
    assert not candidate.is_shadow
    with pytest.raises(Conflict, match="the champion"):
        services.model_shadow_set(model_version=champion, actor=None, enabled=True)
    more = add_received(source, payments.generate_payments(10, seed=63, start=800_000))
    assert services.items_score(item_ids=[i.pk for i in more])["shadow_scored"] == 0


def test_a_broken_shadow_never_touches_the_live_path(source, monkeypatch: pytest.MonkeyPatch) -> None:
    add_labeled_history(source, payments.generate_payments(1200, seed=64))
    services.model_train(source=source, actor=None)
    candidate = services.model_train(source=source, actor=None, promote=False)
    services.model_shadow_set(model_version=candidate, actor=None, enabled=True)
    ModelVersion.objects.filter(pk=candidate.pk).update(artifact_sha256="0" * 64)  # its artifact is gone
    items = add_received(source, payments.generate_payments(20, seed=65, start=900_000))
    result = services.items_score(item_ids=[i.pk for i in items])
    assert result["scored"] == 20 and result["shadow_scored"] == 0 and result["failed"] == 0


def test_risk_control_for_other_targets(source) -> None:
    add_labeled_history(source, payments.generate_payments(3000, seed=71))
    mv = services.model_train(source=source, actor=None)
    stored = mv.risk_control
    assert stored["target_error"] == 0.02 and stored["confidence"] == pytest.approx(0.95)
    assert stored["evidence"]["n_heldout"] == 3000 and stored["evidence"]["per_label"]  # cross-fitted: all labels
    assert services.model_risk_control(model_version=mv, target_error=0.02, confidence=0.95) is stored
    loose = services.model_risk_control(model_version=mv, target_error=0.05, confidence=0.9)
    assert loose["target_error"] == 0.05 and loose["confidence"] == pytest.approx(0.9)
    assert loose["thresholds"]["legit"] <= stored["thresholds"].get("legit", 1.0)
    assert loose["evidence"]["crossfit"] == stored["evidence"]["crossfit"]  # recomputed on the same evidence
    # Too strict for 3,000 held-out labels: nothing is auto-decided, and it says why.
    strict = services.model_risk_control(model_version=mv, target_error=0.001, confidence=0.99)
    assert strict["thresholds"] == {} and "nothing is auto-decided" in strict["reason"]
    with pytest.raises(ValidationFailed):
        services.model_risk_control(model_version=mv, target_error=1.5, confidence=0.9)
    old = ModelVersion.objects.create(source=source, version=9, algorithm="logreg", status="ready")
    assert services.model_risk_control(model_version=old, target_error=0.05, confidence=0.9)["reason"] == (
        services.NO_EVIDENCE_REASON)


def test_risk_control_falls_back_to_the_newest_fifth_above_the_crossfit_limit(source, settings: Any) -> None:
    settings.RISK_CONTROL_CROSSFIT_MAX_LABELS = 1000
    add_labeled_history(source, payments.generate_payments(1500, seed=72))
    mv = services.model_train(source=source, actor=None)
    evidence = mv.risk_control["evidence"]
    assert evidence["n_heldout"] == 300 and evidence["labels"]["count"] == 300  # the newest 20% only
    assert evidence["source"] == services.TIME_SPLIT_SOURCE and "crossfit" not in evidence
    assert "above 1000" in evidence["crossfit_skipped"]
    label_ids = list(Label.objects.filter(source=source).order_by("id").values_list("id", flat=True))
    assert evidence["labels"]["min_label_id"] == label_ids[1200] and evidence["labels"]["max_label_id"] == label_ids[-1]


def test_similar_past_decisions(source) -> None:
    history = payments.generate_payments(1500, seed=81)
    decided = add_labeled_history(source, history)
    mv = services.model_train(source=source, actor=None)
    assert mv.similarity_sha256 and mv.metrics["similarity"]["items"] == 1500
    # A new item identical to a decided one finds it first, at distance ~0, with its label.
    twin = history.iloc[[42]].assign(payment_id="new-42")
    item = add_received(source, twin)[0]
    found = services.similar_decisions(item=item, k=5)
    assert len(found) == 5 and set(found[0]) == {"item_id", "external_id", "label", "distance"}
    assert found[0]["item_id"] == decided[42].pk and found[0]["external_id"] == "pay-00000042"
    assert found[0]["distance"] < 1e-3 and found[0]["label"] == history.iloc[42][payments.LABEL_FIELD]
    assert [f["distance"] for f in found] == sorted(f["distance"] for f in found)
    # A decided item is never its own neighbour; a corrected label shows the current one.
    own = services.similar_decisions(item=decided[42], k=3)
    assert decided[42].pk not in [f["item_id"] for f in own]
    Label.objects.filter(item=decided[42]).update(label="fraud")
    assert services.similar_decisions(item=item, k=1)[0]["label"] == "fraud"
    # No index: nothing, not an error.
    other = make_payments_source(slug="other")
    assert services.similar_decisions(item=add_received(other, twin)[0], k=5) == []
