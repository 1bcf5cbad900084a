"""The ingest pages: capabilities, forms, upload, and the polling batch fragment."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from reviewapp.demo import payments
from reviewapp.ingest import services
from reviewapp.ingest.models import IngestBatch, Source
from tests.ingest.conftest import payments_frame, to_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.fixture
def analyst_client(client, analyst):
    client.force_login(analyst)
    return client


def test_pages_need_login(client):
    response = client.get(reverse("ingest:source_list"))
    assert response.status_code == 302 and "/login/" in response["Location"]


def test_analyst_gets_403_everywhere(analyst_client, source, admin_user):
    batch, _ = services.batch_submit(actor=admin_user, source=source,
                                     uploaded_file=SimpleUploadedFile("a.csv", b"payment_id\n1\n"))
    for url in (reverse("ingest:source_list"), reverse("ingest:source_create"),
                reverse("ingest:source_detail", args=["payments"]), reverse("ingest:batch_detail", args=[batch.pk])):
        assert analyst_client.get(url).status_code == 403, url
    response = analyst_client.post(reverse("ingest:batch_upload", args=["payments"]),
                                   {"file": SimpleUploadedFile("b.csv", b"payment_id\n2\n"), "mode": "quarantine"})
    assert response.status_code == 403
    assert IngestBatch.objects.count() == 1


def test_ml_engineer_may_upload_but_not_create_sources(client, ml_engineer, source):
    client.force_login(ml_engineer)
    assert client.get(reverse("ingest:source_detail", args=["payments"])).status_code == 200
    assert client.get(reverse("ingest:source_create")).status_code == 403


def test_source_list_and_detail(admin_client, source, admin_user):
    batch, _ = services.batch_submit(actor=admin_user, source=source,
                                     uploaded_file=SimpleUploadedFile("p.csv", to_bytes(payments_frame(3), "csv")))
    services.batch_process(batch_id=batch.pk)
    page = admin_client.get(reverse("ingest:source_list")).content.decode()
    assert "Card payments" in page and reverse("ingest:source_create") in page
    detail = admin_client.get(reverse("ingest:source_detail", args=["payments"])).content.decode()
    assert "p.csv" in detail and reverse("ingest:batch_detail", args=[batch.pk]) in detail
    assert 'name="mode"' in detail and "payment_id" in detail
    assert admin_client.get(reverse("ingest:source_detail", args=["nope"])).status_code == 404


def test_create_a_source_from_the_form(admin_client):
    form = {
        "slug": "payments", "name": "Card payments", "labels": "legit, fraud",
        "schema": json.dumps(payments.SCHEMA), "id_field": "payment_id", "label_field": "is_fraud",
        "text_fields": "description",
    }
    bad = admin_client.post(reverse("ingest:source_create"), {**form, "id_field": "nope"})
    assert bad.status_code == 400 and "not a property of the schema" in bad.content.decode()
    broken = admin_client.post(reverse("ingest:source_create"), {**form, "schema": "{not json"})
    assert broken.status_code == 400 and "Not valid JSON" in broken.content.decode()
    response = admin_client.post(reverse("ingest:source_create"), form)
    assert response.status_code == 302 and response["Location"] == reverse("ingest:source_detail", args=["payments"])
    source = Source.objects.get()
    assert source.labels == ["legit", "fraud"] and source.text_fields == ["description"]


def test_upload_redirects_to_the_batch(admin_client, source):
    url = reverse("ingest:batch_upload", args=["payments"])
    content = to_bytes(payments_frame(3), "csv")
    response = admin_client.post(url, {"file": SimpleUploadedFile("p.csv", content), "mode": "all_or_nothing"})
    batch = IngestBatch.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("ingest:batch_detail", args=[batch.pk])

    again = admin_client.post(url, {"file": SimpleUploadedFile("p.csv", content), "mode": "quarantine"},
                              HTTP_HX_REQUEST="true")
    assert again.status_code == 200 and again["HX-Redirect"] == reverse("ingest:batch_detail", args=[batch.pk])

    refused = admin_client.post(url, {"file": SimpleUploadedFile("x.exe", b"MZ\x90\x00"), "mode": "quarantine"})
    assert refused.status_code == 400 and "Unsupported file type" in refused.content.decode()
    fragment = admin_client.post(url, {"file": SimpleUploadedFile("e.csv", b""), "mode": "quarantine"},
                                 HTTP_HX_REQUEST="true")
    body = fragment.content.decode()
    assert fragment.status_code == 200 and body.lstrip().startswith("<form") and "empty" in body
    assert IngestBatch.objects.count() == 1


def test_batch_page_polls_until_finished(admin_client, source, admin_user):
    frame = payments_frame(4).astype(object)
    frame.loc[2, "amount"] = "<script>alert(1)</script>"
    batch, _ = services.batch_submit(actor=admin_user, source=source,
                                     uploaded_file=SimpleUploadedFile("p.csv", frame.to_csv(index=False).encode()))
    url = reverse("ingest:batch_detail", args=[batch.pk])
    page = admin_client.get(url).content.decode()
    assert 'hx-trigger="every 1s"' in page and f'href="{url}"' in page and "<html" in page

    fragment = admin_client.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert fragment.lstrip().startswith('<section id="batch-status"') and "<html" not in fragment

    services.batch_process(batch_id=batch.pk)
    done = admin_client.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert "hx-trigger" not in done and "failed" in done
    assert "<script>alert(1)</script>" not in done and "&lt;script&gt;" in done
    assert "?format=csv" in done
    assert admin_client.get(reverse("ingest:batch_detail", args=[999999])).status_code == 404


# --- issue 3: schema page, sources from a sample, quarantine, pagination, limits ------------------------


def test_schema_page_shows_versions_side_by_side(admin_client, source, admin_user):
    import copy

    schema = copy.deepcopy(payments.SCHEMA)
    schema["properties"]["currency"]["enum"] = [*payments.CURRENCIES, "JPY"]
    services.schema_version_create(actor=admin_user, source=source, json_schema=schema, comment="yen")
    url = reverse("ingest:source_schemas", args=["payments"])
    page = admin_client.get(url).content.decode()
    assert "v1.0 → v1.1" in page and "now also allows &#x27;JPY&#x27;" in page
    assert 'class="diff-insert"' in page or 'class="diff-replace"' in page
    same = admin_client.get(url + "?left=1.1&right=1.1").content.decode()
    assert "The same version on both sides" in same

    breaking = copy.deepcopy(schema)
    breaking["properties"]["currency"]["enum"] = ["USD"]
    refused = admin_client.post(url, {"schema": json.dumps(breaking), "comment": "usd only"})
    assert refused.status_code == 400 and "no longer allows &#x27;GBP&#x27;" in refused.content.decode()
    accepted = admin_client.post(url, {"schema": json.dumps(breaking), "new_major": "on"})
    assert accepted.status_code == 302 and accepted["Location"].endswith("?left=1.1&right=2.0")
    assert [v.label for v in source.schema_versions.all()] == ["2.0", "1.1", "1.0"]


def test_analyst_cannot_see_or_change_schemas(analyst_client, source):
    url = reverse("ingest:source_schemas", args=["payments"])
    assert analyst_client.get(url).status_code == 403
    assert analyst_client.post(url, {"schema": "{}"}).status_code == 403


def test_source_from_a_sample_in_two_steps(admin_client):
    frame = payments.generate_payments(300, seed=2)
    step1 = admin_client.post(reverse("ingest:source_infer"),
                              {"file": SimpleUploadedFile("card_payments.csv", to_bytes(frame, "csv"))})
    page = step1.content.decode()
    assert step1.status_code == 200 and "Step 2 of 2" in page and "first 300 rows" in page
    initial = step1.context["form"].initial
    assert (initial["slug"], initial["id_field"], initial["label_field"]) == ("card_payments", "payment_id", "is_fraud")
    assert initial["labels"] == "fraud, legit" and not Source.objects.exists()
    inferred = json.loads(initial["schema"])
    assert inferred["properties"]["currency"]["enum"] == sorted(set(frame.currency))
    inferred["properties"]["amount"].pop("maximum")  # the admin edits before saving
    step2 = admin_client.post(reverse("ingest:source_create"), {
        **initial, "name": "Card payments", "schema": json.dumps(inferred), "labels": "legit, fraud"})
    assert step2.status_code == 302
    source = Source.objects.get(slug="card_payments")
    assert "maximum" not in source.schema_versions.get().json_schema["properties"]["amount"]

    garbage = admin_client.post(reverse("ingest:source_infer"), {"file": SimpleUploadedFile("x.csv", b"\x00\x01")})
    assert garbage.status_code == 400 and "binary" in garbage.content.decode()


def test_quarantine_page_download_and_resend(admin_client, source, admin_user):
    frame = payments_frame(5).astype(object)
    frame.loc[1, "hour"] = "99"
    frame.loc[3, "currency"] = "XXX"
    content = frame.to_csv(index=False, sep=";").encode()
    batch, _ = services.batch_submit(actor=admin_user, source=source, mode="quarantine",
                                     uploaded_file=SimpleUploadedFile("q.csv", content))
    services.batch_process(batch_id=batch.pk)
    detail = admin_client.get(reverse("ingest:batch_detail", args=[batch.pk])).content.decode()
    assert "2 quarantined rows" in detail and reverse("ingest:batch_quarantine", args=[batch.pk]) in detail
    page = admin_client.get(reverse("ingest:batch_quarantine", args=[batch.pk])).content.decode()
    assert "hour" in page and "XXX" in page and 'name="resend_of"' in page and f'value="{batch.pk}"' in page

    download = admin_client.get(reverse("ingest:batch_quarantine_download", args=[batch.pk]))
    lines = b"".join(download.streaming_content).decode().splitlines()
    assert download["Content-Disposition"].endswith('quarantine.csv"')
    assert lines[0].startswith("payment_id;amount;") and len(lines) == 3 and ";99;" in lines[1]
    fixed = "\n".join([lines[0], lines[1].replace(";99;", ";9;"), lines[2].replace("XXX", "EUR")]) + "\n"
    response = admin_client.post(reverse("ingest:batch_upload", args=["payments"]), {
        "file": SimpleUploadedFile("fixed.csv", fixed.encode()), "mode": "quarantine", "resend_of": batch.pk})
    resent = IngestBatch.objects.exclude(pk=batch.pk).get()
    assert response.status_code == 302 and resent.resend_of_id == batch.pk
    services.batch_process(batch_id=resent.pk)
    resent.refresh_from_db()
    assert (resent.accepted, resent.rejected) == (2, 0)
    again = admin_client.get(reverse("ingest:batch_detail", args=[batch.pk])).content.decode()
    assert f"#{resent.pk}" in again and "Re-sent as" in again


def test_row_errors_are_paginated(admin_client, source, admin_user):
    frame = payments_frame(130).astype(object)
    frame["currency"] = "XXX"
    batch, _ = services.batch_submit(actor=admin_user, source=source,
                                     uploaded_file=SimpleUploadedFile("bad.csv", frame.to_csv(index=False).encode()))
    services.batch_process(batch_id=batch.pk)
    url = reverse("ingest:batch_detail", args=[batch.pk])
    page = admin_client.get(url).content.decode()
    assert "Row errors (130)" in page and "Page 1 of 2" in page and f'href="{url}?page=2"' in page
    second = admin_client.get(url + "?page=2", HTTP_HX_REQUEST="true").content.decode()
    assert second.lstrip().startswith('<div id="batch-errors">') and "Page 2 of 2" in second
    assert second.count("<tr>") == 31  # header + 30 rows


def test_running_batch_shows_its_progress(admin_client, source, admin_user):
    batch, _ = services.batch_submit(actor=admin_user, source=source,
                                     uploaded_file=SimpleUploadedFile("p.csv", to_bytes(payments_frame(3), "csv")))
    IngestBatch.objects.filter(pk=batch.pk).update(status="running", phase="loading", progress=0.375, total_rows=800,
                                                   rows_loaded=300, drift={"channel": 12})
    url = reverse("ingest:batch_detail", args=[batch.pk])
    fragment = admin_client.get(url, HTTP_HX_REQUEST="true").content.decode()
    assert 'value="0.375"' in fragment and "38%" in fragment and "300 of 800 rows loaded" in fragment
    assert "loading valid rows" in fragment and "<code>channel</code>" in fragment and "hx-trigger" in fragment


def test_upload_over_the_limit_is_stopped_while_streaming(admin_client, source, settings):
    settings.MAX_UPLOAD_BYTES = 1000  # the request passes the Content-Length check; the stream guard stops it
    content = to_bytes(payments_frame(40), "csv")
    response = admin_client.post(reverse("ingest:batch_upload", args=["payments"]),
                                 {"file": SimpleUploadedFile("big.csv", content), "mode": "quarantine"})
    assert response.status_code == 413 and "larger than the limit" in response.content.decode()
    assert IngestBatch.objects.count() == 0
