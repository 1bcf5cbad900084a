"""A known sequence of pipeline events with fixed timestamps, written straight through the ORM, and the
figures it must produce (worked out by hand in the comments)."""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from actions.models import ActionConfig, ActionRun
from reviewapp.ingest.models import Item, Source
from reviewapp.observability.models import AlertRule
from reviewapp.review.models import Decision, Label, ReviewTask, Verdict
from scoring.models import ModelVersion, Prediction
from tests.factories import UserFactory, make_payments_source
from tests.review.helpers import payment


def ensure_default_rules() -> None:
    """The default alert rules come from a data migration, and a transactional test elsewhere in the suite
    flushes every table: put them back (idempotent)."""
    migration = importlib.import_module("reviewapp.observability.migrations.0002_default_alert_rules")
    for name, metric, threshold, window, description in migration.DEFAULT_RULES:
        AlertRule.objects.get_or_create(name=name, defaults={
            "metric": metric, "threshold": threshold, "window_hours": window, "description": description})


@dataclass
class Sequence:
    source: Source
    now: datetime
    base: datetime
    items: dict[str, Item]
    decisions: dict[str, Decision]


def _item(source: Source, name: str, received: datetime, state: str, **payload: Any) -> Item:
    body = payment(f"{source.slug}-{name}", **payload)
    return Item.objects.create(
        source=source, external_id=f"{source.slug}-{name}", payload=body,
        payload_sha256=hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(),
        schema_version=source.schema_versions.first(), state=state, received_at=received, state_changed_at=received,
    )


def _predict(item: Item, model: ModelVersion, label: str, confidence: float, at: datetime) -> Prediction:
    other = "fraud" if label == "legit" else "legit"
    p = Prediction.objects.create(
        item=item, model_version=model, probabilities={label: confidence, other: 1 - confidence}, top_label=label,
        confidence=confidence, alternatives=[[other, 1 - confidence]], prediction_set=[label], created_at=at,
    )
    item.prediction = p
    item.save(update_fields=["prediction"])
    return p


