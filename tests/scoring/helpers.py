"""Rows for scoring tests: labeled history and fresh items for a payments source, straight through the ORM."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from reviewapp.demo import payments
from reviewapp.ingest.models import Item, Source
from reviewapp.review.models import Label


def payload_of(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != payments.LABEL_FIELD}


def _items(source: Source, frame: pd.DataFrame, state: str) -> list[Item]:
    schema = source.schema_versions.order_by("-major", "-minor").first()
    items = []
    for row in frame.to_dict(orient="records"):
        payload = payload_of(row)
        items.append(Item(
            source=source, external_id=str(row[payments.ID_FIELD]), payload=payload,
            payload_sha256=hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest(),
            schema_version=schema, state=state,
        ))
    return Item.objects.bulk_create(items, batch_size=1000)


def add_labeled_history(source: Source, frame: pd.DataFrame) -> list[Item]:
    """Decided items with imported labels, in frame order (the time order training splits by)."""
    items = _items(source, frame, Item.State.DECIDED)
    Label.objects.bulk_create(
        [Label(item=item, source=source, label=label, origin=Label.Origin.IMPORT)
         for item, label in zip(items, frame[payments.LABEL_FIELD], strict=True)],
        batch_size=1000,
    )
    return items


def add_received(source: Source, frame: pd.DataFrame) -> list[Item]:
    return _items(source, frame, Item.State.RECEIVED)


# --- The SMS Spam Collection (../shared/data/sms_spam.tsv): 5,574 real labeled messages --------------------

SMS_LABELS = ["ham", "spam"]
SMS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "text": {"type": "string", "maxLength": 1000}},
    "required": ["id", "text"],
}


def load_sms(shared_data_dir: Path) -> pd.DataFrame:
    """Columns id, text, label, in file order (the order the tests treat as time)."""
    # One message per line: quotes inside messages are text, not CSV quoting.
    raw = pd.read_csv(shared_data_dir / "sms_spam.tsv", sep="\t", dtype=str, keep_default_na=False,
                      quoting=csv.QUOTE_NONE)
    return pd.DataFrame({"id": [f"sms-{i:05d}" for i in range(len(raw))], "text": raw["SMS"], "label": raw["Label"]})


def make_sms_source(*, slug: str = "sms", retrain_min_new_labels: int = 500, **policy: Any) -> Source:
    from reviewapp.ingest.models import SchemaVersion
    from reviewapp.review.models import Policy

    source = Source.objects.create(slug=slug, name="SMS", labels=SMS_LABELS, id_field="id", text_fields=["text"],
                                   retrain_min_new_labels=retrain_min_new_labels)
    SchemaVersion.objects.create(source=source, major=1, minor=0, json_schema=SMS_SCHEMA)
    Policy.objects.create(source=source, version=1, **({"thresholds": {}} | policy))
    return source


def _sms_items(source: Source, frame: pd.DataFrame, state: str) -> list[Item]:
    schema = source.schema_versions.get()
    items = []
    for row in frame.itertuples():
        payload = {"id": row.id, "text": row.text}
        items.append(Item(source=source, external_id=row.id, payload=payload, schema_version=schema, state=state,
                          payload_sha256=hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()))
    return Item.objects.bulk_create(items, batch_size=1000)


def add_sms_history(source: Source, frame: pd.DataFrame) -> list[Item]:
    items = _sms_items(source, frame, Item.State.DECIDED)
    Label.objects.bulk_create([Label(item=i, source=source, label=lab, origin=Label.Origin.IMPORT)
                               for i, lab in zip(items, frame["label"], strict=True)], batch_size=1000)
    return items


def add_sms_received(source: Source, frame: pd.DataFrame) -> list[Item]:
    return _sms_items(source, frame, Item.State.RECEIVED)
