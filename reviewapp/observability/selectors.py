"""Pipeline figures read from the ledger tables with grouped aggregate queries.

Every function costs a fixed number of queries whatever the number of sources, items or buckets: counts
are grouped by source (or by time bucket) in SQL; percentiles use PostgreSQL's ``percentile_cont`` (on the
embedded SQLite database the values of one window are fetched and interpolated the same way by numpy).

Definitions (the dashboard and /metrics say the same):
- received / scored / auto-decided / reviewed: items received, items whose routing prediction was made,
  model decisions, and (not withdrawn) verdicts, by their own timestamps.
- automation share: model decisions / (model decisions + first-round review tasks); human review share:
  (first-round review tasks + QA tasks) / the same denominator: the share of routed items a person sees.
- lag: received -> routing prediction (scored); received -> first decision of the item (decided).
- accuracy against reviewers: decisions of review tasks (not QA) whose label equals the model's top label;
  against QA: QA labels equal to the top label of the item's prediction. Calibration error (ECE, 10 bins)
  compares prediction confidence with correctness over the active labels given in the window.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from django.db import connection
from django.db.models import (
    Aggregate,
    Avg,
    Count,
    F,
    FloatField,
    Func,
    IntegerField,
    Max,
    Min,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
)
from django.db.models.functions import Coalesce, Floor, Least, TruncDate
from django.utils import timezone

from actions.models import ActionRun
from reviewapp.ingest.models import BatchRowError, IngestBatch, Item, Source
from reviewapp.observability.models import AlertRule, DriftReport, TaskStat
from reviewapp.review.models import Decision, Label, Policy, ReviewTask, Verdict

# The band of human review share that reviewing teams plan for.
HUMAN_SHARE_BAND = (0.05, 0.20)
ECE_BINS = 10
WAITING_TASK_STATES = (ReviewTask.State.OPEN, ReviewTask.State.CLAIMED)

HUMAN_REVIEW_KINDS = (ReviewTask.Kind.REVIEW, ReviewTask.Kind.DOUBLE, ReviewTask.Kind.ADJUDICATION)


# --- SQL building blocks ----------------------------------------------------------------------------


class SecondsBetween(Func):
    """``later - earlier`` in seconds, as a float."""

    output_field = FloatField()

    def __init__(self, later: Any, earlier: Any) -> None:
        super().__init__(later, earlier)

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        later, later_params = compiler.compile(self.source_expressions[0])
        earlier, earlier_params = compiler.compile(self.source_expressions[1])
        if connection.vendor == "postgresql":
            sql = f"EXTRACT(EPOCH FROM ({later} - {earlier}))::double precision"
        else:
            sql = f"((julianday({later}) - julianday({earlier})) * 86400.0)"
        return sql, [*later_params, *earlier_params]


class BucketIndex(Func):
    """Which fixed-width time bucket (counted from ``start``) a timestamp falls in."""

    output_field = IntegerField()

    def __init__(self, expression: Any, *, start: datetime, seconds: int) -> None:
        super().__init__(expression)
        self.start_epoch = int(start.timestamp())
        self.seconds = int(seconds)

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> tuple[str, list[Any]]:
        expr, params = compiler.compile(self.source_expressions[0])
        if connection.vendor == "postgresql":
            sql = f"FLOOR((EXTRACT(EPOCH FROM {expr})::double precision - %s) / %s)::bigint"
        else:
            sql = f"((CAST(strftime('%%s', {expr}) AS INTEGER) - %s) / %s)"
        return sql, [*params, self.start_epoch, self.seconds]


class PercentileCont(Aggregate):
    """PostgreSQL's continuous percentile (linear interpolation, like numpy's default)."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression: Any, fraction: float) -> None:
        super().__init__(expression, fraction=repr(float(fraction)))


