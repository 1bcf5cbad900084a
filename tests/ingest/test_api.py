"""The ingest REST endpoints, as CONTRACT.md names them, including their 4xx answers."""

from __future__ import annotations

import copy
import csv
import io

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from reviewapp.demo import payments
from reviewapp.ingest import services
from reviewapp.ingest.models import IngestBatch, Item, SchemaVersion, Source
from tests.ingest.conftest import payments_frame, to_bytes

pytestmark = pytest.mark.django_db

SOURCE_BODY = {
    "slug": "payments", "name": "Card payments", "labels": ["legit", "fraud"], "schema": payments.SCHEMA,
    "id_field": "payment_id", "label_field": "is_fraud", "text_fields": ["description"],
}


def one_payment(**overrides):
    row = payments_frame(1).iloc[0].to_dict()
    row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    row.update(overrides)
    return row


def post_file(client, slug, content, name="p.csv", **extra):
    return client.post(f"/api/v1/sources/{slug}/batches/",
                       {"file": SimpleUploadedFile(name, content), **extra}, format="multipart")


# --- sources ---------------------------------------------------------------------------------------
def test_create_list_and_show_a_source(admin_api):
    response = admin_api.post("/api/v1/sources/", SOURCE_BODY, format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["slug"] == "payments" and body["schema_version"] == "1.0"
    assert body["counts"] == {s: 0 for s in Item.State.values}

    listing = admin_api.get("/api/v1/sources/").json()
    assert [s["slug"] for s in listing] == ["payments"] and listing[0]["item_count"] == 0

    detail = admin_api.get("/api/v1/sources/payments/").json()
    assert detail["labels"] == ["legit", "fraud"] and detail["schema"] == payments.SCHEMA


def test_analyst_may_not_create_a_source(analyst_api):
    response = analyst_api.post("/api/v1/sources/", SOURCE_BODY, format="json")
    assert response.status_code == 403
    assert "manage_sources" in response.json()["detail"]
    assert not Source.objects.exists()


def test_anonymous_is_refused(client):
    assert client.get("/api/v1/sources/").status_code in (401, 403)


def test_invalid_schema_is_a_400_naming_the_field(admin_api):
    response = admin_api.post("/api/v1/sources/", {**SOURCE_BODY, "schema": {"type": 12}}, format="json")
    assert response.status_code == 400
    assert {e["field"] for e in response.json()["errors"]} == {"schema"}
    response = admin_api.post("/api/v1/sources/", {**SOURCE_BODY, "id_field": "nope"}, format="json")
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "id_field"
    response = admin_api.post("/api/v1/sources/", {**SOURCE_BODY, "labels": []}, format="json")
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "labels"


def test_unknown_source_is_a_json_404(admin_api):
    for method, path in [("get", "/api/v1/sources/nope/"), ("get", "/api/v1/sources/nope/schemas/"),
                         ("post", "/api/v1/sources/nope/items/"), ("post", "/api/v1/sources/nope/batches/"),
                         ("get", "/api/v1/items/?source=nope")]:
        response = getattr(admin_api, method)(path, {} if method == "get" else None, format="json")
        assert response.status_code == 404, (method, path)
        assert "nope" in response.json()["detail"]


def test_schema_versions(admin_api, source):
    assert [v["version"] for v in admin_api.get("/api/v1/sources/payments/schemas/").json()] == ["1.0"]
    schema = copy.deepcopy(payments.SCHEMA)
    schema["properties"]["channel"] = {"type": "string"}
    response = admin_api.post("/api/v1/sources/payments/schemas/", {"schema": schema, "comment": "channel"},
                              format="json")
    assert response.status_code == 201 and response.json()["version"] == "1.1"
    del schema["properties"]["hour"]
    response = admin_api.post("/api/v1/sources/payments/schemas/", {"schema": schema}, format="json")
    assert response.status_code == 400
    assert any("'hour' was removed" in e["message"] for e in response.json()["errors"])
    assert SchemaVersion.objects.filter(source=source).count() == 2


def test_analyst_may_not_add_a_schema_version(analyst_api, source):
    response = analyst_api.post("/api/v1/sources/payments/schemas/", {"schema": payments.SCHEMA}, format="json")
    assert response.status_code == 403


# --- batches -----------------------------------------------------------------------------------
def test_upload_then_poll_the_batch(admin_api, source, django_capture_on_commit_callbacks):
    content = to_bytes(payments_frame(8), "csv")
    with django_capture_on_commit_callbacks() as callbacks:
        response = post_file(admin_api, "payments", content)
    assert response.status_code == 202, response.json()
    body = response.json()
    assert body["status"] == "queued" and body["url"].endswith(f"/api/v1/batches/{body['id']}/")
    assert len(callbacks) == 1

    queued = admin_api.get(f"/api/v1/batches/{body['id']}/").json()
    assert queued["status"] == "queued" and queued["progress"] == 0.0

    services.batch_process(batch_id=body["id"])
    done = admin_api.get(f"/api/v1/batches/{body['id']}/").json()
    assert done["status"] == "done" and done["progress"] == 1.0
    assert {k: done[k] for k in ("received", "accepted", "duplicates", "conflicts", "rejected", "labeled")} == {
        "received": 8, "accepted": 8, "duplicates": 0, "conflicts": 0, "rejected": 0, "labeled": 0}

    again = post_file(admin_api, "payments", content, name="again.csv")
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    assert IngestBatch.objects.count() == 1


def test_batch_errors_as_json_and_csv(admin_api, source):
    frame = payments_frame(4).astype(object)
    frame.loc[1, "hour"] = "noon"
    response = post_file(admin_api, "payments", frame.to_csv(index=False).encode(), mode="quarantine")
    batch_id = response.json()["id"]
    services.batch_process(batch_id=batch_id)
    body = admin_api.get(f"/api/v1/batches/{batch_id}/errors/").json()
    assert body["count"] == 1
    assert body["results"][0]["row"] == 2 and body["results"][0]["field"] == "hour"
    assert "noon" in body["results"][0]["message"]

    download = admin_api.get(f"/api/v1/batches/{batch_id}/errors/?format=csv")
    assert download.status_code == 200 and download["Content-Type"].startswith("text/csv")
    assert "attachment" in download["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(b"".join(download.streaming_content).decode())))
    assert rows[0] == ["row", "field", "message", "raw", "kind"] and rows[1][:2] == ["2", "hour"]
    assert rows[1][4] == "invalid"
    assert admin_api.get("/api/v1/batches/999999/errors/?format=csv").status_code == 404
    assert admin_api.get("/api/v1/batches/999999/").status_code == 404


def test_upload_refusals(admin_api, analyst_api, source, settings):
    assert post_file(analyst_api, "payments", b"payment_id\n1\n").status_code == 403
    response = post_file(admin_api, "payments", b"", name="empty.csv")
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "file"
    response = post_file(admin_api, "payments", b"\x89PNG\r\n\x1a\n\x00\x00", name="x.png")
    assert response.status_code == 400
    response = post_file(admin_api, "payments", b"payment_id\n1\n", mode="sometimes")
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "mode"
    response = admin_api.post("/api/v1/sources/payments/batches/", {}, format="multipart")
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "file"
    settings.MAX_UPLOAD_BYTES = 10
    response = post_file(admin_api, "payments", b"payment_id\n" + b"123456789\n" * 20)
    assert response.status_code == 413
    assert IngestBatch.objects.count() == 0


# --- items -------------------------------------------------------------------------------------------
def test_single_item_is_idempotent_and_conflicts_are_409(admin_api, source, django_capture_on_commit_callbacks):
    payment = one_payment()
    assert "is_fraud" not in payment
    with django_capture_on_commit_callbacks() as callbacks:
        first = admin_api.post("/api/v1/sources/payments/items/", payment, format="json")
    assert first.status_code == 202 and first.json()["status"] == "received"
    assert len(callbacks) == 1  # scoring is asked for after commit
    again = admin_api.post("/api/v1/sources/payments/items/", payment, format="json")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    changed = admin_api.post("/api/v1/sources/payments/items/", {**payment, "amount": 1.5}, format="json")
    assert changed.status_code == 409 and changed.json()["errors"][0]["field"] == "payment_id"
    assert Item.objects.count() == 1 and Item.objects.get().payload["amount"] == payment["amount"]


def test_single_item_validation_and_labels(admin_api, analyst_api, source):
    response = admin_api.post("/api/v1/sources/payments/items/", one_payment(amount="lots", currency="XXX"),
                              format="json")
    assert response.status_code == 400
    assert {e["field"] for e in response.json()["errors"]} == {"amount", "currency"}
    response = admin_api.post("/api/v1/sources/payments/items/", one_payment(is_fraud="maybe"), format="json")
    assert response.status_code == 400 and response.json()["errors"][0]["field"] == "is_fraud"
    response = admin_api.post("/api/v1/sources/payments/items/", [1, 2], format="json")
    assert response.status_code == 400
    assert analyst_api.post("/api/v1/sources/payments/items/", one_payment(), format="json").status_code == 403

    labeled = admin_api.post("/api/v1/sources/payments/items/", one_payment(is_fraud="fraud"), format="json")
    assert labeled.status_code == 202 and labeled.json()["status"] == "decided"
    detail = admin_api.get(f"/api/v1/items/{labeled.json()['id']}/").json()
    assert detail["decision"]["label"] == "fraud" and detail["decision"]["origin"] == "import"
    assert detail["provenance"]["batch"] is None


def test_item_list_and_detail(admin_api, analyst_api, source, admin_user):
    frame = payments_frame(6, labeled=True)
    frame.loc[0:1, "is_fraud"] = ""
    batch, _ = services.batch_submit(actor=admin_user, source=source,
                                     uploaded_file=SimpleUploadedFile("h.csv", to_bytes(frame, "csv")))
    services.batch_process(batch_id=batch.pk)

    page = analyst_api.get("/api/v1/items/?source=payments&status=received").json()
    assert page["count"] == 2 and {r["status"] for r in page["results"]} == {"received"}
    assert analyst_api.get("/api/v1/items/?status=decided").json()["count"] == 4
    assert analyst_api.get("/api/v1/items/?limit=1").json()["next"]
    bad = analyst_api.get("/api/v1/items/?status=nonsense")
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "status"

    item_id = page["results"][0]["id"]
    detail = analyst_api.get(f"/api/v1/items/{item_id}/").json()
    assert detail["payload"]["payment_id"] == detail["external_id"]
    assert detail["prediction"] is None and detail["decision"] is None
    provenance = detail["provenance"]
    assert provenance["source"] == "payments" and provenance["schema_version"] == "1.0"
    assert provenance["batch"]["filename"] == "h.csv" and provenance["batch"]["uploaded_by"] == "adam"
    assert provenance["model_version"] is None and provenance["policy_version"] is None
    assert analyst_api.get("/api/v1/items/999999/").status_code == 404


def test_openapi_schema_lists_the_ingest_endpoints(admin_api):
    response = admin_api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    paths = response.json()["paths"] if response["Content-Type"].endswith("json") else {}
    for path in ("/api/v1/sources/", "/api/v1/sources/{slug}/batches/", "/api/v1/batches/{batch_id}/errors/",
                 "/api/v1/items/{item_id}/"):
        assert path in paths


# --- issue 3 -----------------------------------------------------------------------------------------
def test_infer_a_schema_from_a_sample(admin_api, analyst_api):
    frame = payments.generate_payments(200, seed=4)
    response = post_sample(admin_api, to_bytes(frame, "parquet"), "sample.parquet")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["rows"] == 200 and body["id_field"] == "payment_id" and body["label_field"] == "is_fraud"
    assert body["schema"]["properties"]["hour"]["type"] == "integer"
    assert body["schema"]["properties"]["card_present"] == {"type": "boolean"}
    created = admin_api.post("/api/v1/sources/", {**SOURCE_BODY, "slug": "inferred", "schema": body["schema"]},
                             format="json")
    assert created.status_code == 201, created.json()
    assert post_sample(analyst_api, b"a,b\n1,2\n", "s.csv").status_code == 403
    bad = post_sample(admin_api, b"\x1f\x8b\x08\x00", "s.csv.gz")
    assert bad.status_code == 400 and "Compressed" in bad.json()["detail"]


def post_sample(client, content, name):
    return client.post("/api/v1/schemas/infer/", {"file": SimpleUploadedFile(name, content)}, format="multipart")


def test_batch_detail_carries_reading_drift_and_links(admin_api, source):
    frame = payments_frame(4)
    frame["channel"] = "web"
    body = post_file(admin_api, "payments", frame.to_csv(index=False, sep=";").encode("cp1252"), "legacy.csv").json()
    services.batch_process(batch_id=body["id"])
    batch = admin_api.get(f"/api/v1/batches/{body['id']}/").json()
    assert (batch["status"], batch["phase"], batch["total_rows"], batch["rows_loaded"]) == ("done", "", 4, 4)
    assert (batch["encoding"], batch["delimiter"], batch["drift"]) == ("utf-8", ";", {"channel": 4})
    assert batch["columns"][0] == "payment_id"
    assert batch["quarantine_url"].endswith(f"/batches/{body['id']}/quarantine/")
    assert any("semicolons" in note for note in batch["notes"])


def test_quarantine_download_errors_by_kind_and_resend(admin_api, source):
    frame = payments_frame(6)
    post_file(admin_api, "payments", to_bytes(frame, "csv"), "first.csv")
    services.batch_process(batch_id=IngestBatch.objects.get().pk)
    changed = frame.astype(object)
    changed.loc[0, "amount"] = 77.5  # a conflict
    changed.loc[1, "hour"] = "99"  # invalid, and new
    changed.loc[1, "payment_id"] = "new-1"
    second = post_file(admin_api, "payments", to_bytes(changed, "jsonl"), "second.jsonl", mode="quarantine")
    batch_id = second.json()["id"]
    services.batch_process(batch_id=batch_id)
    kinds = {k: admin_api.get(f"/api/v1/batches/{batch_id}/errors/?kind={k}").json()["count"]
             for k in ("invalid", "conflict")}
    assert kinds == {"invalid": 1, "conflict": 1}
    assert admin_api.get(f"/api/v1/batches/{batch_id}/errors/?kind=other").status_code == 400
    download = admin_api.get(f"/api/v1/batches/{batch_id}/quarantine/")
    text = b"".join(download.streaming_content).decode()
    assert download["Content-Type"].startswith("application/x-ndjson") and text.count("\n") == 1
    fixed = text.replace('"hour":"99"', '"hour":9').replace('"hour": "99"', '"hour": 9')
    assert fixed != text
    resent = post_file(admin_api, "payments", fixed.encode(), "fixed.jsonl", resend_of=batch_id)
    assert resent.status_code == 202
    assert IngestBatch.objects.get(pk=resent.json()["id"]).resend_of_id == batch_id
    services.batch_process(batch_id=resent.json()["id"])
    assert Item.objects.count() == 7


def test_upload_limit_is_enforced_while_the_body_streams(admin_api, source, settings):
    settings.MAX_UPLOAD_BYTES = 1000  # passes the Content-Length check (limit + multipart overhead)
    response = post_file(admin_api, "payments", to_bytes(payments_frame(50), "csv"), "big.csv")
    assert response.status_code == 413 and response.json()["errors"][0]["field"] == "file"
    assert IngestBatch.objects.count() == 0
