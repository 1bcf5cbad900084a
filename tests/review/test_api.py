from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from reviewapp.ingest.models import Item
from reviewapp.review.models import Decision, Policy, ReviewTask, Verdict
from reviewapp.review.services import task_claim_next
from tests.conftest import api_client_for
from tests.factories import UserFactory, make_payments_source
from tests.review.helpers import make_batch, make_scored_items

pytestmark = pytest.mark.django_db


@pytest.fixture
def source():
    return make_payments_source(thresholds={"legit": 0.99})


def _claim(client: APIClient, **data):
    return client.post("/api/v1/queue/claim/", data, format="json")


# --- Claim -------------------------------------------------------------------------------------------

def test_claim_returns_the_item_with_prediction_provenance_and_lease(analyst_api, analyst, source):
    batch = make_batch(source, user=analyst)
    (item,) = make_scored_items(source, [("fraud", 0.71)], batch=batch)
    response = _claim(analyst_api, source="payments")
    assert response.status_code == 200
    body = response.json()
    task = ReviewTask.objects.get(item=item)
    assert body["id"] == item.pk and body["task_id"] == task.pk and body["status"] == "in_review"
    assert body["payload"]["payment_id"] == item.external_id
    assert body["lease_expires_at"]
    assert body["prediction"]["label"] == "fraud"
    assert body["prediction"]["confidence"] == pytest.approx(0.71)
    assert body["prediction"]["alternatives"] == [["legit", pytest.approx(0.29)]]
    prov = body["provenance"]
    assert prov["source"]["slug"] == "payments"
    assert prov["batch"]["filename"] == batch.filename and prov["batch"]["uploaded_by"] == analyst.username
    assert prov["schema_version"] == "1.0" and prov["policy_version"] == 1
    assert prov["model_version"]["id"] == item.prediction.model_version_id
    assert prov["why"] == "no threshold for label fraud"


def test_claim_204_when_nothing_waits(analyst_api, source):
    assert _claim(analyst_api).status_code == 204


def test_claim_unknown_source_is_400(analyst_api, source):
    response = _claim(analyst_api, source="nope")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "source"


def test_claim_needs_review_permission(ml_api, source):
    make_scored_items(source, [("legit", 0.5)])
    assert _claim(ml_api).status_code == 403
    assert _claim(APIClient()).status_code in (401, 403)
    assert not ReviewTask.objects.filter(state="claimed").exists()


# --- Release and lease ----------------------------------------------------------------------------

def test_release(analyst_api, analyst, source):
    (item,) = make_scored_items(source, [("legit", 0.5)])
    other = api_client_for(UserFactory(role="analyst"))
    _claim(analyst_api)
    assert other.post(f"/api/v1/items/{item.pk}/release/").status_code == 409
    response = analyst_api.post(f"/api/v1/items/{item.pk}/release/")
    assert response.status_code == 200 and response.json() == {"id": item.pk, "status": "queued"}
    assert ReviewTask.objects.get(item=item).state == "open"
    assert analyst_api.post(f"/api/v1/items/{item.pk}/release/").status_code == 409
    assert analyst_api.post("/api/v1/items/999999/release/").status_code == 404


def test_lease_renewal(analyst_api, source):
    (item,) = make_scored_items(source, [("legit", 0.5)])
    assert analyst_api.post(f"/api/v1/items/{item.pk}/lease/").status_code == 409
    _claim(analyst_api)
    response = analyst_api.post(f"/api/v1/items/{item.pk}/lease/")
    assert response.status_code == 200 and response.json()["lease_expires_at"]


# --- Verdicts ----------------------------------------------------------------------------------------

def test_verdict_201_then_replay_200(analyst_api, source):
    (item,) = make_scored_items(source, [("legit", 0.5)])
    _claim(analyst_api)
    url = f"/api/v1/items/{item.pk}/verdicts/"
    data = {"label": "fraud", "note": "odd merchant", "idempotency_key": "abc-1", "handling_ms": 3100}
    first = analyst_api.post(url, data, format="json")
    assert first.status_code == 201, first.json()
    body = first.json()
    assert (body["label"], body["note"], body["handling_ms"], body["item_status"]) == (
        "fraud", "odd merchant", 3100, "decided")
    assert body["decision"]["origin"] == "reviewer"
    again = analyst_api.post(url, data, format="json")
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    assert Verdict.objects.count() == 1


def test_verdict_idempotency_key_header(analyst_api, source):
    (item,) = make_scored_items(source, [("legit", 0.5)])
    _claim(analyst_api)
    url = f"/api/v1/items/{item.pk}/verdicts/"
    first = analyst_api.post(url, {"label": "legit"}, format="json", HTTP_IDEMPOTENCY_KEY="hdr-1")
    again = analyst_api.post(url, {"label": "legit"}, format="json", HTTP_IDEMPOTENCY_KEY="hdr-1")
    assert (first.status_code, again.status_code) == (201, 200)
    assert Verdict.objects.get().idempotency_key == "hdr-1"


