"""The whole review loop once, through the public API and commands, with a live worker on real parts."""

import csv
import io

from django.core.management import call_command

from reviewapp.core.audit import audit_verify
from reviewapp.core.models import AuditEvent
from reviewapp.demo import payments
from reviewapp.ingest.models import Item
from reviewapp.review.models import Decision, Label
from scoring.models import ModelVersion, Prediction
from tests.loop_helpers import create_payments_source_via_api, upload_frame, wait_batch_done, wait_items_routed


def test_upload_score_route_review_export(live_worker, admin_api, analyst_api, ml_api, tmp_path):
    create_payments_source_via_api(admin_api)

    history = payments.generate_payments(3000, seed=3)
    batch = wait_batch_done(upload_frame(admin_api, "payments", history, "history.csv")["id"])
    assert batch.labeled == 3000 and batch.accepted == 3000
    assert Label.objects.filter(source__slug="payments", origin="import").count() == 3000

    call_command("train", "payments", "--promote")
    champion = ModelVersion.objects.get(source__slug="payments", is_champion=True)

    incoming = payments.generate_payments(300, seed=5, start=3000).drop(columns=[payments.LABEL_FIELD])
    batch_id = upload_frame(admin_api, "payments", incoming, "incoming.csv")["id"]
    wait_batch_done(batch_id)
    wait_items_routed(batch_id, 300)

    # Scored by the champion, exactly once per item, and routed by policy v1.
    assert Prediction.objects.filter(item__batch_id=batch_id, model_version=champion).count() == 300
    states = set(Item.objects.filter(batch_id=batch_id).values_list("state", flat=True))
    assert states <= {"auto_decided", "queued"} and "queued" in states

    claimed = analyst_api.post("/api/v1/queue/claim/", {"source": "payments"}, format="json")
    assert claimed.status_code == 200, claimed.content
    item_id = claimed.json()["item"]["id"] if "item" in claimed.json() else claimed.json()["id"]
    verdict = analyst_api.post(f"/api/v1/items/{item_id}/verdicts/", {"label": "fraud", "note": "odd"}, format="json")
    assert verdict.status_code == 201, verdict.content
    item = Item.objects.get(pk=item_id)
    assert item.state == "decided"
    decision = Decision.objects.get(item=item, is_current=True)
    assert decision.origin == "reviewer" and decision.label == "fraud"
    assert decision.model_version_id == champion.pk and decision.policy.version == 1
    assert Label.objects.get(item=item, is_active=True).origin == "review"

    # Export through the API and the command: the reviewed row is there with its provenance.
    response = ml_api.get("/api/v1/sources/payments/labels/export/?format=csv&origin=review")
    assert response.status_code == 200
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [r["external_id"] for r in rows] == [item.external_id]
    assert rows[0]["reviewer"] == "ana" and rows[0]["model_version"] == str(champion.version)
    out = tmp_path / "labels.csv"
    call_command("export_labels", "payments", "--format", "csv", "-o", str(out))
    assert len(list(csv.DictReader(out.open()))) == 3001

    # Every stage left an audit trail, and the chain holds.
    verbs = set(AuditEvent.objects.values_list("verb", flat=True))
    assert {"source.created", "batch.processed", "model.promoted", "verdict.submitted", "labels.exported"} <= verbs
    assert list(audit_verify()) == []