def _percentiles(
    qs: QuerySet, *, value: Any, group: dict[str, Any], fractions: tuple[float, ...]
) -> dict[tuple, tuple[int, list[float | None]]]:
    """{group key: (n, [percentile per fraction])} over the non-null ``value`` of ``qs``."""
    names = list(group)
    qs = qs.annotate(_v=value, **group).filter(_v__isnull=False)
    out: dict[tuple, tuple[int, list[float | None]]] = {}
    if connection.vendor == "postgresql" and not names:
        aggregates = {f"_p{i}": PercentileCont(F("_v"), f) for i, f in enumerate(fractions)}
        row = qs.aggregate(_n=Count("pk"), **aggregates)
        if row["_n"]:
            out[()] = (row["_n"], [row[f"_p{i}"] for i in range(len(fractions))])
        return out
    if connection.vendor == "postgresql":
        aggregates = {f"_p{i}": PercentileCont(F("_v"), f) for i, f in enumerate(fractions)}
        for row in qs.values(*names).annotate(_n=Count("pk"), **aggregates).order_by():
            out[tuple(row[n] for n in names)] = (row["_n"], [row[f"_p{i}"] for i in range(len(fractions))])
        return out
    grouped: dict[tuple, list[float]] = defaultdict(list)
    for row in qs.values_list(*names, "_v").order_by():
        grouped[tuple(row[:-1])].append(float(row[-1]))
    for key, values in grouped.items():
        out[key] = (len(values), [float(np.percentile(values, f * 100)) for f in fractions])
    return out


def _by_source(qs: QuerySet, path: str, source_id: int | None) -> QuerySet:
    return qs.filter(**{path: source_id}) if source_id is not None else qs


def _window(qs: QuerySet, path: str, start: datetime, end: datetime) -> QuerySet:
    return qs.filter(**{f"{path}__gte": start, f"{path}__lt": end})


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


# --- Per-source figures over one window -------------------------------------------------------------


@dataclass
class SourceFigures:
    source_id: int
    received: int = 0
    scored: int = 0
    auto_decided: int = 0
    reviewer_decided: int = 0
    reviewed: int = 0
    review_routed: int = 0
    qa_sampled: int = 0
    overrides: int = 0
    lag_scored: tuple[float | None, float | None] = (None, None)
    lag_decided: tuple[float | None, float | None] = (None, None)
    handling_p50_seconds: float | None = None
    agreement_items: int = 0
    agreement_agreed: int = 0
    reviewer_n: int = 0
    reviewer_correct: int = 0
    qa_n: int = 0
    qa_correct: int = 0
    calibration_n: int = 0
    ece: float | None = None
    reliability: list[dict[str, Any]] = field(default_factory=list)
    failed_now: int = 0
    failed_in_window: int = 0
    dead_actions_now: int = 0
    dead_actions_in_window: int = 0
    queue_depth: int = 0
    oldest_wait_seconds: float | None = None

    @property
    def routed(self) -> int:
        return self.auto_decided + self.review_routed

    @property
    def automation_share(self) -> float | None:
        return _share(self.auto_decided, self.routed)

    @property
    def human_share(self) -> float | None:
        return _share(self.review_routed + self.qa_sampled, self.routed)

    @property
    def agreement(self) -> float | None:
        return _share(self.agreement_agreed, self.agreement_items)

    @property
    def accuracy_vs_reviewers(self) -> float | None:
        return _share(self.reviewer_correct, self.reviewer_n)

    @property
    def accuracy_vs_qa(self) -> float | None:
        return _share(self.qa_correct, self.qa_n)

    @property
    def failure_rate(self) -> float | None:
        return _share(self.failed_in_window, self.received)


def queue_now(*, now: datetime, source_id: int | None = None) -> dict[int, tuple[int, float | None]]:
    """{source: (waiting review tasks (open or claimed), age in seconds of the oldest)}."""
    qs = _by_source(ReviewTask.objects.filter(state__in=WAITING_TASK_STATES), "source_id", source_id)
    out = {}
    for row in qs.values("source_id").annotate(n=Count("id"), oldest=Min("created_at")).order_by():
        age = (now - row["oldest"]).total_seconds() if row["oldest"] else None
        out[row["source_id"]] = (row["n"], max(age, 0.0) if age is not None else None)
    return out


def lag_percentiles(
    *, start: datetime, end: datetime, stage: str, source_id: int | None = None, by_source: bool = True
) -> dict[int, tuple[int, float | None, float | None]]:
    """{source: (n, median, p95)} lag in seconds for ``stage`` "scored" or "decided", by when it happened
    (with ``by_source=False``: {0: ...} over every source together)."""
    if stage == "scored":
        qs = _window(Item.objects.filter(prediction__isnull=False), "prediction__created_at", start, end)
        qs = _by_source(qs, "source_id", source_id)
        value, group = SecondsBetween(F("prediction__created_at"), F("received_at")), {"_s": F("source_id")}
    elif stage == "decided":
        qs = _window(Decision.objects.filter(supersedes__isnull=True), "created_at", start, end)
        qs = _by_source(qs, "item__source_id", source_id)
        value, group = SecondsBetween(F("created_at"), F("item__received_at")), {"_s": F("item__source_id")}
    else:
        raise ValueError(f"unknown stage {stage!r}")
    result = _percentiles(qs, value=value, group=group if by_source else {}, fractions=(0.5, 0.95))
    return {key[0] if key else 0: (n, p[0], p[1]) for key, (n, p) in result.items()}


