"""The model registry API: /api/v1/sources/{slug}/models/, /api/v1/models/{id}/, .../promote/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reviewapp.demo import payments
from scoring import services
from scoring.models import ModelVersion
from tests.factories import make_payments_source
from tests.scoring.helpers import add_labeled_history, add_received

pytestmark = pytest.mark.django_db


@pytest.fixture
def source(artifact_root: Path):
    return make_payments_source()


@pytest.fixture
def trained(source) -> ModelVersion:
    add_labeled_history(source, payments.generate_payments(1200, seed=4))
    return services.model_train(source=source, actor=None)


def test_post_starts_training_and_answers_202(ml_api: Any, source, django_capture_on_commit_callbacks) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = ml_api.post("/api/v1/sources/payments/models/", {"algorithm": "hgb"}, format="json")
    assert response.status_code == 202, response.json()
    body = response.json()
    mv = ModelVersion.objects.get(pk=body["id"])
    assert body == {"id": mv.pk, "status": "training", "url": f"/api/v1/models/{mv.pk}/"}
    assert mv.algorithm == "hgb" and mv.status == "training" and mv.created_by.username == "emma"
    assert len(callbacks) == 1  # the training task is sent after commit, not before


def test_post_defaults_to_logreg(admin_api: Any, source) -> None:
    response = admin_api.post("/api/v1/sources/payments/models/", {}, format="json")
    assert response.status_code == 202
    assert ModelVersion.objects.get(pk=response.json()["id"]).algorithm == "logreg"


def test_post_refuses_unknown_algorithm(ml_api: Any, source) -> None:
    response = ml_api.post("/api/v1/sources/payments/models/", {"algorithm": "magic"}, format="json")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "algorithm"
    assert not ModelVersion.objects.exists()


def test_analysts_may_not_train_or_promote(analyst_api: Any, trained: ModelVersion) -> None:
    response = analyst_api.post("/api/v1/sources/payments/models/", {"algorithm": "logreg"}, format="json")
    assert response.status_code == 403 and response.json()["detail"]
    assert analyst_api.post(f"/api/v1/models/{trained.pk}/promote/").status_code == 403
    assert ModelVersion.objects.count() == 1


def test_anonymous_is_refused(client: Any, source) -> None:
    assert client.get("/api/v1/sources/payments/models/").status_code in (401, 403)


def test_unknown_source_and_model_are_404(ml_api: Any, source) -> None:
    assert ml_api.get("/api/v1/sources/nope/models/").status_code == 404
    assert ml_api.post("/api/v1/sources/nope/models/", {"algorithm": "logreg"}, format="json").status_code == 404
    assert ml_api.get("/api/v1/models/999999/").status_code == 404
    assert ml_api.post("/api/v1/models/999999/promote/").status_code == 404


def test_list_and_detail(analyst_api: Any, trained: ModelVersion) -> None:
    listing = analyst_api.get("/api/v1/sources/payments/models/").json()
    assert listing["count"] == 1
    row = listing["results"][0]
    assert row["id"] == trained.pk and row["is_champion"] is True and row["status"] == "ready"
    assert set(row["key_metrics"]) >= {"accuracy", "macro_f1", "log_loss", "ece"}
    detail = analyst_api.get(f"/api/v1/models/{trained.pk}/").json()
    assert detail["schema_version"] == "1.0" and detail["algorithm"] == "logreg"
    assert detail["label_snapshot"]["count"] == 1200 and len(detail["artifact_sha256"]) == 64
    metrics = detail["metrics"]
    assert set(metrics["per_label"]) == {"legit", "fraud"}
    assert len(metrics["reliability"]) == 10 and 0 <= metrics["ece"] < 0.1
    assert metrics["conformal"]["target_coverage"] == pytest.approx(0.9)
    assert detail["feature_spec"]["numeric"] and detail["params"]["C"] == 1.0


def test_promote_and_rollback(ml_api: Any, trained: ModelVersion, source) -> None:
    second = services.model_train(source=source, actor=None, promote=False)
    response = ml_api.post(f"/api/v1/models/{second.pk}/promote/")
    assert response.status_code == 200 and response.json()["is_champion"] is True
    trained.refresh_from_db()
    assert not trained.is_champion
    assert ml_api.post(f"/api/v1/models/{trained.pk}/promote/").json()["is_champion"] is True


def test_promote_a_version_not_ready_is_409(ml_api: Any, source) -> None:
    mv = ModelVersion.objects.create(source=source, version=1, algorithm="logreg")
    response = ml_api.post(f"/api/v1/models/{mv.pk}/promote/")
    assert response.status_code == 409 and "training" in response.json()["detail"]


def test_detail_carries_risk_control_evidence_and_the_loop_fields(analyst_api: Any, trained: ModelVersion) -> None:
    detail = analyst_api.get(f"/api/v1/models/{trained.pk}/").json()
    assert detail["is_shadow"] is False and detail["trigger"] == "manual"
    assert len(detail["heldout_sha256"]) == 64 and len(detail["similarity_sha256"]) == 64
    assert detail["label_watermark"] is not None and detail["shadow"]["n"] == 0
    risk = detail["risk_control"]
    assert set(risk) >= {"target_error", "confidence", "thresholds", "evidence", "reason"}
    # 1,200 labels are few: every one is scored out of fold (5 folds), and the evidence says which labels and how.
    assert risk["evidence"]["n_heldout"] == 1200 and risk["evidence"]["labels"]["count"] == 1200
    assert [f["n_heldout"] for f in risk["evidence"]["crossfit"]["per_fold"]] == [240] * 5
    assert detail["key_metrics"]["coverage"] == detail["metrics"]["conformal"]["coverage"]


def test_shadow_endpoint(ml_api: Any, analyst_api: Any, trained: ModelVersion, source) -> None:
    second = services.model_train(source=source, actor=None, promote=False)
    assert analyst_api.post(f"/api/v1/models/{second.pk}/shadow/", {"enabled": True}, format="json").status_code == 403
    response = ml_api.post(f"/api/v1/models/{second.pk}/shadow/", {"enabled": True}, format="json")
    assert response.status_code == 200 and response.json()["is_shadow"] is True
    assert ml_api.post(f"/api/v1/models/{trained.pk}/shadow/", {"enabled": True}, format="json").status_code == 409
    assert ml_api.post(f"/api/v1/models/{second.pk}/shadow/", {}, format="json").status_code == 400
    off = ml_api.post(f"/api/v1/models/{second.pk}/shadow/", {"enabled": False}, format="json").json()
    assert off["is_shadow"] is False


def test_risk_control_endpoint(analyst_api: Any, trained: ModelVersion) -> None:
    url = f"/api/v1/models/{trained.pk}/risk-control/"
    body = analyst_api.get(url, {"target_error": 0.1, "confidence": 0.9}).json()
    assert body["target_error"] == 0.1 and body["confidence"] == pytest.approx(0.9) and "thresholds" in body
    assert analyst_api.get(url, {"target_error": 0}).status_code == 400
    assert analyst_api.get(url).status_code == 400
    assert analyst_api.get("/api/v1/models/999999/risk-control/", {"target_error": 0.1}).status_code == 404


def test_similar_endpoint(analyst_api: Any, trained: ModelVersion, source) -> None:
    item = add_received(source, payments.generate_payments(1, seed=5, start=900_000))[0]
    body = analyst_api.get(f"/api/v1/items/{item.pk}/similar/", {"k": 3}).json()
    assert len(body["results"]) == 3 and set(body["results"][0]) == {"item_id", "external_id", "label", "distance"}
    assert analyst_api.get(f"/api/v1/items/{item.pk}/similar/", {"k": 0}).status_code == 400
    assert analyst_api.get("/api/v1/items/999999/similar/").status_code == 404
