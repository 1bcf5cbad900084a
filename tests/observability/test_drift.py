"""PSI per feature against the champion's training data; schema drift; the drift alert."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest
from django.utils import timezone

from reviewapp.demo import payments
from reviewapp.ingest.models import BatchRowError, IngestBatch, Item
from reviewapp.observability import drift, selectors, services
from reviewapp.observability.models import DriftReport
from reviewapp.review.models import Label
from scoring.features import feature_spec_from_schema
from scoring.models import ModelVersion
from tests.factories import make_payments_source
from tests.observability.helpers import ensure_default_rules

# --- pure --------------------------------------------------------------------------------------------


def test_psi_of_identical_distributions_is_zero():
    assert drift.psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)


def test_psi_known_value():
    # (0.5 - 0.25) ln 2 + (0.5 - 0.75) ln(2/3)
    expected = 0.25 * np.log(2) - 0.25 * np.log(2 / 3)
    assert drift.psi([25, 75], [50, 50]) == pytest.approx(expected)


def test_empty_bin_is_floored_not_infinite():
    value = drift.psi([100, 0], [50, 50])
    assert np.isfinite(value) and value > 1


def test_numeric_bins_at_reference_quantiles_and_missing_bin():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=5000)
    same = drift.numeric_drift("x", ref, rng.normal(size=5000))
    shifted = drift.numeric_drift("x", ref, rng.normal(loc=1.0, size=5000))
    assert same.psi < 0.02 < 0.2 < shifted.psi
    assert len(same.bins) == 10 and all(b.expected == pytest.approx(0.1, abs=0.01) for b in same.bins)
    missing = drift.numeric_drift("x", ref, np.append(rng.normal(size=900), [np.nan] * 100))
    assert missing.bins[-1].bin == drift.MISSING and missing.bins[-1].actual == pytest.approx(0.1)
    assert missing.psi > 0.2


def test_categorical_drift_counts_new_categories_as_other():
    ref = ["a"] * 50 + ["b"] * 50
    out = drift.categorical_drift("c", ref, ["a"] * 50 + ["zzz"] * 50)
    names = {b.bin: b for b in out.bins}
    assert names[drift.OTHER].actual == pytest.approx(0.5) and out.psi > 1


def test_frame_drift_sorts_most_drifted_first():
    ref = pd.DataFrame({"n": np.arange(1000.0), "c": ["x", "y"] * 500})
    rec = pd.DataFrame({"n": np.arange(1000.0) + 800, "c": ["x", "y"] * 500})
    out = drift.frame_drift(ref, rec, numeric=["n"], categorical=["c"])
    assert [f.name for f in out] == ["n", "c"] and out[1].psi == pytest.approx(0.0)


# --- against the database ----------------------------------------------------------------------------


def _payloads(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))


def _store(source, rows: list[dict], *, received, labeled: bool, prefix: str, batch=None) -> list[Item]:
    schema = source.schema_versions.first()
    items = []
    for i, row in enumerate(rows):
        row = dict(row)
        label = row.pop(payments.LABEL_FIELD)
        row[payments.ID_FIELD] = f"{prefix}-{i}"
        items.append(Item(
            source=source, external_id=row[payments.ID_FIELD], payload=row, schema_version=schema, batch=batch,
            payload_sha256=hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest(),
            state="decided" if labeled else "received", received_at=received, state_changed_at=received,
        ))
        items[-1].label_value = label
    Item.objects.bulk_create(items, batch_size=1000)
    if labeled:
        Label.objects.bulk_create([Label(item=it, source=source, label=it.label_value, origin="import",
                                         created_at=received) for it in items], batch_size=1000)
    return items


def _trained_source(slug: str, now):
    ensure_default_rules()
    source = make_payments_source(slug=slug)
    trained = now - timedelta(days=60)
    _store(source, _payloads(payments.generate_payments(1500, seed=1)), received=trained, labeled=True,
           prefix="train")
    ids = list(Label.objects.filter(source=source).values_list("pk", flat=True))
    spec = feature_spec_from_schema(payments.SCHEMA, id_field=payments.ID_FIELD, label_field=payments.LABEL_FIELD,
                                    text_fields=payments.TEXT_FIELDS)
    ModelVersion.objects.create(
        source=source, version=1, algorithm="test", status="ready", is_champion=True, feature_spec=spec,
        trained_at=trained + timedelta(hours=1), label_snapshot={"min_label_id": min(ids), "max_label_id": max(ids)},
    )
    return source


@pytest.mark.django_db
def test_unshifted_batch_does_not_raise_the_alert():
    now = timezone.now()
    source = _trained_source("steady", now)
    recent = payments.generate_payments(800, seed=99, start=50_000)
    _store(source, _payloads(recent), received=now - timedelta(days=1), labeled=False, prefix="new")
    report = services.drift_compute(source_id=source.pk, now=now)
    assert report.status == DriftReport.Status.OK
    assert (report.n_reference, report.n_recent) == (1500, 800)
    assert report.max_psi < 0.1, report.features[:3]
    names = {f["name"] for f in report.features}
    assert {"amount", "country", "merchant_category", "card_present", "description.length"} <= names
    status = next(s for s in services.alerts_evaluate(now=now) if s.rule.name == "drift-psi")
    assert not status.firing and status.value == pytest.approx(report.max_psi)


@pytest.mark.django_db
def test_shifted_batch_raises_the_alert(client):
    now = timezone.now()
    source = _trained_source("shifted", now)
    recent = payments.generate_payments(800, seed=99, start=50_000)
    recent["amount"] = (recent["amount"] * 6).round(2)
    recent["country"] = np.where(np.arange(len(recent)) % 2 == 0, "NG", recent["country"])
    rows = _payloads(recent)
    for row in rows[:40]:
        row["promo_code"] = "SPRING"  # a field the schema does not know
    _store(source, rows, received=now - timedelta(days=1), labeled=False, prefix="new")
    report = services.drift_compute(source_id=source.pk, now=now)
    assert report.max_psi > 0.2
    top = [f["name"] for f in report.features[:2]]
    assert set(top) == {"amount", "country"}
    assert report.schema_drift["fields"] == [{"field": "promo_code", "items": 40, "batches": 0}]
    status = next(s for s in services.alerts_evaluate(now=now) if s.rule.name == "drift-psi")
    assert status.firing and "shifted" in status.detail
    text = client.get("/metrics").content.decode()
    assert 'reviewapp_alert_firing{rule="drift-psi"} 1.0' in text
    assert 'reviewapp_drift_psi{feature="amount",source="shifted"}' in text
    assert 'reviewapp_schema_unknown_fields{source="shifted"} 1.0' in text


@pytest.mark.django_db
def test_training_data_is_the_snapshot_not_later_labels():
    now = timezone.now()
    source = _trained_source("snap", now)
    # Labels added after training (shifted) must not count as training data.
    shifted = payments.generate_payments(500, seed=5, start=9_000)
    shifted["amount"] = shifted["amount"] * 20
    _store(source, _payloads(shifted), received=now - timedelta(days=30), labeled=True, prefix="late")
    _store(source, _payloads(payments.generate_payments(400, seed=7, start=70_000)),
           received=now - timedelta(days=1), labeled=False, prefix="new")
    report = services.drift_compute(source_id=source.pk, now=now)
    assert report.n_reference == 1500 and report.n_recent == 400 and report.max_psi < 0.1


@pytest.mark.django_db
def test_no_champion_and_too_little_data_say_why():
    now = timezone.now()
    source = make_payments_source(slug="cold")
    report = services.drift_compute(source_id=source.pk, now=now)
    assert report.status == DriftReport.Status.NO_MODEL and "champion" in report.detail
    source = _trained_source("thin", now)
    _store(source, _payloads(payments.generate_payments(10, seed=3, start=80_000)),
           received=now - timedelta(hours=1), labeled=False, prefix="new")
    report = services.drift_compute(source_id=source.pk, now=now)
    assert report.status == DriftReport.Status.INSUFFICIENT_DATA and "10" in report.detail
    statuses = {s.rule.name: s for s in services.alerts_evaluate(now=now)}
    assert not statuses["drift-psi"].firing


@pytest.mark.django_db
def test_rejected_rows_grouped_by_reason_per_batch_and_day():
    source = make_payments_source(slug="rows")
    schema = source.schema_versions.first()
    batch = IngestBatch.objects.create(source=source, schema_version=schema, filename="a.csv", file_format="csv",
                                       content_sha256="a" * 64, status="done", received=10, accepted=7, rejected=3)
    BatchRowError.objects.bulk_create([
        BatchRowError(batch=batch, row_number=1, field="amount", message="'abc' is not of type 'number'"),
        BatchRowError(batch=batch, row_number=2, field="amount", message="'x1' is not of type 'number'"),
        BatchRowError(batch=batch, row_number=3, field="country", message="'ZZ' is not one of ['US', 'GB']"),
    ])
    out = selectors.rejected_rows(source_id=source.pk, since=timezone.now() - timedelta(days=1))
    assert out["reasons"][0] == {"field": "amount", "reason": "value is not of type 'number'", "rows": 2}
    assert out["total_rejected"] == 3 and out["per_batch"][0]["rejected"] == 3
    assert out["by_day"][0]["received"] == 10