def handling_median(*, start: datetime, end: datetime, source_id: int | None = None,
                    by_source: bool = True) -> dict[int, float | None]:
    """{source: median verdict handling time in seconds} (``by_source=False``: {0: overall})."""
    verdicts = _window(Verdict.objects.filter(withdrawn_at__isnull=True), "created_at", start, end)
    verdicts = _by_source(verdicts, "item__source_id", source_id)
    result = _percentiles(verdicts, value=F("handling_ms") / 1000.0,
                          group={"_s": F("item__source_id")} if by_source else {}, fractions=(0.5,))
    return {key[0] if key else 0: p[0] for key, (_n, p) in result.items()}


def failures(*, start: datetime, end: datetime, source_id: int | None = None) -> dict[int, dict[str, int]]:
    """{source: {"received", "failed_now", "failed_in_window"}} (failed_in_window: received in the window
    and failed now)."""
    out: dict[int, dict[str, int]] = defaultdict(lambda: {"received": 0, "failed_now": 0, "failed_in_window": 0})
    received = _by_source(_window(Item.objects.all(), "received_at", start, end), "source_id", source_id)
    in_window = Q(received_at__gte=start, received_at__lt=end)
    for row in received.values("source_id").annotate(
        n=Count("id"), failed=Count("id", filter=Q(state=Item.State.FAILED))
    ).order_by():
        out[row["source_id"]]["received"] = row["n"]
        out[row["source_id"]]["failed_in_window"] = row["failed"]
    failed = _by_source(Item.objects.filter(state=Item.State.FAILED), "source_id", source_id)
    for row in failed.values("source_id").annotate(n=Count("id"), w=Count("id", filter=in_window)).order_by():
        out[row["source_id"]]["failed_now"] = row["n"]
    return dict(out)


def dead_actions(*, start: datetime, end: datetime, source_id: int | None = None) -> dict[int, tuple[int, int]]:
    """{source: (dead-lettered runs now, of which dead-lettered in the window)}."""
    qs = _by_source(ActionRun.objects.filter(state=ActionRun.State.DEAD), "decision__item__source_id", source_id)
    window = Q(state_changed_at__gte=start, state_changed_at__lt=end)
    return {
        row["s"]: (row["n"], row["w"])
        for row in qs.values(s=F("decision__item__source_id")).annotate(
            n=Count("id"), w=Count("id", filter=window)
        ).order_by()
    }


def qa_outcomes(*, start: datetime, end: datetime, source_id: int | None = None) -> dict[int, tuple[int, int]]:
    """{source: (QA samples, of which the model's top label was right)} over QA labels given in the window."""
    qs = _window(Label.objects.filter(origin=Label.Origin.QA, item__prediction__isnull=False), "created_at",
                 start, end)
    qs = _by_source(qs, "source_id", source_id)
    return {
        row["source_id"]: (row["n"], row["ok"])
        for row in qs.values("source_id").annotate(
            n=Count("id"), ok=Count("id", filter=Q(label=F("item__prediction__top_label")))
        ).order_by()
    }


def latest_drift_reports(*, source_id: int | None = None) -> dict[int, DriftReport]:
    """The newest drift report of each source (one query)."""
    newest = DriftReport.objects.filter(source_id=OuterRef("source_id")).order_by("-computed_at", "-id")
    qs = DriftReport.objects.filter(pk=Subquery(newest.values("pk")[:1])).select_related("model_version")
    return {r.source_id: r for r in _by_source(qs, "source_id", source_id)}


def current_policies(*, source_id: int | None = None) -> dict[int, Policy]:
    newest = Policy.objects.filter(source_id=OuterRef("source_id")).order_by("-version")
    qs = Policy.objects.filter(pk=Subquery(newest.values("pk")[:1]))
    return {p.source_id: p for p in _by_source(qs, "source_id", source_id)}


