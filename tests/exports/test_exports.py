"""Label export: every format round-trips, every filter, snapshots reproduce bytes, injection, permissions."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from reviewapp.core.models import AuditEvent
from reviewapp.exports.services import ExportFilters, ExportSpec, Snapshot, count_rows, stream_export
from reviewapp.review.models import Label, ReviewTask, Verdict
from tests.conftest import api_client_for
from tests.exports.conftest import make_labeled
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def _export(source, fmt, filters=None, snapshot=None, include_raw=False) -> bytes:
    spec = ExportSpec(
        source=source,
        fmt=fmt,
        filters=filters or ExportFilters(),
        snapshot=snapshot or Snapshot.now(),
        include_raw=include_raw,
    )
    return b"".join(stream_export(spec))


def _read(fmt: str, data: bytes) -> pd.DataFrame:
    if fmt == "csv":
        return pd.read_csv(io.BytesIO(data), keep_default_na=False, na_values=[""], dtype={"external_id": str})
    if fmt == "jsonl":
        return pd.DataFrame([json.loads(line) for line in data.splitlines()])
    return pq.read_table(io.BytesIO(data)).to_pandas()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_round_trip_matches_the_database_row_by_row(labeled_source, fmt):
    frame = _read(fmt, _export(labeled_source, fmt))
    labels = list(
        Label.objects.filter(source=labeled_source, is_active=True)
        .select_related("item", "verdict__reviewer")
        .order_by("id")
    )
    assert len(frame) == len(labels) == 40
    for (_, row), lab in zip(frame.iterrows(), labels, strict=True):
        assert row["external_id"] == lab.item.external_id
        assert row["label"] == lab.label and row["label_origin"] == lab.origin
        assert row["amount"] == pytest.approx(lab.item.payload["amount"])
        assert row["merchant_category"] == lab.item.payload["merchant_category"]
        assert bool(row["card_present"]) == lab.item.payload["card_present"]
        assert row["schema_version"] == "1.0" or str(row["schema_version"]) == "1.0"
        if lab.origin == "review":
            assert row["reviewer"] == "rita" and int(row["handling_ms"]) == 4200
            assert int(row["model_version"]) == 1 and row["predicted_label"] == "legit"
            assert row["confidence"] == pytest.approx(0.6) and int(row["policy_version"]) == 1
        else:
            assert pd.isna(row["reviewer"]) and pd.isna(row["model_version"])


def test_parquet_columns_are_typed(labeled_source):
    schema = pq.read_table(io.BytesIO(_export(labeled_source, "parquet"))).schema
    assert str(schema.field("amount").type) == "double"
    assert str(schema.field("hour").type) == "int64"
    assert str(schema.field("card_present").type) == "bool"
    assert str(schema.field("labeled_at").type) == "timestamp[us, tz=UTC]"
    assert str(schema.field("model_version").type) == "int64"


def test_raw_payload_on_request(labeled_source):
    frame = _read("jsonl", _export(labeled_source, "jsonl", include_raw=True))
    first = Label.objects.filter(source=labeled_source).order_by("id").first()
    assert frame.iloc[0]["payload_json"] == first.item.payload


def test_filters(labeled_source):
    reviewer = UserFactory(username="otto", role="analyst")
    make_labeled(labeled_source, 3, reviewer=reviewer, start=5000)
    count = lambda **kw: count_rows(ExportSpec(labeled_source, "csv", ExportFilters(**kw), Snapshot.now()))  # noqa: E731
    assert count() == 43
    assert count(origin="review") == 13 and count(origin="import") == 30
    assert count(reviewer="otto") == 3 and count(reviewer="rita") == 10
    fraud = Label.objects.filter(source=labeled_source, label="fraud").count()
    assert count(label="fraud") == fraud
    assert count(model_version=1) == 13 and count(model_version=2) == 0
    # Time range on the decision time.
    latest = [lab.pk for lab in Label.objects.filter(source=labeled_source).order_by("-id")[:3]]
    Label.objects.exclude(pk__in=latest).update(created_at=timezone.now() - timedelta(hours=2))
    hour_ago = timezone.now() - timedelta(hours=1)
    assert count(since=hour_ago) == 3
    assert count(until=hour_ago) == 40
    # QA only.
    qa = Label.objects.filter(source=labeled_source, origin="review").first()
    Label.objects.filter(pk=qa.pk).update(origin="qa")
    assert count(qa_only=True) == 1
    # Agreed double reviews: a second reviewer agreeing on one item, disagreeing on another.
    labs = list(Label.objects.filter(source=labeled_source, origin="review", verdict__reviewer__username="rita")[:2])
    for lab, answer in ((labs[0], labs[0].label), (labs[1], "fraud" if labs[1].label == "legit" else "legit")):
        task = ReviewTask.objects.create(item=lab.item, source=labeled_source, round=2, state="done")
        Verdict.objects.create(task=task, item=lab.item, reviewer=reviewer, label=answer)
    frame = _read("csv", _export(labeled_source, "csv", ExportFilters(agreed_only=True)))
    assert list(frame["external_id"]) == [labs[0].item.external_id]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_same_snapshot_gives_byte_identical_file(labeled_source, fmt):
    snapshot = Snapshot.now()
    first = _export(labeled_source, fmt, snapshot=snapshot)
    # Later activity: new labels and a withdrawal. The snapshot still sees the past as it was.
    make_labeled(labeled_source, 5, start=9000)
    withdrawn = Label.objects.filter(source=labeled_source, id__lte=snapshot.max_label_id).order_by("id").first()
    Label.objects.filter(pk=withdrawn.pk).update(is_active=False, withdrawn_at=timezone.now())
    assert _export(labeled_source, fmt, snapshot=snapshot) == first
    assert _export(labeled_source, fmt) != first


def test_csv_formula_injection_is_neutralised(db):
    from tests.factories import make_payments_source

    source = make_payments_source(slug="inj")
    hostile = ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd", "plain"]
    for n, text in enumerate(hostile):
        make_labeled(source, 1, start=n, overrides={"description": text})
    frame = _read("csv", _export(source, "csv"))
    assert list(frame["description"]) == ["'" + t for t in hostile[:-1]] + ["plain"]
    # Numbers stay numbers; JSON lines and Parquet keep the exact text (they are not spreadsheets).
    assert frame["amount"].dtype.kind == "f"
    assert list(_read("jsonl", _export(source, "jsonl"))["description"]) == hostile


def test_api_stream_permissions_and_errors(labeled_source, client):
    analyst = api_client_for(UserFactory(username="a1", role="analyst"))
    engineer = api_client_for(UserFactory(username="m1", role="ml_engineer"))
    admin = api_client_for(UserFactory(username="ad1", role="admin"))
    url = f"/api/v1/sources/{labeled_source.slug}/labels/export/"
    assert client.get(url).status_code in (401, 403)
    denied = analyst.get(url)
    assert denied.status_code == 403 and "export" in denied.json()["detail"]
    for api in (engineer, admin):
        response = api.get(url + "?format=jsonl")
        assert response.status_code == 200 and response["Content-Type"] == "application/x-ndjson"
        assert len(b"".join(response.streaming_content).splitlines()) == 40
    assert engineer.get("/api/v1/sources/nope/labels/export/").status_code == 404
    bad = engineer.get(url + "?format=xlsx")
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "format"
    bad = engineer.get(url + "?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z")
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "until"
    bad = engineer.get(url + "?label=maybe")
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "label"
    assert AuditEvent.objects.filter(verb="labels.exported").count() == 2


def test_cli_matches_api_for_the_same_snapshot(labeled_source, tmp_path):
    engineer = api_client_for(UserFactory(username="m2", role="ml_engineer"))
    snapshot = Snapshot.now()
    query = f"cutoff={snapshot.cutoff.isoformat().replace('+', '%2B')}&max_label_id={snapshot.max_label_id}"
    for fmt in ("csv", "jsonl", "parquet"):
        response = engineer.get(f"/api/v1/sources/{labeled_source.slug}/labels/export/?format={fmt}&{query}")
        api_bytes = b"".join(response.streaming_content)
        out = tmp_path / f"labels.{fmt}"
        call_command(
            "export_labels",
            labeled_source.slug,
            "--format",
            fmt,
            "-o",
            str(out),
            "--cutoff",
            snapshot.cutoff.isoformat(),
            "--max-label-id",
            str(snapshot.max_label_id),
        )
        assert out.read_bytes() == api_bytes


def test_cli_errors(labeled_source, tmp_path):
    with pytest.raises(CommandError, match="unknown source"):
        call_command("export_labels", "nope", "-o", str(tmp_path / "x.csv"))
    with pytest.raises(CommandError, match="label"):
        call_command("export_labels", labeled_source.slug, "--label", "maybe", "-o", str(tmp_path / "x.csv"))
    with pytest.raises(CommandError, match="ISO timestamp"):
        call_command("export_labels", labeled_source.slug, "--since", "yesterday", "-o", str(tmp_path / "x.csv"))


def test_exports_page_permissions(labeled_source, client):
    client.force_login(UserFactory(username="a2", role="analyst"))
    assert client.get("/exports/").status_code == 403
    client.force_login(UserFactory(username="m3", role="ml_engineer"))
    page = client.get("/exports/")
    assert page.status_code == 200 and b"Start export" in page.content


def test_export_job_end_to_end_with_live_worker(live_worker, tmp_path):
    from reviewapp.exports.models import ExportJob
    from reviewapp.exports.services import export_verify
    from tests.conftest import wait_for
    from tests.factories import make_payments_source

    source = make_payments_source(slug="jobs")
    make_labeled(source, 25)
    engineer = api_client_for(UserFactory(username="m4", role="ml_engineer"))
    engineer.get(f"/api/v1/sources/{source.slug}/labels/export/")  # leaves an audit event before the job
    last_event = AuditEvent.objects.order_by("-id").first().pk
    started = engineer.post(f"/api/v1/sources/{source.slug}/labels/exports/", {"format": "parquet"}, format="json")
    assert started.status_code == 202, started.content
    job_id = started.json()["id"]
    job = wait_for(
        lambda: ExportJob.objects.filter(pk=job_id, status__in=["done", "failed"]).first(),
        timeout=60,
        what="the export job",
    )
    assert job.status == "done", job.error
    detail = engineer.get(f"/api/v1/exports/{job_id}/").json()
    manifest = detail["manifest"]
    assert manifest["row_count"] == 25 and manifest["sha256"] == job.sha256
    assert {"name": "amount", "type": "float64"} in manifest["columns"]
    assert manifest["last_audit_event_id"] == last_event and manifest["created_by"] == "m4"
    download = engineer.get(detail["download_url"])
    body = b"".join(download.streaming_content)
    import hashlib

    assert hashlib.sha256(body).hexdigest() == job.sha256 == download["X-Content-SHA256"]
    assert pq.read_table(io.BytesIO(body)).num_rows == 25
    # The same snapshot through the streamed door gives the same bytes.
    spec = ExportSpec(source, "parquet", ExportFilters(), Snapshot(job.cutoff, job.max_label_id, None))
    assert b"".join(stream_export(spec)) == body
    assert export_verify(job)
    with open(job.file_path, "ab") as handle:
        handle.write(b"tampered")
    assert not export_verify(job)


# Text that needs every kind of escaping, and text that looks like a null.
HOSTILE_TEXTS = [
    'say "hi"',
    "back\\slash",
    "ctrl\x01\x02\x1f",
    "line\nbreak\r\ttab\b\f",
    "é ü 😀 \u2028",
    "null",
    "NA",
    "",
    "/slash",
    "N/A",
]


def _hostile_source():
    """Rows whose text needs every kind of escaping, text that looks like a null, and missing values."""
    from reviewapp.ingest.models import Item
    from scoring.models import Prediction
    from tests.factories import make_payments_source

    source = make_payments_source(slug="hostile")
    texts = HOSTILE_TEXTS
    reviewer = UserFactory(username='we"ird\\name', role="analyst")
    for n, text in enumerate(texts):
        make_labeled(
            source,
            1,
            start=n,
            overrides={"description": text, "payment_id": f"{text}#{n}"},
            reviewer=reviewer if n % 2 else None,
        )
    make_labeled(source, 1, start=99, overrides={"payment_id": "NA", "country": None})
    # A payload without one of the schema's fields (SQL NULL, not JSON null) and odd floats.
    item = Item.objects.filter(source=source).order_by("id").first()
    item.payload.pop("merchant_category")
    Item.objects.filter(pk=item.pk).update(payload=item.payload)
    Prediction.objects.filter(item__source=source).update(confidence=1e-05)
    return source


def _json_build_object_reference(spec: ExportSpec) -> bytes:
    """The JSON lines as PostgreSQL's own json_build_object writes them: the format the export must keep."""
    from django.db import connection

    from reviewapp.exports.services import _from, _quote_key, _where

    pairs = []
    for col in spec.columns:  # payload values, the prediction set and the raw payload as jsonb
        value = col.sql.replace("->>", "->") if col.sql.startswith("(i.payload ->>") else col.sql
        value = {"prediction_set": "p.prediction_set", "payload_json": "i.payload"}.get(col.name, value)
        pairs.append(f"{_quote_key(col.name)}, {value}")
    pairs = ", ".join(pairs)
    from_sql, from_params = _from(spec)
    where, params = _where(spec)
    with connection.cursor() as cursor:
        sql = f"SELECT json_build_object({pairs})::text {from_sql} WHERE {where} ORDER BY l.id"
        cursor.execute(sql, from_params + params)
        return b"".join((row[0] + "\n").encode() for row in cursor.fetchall())


