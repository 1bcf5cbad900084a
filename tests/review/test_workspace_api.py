"""Issue 5 API: the adjudication queue through claim, escalate, undo, bulk verdicts, figures, and the
policy's double-review rate."""

from __future__ import annotations

import pytest

from reviewapp.review.models import Label, Policy, ReviewTask, Verdict
from tests.factories import make_payments_source
from tests.review.helpers import make_scored_items

pytestmark = pytest.mark.django_db


@pytest.fixture
def source():
    return make_payments_source(thresholds={})


def test_escalate_then_adjudicate_through_the_api(analyst_api, admin_api, source):
    (item,) = make_scored_items(source, [("legit", 0.5)])
    assert analyst_api.post("/api/v1/queue/claim/", {}, format="json").json()["id"] == item.pk
    response = analyst_api.post(f"/api/v1/items/{item.pk}/escalate/", {"note": "odd"}, format="json")
    assert response.status_code == 201 and response.json()["kind"] == "escalation"
    assert analyst_api.post(f"/api/v1/items/{item.pk}/escalate/", {}, format="json").status_code == 409
    assert analyst_api.post("/api/v1/queue/claim/", {"queue": "adjudication"}, format="json").status_code == 403
    claimed = admin_api.post("/api/v1/queue/claim/", {"queue": "adjudication"}, format="json")
    assert claimed.status_code == 200 and claimed.json()["task"]["kind"] == "escalation"
    verdict = admin_api.post(f"/api/v1/items/{item.pk}/verdicts/", {"label": "fraud"}, format="json")
    assert verdict.status_code == 201 and verdict.json()["decision"]["label"] == "fraud"
    assert Label.objects.get(item=item, is_active=True).origin == "adjudication"


def test_undo_through_the_api(analyst_api, source):
    (item,) = make_scored_items(source, [("legit", 0.5)])
    analyst_api.post("/api/v1/queue/claim/", {}, format="json")
    verdict_id = analyst_api.post(f"/api/v1/items/{item.pk}/verdicts/", {"label": "fraud"}, format="json").json()["id"]
    response = analyst_api.post("/api/v1/verdicts/undo/", {"verdict": verdict_id}, format="json")
    assert response.status_code == 200 and response.json()["status"] == "in_review"
    assert Verdict.objects.get(pk=verdict_id).withdrawn_at is not None
    assert analyst_api.post("/api/v1/verdicts/undo/", {}, format="json").status_code == 409


def test_bulk_through_the_api(analyst_api, source):
    items = make_scored_items(source, [("legit", 0.5), ("legit", 0.6)])
    response = analyst_api.post("/api/v1/verdicts/bulk/", {"items": [i.pk for i in items] + [123456],
                                                           "label": "legit"}, format="json")
    body = response.json()
    assert response.status_code == 200 and (body["recorded"], body["skipped"]) == (2, 1)
    assert {r["status"] for r in body["results"]} == {"recorded", "skipped"}
    assert analyst_api.post("/api/v1/verdicts/bulk/", {"items": [], "label": "legit"}, format="json").status_code == 400


def test_figures_api_scopes_by_role(analyst_api, admin_api, analyst, source):
    (item,) = make_scored_items(source, [("legit", 0.5)])
    analyst_api.post("/api/v1/queue/claim/", {}, format="json")
    analyst_api.post(f"/api/v1/items/{item.pk}/verdicts/", {"label": "legit", "handling_ms": 4000}, format="json")
    mine = analyst_api.get("/api/v1/review/analysts/").json()["analysts"]
    assert [(a["reviewer"], a["items"], a["median_handling_s"]) for a in mine] == [(analyst.username, 1, 4.0)]
    assert len(admin_api.get("/api/v1/review/analysts/?days=all").json()["analysts"]) == 1


def test_policy_double_review_rate_round_trip(admin_api, source):
    response = admin_api.put(f"/api/v1/sources/{source.slug}/policy/", {"double_review_rate": 0.25}, format="json")
    assert response.status_code == 200 and response.json()["double_review_rate"] == 0.25
    assert Policy.objects.filter(source=source).order_by("-version").first().double_review_rate == 0.25
    # Left out, the rate carries over to the next version.
    admin_api.put(f"/api/v1/sources/{source.slug}/policy/", {"qa_sample_rate": 0.1}, format="json")
    assert admin_api.get(f"/api/v1/sources/{source.slug}/policy/").json()["double_review_rate"] == 0.25
    bad = admin_api.put(f"/api/v1/sources/{source.slug}/policy/", {"double_review_rate": 2}, format="json")
    assert bad.status_code == 400
    Policy.objects.filter(source=source).update(double_review_rate=1.0)
    (item,) = make_scored_items(source, [("legit", 0.5)])
    assert set(ReviewTask.objects.filter(item=item).values_list("kind", flat=True)) == {"review", "double"}
