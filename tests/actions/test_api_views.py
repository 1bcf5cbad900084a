"""The actions API and pages: permissions, the secret shown once, run lists, htmx row actions."""

from __future__ import annotations

import pytest
from django.test import Client

from actions.models import ActionConfig, ActionRun
from tests.actions.helpers import decide, make_config, make_item
from tests.conftest import api_client_for
from tests.factories import PASSWORD

pytestmark = pytest.mark.urls("tests.actions.urls")


def test_config_endpoints_are_for_admins_only(source, analyst_api, ml_api, admin_api):
    for client in (analyst_api, ml_api):
        assert client.get("/api/v1/sources/payments/actions/").status_code == 403
        response = client.post("/api/v1/sources/payments/actions/",
                               {"kind": "log", "name": "x"}, format="json")
        assert response.status_code == 403 and "detail" in response.json()
    assert not ActionConfig.objects.exists()
    assert admin_api.get("/api/v1/sources/nope/actions/").status_code == 404


def test_secret_is_returned_once_at_creation(source, admin_api):
    response = admin_api.post("/api/v1/sources/payments/actions/", {
        "kind": "webhook", "name": "freeze", "label": "fraud", "url": "https://hooks.example.com/freeze",
        "high_risk": True, "max_attempts": 5,
    }, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["secret"].startswith("whsec_") and len(body["secret"]) > 30
    assert body["high_risk"] is True and body["max_attempts"] == 5 and body["has_secret"] is True
    assert ActionConfig.objects.get(pk=body["id"]).secret == body["secret"]

    listed = admin_api.get("/api/v1/sources/payments/actions/")
    assert listed.status_code == 200
    assert [c["name"] for c in listed.json()] == ["freeze"]
    assert "secret" not in listed.json()[0] and body["secret"] not in listed.content.decode()

    comp = admin_api.post("/api/v1/sources/payments/actions/", {
        "kind": "log", "name": "undo", "compensation_only": True}, format="json")
    assert comp.status_code == 201 and comp.json()["secret"] == ""


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"kind": "webhook", "name": "a", "url": "ftp://example.com/"}, "url"),
        ({"kind": "webhook", "name": "a", "url": "http://example.com/", "label": "maybe"}, "label"),
        ({"kind": "smoke-signal", "name": "a"}, "kind"),
        ({"kind": "webhook", "name": "a", "url": "http://example.com/", "read_timeout_seconds": 600},
         "read_timeout_seconds"),
        ({"kind": "log", "name": "a", "compensating_config": 999999}, "compensating_config"),
    ],
)
def test_invalid_configs_are_refused_with_the_field(source, admin_api, payload, field):
    response = admin_api.post("/api/v1/sources/payments/actions/", payload, format="json")
    assert response.status_code == 400, response.content
    assert field in {e["field"] for e in response.json()["errors"]}


def test_duplicate_name_is_a_conflict(source, admin_api):
    for expected in (201, 409):
        response = admin_api.post("/api/v1/sources/payments/actions/", {"kind": "log", "name": "same"},
                                  format="json")
        assert response.status_code == expected


def test_run_endpoints_permissions_and_reject(source, admin_user, analyst, analyst_api, bea):
    make_config(source, admin_user, url="https://hooks.example.com/a", high_risk=True)
    decision = decide(make_item(source), label="fraud")
    run = ActionRun.objects.get(decision=decision)

    runs = analyst_api.get(f"/api/v1/decisions/{decision.pk}/actions/")
    assert runs.status_code == 200 and runs.json()[0]["status"] == "pending_approval"
    assert analyst_api.get("/api/v1/decisions/999999/actions/").status_code == 404
    for verb in ("approve", "replay", "reject"):
        assert analyst_api.post(f"/api/v1/action-runs/{run.pk}/{verb}/", {"reason": "x"}).status_code == 403
    assert analyst_api.get("/api/v1/action-runs/").status_code == 403

    bea_api = api_client_for(bea)
    assert bea_api.post(f"/api/v1/action-runs/{run.pk}/reject/", {}, format="json").status_code == 400
    rejected = bea_api.post(f"/api/v1/action-runs/{run.pk}/reject/", {"reason": "false positive"}, format="json")
    assert rejected.status_code == 200
    assert rejected.json()["status"] == "rejected" and rejected.json()["rejected_by"] == "bea"
    assert rejected.json()["rejection_reason"] == "false positive"
    assert bea_api.post(f"/api/v1/action-runs/{run.pk}/replay/").status_code == 409
    assert bea_api.post("/api/v1/action-runs/999999/approve/").status_code == 404
    assert bea_api.get("/api/v1/action-runs/?state=rejected").json()[0]["id"] == run.pk
    assert bea_api.get("/api/v1/action-runs/?state=bogus").status_code == 400


