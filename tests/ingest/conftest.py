"""Fixtures for the ingest tests: files on disk built from the payments generator."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from reviewapp.demo import payments
from reviewapp.ingest import services


@pytest.fixture(autouse=True)
def upload_root(request: pytest.FixtureRequest, settings: Any, tmp_path: Path) -> Path:
    """Uploads go to a temporary folder, except where a live worker must read them from the real one."""
    # Users are made in every test; the production hasher costs ~0.6 s each.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    if "live_worker" not in request.fixturenames:
        settings.UPLOAD_ROOT = tmp_path / "uploads"
    return Path(settings.UPLOAD_ROOT)


@pytest.fixture
def source(admin_user: Any) -> Any:
    """The payments source, made through the service as a user would."""
    return services.source_create(
        actor=admin_user, slug="payments", name="Card payments", labels=list(payments.LABELS),
        json_schema=payments.SCHEMA, id_field=payments.ID_FIELD, label_field=payments.LABEL_FIELD,
        text_fields=list(payments.TEXT_FIELDS),
    )


def payments_frame(n: int, *, start: int = 0, labeled: bool = False) -> pd.DataFrame:
    frame = payments.generate_payments(n, seed=11, start=start)
    return frame if labeled else frame.drop(columns=[payments.LABEL_FIELD])


def to_bytes(frame: pd.DataFrame, fmt: str) -> bytes:
    if fmt == "csv":
        return frame.to_csv(index=False).encode()
    if fmt == "jsonl":
        return frame.to_json(orient="records", lines=True).encode()
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def upload(content: bytes, name: str) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, content)


@pytest.fixture
def make_upload() -> Callable[..., SimpleUploadedFile]:
    def make(frame: pd.DataFrame, fmt: str = "csv", name: str | None = None) -> SimpleUploadedFile:
        return upload(to_bytes(frame, fmt), name or f"payments.{fmt}")

    return make
