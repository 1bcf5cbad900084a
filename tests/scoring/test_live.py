"""Training and scoring through a real Celery worker process (no eager mode)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.db.models import Count

from reviewapp.celery import app
from reviewapp.demo import payments
from reviewapp.ingest.models import Item
from reviewapp.review.models import ReviewTask
from scoring import services
from scoring.models import ModelVersion, Prediction
from tests.conftest import wait_for
from tests.factories import make_payments_source
from tests.scoring.helpers import (
    add_labeled_history,
    add_received,
    add_sms_history,
    add_sms_received,
    load_sms,
    make_sms_source,
)


def test_post_trains_in_the_worker(live_worker: Any, ml_api: Any) -> None:
    source = make_payments_source()
    add_labeled_history(source, payments.generate_payments(1200, seed=31))
    response = ml_api.post("/api/v1/sources/payments/models/", {"algorithm": "logreg"}, format="json")
    assert response.status_code == 202
    pk = response.json()["id"]
    mv = wait_for(lambda: ModelVersion.objects.filter(pk=pk).exclude(status="training").first(), timeout=120,
                  what="the training task to finish")
    assert mv.status == "ready", mv.error
    assert mv.is_champion and mv.metrics["roc_auc"] > 0.8
    assert ml_api.get(f"/api/v1/models/{pk}/").json()["status"] == "ready"


def test_send_task_scores_items_in_the_worker(live_worker: Any) -> None:
    source = make_payments_source(thresholds={"legit": 0.9, "fraud": 0.99})
    add_labeled_history(source, payments.generate_payments(1200, seed=32))
    champion = services.model_train(source=source, actor=None)
    items = add_received(source, payments.generate_payments(300, seed=33, start=900_000))
    ids = [i.pk for i in items]
    # A duplicated message (two worker processes may run both at once) must change nothing more.
    app.send_task("scoring.score_items", args=[ids])
    app.send_task("scoring.score_items", args=[ids])
    wait_for(lambda: Prediction.objects.filter(item_id__in=ids).count() == len(ids), timeout=120,
             what="predictions for every item")
    wait_for(lambda: not Item.objects.filter(pk__in=ids, state=Item.State.RECEIVED).exists(), timeout=60,
             what="every item to leave received")
    per_item = ReviewTask.objects.filter(item_id__in=ids).values("item_id").annotate(n=Count("id"))
    assert all(row["n"] == 1 for row in per_item)  # routed once, never twice
    assert set(Prediction.objects.filter(item_id__in=ids).values_list("model_version_id", flat=True)) == {champion.pk}
    assert Prediction.objects.filter(item_id__in=ids).count() == len(ids)
    states = set(Item.objects.filter(pk__in=ids).values_list("state", flat=True))
    assert states <= {"scored", "auto_decided", "queued"} and "auto_decided" in states


def test_real_sms_loop_in_the_worker(live_worker: Any, ml_api: Any, shared_data_dir: Path) -> None:
    """Cold start through the periodic retraining check, a risk-controlled champion routing real messages, and a
    PyTorch candidate trained on demand that waits in shadow, all run by the worker process."""
    df = load_sms(shared_data_dir)
    source = make_sms_source(retrain_min_new_labels=2000, mode="target_error", target_error=0.02, confidence=0.95)
    add_sms_history(source, df.iloc[:3000])
    app.send_task("scoring.check_retraining")
    champion = wait_for(lambda: ModelVersion.objects.filter(source=source, is_champion=True).first(), timeout=120,
                        what="the retraining check to train a first champion")
    assert champion.trigger == "retraining_check" and "ham" in champion.risk_control["thresholds"]
    response = ml_api.post("/api/v1/sources/sms/models/", {"algorithm": "torch_text"}, format="json")
    assert response.status_code == 202
    candidate = wait_for(lambda: ModelVersion.objects.filter(pk=response.json()["id"]).exclude(status="training")
                         .first(), timeout=180, what="the torch candidate to train")
    assert candidate.status == "ready", candidate.error
    comparison = candidate.metrics["promotion"]["comparison"]
    assert comparison["n"] == 600 and comparison["champion_version"] == champion.version
    if not candidate.is_champion:  # the expected outcome: the network does not beat the linear model here
        assert candidate.is_shadow and "waits for an ML engineer" in candidate.metrics["promotion"]["reason"]
        champion_now = champion
    else:
        champion_now = candidate
    unseen = df.iloc[3000:3600]
    items = add_sms_received(source, unseen)
    ids = [i.pk for i in items]
    app.send_task("scoring.score_items", args=[ids])
    wait_for(lambda: not Item.objects.filter(pk__in=ids, state__in=["received", "scored"]).exists(), timeout=120,
             what="every message to be routed")
    routed_by = set(Item.objects.filter(pk__in=ids).values_list("prediction__model_version_id", flat=True))
    assert routed_by == {champion_now.pk}
    if candidate.is_shadow:
        # Shadow predictions are written right after the champion's routing commits.
        wait_for(lambda: Prediction.objects.filter(model_version=candidate, item_id__in=ids).count() == len(ids),
                 timeout=60, what="the shadow's predictions")
    truth = dict(zip(unseen["id"], unseen["label"], strict=True))
    auto = list(Item.objects.filter(pk__in=ids, state="auto_decided").values_list("external_id",
                                                                                 "prediction__top_label"))
    wrong = sum(truth[ext] != label for ext, label in auto)
    # The promise (error <= 0.02 with 95% confidence) plus binomial noise on ~500 messages (see test_sms.py).
    assert len(auto) > 300 and wrong / len(auto) <= 0.02 + 0.015, (wrong, len(auto))