def _login(user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def test_admin_page_lists_runs_needing_a_person_and_acts_with_htmx(source, admin_user, bea, analyst):
    make_config(source, admin_user, url="https://hooks.example.com/a", high_risk=True, name="freeze <b>")
    run = ActionRun.objects.get(decision=decide(make_item(source, "<script>x</script>"), label="fraud",
                                                reviewer=admin_user))
    assert _login(analyst).get("/actions/").status_code == 403

    page = _login(admin_user).get("/actions/")
    assert page.status_code == 200
    html = page.content.decode()
    assert f'id="run-{run.pk}"' in html and "Approve" in html and "Waiting for approval" in html
    assert "<script>x</script>" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert "freeze &lt;b&gt;" in html

    # adam decided it: the row says why he may not approve, the run keeps waiting.
    own = _login(admin_user).post(f"/actions/runs/{run.pk}/approve/", HTTP_HX_REQUEST="true")
    assert own.status_code == 200 and "second person" in own.content.decode()
    assert ActionRun.objects.get(pk=run.pk).state == "pending_approval"

    bea_client = _login(bea)
    row = bea_client.post(f"/actions/runs/{run.pk}/approve/", HTTP_HX_REQUEST="true")
    assert row.status_code == 200
    fragment = row.content.decode()
    assert fragment.lstrip().startswith(f'<tr id="run-{run.pk}"') and "<html" not in fragment
    assert "approved by bea" in fragment
    assert ActionRun.objects.get(pk=run.pk).state == "pending"

    # Without htmx: a redirect back to the page with a message.
    ActionRun.objects.filter(pk=run.pk).update(state="dead", next_attempt_at=None)
    plain = bea_client.post(f"/actions/runs/{run.pk}/replay/")
    assert plain.status_code == 302 and plain["Location"] == "/actions/"
    assert ActionRun.objects.get(pk=run.pk).state == "pending"
    ActionRun.objects.filter(pk=run.pk).update(state="failed", next_attempt_at=None)
    rejected = bea_client.post(f"/actions/runs/{run.pk}/reject/", {"reason": "no"}, HTTP_HX_REQUEST="true")
    assert "rejected by bea" in rejected.content.decode()
    partial = bea_client.get("/actions/", HTTP_HX_REQUEST="true")
    assert partial.content.decode().lstrip().startswith('<div id="run-table">')


def test_admin_page_query_count_does_not_grow_with_runs(source, admin_user, bea,
                                                        django_assert_max_num_queries):
    make_config(source, admin_user, url="https://hooks.example.com/a", high_risk=True)
    client = _login(bea)
    decide(make_item(source), label="fraud", reviewer=admin_user)
    with django_assert_max_num_queries(12) as few:
        client.get("/actions/")
    for _ in range(6):
        decide(make_item(source), label="fraud", reviewer=admin_user)
    with django_assert_max_num_queries(len(few.captured_queries)):
        assert client.get("/actions/").content.decode().count("Approve</button>") == 7


def test_source_page_creates_an_action_and_shows_the_secret_once(source, admin_user, analyst):
    assert _login(analyst).get("/actions/sources/payments/").status_code == 403
    client = _login(admin_user)
    assert client.get("/actions/sources/payments/").status_code == 200
    created = client.post("/actions/sources/payments/", {
        "name": "freeze", "kind": "webhook", "label": "fraud", "url": "https://hooks.example.com/f",
        "template": "", "high_risk": "on",
    })
    assert created.status_code == 200
    config = ActionConfig.objects.get(name="freeze")
    assert config.high_risk and config.secret in created.content.decode()
    assert created["Cache-Control"] == "no-store"
    again = client.get("/actions/sources/payments/")
    assert "freeze" in again.content.decode() and config.secret not in again.content.decode()

    bad = client.post("/actions/sources/payments/", {"name": "x", "kind": "webhook", "url": "ftp://nope/"})
    assert bad.status_code == 400 and "only http and https" in bad.content.decode()
    bad_json = client.post("/actions/sources/payments/", {"name": "t", "kind": "ticket",
                                                          "url": "https://x.example/", "template": "{nope"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.content.decode()
