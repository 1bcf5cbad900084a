"""Rows, threads and figures for the reliability suite. Rows are made set-based (bulk_create) so that
thousands of trials stay fast; domain behaviour is always exercised through the real services and API."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.db import close_old_connections, connection
from django.utils import timezone

from reviewapp.ingest.models import Item, Source
from reviewapp.review.models import ReviewTask

ROOT = Path(__file__).resolve().parents[2]
# Figures of the last run, one entry per scenario; docs/reliability.md is rendered from it.
FIGURES_PATH = Path(os.environ.get("RELIABILITY_FIGURES", ROOT / "var" / "reliability-figures.json"))
RESTING_STATES = {"auto_decided", "queued", "decided", "failed"}


def payment(external_id: str, **overrides: Any) -> dict[str, Any]:
    payload = {
        "payment_id": external_id, "amount": 42.5, "currency": "USD", "merchant_category": "grocery",
        "country": "US", "card_present": True, "hour": 14, "account_age_days": 400, "txn_count_24h": 1,
        "description": "weekly shop",
    }
    payload.update(overrides)
    return payload


def make_review_items(
    source: Source, n: int, *, claimed_by: Any = None, lease_seconds: int = 600
) -> list[tuple[int, int]]:
    """``n`` items waiting for review, each with one review task: open (item queued), or claimed by
    ``claimed_by`` (item in review). Returns ``[(item_id, task_id), ...]``. Two statements, not 2n."""
    schema = source.schema_versions.first()
    tag = uuid.uuid4().hex[:8]
    now = timezone.now()
    state = Item.State.IN_REVIEW if claimed_by else Item.State.QUEUED
    items = []
    for i in range(n):
        payload = payment(f"r{tag}-{i}")
        items.append(Item(
            source=source, external_id=payload["payment_id"], payload=payload,
            payload_sha256=hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest(),
            schema_version=schema, state=state, route_reason="reliability suite",
        ))
    items = Item.objects.bulk_create(items, batch_size=1000)
    tasks = [
        ReviewTask(
            item=item, source=source, kind=ReviewTask.Kind.REVIEW, round=1, priority=0.5, reason="reliability",
            state=ReviewTask.State.CLAIMED if claimed_by else ReviewTask.State.OPEN,
            claimed_by=claimed_by, claimed_at=now if claimed_by else None,
            lease_expires_at=now + timedelta(seconds=lease_seconds) if claimed_by else None,
        )
        for item in items
    ]
    tasks = ReviewTask.objects.bulk_create(tasks, batch_size=1000)
    return [(t.item_id, t.pk) for t in tasks]


def in_thread(function: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``function`` on its own database connection, closed afterwards (threads do not share one)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        close_old_connections()
        try:
            return function(*args, **kwargs)
        finally:
            connection.close()

    return wrapper


def run_together(functions: Iterable[Callable[[], Any]]) -> list[Any]:
    """Start every function at the same instant (a barrier) on its own thread; results in order."""
    functions = list(functions)
    barrier = threading.Barrier(len(functions))

    def start(function: Callable[[], Any]) -> Any:
        barrier.wait()
        return function()

    with ThreadPoolExecutor(max_workers=len(functions)) as pool:
        return [f.result() for f in [pool.submit(in_thread(start), fn) for fn in functions]]


def record_figures(scenario: str, **figures: Any) -> None:
    """Merge one scenario's figures into the JSON file docs/reliability.md is rendered from."""
    FIGURES_PATH.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if FIGURES_PATH.exists():
        data = json.loads(FIGURES_PATH.read_text())
    data[scenario] = {**figures, "recorded_at": timezone.now().isoformat(timespec="seconds")}
    tmp = FIGURES_PATH.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(FIGURES_PATH)
