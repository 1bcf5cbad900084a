"""Reads for sources, batches and items, with the joins their pages and endpoints need."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.db.models import Count, QuerySet

from reviewapp.core.errors import NotFound, ValidationFailed
from reviewapp.ingest.models import BatchRowError, IngestBatch, Item, SchemaVersion, Source
from reviewapp.ingest.parsing import MAX_RAW_CHARS

ITEM_STATES: tuple[str, ...] = tuple(Item.State.values)
FINISHED = (IngestBatch.Status.DONE, IngestBatch.Status.FAILED)


def _counts_by_source(source_ids: list[int]) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = {sid: dict.fromkeys(ITEM_STATES, 0) for sid in source_ids}
    rows = (
        Item.objects.filter(source_id__in=source_ids).order_by().values("source_id", "state").annotate(n=Count("id"))
    )
    for row in rows:
        out[row["source_id"]][row["state"]] = row["n"]
    return out


def source_list_with_counts() -> list[Source]:
    """Every source, each with ``counts`` (items per state) and ``item_count``. Two queries."""
    sources = list(Source.objects.order_by("slug"))
    counts = _counts_by_source([s.pk for s in sources])
    for source in sources:
        source.counts = counts[source.pk]  # type: ignore[attr-defined]
        source.item_count = sum(source.counts.values())  # type: ignore[attr-defined]
    return sources


def source_get(*, slug: str) -> Source:
    source = Source.objects.filter(slug=slug).first()
    if source is None:
        raise NotFound(f"No source named {slug!r}.")
    return source


def source_counts(*, source: Source) -> dict[str, int]:
    return _counts_by_source([source.pk])[source.pk]


def schema_versions(*, source: Source) -> QuerySet[SchemaVersion]:
    return SchemaVersion.objects.filter(source=source).select_related("created_by").order_by("-major", "-minor")


def schema_current(*, source: Source) -> SchemaVersion | None:
    return schema_versions(source=source).first()


def schema_version_get(*, source: Source, label: str) -> SchemaVersion:
    major, _, minor = (label or "").partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise NotFound(f"No schema version {label!r} of {source.slug}.")
    version = schema_versions(source=source).filter(major=int(major), minor=int(minor)).first()
    if version is None:
        raise NotFound(f"No schema version {label!r} of {source.slug}.")
    return version


def batch_list(*, source: Source, limit: int = 20) -> QuerySet[IngestBatch]:
    return (
        IngestBatch.objects.filter(source=source)
        .select_related("uploaded_by", "schema_version")
        .order_by("-created_at", "-id")[:limit]
    )


def batch_get(*, batch_id: int) -> IngestBatch:
    batch = (
        IngestBatch.objects.select_related("source", "uploaded_by", "schema_version").filter(pk=batch_id).first()
    )
    if batch is None:
        raise NotFound(f"No batch {batch_id}.")
    return batch


def batch_errors(*, batch: IngestBatch, kind: str | None = None) -> QuerySet[BatchRowError]:
    errors = BatchRowError.objects.filter(batch=batch)
    if kind:
        if kind not in BatchRowError.Kind.values:
            allowed = ", ".join(BatchRowError.Kind.values)
            raise ValidationFailed("Unknown kind.", [{"field": "kind", "message": f"must be one of {allowed}"}])
        errors = errors.filter(kind=kind)
    return errors.order_by("row_number", "id")


def batch_progress(batch: IngestBatch) -> float | None:
    """Share of the work done: 0 queued, 1 finished; while running, the fraction the worker last
    published (bytes or rows read while validating, rows loaded / total rows while loading), or None
    when it has not said yet."""
    if batch.status in FINISHED:
        return 1.0
    if batch.status == IngestBatch.Status.QUEUED:
        return 0.0
    return batch.progress


@dataclass
class QuarantinedRow:
    number: int
    raw: str
    problems: list[BatchRowError]

    @property
    def complete(self) -> bool:
        """False when the raw text was cut at storage (such a row cannot be re-sent from here)."""
        return len(self.raw) < MAX_RAW_CHARS


def batch_quarantined(*, batch: IngestBatch, limit: int | None = None) -> Iterator[QuarantinedRow]:
    """The rows refused for being invalid, one per row with all its problems, in row order."""
    errors = (
        BatchRowError.objects.filter(batch=batch, kind=BatchRowError.Kind.INVALID, row_number__gt=0)
        .order_by("row_number", "id")
    )
    current: QuarantinedRow | None = None
    count = 0
    for error in errors.iterator(chunk_size=2000):
        if current is not None and error.row_number == current.number:
            current.problems.append(error)
            continue
        if current is not None:
            yield current
            count += 1
            if limit is not None and count >= limit:
                return
        current = QuarantinedRow(error.row_number, error.raw, [error])
    if current is not None:
        yield current


def quarantine_count(*, batch: IngestBatch) -> int:
    return (
        BatchRowError.objects.filter(batch=batch, kind=BatchRowError.Kind.INVALID, row_number__gt=0)
        .values("row_number").distinct().count()
    )


def quarantine_file(*, batch: IngestBatch) -> tuple[str, str, Iterator[str]]:
    """The quarantined rows as a file to fix and send again: (filename, content type, text lines).
    CSV batches give CSV (their header, then each row as it was read); JSON Lines and Parquet give
    JSON Lines. Rows too long to have been kept whole are left out (the page lists them)."""
    is_csv = batch.file_format == "csv"
    name = f"batch-{batch.pk}-quarantine.{'csv' if is_csv else 'jsonl'}"
    content_type = "text/csv; charset=utf-8" if is_csv else "application/x-ndjson; charset=utf-8"

    def lines() -> Iterator[str]:
        if is_csv:
            buffer = io.StringIO()
            csv.writer(buffer, delimiter=batch.delimiter or ",", lineterminator="\n").writerow(batch.columns)
            yield buffer.getvalue()
        for row in batch_quarantined(batch=batch):
            if row.complete:
                yield row.raw + "\n"

    return name, content_type, lines()


def item_list(*, source: Source | None = None, state: str | None = None) -> QuerySet[Item]:
    if state and state not in ITEM_STATES:
        raise ValidationFailed("Unknown status.", [{"field": "status", "message": f"must be one of "
                                                                                   f"{', '.join(ITEM_STATES)}"}])
    qs = Item.objects.select_related("source", "prediction", "schema_version")
    if source is not None:
        qs = qs.filter(source=source)
    if state:
        qs = qs.filter(state=state)
    return qs.order_by("-id")


def item_get(*, item_id: int) -> Item:
    item = (
        Item.objects.select_related(
            "source", "prediction", "prediction__model_version", "policy", "batch", "batch__uploaded_by",
            "schema_version",
        )
        .filter(pk=item_id)
        .first()
    )
    if item is None:
        raise NotFound(f"No item {item_id}.")
    return item


def item_latest_prediction(*, item: Item) -> Any | None:
    """The prediction that routed the item, else its newest one (scored but not yet routed)."""
    if item.prediction_id:
        return item.prediction
    return item.predictions.select_related("model_version").order_by("-created_at", "-id").first()


def item_current_decision(*, item: Item) -> Any | None:
    return item.decisions.filter(is_current=True).select_related("decided_by").first()
