"""Policy editor API: simulate, versions, restore, promise, re-route; admins only for changes."""

from __future__ import annotations

import pytest

from reviewapp.core.models import AuditEvent
from reviewapp.review.models import Policy
from tests.review.policy_helpers import add_labeled, block, make_champion, source_setup

pytestmark = pytest.mark.django_db

BASE = "/api/v1/sources/payments/policy"


@pytest.fixture
def source():
    source = source_setup(thresholds={"legit": 0.9})
    model = make_champion(source)
    add_labeled(source, block("legit", 0.95, 100, 5, "fraud") + block("fraud", 0.8, 50, 10, "legit"), model=model)
    return source


def test_simulate_returns_the_contract_numbers(admin_api, source) -> None:
    response = admin_api.post(f"{BASE}/simulate/", {"thresholds": {"legit": 0.9, "fraud": 0.75}}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    for key in ("review_rate", "auto_rate", "est_auto_error", "est_auto_error_interval", "per_label", "thresholds",
                "n_labels", "warnings", "reviews_per_day", "analyst_hours_per_day", "evidence"):
        assert key in body
    assert body["auto_rate"] == pytest.approx(1.0)
    assert body["est_auto_error"] == pytest.approx(15 / 150)
    assert body["per_label"]["fraud"]["est_auto_error"] == pytest.approx(0.2)
    assert body["n_labels"] == 150
    lo, hi = body["est_auto_error_interval"]
    assert lo < 0.1 < hi


def test_simulate_target_error_returns_thresholds(admin_api, source) -> None:
    response = admin_api.post(f"{BASE}/simulate/", {"mode": "target_error", "target_error": 0.2, "confidence": 0.9},
                              format="json")
    assert response.status_code == 200
    body = response.json()
    assert body["mode"] == "target_error" and body["thresholds_from"] == "computed"
    assert set(body["thresholds"]) == {"legit"}  # fraud: 50 labels at 20% error cannot support 20%


def test_simulate_validation(admin_api, source) -> None:
    response = admin_api.post(f"{BASE}/simulate/", {"mode": "target_error", "target_error": None}, format="json")
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "target_error"
    assert admin_api.post("/api/v1/sources/nope/policy/simulate/", {}, format="json").status_code == 404
    response = admin_api.post(f"{BASE}/simulate/", {"thresholds": {"legit": 2}}, format="json")
    assert response.status_code == 400


@pytest.mark.parametrize("client_name", ["analyst_api", "ml_api"])
def test_non_admins_get_403_on_every_change(request, client_name, source) -> None:
    client = request.getfixturevalue(client_name)
    assert client.post(f"{BASE}/simulate/", {}, format="json").status_code == 403
    assert client.post(f"{BASE}/versions/", {"thresholds": {"legit": 0.5}}, format="json").status_code == 403
    assert client.post(f"{BASE}/restore/", {"version": 1}, format="json").status_code == 403
    assert client.post(f"{BASE}/reroute/", {}, format="json").status_code == 403
    assert client.put(f"{BASE}/", {"thresholds": {"legit": 0.5}}, format="json").status_code == 403
    assert Policy.objects.filter(source=source).count() == 1
    # Reads are fine.
    assert client.get(f"{BASE}/versions/").status_code == 200
    assert client.get(f"{BASE}/promise/").status_code == 200


def test_anonymous_is_refused(client, source) -> None:
    assert client.post(f"{BASE}/simulate/", {}, content_type="application/json").status_code in (401, 403)


def test_versions_save_history_and_restore(admin_api, source) -> None:
    response = admin_api.post(f"{BASE}/versions/", {"thresholds": {"legit": 0.97}, "comment": "safer"}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["version"] == 2 and body["comment"] == "safer" and body["created_by"] == "adam"
    assert body["diff"] == [{"field": "thresholds.legit", "before": 0.9, "after": 0.97}]
    assert body["reroute_run_id"] is None
    history = admin_api.get(f"{BASE}/versions/").json()["results"]
    assert [v["version"] for v in history] == [2, 1] and history[0]["in_force"]
    restored = admin_api.post(f"{BASE}/restore/", {"version": 1}, format="json")
    assert restored.status_code == 201 and restored.json()["version"] == 3
    assert restored.json()["thresholds"] == {"legit": 0.9}
    assert admin_api.post(f"{BASE}/restore/", {"version": 99}, format="json").status_code == 404
    assert AuditEvent.objects.filter(verb="policy.applied").count() == 2


def test_versions_with_reroute_records_a_run(admin_api, source) -> None:
    response = admin_api.post(f"{BASE}/versions/", {"thresholds": {"legit": 0.97}, "reroute": True}, format="json")
    run_id = response.json()["reroute_run_id"]
    assert run_id
    progress = admin_api.get(f"{BASE}/reroute/{run_id}/")
    assert progress.status_code == 200
    assert progress.json()["status"] in ("queued", "running", "done", "failed")
    assert admin_api.get(f"{BASE}/reroute/nope/").status_code == 404


def test_promise_endpoint(admin_api, source) -> None:
    body = admin_api.get(f"{BASE}/promise/").json()
    assert body["policy_version"] == 1 and body["status"] == "no_data" and body["promised_error"] is None