@pytest.mark.parametrize("include_raw", [False, True])
def test_jsonl_is_byte_identical_to_postgresql_json(db, include_raw):
    source = _hostile_source()
    spec = ExportSpec(source, "jsonl", ExportFilters(), Snapshot.now(), include_raw=include_raw)
    data = b"".join(stream_export(spec))
    assert data == _json_build_object_reference(spec)
    rows = [json.loads(line) for line in data.splitlines()]
    assert len(rows) == 11
    assert [r["description"] for r in rows[:10]] == HOSTILE_TEXTS
    assert rows[-1]["external_id"] == "NA" and rows[-1]["country"] is None and rows[0]["merchant_category"] is None
    assert rows[1]["reviewer"] == 'we"ird\\name' and rows[1]["confidence"] == 1e-05


def test_jsonl_many_columns_and_filters_keep_the_format(labeled_source):
    """Filters change the rows, never the format; a filter matching nothing gives a valid empty file."""
    for filters in (
        ExportFilters(reviewer="rita"),
        ExportFilters(origin="import", label="legit"),
        ExportFilters(model_version=7),
    ):
        spec = ExportSpec(labeled_source, "jsonl", filters, Snapshot.now(), include_raw=True)
        data = b"".join(stream_export(spec))
        assert data == _json_build_object_reference(spec)
        assert len(data.splitlines()) == count_rows(spec)
    nothing = ExportFilters(model_version=7)
    assert _export(labeled_source, "jsonl", nothing) == b""
    assert _read("csv", _export(labeled_source, "csv", nothing)).empty
    empty = pq.read_table(io.BytesIO(_export(labeled_source, "parquet", nothing)))
    assert empty.num_rows == 0 and "amount" in empty.schema.names


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_text_that_looks_like_null_stays_text(db, fmt):
    source = _hostile_source()
    frame = _read(fmt, _export(source, fmt))
    assert list(frame["external_id"])[-1] == "NA"
    assert list(frame["description"])[5:7] == ["null", "NA"]
    if fmt == "parquet":  # CSV has one spelling for empty text and none; Parquet keeps them apart
        assert list(frame["description"])[7] == ""
        assert frame["merchant_category"].isna().tolist() == [True] + [False] * 10