def build_sequence(*, now: datetime, slug: str = "obs") -> Sequence:
    """Eight items of one source, base = now - 2h:

    item  received   scored (lag)  route                       human
    i1    base       +10s  legit .95 auto (d1 +20s), QA         QA verdict legit (10 s)
    i2    base       +30s  legit .97 auto (d2 +40s), QA         QA verdict fraud (15 s) -> override d2b
    i3    base       +50s  fraud .60 review                     legit (20 s) -> d3 (+30m)
    i4    base       +70s  legit .70 review + escalation        legit (40 s) -> d4 (+40m); legit (50 s)
    i5    base       +90s  legit .55 review + escalation        fraud (60 s) -> d5 (+50m); legit (30 s)
    i6    base       -     failed
    i7    now-50m    +110s legit .80 review, open
    i8    now-30m    +130s legit .85 review, open
    A dead-lettered action run on d3.
    """
    ensure_default_rules()
    base = now - timedelta(hours=2)
    source = make_payments_source(slug=slug)
    model = ModelVersion.objects.create(source=source, version=1, algorithm="test", status="ready", is_champion=True)
    r1 = UserFactory(username=f"{slug}-r1", role="analyst")
    r2 = UserFactory(username=f"{slug}-r2", role="analyst")
    s = timedelta(seconds=1)
    m = timedelta(minutes=1)
    items: dict[str, Item] = {}
    decisions: dict[str, Decision] = {}

    def task(item: Item, kind: str, at: datetime, *, state: str = "done", done: datetime | None = None) -> ReviewTask:
        return ReviewTask.objects.create(item=item, source=source, kind=kind, state=state, created_at=at,
                                         completed_at=done)

    def verdict(t: ReviewTask, user: Any, label: str, ms: int, at: datetime) -> Verdict:
        return Verdict.objects.create(task=t, item=t.item, reviewer=user, label=label, handling_ms=ms, created_at=at)

    def decide(item: Item, label: str, origin: str, at: datetime, **kw: Any) -> Decision:
        return Decision.objects.create(item=item, label=label, origin=origin, created_at=at,
                                       prediction=item.prediction, model_version=model, **kw)

    # i1: auto-decided, QA agrees.
    i1 = items["i1"] = _item(source, "i1", base, "auto_decided")
    _predict(i1, model, "legit", 0.95, base + 10 * s)
    decisions["d1"] = decide(i1, "legit", "model", base + 20 * s)
    t = task(i1, "qa", base + 20 * s, done=base + 15 * m)
    v = verdict(t, r2, "legit", 10_000, base + 15 * m)
    Label.objects.create(item=i1, source=source, label="legit", origin="qa", verdict=v, created_at=base + 15 * m)
    # i2: auto-decided, QA disagrees and overrides.
    i2 = items["i2"] = _item(source, "i2", base, "decided")
    _predict(i2, model, "legit", 0.97, base + 30 * s)
    d2 = decisions["d2"] = decide(i2, "legit", "model", base + 40 * s, is_current=False)
    t = task(i2, "qa", base + 40 * s, done=base + 20 * m)
    v = verdict(t, r2, "fraud", 15_000, base + 20 * m)
    decisions["d2b"] = decide(i2, "fraud", "reviewer", base + 20 * m, verdict=v, supersedes=d2, decided_by=r2)
    Label.objects.create(item=i2, source=source, label="fraud", origin="qa", verdict=v, created_at=base + 20 * m)
    # i3..i5: sent to review.
    specs = [("i3", "fraud", 0.60, 50, [("legit", r1, 20_000, 30)]),
             ("i4", "legit", 0.70, 70, [("legit", r1, 40_000, 40), ("legit", r2, 50_000, 45)]),
             ("i5", "legit", 0.55, 90, [("fraud", r1, 60_000, 50), ("legit", r2, 30_000, 55)])]
    for name, label, conf, lag, answers in specs:
        item = items[name] = _item(source, name, base, "decided")
        _predict(item, model, label, conf, base + lag * s)
        for round_, (answer, user, ms, minute) in enumerate(answers):
            kind = "review" if round_ == 0 else "escalation"
            t = task(item, kind, base + lag * s, done=base + minute * m)
            v = verdict(t, user, answer, ms, base + minute * m)
            if round_ == 0:
                d = decisions[f"d{name[1]}"] = decide(item, answer, "reviewer", base + minute * m, verdict=v,
                                                      decided_by=user)
                Label.objects.create(item=item, source=source, label=answer, origin="review", verdict=v, decision=d,
                                     created_at=base + minute * m)
    # i6: failed before scoring.
    i6 = items["i6"] = _item(source, "i6", base, "failed")
    Item.objects.filter(pk=i6.pk).update(state_changed_at=base + 5 * m)
    # i7, i8: waiting in the queue.
    for name, received, lag, conf in (("i7", now - 50 * m, 110, 0.80), ("i8", now - 30 * m, 130, 0.85)):
        item = items[name] = _item(source, name, received, "queued")
        _predict(item, model, "legit", conf, received + lag * s)
        task(item, "review", received + lag * s, state="open")
    config = ActionConfig.objects.create(source=source, kind="log", name="log it")
    ActionRun.objects.create(decision=decisions["d3"], config=config, idempotency_key=f"{slug}-dead-1", state="dead",
                             attempts=8, state_changed_at=base + 60 * m)
    return Sequence(source, now, base, items, decisions)


# What the sequence must give over a window that holds all of it.
EXPECTED = {
    "received": 8,
    "scored": 7,
    "auto_decided": 2,
    "reviewer_decided": 4,
    "reviewed": 7,
    "review_routed": 5,
    "qa_sampled": 2,
    "overrides": 1,
    "automation_share": 2 / 7,
    "human_share": 7 / 7,
    # lags to scored [10, 30, 50, 70, 90, 110, 130]: median 70; p95 at rank 5.7 -> 110 + 0.7 * 20
    "lag_scored": (70.0, 124.0),
    # first decisions [20, 40, 1800, 2400, 3000]: median 1800; p95 at rank 3.8 -> 2400 + 0.8 * 600
    "lag_decided": (1800.0, 2880.0),
    # handling [10, 15, 20, 30, 40, 50, 60] s
    "handling_p50_seconds": 30.0,
    "agreement": 0.5,  # i4 agrees, i5 does not
    "accuracy_vs_reviewers": 1 / 3,  # i3 wrong, i4 right, i5 wrong (the QA override is not a review task)
    "accuracy_vs_qa": 0.5,  # i1 right, i2 wrong
    # bins: 9: {.95 ok, .97 wrong} gap .46 x2; 5: .55 wrong .55; 6: .60 wrong .60; 7: .70 ok .30 -> 2.37 / 5
    "ece": 0.474,
    "failed_now": 1,
    "failed_in_window": 1,
    "dead_actions_now": 1,
    "queue_depth": 2,
    "oldest_wait_seconds": 50 * 60 - 110.0,
}
