"""Reads for the model registry."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db.models import Count, F, Max, Min, OuterRef, Prefetch, Q, QuerySet, Subquery

from reviewapp.core.errors import NotFound
from reviewapp.ingest.models import Item, SchemaVersion, Source
from reviewapp.review.models import Label
from scoring.models import ModelVersion, Prediction


def source_get(*, slug: str) -> Source:
    source = Source.objects.filter(slug=slug).first()
    if source is None:
        raise NotFound(f"No source {slug!r}.")
    return source


def item_get(*, pk: int) -> Item:
    item = Item.objects.filter(pk=pk).only("id", "source_id", "payload").first()
    if item is None:
        raise NotFound(f"No item {pk}.")
    return item


def schema_current(*, source: Source) -> SchemaVersion | None:
    return SchemaVersion.objects.filter(source=source).order_by("-major", "-minor").first()


def model_version_list(*, source: Source) -> QuerySet[ModelVersion]:
    return (
        ModelVersion.objects.filter(source=source)
        .select_related("source", "schema_version", "created_by")
        .order_by("-version")
    )


def model_version_get(*, pk: int) -> ModelVersion:
    mv = ModelVersion.objects.select_related("source", "schema_version", "created_by").filter(pk=pk).first()
    if mv is None:
        raise NotFound(f"No model version {pk}.")
    return mv


def champion_for(*, source_id: int) -> ModelVersion | None:
    return ModelVersion.objects.filter(
        source_id=source_id, is_champion=True, status=ModelVersion.Status.READY
    ).first()


def sources_with_versions(*, per_source: int = 20) -> list[tuple[Source, list[ModelVersion], ModelVersion | None]]:
    """Every source with its newest model versions and its champion (three queries whatever the number of
    sources; the champion may be older than the versions listed)."""
    sources = list(
        Source.objects.order_by("slug").prefetch_related(
            Prefetch(
                "model_versions",
                queryset=ModelVersion.objects.select_related("created_by").order_by("-version"),
                to_attr="versions_newest_first",
            )
        )
    )
    champions = {mv.source_id: mv for mv in ModelVersion.objects.filter(is_champion=True)}
    return [(s, s.versions_newest_first[:per_source], champions.get(s.pk)) for s in sources]


@dataclass(frozen=True)
class TrainingRow:
    label_id: int
    item_id: int
    label: str
    origin: str
    payload: dict[str, Any]
    created_at: datetime | None = None

    @property
    def order_key(self) -> tuple[str, int]:
        """The position in time order (created_at, id), comparable with a stored boundary."""
        return (self.created_at.isoformat() if self.created_at else "", self.label_id)


def training_rows(*, source: Source) -> list[TrainingRow]:
    """Active labels of ``source`` with their items' payloads, oldest first (the time order of the split)."""
    rows = (
        Label.objects.filter(source=source, is_active=True)
        .order_by("created_at", "id")
        .values_list("id", "item_id", "label", "origin", "item__payload", "created_at")
    )
    return [TrainingRow(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows.iterator(chunk_size=5000)]


def label_watermark(*, source: Source) -> int:
    """The newest active label id of ``source`` (0 when none)."""
    return Label.objects.filter(source=source, is_active=True).aggregate(m=Max("id"))["m"] or 0


def labels_since(*, source: Source, label_id: int) -> int:
    """Active labels of ``source`` newer than ``label_id``."""
    return Label.objects.filter(source=source, is_active=True, pk__gt=label_id).count()


def shadows_for(*, source_id: int) -> list[ModelVersion]:
    return list(ModelVersion.objects.filter(source_id=source_id, is_shadow=True, status=ModelVersion.Status.READY)
                .order_by("-version"))


def similarity_version_for(*, source_id: int) -> ModelVersion | None:
    """The version whose nearest-neighbour index serves the source: the champion's, else the newest ready one."""
    qs = ModelVersion.objects.filter(source_id=source_id, status=ModelVersion.Status.READY).exclude(
        similarity_sha256="")
    return qs.filter(is_champion=True).first() or qs.order_by("-version").first()


def shadow_comparison(*, model_version: ModelVersion) -> dict[str, Any]:
    """How a version's predictions on live items it did not route compare with the predictions that did route
    them: agreement of top labels, and accuracy of each on the items that have since got a human label. Two
    aggregate queries whatever the number of items."""
    shadow = Prediction.objects.filter(model_version=model_version, item__prediction__isnull=False).exclude(
        item__prediction_id=F("pk"))
    totals = shadow.aggregate(
        n=Count("id"), agree=Count("id", filter=Q(top_label=F("item__prediction__top_label"))),
        first=Min("created_at"), last=Max("created_at"),
    )
    human = Label.objects.filter(item_id=OuterRef("item_id"), is_active=True).values("label")[:1]
    labeled = shadow.annotate(human=Subquery(human)).filter(human__isnull=False).aggregate(
        n=Count("id"),
        shadow_correct=Count("id", filter=Q(top_label=F("human"))),
        routing_correct=Count("id", filter=Q(item__prediction__top_label=F("human"))),
    )
    n, n_labeled = totals["n"], labeled["n"]
    return {
        "n": n,
        "agreement": totals["agree"] / n if n else None,
        "first_at": totals["first"],
        "last_at": totals["last"],
        "n_labeled": n_labeled,
        "shadow_accuracy": labeled["shadow_correct"] / n_labeled if n_labeled else None,
        "routing_accuracy": labeled["routing_correct"] / n_labeled if n_labeled else None,
    }