def test_portable_path_gives_the_same_json_rows(labeled_source):
    """The ORM path (SQLite) and the COPY path agree value for value."""
    from reviewapp.exports.services import _python_stream

    spec = ExportSpec(labeled_source, "jsonl", ExportFilters(), Snapshot.now(), include_raw=True)
    portable = [json.loads(line) for line in b"".join(_python_stream(spec)).splitlines()]
    copied = [json.loads(line) for line in b"".join(stream_export(spec)).splitlines()]
    assert portable == copied and len(copied) == 40


def test_wide_schema_and_odd_field_names_in_every_format(db):
    """More fields than json_build_object takes, and names with quotes and percent signs."""
    from reviewapp.ingest.models import SchemaVersion
    from tests.factories import make_payments_source

    source = make_payments_source(slug="wide")
    schema = SchemaVersion.objects.get(source=source)
    extra = {"50% off": "string", 'say "x"': "number", "it's": "integer"} | {f"f{n:02}": "integer" for n in range(45)}
    schema.json_schema["properties"] |= {name: {"type": kind} for name, kind in extra.items()}
    schema.save()
    values = {"50% off": "%s %(x)s", 'say "x"': 1.5, "it's": 7} | {f"f{n:02}": n for n in range(45)}
    make_labeled(source, 3, overrides=values)
    spec = ExportSpec(source, "jsonl", ExportFilters(), Snapshot.now())
    names = [c.name for c in spec.columns]
    assert len(names) > 60
    rows = [json.loads(line) for line in b"".join(stream_export(spec)).splitlines()]
    assert len(rows) == 3 and all(list(row) == names for row in rows)
    assert all(row[name] == value for row in rows for name, value in values.items())
    assert list(_read("csv", _export(source, "csv")).columns) == names
    table = pq.read_table(io.BytesIO(_export(source, "parquet")))
    assert table.schema.names == names and table.column("50% off").to_pylist() == ["%s %(x)s"] * 3


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_three_doors_give_the_same_bytes_for_the_same_filters(labeled_source, client, settings, tmp_path, fmt):
    """The exports page (a job), the streamed API and the CLI, with filters, at the job's snapshot."""
    from reviewapp.exports.models import ExportJob
    from reviewapp.exports.services import export_job_run

    settings.EXPORT_ROOT = tmp_path / "exports"
    UserFactory(username="otto", role="analyst")
    engineer = UserFactory(username="m5", role="ml_engineer")
    client.force_login(engineer)
    form = {"source": labeled_source.slug, "format": fmt, "origin": "review", "reviewer": "rita", "label": "legit"}
    assert client.post("/exports/", form).status_code == 302
    job = ExportJob.objects.get(source=labeled_source, file_format=fmt)
    assert job.filters == {"origin": "review", "reviewer": "rita", "label": "legit"}
    job = export_job_run(job_id=job.pk)  # what the worker runs (the live worker test covers the queue)
    ui_bytes = Path(job.file_path).read_bytes()
    expected = Label.objects.filter(source=labeled_source, origin="review", label="legit").count()
    assert job.rows_written == job.manifest["row_count"] == expected > 0

    snapshot = f"cutoff={job.cutoff.isoformat().replace('+', '%2B')}&max_label_id={job.max_label_id}"
    api = api_client_for(engineer)
    response = api.get(
        f"/api/v1/sources/{labeled_source.slug}/labels/export/?format={fmt}&origin=review&reviewer=rita"
        f"&label=legit&{snapshot}"
    )
    assert b"".join(response.streaming_content) == ui_bytes
    out = tmp_path / f"cli.{fmt}"
    call_command(
        "export_labels", labeled_source.slug, "--format", fmt, "-o", str(out), "--origin", "review",
        "--reviewer", "rita", "--label", "legit", "--cutoff", job.cutoff.isoformat(),
        "--max-label-id", str(job.max_label_id),
    )  # fmt: skip
    assert out.read_bytes() == ui_bytes
    assert len(_read(fmt, ui_bytes)) == expected


def test_parquet_reports_rows_as_it_goes(labeled_source):
    """Parquet has no lines to count: the writer reports each batch's rows, which drive the job's progress."""
    seen: list[int] = []
    spec = ExportSpec(labeled_source, "parquet", ExportFilters(), Snapshot.now())
    data = b"".join(stream_export(spec, on_rows=seen.append))
    assert sum(seen) == pq.read_table(io.BytesIO(data)).num_rows == 40