def test_verdict_409_for_another_reviewers_claim_and_for_a_decided_item(analyst_api, source):
    (item,) = make_scored_items(source, [("legit", 0.5)])
    other = api_client_for(UserFactory(role="analyst"))
    url = f"/api/v1/items/{item.pk}/verdicts/"
    _claim(analyst_api)
    response = other.post(url, {"label": "legit"}, format="json")
    assert response.status_code == 409 and "someone else" in response.json()["detail"]
    assert analyst_api.post(url, {"label": "legit"}, format="json").status_code == 201
    response = other.post(url, {"label": "fraud"}, format="json")
    assert response.status_code == 409 and "already decided" in response.json()["detail"]


def test_verdict_400_for_label_outside_the_set(analyst_api, source):
    (item,) = make_scored_items(source, [("legit", 0.5)])
    _claim(analyst_api)
    response = analyst_api.post(f"/api/v1/items/{item.pk}/verdicts/", {"label": "spam"}, format="json")
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "label"
    response = analyst_api.post(f"/api/v1/items/{item.pk}/verdicts/", {}, format="json")
    assert response.status_code == 400
    response = analyst_api.post(f"/api/v1/items/{item.pk}/verdicts/", {"label": "legit", "handling_ms": -1},
                                format="json")
    assert response.status_code == 400
    assert not Verdict.objects.exists()


def test_verdict_permissions_and_404(ml_api, analyst_api, source):
    (item,) = make_scored_items(source, [("legit", 0.5)])
    assert ml_api.post(f"/api/v1/items/{item.pk}/verdicts/", {"label": "legit"}, format="json").status_code == 403
    assert analyst_api.post("/api/v1/items/999999/verdicts/", {"label": "legit"}, format="json").status_code == 404


def test_qa_override_through_the_api(analyst_api):
    source = make_payments_source(thresholds={"legit": 0.9}, qa_sample_rate=1.0)
    (item,) = make_scored_items(source, [("legit", 0.95)])
    body = _claim(analyst_api).json()
    assert body["task"]["kind"] == "qa" and body["status"] == "auto_decided"
    assert body["provenance"]["why"] == "QA sample of an auto-decision"
    response = analyst_api.post(f"/api/v1/items/{item.pk}/verdicts/", {"label": "fraud"}, format="json")
    assert response.status_code == 201
    assert response.json()["decision"]["reason"] == "QA override"
    assert Decision.objects.filter(item=item).count() == 2


# --- Policy ------------------------------------------------------------------------------------------

def test_policy_get(analyst_api, source):
    response = analyst_api.get("/api/v1/sources/payments/policy/")
    assert response.status_code == 200
    body = response.json()
    assert {k: body[k] for k in ("version", "mode", "thresholds", "target_error", "priority")} == {
        "version": 1, "mode": "threshold", "thresholds": {"legit": 0.99}, "target_error": None,
        "priority": "uncertainty"}
    assert analyst_api.get("/api/v1/sources/nope/policy/").status_code == 404


def test_policy_put_creates_a_new_version(admin_api, source):
    new = {"version": 1, "mode": "threshold", "thresholds": {"legit": 0.97, "fraud": 0.995},
           "target_error": None, "confidence": 0.95, "qa_sample_rate": 0.02, "priority": "uncertainty",
           "comment": "tighter"}
    response = admin_api.put("/api/v1/sources/payments/policy/", new, format="json")
    assert response.status_code == 200, response.json()
    assert response.json()["version"] == 2 and response.json()["thresholds"] == {"legit": 0.97, "fraud": 0.995}
    assert Policy.objects.filter(source=source).count() == 2
    assert admin_api.get("/api/v1/sources/payments/policy/").json()["version"] == 2
    # A field left out keeps its value from the policy in force.
    partial = admin_api.put("/api/v1/sources/payments/policy/", {"qa_sample_rate": 0.1}, format="json")
    assert partial.status_code == 200
    assert partial.json()["thresholds"] == {"legit": 0.97, "fraud": 0.995} and partial.json()["version"] == 3


def test_policy_put_validation(admin_api, source):
    bad = admin_api.put("/api/v1/sources/payments/policy/", {"thresholds": {"legit": 1.5}}, format="json")
    assert bad.status_code == 400
    unknown = admin_api.put("/api/v1/sources/payments/policy/", {"thresholds": {"spam": 0.5}}, format="json")
    assert unknown.status_code == 400 and unknown.json()["errors"][0]["field"] == "thresholds.spam"
    target = admin_api.put("/api/v1/sources/payments/policy/", {"mode": "target_error"}, format="json")
    assert target.status_code == 400 and target.json()["errors"][0]["field"] == "target_error"
    assert admin_api.put("/api/v1/sources/nope/policy/", {}, format="json").status_code == 404
    assert Policy.objects.filter(source=source).count() == 1


def test_policy_put_forbidden_for_analysts_and_ml_engineers(analyst_api, ml_api, source):
    for client in (analyst_api, ml_api):
        response = client.put("/api/v1/sources/payments/policy/", {"qa_sample_rate": 0.5}, format="json")
        assert response.status_code == 403
    assert Policy.objects.filter(source=source).count() == 1


def test_claim_then_verdict_round_trip_leaves_queue_empty(analyst_api, analyst, source):
    items = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    for _ in items:
        body = _claim(analyst_api).json()
        analyst_api.post(f"/api/v1/items/{body['id']}/verdicts/", {"label": "legit"}, format="json")
    assert _claim(analyst_api).status_code == 204
    assert set(Item.objects.values_list("state", flat=True)) == {"decided"}
    assert task_claim_next(user=analyst) is None
