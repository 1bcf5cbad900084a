"""Scored items for review tests, made directly through the ORM (no scoring area needed)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from reviewapp.ingest.models import IngestBatch, Item, Source
from reviewapp.review.services import items_route
from scoring.models import ModelVersion, Prediction

_counter = {"n": 0}


def champion(source: Source, *, risk_control: dict | None = None) -> ModelVersion:
    model = ModelVersion.objects.filter(source=source, is_champion=True).first()
    if model is None:
        model = ModelVersion.objects.create(
            source=source, version=1, algorithm="test-logreg", status=ModelVersion.Status.READY, is_champion=True,
            risk_control=risk_control or {},
        )
    return model


def make_batch(source: Source, *, user: Any = None, filename: str = "payments-2026-01.csv") -> IngestBatch:
    return IngestBatch.objects.create(
        source=source, schema_version=source.schema_versions.first(), filename=filename, file_format="csv",
        content_sha256=hashlib.sha256(filename.encode()).hexdigest(), status=IngestBatch.Status.DONE,
        uploaded_by=user,
    )


def payment(external_id: str, **overrides: Any) -> dict[str, Any]:
    payload = {
        "payment_id": external_id, "amount": 42.5, "currency": "USD", "merchant_category": "grocery",
        "country": "US", "card_present": True, "hour": 14, "account_age_days": 400, "txn_count_24h": 1,
        "description": "weekly shop",
    }
    payload.update(overrides)
    return payload


def make_scored_items(
    source: Source,
    specs: list[tuple[str, float]],
    *,
    model: ModelVersion | None = None,
    batch: IngestBatch | None = None,
    payloads: list[dict[str, Any]] | None = None,
    route: bool = True,
) -> list[Item]:
    """One item per ``(top_label, confidence)``, scored by the champion, then routed by items_route."""
    model = model or champion(source)
    schema = source.schema_versions.first()
    labels = list(source.labels)
    items = []
    for index, (label, confidence) in enumerate(specs):
        _counter["n"] += 1
        external_id = f"t{_counter['n']}"
        payload = payloads[index] if payloads else payment(external_id)
        item = Item.objects.create(
            source=source, external_id=external_id, payload=payload,
            payload_sha256=hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest(),
            schema_version=schema, batch=batch, state=Item.State.SCORED,
        )
        others = [x for x in labels if x != label]
        rest = (1.0 - confidence) / max(len(others), 1)
        probabilities = {label: confidence, **{o: rest for o in others}}
        prediction = Prediction.objects.create(
            item=item, model_version=model, probabilities=probabilities, top_label=label, confidence=confidence,
            alternatives=[[o, rest] for o in others], prediction_set=[label] if confidence > 0.9 else labels,
        )
        item.prediction = prediction
        item.save(update_fields=["prediction"])
        items.append(item)
    if route:
        items_route(item_ids=[i.pk for i in items])
        for item in items:
            item.refresh_from_db()
    return items
