"""Rows for policy-editor tests: a champion with honest evidence (labels it never trained on)."""

from __future__ import annotations

from typing import Any

from django.utils import timezone

from reviewapp.ingest.models import Item, Source
from reviewapp.review.models import Label
from reviewapp.review.policy_simulation import evidence_cache_clear
from scoring.models import ModelVersion
from tests.review.helpers import champion, make_scored_items


def make_champion(source: Source, *, max_label_id: int | None = 0, risk_control: dict | None = None) -> ModelVersion:
    """The source's champion; its snapshot says it trained on labels up to ``max_label_id``."""
    model = champion(source, risk_control=risk_control)
    model.label_snapshot = {"count": 0, "max_label_id": max_label_id} if max_label_id is not None else {}
    model.trained_at = timezone.now()
    model.save(update_fields=["label_snapshot", "trained_at"])
    evidence_cache_clear()
    return model


def add_labeled(source: Source, rows: list[tuple[str, float, str]], *, origin: str = Label.Origin.IMPORT,
                model: ModelVersion | None = None) -> list[Item]:
    """Items scored by the champion as ``(top_label, confidence)`` with a human label ``true`` each."""
    items = make_scored_items(source, [(top, conf) for top, conf, _ in rows], model=model, route=False)
    Label.objects.bulk_create([
        Label(item=item, source=source, label=true, origin=origin)
        for item, (_, _, true) in zip(items, rows, strict=True)
    ])
    Item.objects.filter(pk__in=[i.pk for i in items]).update(state=Item.State.DECIDED)
    evidence_cache_clear()
    return items


def block(top: str, conf: float, n: int, n_wrong: int, other: str) -> list[tuple[str, float, str]]:
    """``n`` items predicted ``top`` at ``conf``, of which exactly ``n_wrong`` are truly ``other``."""
    return [(top, conf, other if i < n_wrong else top) for i in range(n)]


def source_setup(**kwargs: Any) -> Source:
    from tests.factories import make_payments_source

    return make_payments_source(**kwargs)
