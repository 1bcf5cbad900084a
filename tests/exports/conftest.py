"""Labeled rows for export tests, written straight to the ledger tables (the loop tests cover the services)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from django.utils import timezone

from reviewapp.demo import payments
from reviewapp.ingest.models import Item, SchemaVersion
from reviewapp.review.models import Decision, Label, Policy, ReviewTask, Verdict
from scoring.models import ModelVersion, Prediction
from tests.factories import UserFactory, make_payments_source


def make_labeled(
    source: Any, n: int, *, reviewer: Any = None, start: int = 0, overrides: dict | None = None
) -> list[Label]:
    frame = payments.generate_payments(n, seed=17, start=start)
    schema = SchemaVersion.objects.get(source=source)
    policy = Policy.objects.get(source=source, version=1)
    model, _ = ModelVersion.objects.get_or_create(
        source=source, version=1, defaults={"algorithm": "logreg", "status": "ready", "is_champion": True}
    )
    labels = []
    for record in frame.to_dict("records"):
        label = record.pop("is_fraud")
        record.update(overrides or {})
        payload = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        item = Item.objects.create(
            source=source,
            external_id=payload["payment_id"],
            payload=payload,
            schema_version=schema,
            payload_sha256=hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest(),
            state="decided",
        )
        if reviewer is None:
            decision = Decision.objects.create(item=item, label=label, origin="import")
            labels.append(
                Label.objects.create(item=item, source=source, label=label, origin="import", decision=decision)
            )
            continue
        prediction = Prediction.objects.create(
            item=item,
            model_version=model,
            probabilities={"legit": 0.6, "fraud": 0.4},
            top_label="legit",
            confidence=0.6,
            alternatives=[["fraud", 0.4]],
            prediction_set=["legit", "fraud"],
        )
        task = ReviewTask.objects.create(item=item, source=source, state="done", completed_at=timezone.now())
        verdict = Verdict.objects.create(task=task, item=item, reviewer=reviewer, label=label, handling_ms=4200)
        decision = Decision.objects.create(
            item=item,
            label=label,
            origin="reviewer",
            verdict=verdict,
            prediction=prediction,
            model_version=model,
            policy=policy,
        )
        labels.append(
            Label.objects.create(
                item=item, source=source, label=label, origin="review", verdict=verdict, decision=decision
            )
        )
    return labels


@pytest.fixture
def labeled_source(db: None) -> Any:
    source = make_payments_source()
    reviewer = UserFactory(username="rita", role="analyst")
    make_labeled(source, 30)
    make_labeled(source, 10, reviewer=reviewer, start=1000)
    return source
