"""Drive the whole loop through the public API, for the end-to-end tests."""

from __future__ import annotations

import io
from typing import Any

from rest_framework.test import APIClient

from reviewapp.demo import payments
from reviewapp.ingest.models import IngestBatch, Item
from tests.conftest import wait_for


def create_payments_source_via_api(admin_api: APIClient, slug: str = "payments") -> dict[str, Any]:
    response = admin_api.post(
        "/api/v1/sources/",
        {
            "slug": slug,
            "name": "Card payments",
            "labels": payments.LABELS,
            "schema": payments.SCHEMA,
            "id_field": payments.ID_FIELD,
            "label_field": payments.LABEL_FIELD,
            "text_fields": payments.TEXT_FIELDS,
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    return response.json()


def upload_frame(api: APIClient, slug: str, frame: Any, name: str) -> dict[str, Any]:
    buffer = io.BytesIO(frame.to_csv(index=False).encode())
    buffer.name = name
    response = api.post(f"/api/v1/sources/{slug}/batches/", {"file": buffer}, format="multipart")
    assert response.status_code in (200, 202), response.content
    return response.json()


def wait_batch_done(batch_id: int, timeout: float = 90) -> IngestBatch:
    def finished() -> IngestBatch | None:
        batch = IngestBatch.objects.get(pk=batch_id)
        return batch if batch.status in ("done", "failed") else None

    batch = wait_for(finished, timeout=timeout, what=f"batch {batch_id} to finish")
    assert batch.status == "done", batch.error
    return batch


def wait_items_routed(batch_id: int, expected: int, timeout: float = 120) -> None:
    wait_for(
        lambda: Item.objects.filter(batch_id=batch_id).exclude(state__in=["received", "scored"]).count() >= expected,
        timeout=timeout,
        what=f"{expected} items of batch {batch_id} to be scored and routed",
    )
