"""A decision's trail and record: auto-decision, QA override, actions, audit events and their verification."""

from __future__ import annotations

import pytest
from django.db import connection

from actions.models import ActionConfig
from reviewapp.core.models import AuditEvent
from reviewapp.ingest.models import Item
from reviewapp.ingest.parsing import payload_digest
from reviewapp.review.models import Decision
from reviewapp.review.services import task_claim_next, verdict_submit
from tests.factories import make_payments_source
from tests.review.helpers import make_scored_items

pytestmark = pytest.mark.django_db


@pytest.fixture
def overridden(analyst):
    """An auto-decision drawn for QA, which the analyst overrides: (model decision, reviewer decision, item)."""
    source = make_payments_source(slug="trail", thresholds={"legit": 0.9, "fraud": 0.99}, qa_sample_rate=1.0)
    ActionConfig.objects.create(source=source, kind="log", name="log decisions")
    (item,) = make_scored_items(source, [("legit", 0.97)])
    Item.objects.filter(pk=item.pk).update(payload_sha256=payload_digest(item.payload))
    item.refresh_from_db()
    model_decision = Decision.objects.get(item=item, origin="model")
    task = task_claim_next(user=analyst, source=source)
    assert task is not None and task.kind == "qa"
    verdict_submit(user=analyst, item=item, label="fraud", handling_ms=1234)
    human = Decision.objects.get(item=item, is_current=True)
    return model_decision, human, item


def _trail(api, pk):
    response = api.get(f"/api/v1/decisions/{pk}/trail/")
    assert response.status_code == 200, response.content
    return response.json()


def test_record_of_an_overridden_auto_decision(admin_api, overridden, analyst):
    model_decision, human, item = overridden
    data = _trail(admin_api, human.pk)
    record = data["record"]
    assert record["inputs"]["payload_sha256"] == item.payload_sha256 == payload_digest(item.payload)
    assert record["inputs"]["payload_sha256_matches_stored_payload"] is True
    assert record["inputs"]["schema_version"] == "1.0"
    assert record["model_version"]["version"] == 1
    assert record["output"] == {"label": "fraud", "origin": "reviewer", "model_label": "legit", "confidence": 0.97}
    assert record["policy"]["version"] == 1 and record["policy"]["qa_sample_rate"] == 1.0
    assert "0.97" in record["route_reason"] or record["route_reason"]
    assert record["human_oversight"] == {"human_involved": True, "reviewers": [analyst.username],
                                         "decided_by": {"id": analyst.pk, "username": analyst.username}}
    assert record["override"]["is_override"] is True
    assert record["override"]["overrides"]["id"] == model_decision.pk
    assert record["override"]["overrides"]["origin"] == "model"
    assert record["override"]["supersedes_chain"] == [human.pk, model_decision.pk]
    assert record["time"]["decided_at"] and record["time"]["scored_at"] and record["time"]["received_at"]
    assert [v["label"] for v in data["verdicts"]] == ["fraud"] and data["verdicts"][0]["handling_ms"] == 1234
    assert [d["id"] for d in data["decisions"]] == [model_decision.pk, human.pk]
    assert data["prediction"]["confidence"] == 0.97 and data["prediction"]["model_version"]["version"] == 1
    verbs = {e["verb"] for e in data["audit_events"]}
    assert {"items.routed", "task.claimed", "verdict.submitted"} <= verbs
    verification = data["verification"]
    assert verification["status"] == "ok" and verification["breaks"] == []
    assert verification["events_checked"] == len(data["audit_events"])
    assert [h["hash"] for h in verification["hashes"]] == [e["hash"] for e in data["audit_events"]]
    assert verification["chain_head"]["id"] == AuditEvent.objects.order_by("-id").first().pk
    chains = {e["chain"] for e in data["audit_events"]}
    assert {h["chain"] for h in verification["chain_heads"]} == chains
    for head in verification["chain_heads"]:
        assert head["id"] == AuditEvent.objects.filter(chain=head["chain"]).order_by("-id").first().pk