def _agreement(*, start: datetime, end: datetime, source_id: int | None) -> dict[int, tuple[int, int]]:
    """{source: (items with more than one active verdict whose newest verdict is in the window, of which
    every verdict has the same label)}: one query, the per-item counts grouped again in SQL."""
    recent = _window(Verdict.objects.all(), "created_at", start, end).values("item_id")
    per_item = (
        Verdict.objects.filter(withdrawn_at__isnull=True, item_id__in=Subquery(recent))
        .annotate(src=F("item__source_id"))
        .values("src", "item_id")
        .annotate(n=Count("id"), k=Count("label", distinct=True), last=Max("created_at"))
        .filter(n__gt=1, last__gte=start, last__lt=end)
        .order_by()
    )
    per_item = _by_source(per_item, "item__source_id", source_id)
    inner, params = per_item.query.sql_with_params()
    # The inner query is compiled by the ORM with its parameters kept apart: nothing user-given is inlined.
    sql = (
        "SELECT t.src, COUNT(*), SUM(CASE WHEN t.k = 1 THEN 1 ELSE 0 END) "  # noqa: S608
        f"FROM ({inner}) t GROUP BY t.src"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {row[0]: (int(row[1]), int(row[2] or 0)) for row in cursor.fetchall()}


def _calibration(*, start: datetime, end: datetime, source_id: int | None) -> dict[int, list[dict[str, Any]]]:
    """{source: [{"bin", "n", "confidence", "accuracy"}]} over active labels given in the window."""
    qs = _window(Label.objects.filter(is_active=True, item__prediction__isnull=False), "created_at", start, end)
    qs = _by_source(qs, "source_id", source_id)
    bin_expr = Least(Floor(F("item__prediction__confidence") * ECE_BINS), ECE_BINS - 1, output_field=IntegerField())
    out: dict[int, list[dict[str, Any]]] = defaultdict(list)
    rows = (
        qs.annotate(_bin=bin_expr)
        .values("source_id", "_bin")
        .annotate(
            n=Count("id"),
            conf=Avg("item__prediction__confidence"),
            ok=Count("id", filter=Q(label=F("item__prediction__top_label"))),
        )
        .order_by("source_id", "_bin")
    )
    for row in rows:
        out[row["source_id"]].append(
            {"bin": int(row["_bin"]), "n": row["n"], "confidence": float(row["conf"]), "accuracy": row["ok"] / row["n"]}
        )
    return dict(out)


def expected_calibration_error(bins: Iterable[dict[str, Any]]) -> tuple[int, float | None]:
    """(n, ECE): the count-weighted mean gap between confidence and accuracy over the bins."""
    bins = list(bins)
    n = sum(b["n"] for b in bins)
    if not n:
        return 0, None
    return n, sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / n


def source_figures(*, start: datetime, end: datetime, now: datetime | None = None,
                   source_id: int | None = None) -> dict[int, SourceFigures]:
    """Every headline figure per source for the window [start, end), in a fixed number of queries."""
    now = now or timezone.now()
    figs: dict[int, SourceFigures] = {}

    def fig(sid: int) -> SourceFigures:
        if sid not in figs:
            figs[sid] = SourceFigures(source_id=sid)
        return figs[sid]

    for sid in _by_source(Source.objects.all(), "pk", source_id).values_list("pk", flat=True):
        fig(sid)
    for sid, row in failures(start=start, end=end, source_id=source_id).items():
        f = fig(sid)
        f.received, f.failed_now, f.failed_in_window = row["received"], row["failed_now"], row["failed_in_window"]
    for sid, (n, p50, p95) in lag_percentiles(start=start, end=end, stage="scored", source_id=source_id).items():
        fig(sid).scored, fig(sid).lag_scored = n, (p50, p95)
    for sid, (_n, p50, p95) in lag_percentiles(start=start, end=end, stage="decided", source_id=source_id).items():
        fig(sid).lag_decided = (p50, p95)

    decisions = _by_source(_window(Decision.objects.all(), "created_at", start, end), "item__source_id", source_id)
    # Human review decisions: single review, agreed double review, adjudication (not QA overrides).
    review_kind = Q(verdict__task__kind__in=HUMAN_REVIEW_KINDS)
    top = Coalesce(F("prediction__top_label"), F("item__prediction__top_label"))
    for row in decisions.annotate(_top=top).values(s=F("item__source_id")).annotate(
        auto=Count("id", filter=Q(origin=Decision.Origin.MODEL)),
        human=Count("id", filter=Q(origin=Decision.Origin.REVIEWER)),
        overrides=Count("id", filter=Q(supersedes__origin=Decision.Origin.MODEL)),
        rev_n=Count("id", filter=Q(origin=Decision.Origin.REVIEWER) & review_kind & Q(_top__isnull=False)),
        rev_ok=Count("id", filter=Q(origin=Decision.Origin.REVIEWER) & review_kind & Q(label=F("_top"))),
    ).order_by():
        f = fig(row["s"])
        f.auto_decided, f.reviewer_decided, f.overrides = row["auto"], row["human"], row["overrides"]
        f.reviewer_n, f.reviewer_correct = row["rev_n"], row["rev_ok"]

    verdicts = _window(Verdict.objects.filter(withdrawn_at__isnull=True), "created_at", start, end)
    verdicts = _by_source(verdicts, "item__source_id", source_id)
    for row in verdicts.values(s=F("item__source_id")).annotate(n=Count("id")).order_by():
        fig(row["s"]).reviewed = row["n"]
    for sid, p50 in handling_median(start=start, end=end, source_id=source_id).items():
        fig(sid).handling_p50_seconds = p50

    tasks = _by_source(_window(ReviewTask.objects.all(), "created_at", start, end), "source_id", source_id)
    for row in tasks.values("source_id").annotate(
        review=Count("id", filter=Q(kind=ReviewTask.Kind.REVIEW, round=1)),
        qa=Count("id", filter=Q(kind=ReviewTask.Kind.QA)),
    ).order_by():
        fig(row["source_id"]).review_routed, fig(row["source_id"]).qa_sampled = row["review"], row["qa"]

    for sid, (items, agreed) in _agreement(start=start, end=end, source_id=source_id).items():
        fig(sid).agreement_items, fig(sid).agreement_agreed = items, agreed
    for sid, (n, ok) in qa_outcomes(start=start, end=end, source_id=source_id).items():
        fig(sid).qa_n, fig(sid).qa_correct = n, ok
    for sid, bins in _calibration(start=start, end=end, source_id=source_id).items():
        f = fig(sid)
        f.reliability = bins
        f.calibration_n, f.ece = expected_calibration_error(bins)
    for sid, (n, w) in dead_actions(start=start, end=end, source_id=source_id).items():
        fig(sid).dead_actions_now, fig(sid).dead_actions_in_window = n, w
    for sid, (depth, age) in queue_now(now=now, source_id=source_id).items():
        fig(sid).queue_depth, fig(sid).oldest_wait_seconds = depth, age
    return figs


def overall_figures(figs: Iterable[SourceFigures], *, start: datetime, end: datetime) -> SourceFigures:
    """Every source together: counts add up; percentiles are not additive, so three more queries
    compute them over all sources at once."""
    total = SourceFigures(source_id=0)
    additive = ("received", "scored", "auto_decided", "reviewer_decided", "reviewed", "review_routed", "qa_sampled",
                "overrides", "agreement_items", "agreement_agreed", "reviewer_n", "reviewer_correct", "qa_n",
                "qa_correct", "failed_now", "failed_in_window", "dead_actions_now", "dead_actions_in_window",
                "queue_depth")
    bins: dict[int, dict[str, float]] = {}
    for f in figs:
        for name in additive:
            setattr(total, name, getattr(total, name) + getattr(f, name))
        if f.oldest_wait_seconds is not None:
            total.oldest_wait_seconds = max(total.oldest_wait_seconds or 0.0, f.oldest_wait_seconds)
        for b in f.reliability:
            acc = bins.setdefault(b["bin"], {"n": 0, "conf": 0.0, "ok": 0.0})
            acc["n"] += b["n"]
            acc["conf"] += b["confidence"] * b["n"]
            acc["ok"] += b["accuracy"] * b["n"]
    total.reliability = [
        {"bin": k, "n": int(v["n"]), "confidence": v["conf"] / v["n"], "accuracy": v["ok"] / v["n"]}
        for k, v in sorted(bins.items())
    ]
    total.calibration_n, total.ece = expected_calibration_error(total.reliability)
    scored = lag_percentiles(start=start, end=end, stage="scored", by_source=False).get(0)
    decided = lag_percentiles(start=start, end=end, stage="decided", by_source=False).get(0)
    total.lag_scored = (scored[1], scored[2]) if scored else (None, None)
    total.lag_decided = (decided[1], decided[2]) if decided else (None, None)
    total.handling_p50_seconds = handling_median(start=start, end=end, by_source=False).get(0)
    return total


# --- Time series ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeFrame:
    key: str
    start: datetime
    end: datetime
    bucket_seconds: int
    unit: str  # "hour", "6 hours", "day"

    @property
    def buckets(self) -> int:
        return int((self.end - self.start).total_seconds() // self.bucket_seconds)

    def edges(self) -> list[datetime]:
        return [self.start + timedelta(seconds=i * self.bucket_seconds) for i in range(self.buckets)]


RANGES: dict[str, tuple[timedelta, int, str]] = {
    "24h": (timedelta(hours=24), 3600, "hour"),
    "7d": (timedelta(days=7), 6 * 3600, "6 hours"),
    "30d": (timedelta(days=30), 86400, "day"),
}


def time_frame(*, key: str, now: datetime) -> TimeFrame:
    """Buckets aligned to UTC boundaries; the last one holds ``now`` (it is partial)."""
    span, seconds, unit = RANGES[key]
    epoch = int(now.timestamp())
    end = datetime.fromtimestamp((epoch // seconds + 1) * seconds, tz=now.tzinfo or timezone.get_current_timezone())
    return TimeFrame(key, end - span, end, seconds, unit)


def _series(qs: QuerySet, path: str, frame: TimeFrame, **aggregates: Any) -> dict[str, list[float]]:
    """{aggregate name: one value per bucket (0 when empty)} from one grouped query."""
    qs = _window(qs, path, frame.start, frame.end).annotate(_b=BucketIndex(F(path), start=frame.start,
                                                                            seconds=frame.bucket_seconds))
    out = {name: [0.0] * frame.buckets for name in aggregates}
    for row in qs.values("_b").annotate(**aggregates).order_by():
        b = row["_b"]
        if b is not None and 0 <= b < frame.buckets:
            for name in aggregates:
                out[name][b] = float(row[name] or 0)
    return out


def _percentile_series(qs: QuerySet, path: str, value: Any, frame: TimeFrame,
                       fractions: tuple[float, ...]) -> list[list[float | None]]:
    qs = _window(qs, path, frame.start, frame.end)
    result = _percentiles(qs, value=value, fractions=fractions,
                          group={"_b": BucketIndex(F(path), start=frame.start, seconds=frame.bucket_seconds)})
    out: list[list[float | None]] = [[None] * frame.buckets for _ in fractions]
    for (b,), (_n, values) in result.items():
        if b is not None and 0 <= b < frame.buckets:
            for i, v in enumerate(values):
                out[i][b] = v
    return out


def _queue_history(frame: TimeFrame, *, now: datetime, source_id: int | None) -> tuple[list[float], list[float | None]]:
    """Tasks waiting (created, not completed) at each bucket's end, and the oldest one's age: one query
    with a filtered aggregate per bucket."""
    qs = _by_source(ReviewTask.objects.exclude(state=ReviewTask.State.CANCELLED), "source_id", source_id)
    qs = qs.filter(Q(completed_at__isnull=True) | Q(completed_at__gte=frame.start), created_at__lt=frame.end)
    points = [min(e + timedelta(seconds=frame.bucket_seconds), now) for e in frame.edges()]
    aggregates: dict[str, Any] = {}
    for i, t in enumerate(points):
        waiting = Q(created_at__lte=t) & (Q(completed_at__isnull=True) | Q(completed_at__gt=t))
        aggregates[f"n{i}"] = Count("id", filter=waiting)
        aggregates[f"o{i}"] = Min("created_at", filter=waiting)
    row = qs.aggregate(**aggregates)
    depth = [float(row[f"n{i}"] or 0) for i in range(len(points))]
    age = [max((t - row[f"o{i}"]).total_seconds(), 0.0) if row[f"o{i}"] else None for i, t in enumerate(points)]
    return depth, age


def dashboard_series(*, frame: TimeFrame, now: datetime, source_id: int | None = None) -> dict[str, Any]:
    """Every chart's data for one source (or all), one value per bucket of ``frame``."""
    items = _by_source(Item.objects.all(), "source_id", source_id)
    received = _series(items, "received_at", frame, n=Count("id"))["n"]
    scored = _series(items.filter(prediction__isnull=False), "prediction__created_at", frame, n=Count("id"))["n"]
    failed = _series(items.filter(state=Item.State.FAILED), "state_changed_at", frame, n=Count("id"))["n"]
    decisions = _by_source(Decision.objects.all(), "item__source_id", source_id)
    top = Coalesce(F("prediction__top_label"), F("item__prediction__top_label"))
    reviewer_review = Q(origin=Decision.Origin.REVIEWER, verdict__task__kind__in=HUMAN_REVIEW_KINDS)
    d = _series(
        decisions.annotate(_top=top), "created_at", frame,
        auto=Count("id", filter=Q(origin=Decision.Origin.MODEL)),
        overrides=Count("id", filter=Q(supersedes__origin=Decision.Origin.MODEL)),
        rev_n=Count("id", filter=reviewer_review & Q(_top__isnull=False)),
        rev_ok=Count("id", filter=reviewer_review & Q(label=F("_top"))),
    )
    verdicts = _by_source(Verdict.objects.filter(withdrawn_at__isnull=True), "item__source_id", source_id)
    reviewed = _series(verdicts, "created_at", frame, n=Count("id"))["n"]
    (handling_p50,) = _percentile_series(verdicts, "created_at", F("handling_ms") / 1000.0, frame, (0.5,))
    tasks = _by_source(ReviewTask.objects.all(), "source_id", source_id)
    t = _series(tasks, "created_at", frame, review=Count("id", filter=Q(kind=ReviewTask.Kind.REVIEW, round=1)),
                qa=Count("id", filter=Q(kind=ReviewTask.Kind.QA)))
    qa_labels = _by_source(Label.objects.filter(origin=Label.Origin.QA, item__prediction__isnull=False),
                           "source_id", source_id)
    qa = _series(qa_labels, "created_at", frame, n=Count("id"),
                 ok=Count("id", filter=Q(label=F("item__prediction__top_label"))))
    lag_scored = _percentile_series(
        items.filter(prediction__isnull=False), "prediction__created_at",
        SecondsBetween(F("prediction__created_at"), F("received_at")), frame, (0.5, 0.95))
    lag_decided = _percentile_series(
        decisions.filter(supersedes__isnull=True), "created_at",
        SecondsBetween(F("created_at"), F("item__received_at")), frame, (0.5, 0.95))
    runs = _by_source(ActionRun.objects.filter(state=ActionRun.State.DEAD), "decision__item__source_id", source_id)
    dead = _series(runs, "state_changed_at", frame, n=Count("id"))["n"]
    depth, oldest = _queue_history(frame, now=now, source_id=source_id)
    routed = [a + r for a, r in zip(d["auto"], t["review"], strict=True)]
    return {
        "frame": frame,
        "received": received,
        "scored": scored,
        "auto_decided": d["auto"],
        "reviewed": reviewed,
        "automation_share": [_share(a, n) for a, n in zip(d["auto"], routed, strict=True)],
        "human_share": [_share(r + q, n) for r, q, n in zip(t["review"], t["qa"], routed, strict=True)],
        "lag_scored_p50": lag_scored[0],
        "lag_scored_p95": lag_scored[1],
        "lag_decided_p50": lag_decided[0],
        "lag_decided_p95": lag_decided[1],
        "handling_p50": handling_p50,
        "accuracy_vs_reviewers": [_share(ok, n) for ok, n in zip(d["rev_ok"], d["rev_n"], strict=True)],
        "accuracy_vs_qa": [_share(ok, n) for ok, n in zip(qa["ok"], qa["n"], strict=True)],
        "overrides": d["overrides"],
        "failed": failed,
        "dead_actions": dead,
        "queue_depth": depth,
        "oldest_wait": oldest,
    }


# --- Schema drift -----------------------------------------------------------------------------------


def _reason(message: str) -> str:
    """A row error's message without the offending value, so equal reasons group together:
    "'abc' is not of type 'number'" -> "value is not of type 'number'"."""
    head, sep, tail = message.partition(" is ")
    if sep and len(head) <= 200 and not head.startswith("the "):
        return f"value is {tail}"[:300]
    return message[:300]


def rejected_rows(*, source_id: int, since: datetime, batches: int = 20, reasons: int = 10) -> dict[str, Any]:
    """Rejected rows per batch, per day, and by reason (field and message without the value)."""
    recent = IngestBatch.objects.filter(source_id=source_id, created_at__gte=since)
    per_batch = list(
        recent.order_by("-created_at", "-id").values("id", "filename", "created_at", "received", "rejected",
                                                     "status")[:batches]
    )
    by_day = [
        {"day": row["day"], "received": row["received"] or 0, "rejected": row["rejected"] or 0}
        for row in recent.annotate(day=TruncDate("created_at"))
        .values("day").annotate(received=Sum("received"), rejected=Sum("rejected")).order_by("day")
    ]
    grouped: dict[tuple[str, str], int] = defaultdict(int)
    errors = BatchRowError.objects.filter(batch__source_id=source_id, batch__created_at__gte=since)
    for row in errors.values("field", "message").annotate(n=Count("id")).order_by("-n")[:2000]:
        grouped[(row["field"], _reason(row["message"]))] += row["n"]
    top = sorted(grouped.items(), key=lambda kv: (-kv[1], kv[0]))[:reasons]
    return {
        "per_batch": per_batch,
        "by_day": by_day,
        "reasons": [{"field": f, "reason": r, "rows": n} for (f, r), n in top],
        "total_rejected": sum(b["rejected"] or 0 for b in by_day),
    }


def unknown_fields(*, source_id: int, since: datetime, limit: int = 50) -> dict[str, Any]:
    """Payload keys the item's schema version does not declare, per field, per batch and per day, over
    items received since ``since``. One grouped query over the payload keys (jsonb_object_keys / json_each)."""
    item, schema = Item._meta.db_table, "ingest_schemaversion"
    if connection.vendor == "postgresql":
        # A payload that is not an object (never stored by ingest, but cheap to guard) has no keys.
        keys = ("CROSS JOIN LATERAL jsonb_object_keys(CASE WHEN jsonb_typeof(i.payload) = 'object' "
                "THEN i.payload ELSE '{}'::jsonb END) AS k(key)")
        unknown = "NOT ((sv.json_schema -> 'properties') ? k.key)"
        day = "DATE(i.received_at AT TIME ZONE 'UTC')"
    else:
        keys = "JOIN json_each(i.payload) AS k"
        unknown = "json_type(sv.json_schema, '$.properties.\"' || k.key || '\"') IS NULL"
        day = "DATE(i.received_at)"
    # Only constants are interpolated; the source id and time are parameters.
    sql = (
        f"SELECT k.key, i.batch_id, {day}, COUNT(*) FROM {item} i {keys} "  # noqa: S608
        f"JOIN {schema} sv ON sv.id = i.schema_version_id "
        f"WHERE i.source_id = %s AND i.received_at >= %s AND {unknown} "
        f"GROUP BY k.key, i.batch_id, {day}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [source_id, since])
        rows = cursor.fetchall()
    fields: dict[str, dict[str, Any]] = {}
    by_batch: dict[tuple[int | None, str], int] = defaultdict(int)
    by_day: dict[str, int] = defaultdict(int)
    for key, batch_id, d, n in rows:
        entry = fields.setdefault(key, {"field": key, "items": 0, "batches": set()})
        entry["items"] += n
        if batch_id is not None:
            entry["batches"].add(batch_id)
        by_batch[(batch_id, key)] += n
        by_day[str(d)] += n
    ranked = sorted(fields.values(), key=lambda e: (-e["items"], e["field"]))[:limit]
    return {
        "fields": [{"field": e["field"], "items": e["items"], "batches": len(e["batches"])} for e in ranked],
        "by_batch": [{"batch_id": b, "field": k, "items": n}
                     for (b, k), n in sorted(by_batch.items(), key=lambda kv: (-(kv[0][0] or 0), kv[0][1]))][:limit],
        "by_day": [{"day": d, "items": n} for d, n in sorted(by_day.items())],
        "field_count": len(fields),
    }


# --- Small reads for views and metrics --------------------------------------------------------------


def sources() -> QuerySet[Source]:
    return Source.objects.order_by("slug")


def drift_history(*, source_id: int, limit: int = 48) -> list[DriftReport]:
    return list(DriftReport.objects.filter(source_id=source_id).order_by("-computed_at", "-id")[:limit])[::-1]


def alert_rules() -> QuerySet[AlertRule]:
    return AlertRule.objects.select_related("source").order_by("name")


def task_stats() -> QuerySet[TaskStat]:
    return TaskStat.objects.order_by("task")


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
