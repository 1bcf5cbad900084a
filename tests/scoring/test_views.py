"""Model registry pages: the list with a Train button, the model card with a server-drawn reliability diagram."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.urls import reverse

from reviewapp.demo import payments
from scoring import services
from scoring.models import ModelVersion
from scoring.views import reliability_geometry
from tests.factories import make_payments_source
from tests.scoring.helpers import add_labeled_history

pytestmark = pytest.mark.django_db


@pytest.fixture
def trained(artifact_root: Path) -> ModelVersion:
    source = make_payments_source()
    add_labeled_history(source, payments.generate_payments(1200, seed=4))
    return services.model_train(source=source, actor=None)


def test_model_list_for_ml_engineers(client: Any, ml_engineer: Any, trained: ModelVersion) -> None:
    client.force_login(ml_engineer)
    response = client.get(reverse("scoring:model_list"))
    assert response.status_code == 200
    html = response.content.decode()
    assert "champion v1" in html and "Train now" in html
    assert reverse("scoring:model_detail", kwargs={"pk": trained.pk}) in html
    assert reverse("scoring:model_train", kwargs={"slug": "payments"}) in html
    assert "<script>" not in html


def test_model_list_queries_do_not_grow_with_sources(client: Any, ml_engineer: Any, trained: ModelVersion,
                                                     django_assert_max_num_queries: Any) -> None:
    for n in range(3):
        other = make_payments_source(slug=f"other{n}")
        for v in range(1, 4):
            ModelVersion.objects.create(source=other, version=v, algorithm="logreg", status="failed", error="x")
    client.force_login(ml_engineer)
    with django_assert_max_num_queries(10):
        html = client.get(reverse("scoring:model_list")).content.decode()
    assert html.count('data-model-id="') == 10


def test_model_list_without_manage_models_has_no_train_button(client: Any, analyst: Any, trained: ModelVersion) -> None:
    client.force_login(analyst)
    html = client.get(reverse("scoring:model_list")).content.decode()
    assert "champion v1" in html and "Train now" not in html


def test_model_list_polls_while_training_and_serves_the_partial(client: Any, ml_engineer: Any,
                                                                trained: ModelVersion) -> None:
    ModelVersion.objects.create(source=trained.source, version=2, algorithm="logreg")
    client.force_login(ml_engineer)
    html = client.get(reverse("scoring:model_list")).content.decode()
    assert 'hx-trigger="every 3s"' in html
    partial = client.get(reverse("scoring:model_list"), HTTP_HX_REQUEST="true").content.decode()
    assert partial.lstrip().startswith('<div id="model-tables"') and "<html" not in partial


def test_login_required(client: Any) -> None:
    response = client.get(reverse("scoring:model_list"))
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_model_card(client: Any, ml_engineer: Any, trained: ModelVersion) -> None:
    client.force_login(ml_engineer)
    response = client.get(reverse("scoring:model_detail", kwargs={"pk": trained.pk}))
    assert response.status_code == 200
    html = response.content.decode()
    for expected in ("Model card", "Logistic regression", "Schema version", "Held-out metrics", "Per label",
                     "Expected calibration error", "Prediction sets", trained.artifact_sha256,
                     trained.label_snapshot["sha256"], "first model of the source", "Selective risk control",
                     "split-conformal (LAC, level α = 0.1)", "Sigmoid calibration"):
        assert expected in html, expected
    assert ('id="risk-summary"' in html) != ('id="risk-reason"' in html)
    # The evidence behind the bound: which labels, cross-fitted in folds, and the assumption it rests on.
    evidence = trained.risk_control["evidence"]
    assert 'id="risk-evidence"' in html and evidence["labels"]["sha256"] in html
    assert 'id="risk-folds"' in html and f"Cross-fitting: {evidence['crossfit']['folds']} folds" in html
    assert 'id="risk-assumption"' in html and "exchangeable" in html
    svg = re.search(r"<svg class=\"reliability\".*?</svg>", html, re.S)
    assert svg and svg.group(0).count("<rect") >= 1 and svg.group(0).count("<circle") >= 1
    assert "<script" not in html.split("</head>")[1]
    # Already champion: no promote button.
    assert 'id="promote"' not in html


def test_promote_from_the_card(client: Any, ml_engineer: Any, trained: ModelVersion) -> None:
    second = services.model_train(source=trained.source, actor=None, promote=False)
    client.force_login(ml_engineer)
    url = reverse("scoring:model_detail", kwargs={"pk": second.pk})
    assert 'id="promote"' in client.get(url).content.decode()
    response = client.post(reverse("scoring:model_promote", kwargs={"pk": second.pk}))
    assert response.status_code == 302 and response["Location"] == url
    second.refresh_from_db()
    assert second.is_champion
    # Rolling back: the earlier version's button says so.
    html = client.get(reverse("scoring:model_detail", kwargs={"pk": trained.pk})).content.decode()
    assert "Roll back to this version" in html


def test_train_button_starts_training(client: Any, ml_engineer: Any, trained: ModelVersion,
                                      django_capture_on_commit_callbacks) -> None:
    client.force_login(ml_engineer)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(reverse("scoring:model_train", kwargs={"slug": "payments"}), {"algorithm": "hgb"})
    mv = ModelVersion.objects.get(version=2)
    assert response.status_code == 302
    assert response["Location"] == reverse("scoring:model_detail", kwargs={"pk": mv.pk})
    assert mv.status == "training" and mv.algorithm == "hgb" and len(callbacks) == 1
    html = client.get(response["Location"]).content.decode()
    assert 'hx-trigger="every 2s"' in html and "Training" in html


def test_analyst_may_not_train_or_promote(client: Any, analyst: Any, trained: ModelVersion) -> None:
    client.force_login(analyst)
    assert client.post(reverse("scoring:model_train", kwargs={"slug": "payments"})).status_code == 403
    assert client.post(reverse("scoring:model_promote", kwargs={"pk": trained.pk})).status_code == 403


def test_unknown_model_is_404(client: Any, ml_engineer: Any) -> None:
    client.force_login(ml_engineer)
    assert client.get(reverse("scoring:model_detail", kwargs={"pk": 999999})).status_code == 404


def test_failed_version_shows_its_error(client: Any, ml_engineer: Any, artifact_root: Path) -> None:
    source = make_payments_source(slug="tiny")
    mv = services.model_train(source=source, actor=None)
    client.force_login(ml_engineer)
    html = client.get(reverse("scoring:model_detail", kwargs={"pk": mv.pk})).content.decode()
    assert "Training failed: not enough labels to train: 0" in html


def test_reliability_geometry_is_numbers_only() -> None:
    bins = [{"lo": 0.5, "hi": 0.6, "count": 10, "confidence": 0.55, "accuracy": 0.5},
            {"lo": 0.9, "hi": 1.0, "count": 90, "confidence": 0.97, "accuracy": 0.98},
            {"lo": 0.0, "hi": 0.1, "count": 0, "confidence": None, "accuracy": None}]
    geo = reliability_geometry(bins)
    assert len(geo["bars"]) == 2 and len(geo["dots"]) == 2
    assert geo["x0"] < geo["dots"][0]["cx"] < geo["dots"][1]["cx"] <= geo["x1"]
    assert geo["dots"][1]["cy"] < geo["dots"][0]["cy"]  # higher accuracy is drawn higher


def test_model_card_says_why_nothing_is_auto_decided(client: Any, ml_engineer: Any, trained: ModelVersion) -> None:
    trained.risk_control = services.model_risk_control(model_version=trained, target_error=0.0001, confidence=0.99)
    trained.save(update_fields=["risk_control"])
    client.force_login(ml_engineer)
    html = client.get(reverse("scoring:model_detail", kwargs={"pk": trained.pk})).content.decode()
    assert 'id="risk-reason"' in html and "Nothing is auto-decided under a target error" in html
    assert "no threshold is supported by the held-out labels" in html