def test_the_model_decision_shows_who_overrode_it_and_its_actions(ml_api, overridden):
    model_decision, human, _item = overridden
    data = _trail(ml_api, model_decision.pk)
    record = data["record"]
    assert record["output"]["origin"] == "model" and record["human_oversight"]["decided_by"] is None
    assert record["human_oversight"]["human_involved"] is True  # a QA reviewer looked at it
    assert record["override"]["is_override"] is False
    assert record["override"]["overridden_by"]["id"] == human.pk
    assert [r["action"] for r in data["action_runs"]] == ["log decisions"]


def test_edited_audit_row_breaks_the_verification(admin_api, overridden):
    _model, human, _item = overridden
    event = AuditEvent.objects.get(verb="verdict.submitted")
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE core_auditevent DISABLE TRIGGER USER")
        try:
            cursor.execute("UPDATE core_auditevent SET after = %s WHERE id = %s", ['{"label": "legit"}', event.pk])
        finally:
            cursor.execute("ALTER TABLE core_auditevent ENABLE TRIGGER USER")
    verification = _trail(admin_api, human.pk)["verification"]
    assert verification["status"] == "broken"
    assert verification["first_break"] == event.pk
    assert verification["breaks"] == [{"event_id": event.pk, "reason": "content does not match its hash (the row "
                                                                        "was edited)"}]


def test_deleted_audit_row_breaks_the_link_of_the_next_shown_event(admin_api, overridden):
    _model, human, _item = overridden
    claimed = AuditEvent.objects.get(verb="task.claimed")
    following = AuditEvent.objects.filter(chain=claimed.chain, id__gt=claimed.pk).order_by("id").first()
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE core_auditevent DISABLE TRIGGER USER")
        try:
            cursor.execute("DELETE FROM core_auditevent WHERE id = %s", [claimed.pk])
        finally:
            cursor.execute("ALTER TABLE core_auditevent ENABLE TRIGGER USER")
    verification = _trail(admin_api, human.pk)["verification"]
    assert verification["status"] == "broken" and verification["first_break"] == following.pk
    assert "removed" in verification["breaks"][0]["reason"]


def test_tampered_payload_is_visible_in_the_record(admin_api, overridden):
    _model, human, item = overridden
    Item.objects.filter(pk=item.pk).update(payload={**item.payload, "amount": 1})
    assert _trail(admin_api, human.pk)["record"]["inputs"]["payload_sha256_matches_stored_payload"] is False


def test_permissions_and_missing_decision(analyst_api, admin_api, overridden):
    _model, human, _item = overridden
    assert analyst_api.get(f"/api/v1/decisions/{human.pk}/trail/").status_code == 403
    missing = admin_api.get("/api/v1/decisions/999999/trail/")
    assert missing.status_code == 404 and "detail" in missing.json()
    download = admin_api.get(f"/api/v1/decisions/{human.pk}/trail/?download=1")
    assert download["Content-Disposition"] == f'attachment; filename="decision-{human.pk}-trail.json"'


def test_trail_page(client, admin_user, analyst, overridden, django_assert_max_num_queries):
    model_decision, human, item = overridden
    client.force_login(admin_user)
    with django_assert_max_num_queries(25):
        response = client.get(f"/decisions/{human.pk}/trail/")
    assert response.status_code == 200
    body = response.content.decode()
    assert 'data-verification="ok"' in body and item.payload_sha256 in body
    assert f"/decisions/{model_decision.pk}/trail/" in body and "verdict.submitted" in body
    assert f"/api/v1/decisions/{human.pk}/trail/?download=1" in body
    assert client.get("/decisions/999999/trail/").status_code == 404
    client.force_login(analyst)
    assert client.get(f"/decisions/{human.pk}/trail/").status_code == 403
