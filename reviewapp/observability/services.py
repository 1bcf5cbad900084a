"""Writes of the observability app: drift reports, alert evaluation and rules, the task-run ledger."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from reviewapp.core.audit import audit_record
from reviewapp.core.errors import ValidationFailed
from reviewapp.ingest.models import Item, SchemaVersion, Source
from reviewapp.observability import ledger, selectors
from reviewapp.observability.models import AlertRule, DriftReport
from reviewapp.review.models import Label
from scoring.models import ModelVersion

if TYPE_CHECKING:
    from reviewapp.observability.drift import FeatureDrift

logger = logging.getLogger(__name__)


def _setting(name: str, default: Any) -> Any:
    return getattr(settings, name, default)


# The Celery task ledger lives in a module of its own so that the worker signal hooks import nothing heavy.
task_stat_record = ledger.task_stat_record


# --- Drift ------------------------------------------------------------------------------------------


def _reference_payloads(champion: ModelVersion, *, cap: int) -> list[dict[str, Any]]:
    """Payloads of the labels the champion was trained on: the snapshot's label id range when recorded,
    else the labels that existed at training time; labels withdrawn before training are left out."""
    trained_at = champion.trained_at or champion.created_at
    labels = Label.objects.filter(source_id=champion.source_id)
    snapshot = champion.label_snapshot or {}
    if snapshot.get("max_label_id") is not None:
        labels = labels.filter(pk__lte=snapshot["max_label_id"], pk__gte=snapshot.get("min_label_id") or 0)
    else:
        labels = labels.filter(created_at__lte=trained_at)
    labels = labels.filter(Q(withdrawn_at__isnull=True) | Q(withdrawn_at__gt=trained_at))
    return list(labels.order_by("-id").values_list("item__payload", flat=True)[:cap])


def _spec_for(champion: ModelVersion, source: Source) -> dict[str, Any]:
    from scoring.features import feature_spec_from_schema

    spec = champion.feature_spec or {}
    if "numeric" in spec and "categorical" in spec:
        return spec
    schema = champion.schema_version or SchemaVersion.objects.filter(source=source).order_by("-major", "-minor").first()
    return feature_spec_from_schema(
        schema.json_schema if schema else {}, id_field=source.id_field, label_field=source.label_field,
        text_fields=list(source.text_fields or []),
    )


def _drift_features(reference: list[dict[str, Any]], recent: list[dict[str, Any]],
                    spec: dict[str, Any]) -> list[FeatureDrift]:
    # pandas and scikit-learn load only where drift is computed (the worker), not in every web process.
    import pandas as pd

    from reviewapp.observability import drift
    from scoring.features import DATETIME_PARTS, frame_from_payloads

    ref, rec = frame_from_payloads(reference, spec), frame_from_payloads(recent, spec)
    numeric = list(spec["numeric"]) + list(spec["boolean"])
    numeric += [f"{name}__{part}" for name in spec.get("datetime", []) for part in DATETIME_PARTS]
    categorical = [c["name"] for c in spec["categorical"]]
    # Free text drifts in many ways; its length is a cheap, telling summary.
    for name in spec["text"]:
        ref[f"{name}.length"] = ref[name].str.len().astype("float64")
        rec[f"{name}.length"] = rec[name].str.len().astype("float64")
        numeric.append(f"{name}.length")
    numeric = [c for c in dict.fromkeys(numeric) if c in ref.columns]
    return drift.frame_drift(pd.DataFrame(ref), pd.DataFrame(rec), numeric=numeric, categorical=categorical)


def drift_compute(*, source_id: int, window_days: int | None = None, now: datetime | None = None,
                  actor: Any | None = None) -> DriftReport:
    """Compare the source's items of the last ``window_days`` with its champion's training data and
    record a DriftReport (also when there is no champion or too little data: the report says why)."""
    window_days = int(window_days or _setting("OBSERVABILITY_DRIFT_WINDOW_DAYS", 7))
    if not 1 <= window_days <= 365:
        raise ValidationFailed("The drift window must be 1 to 365 days.",
                               [{"field": "window_days", "message": "between 1 and 365"}])
    now = now or timezone.now()
    since = now - timedelta(days=window_days)
    cap = int(_setting("OBSERVABILITY_DRIFT_MAX_ROWS", 20_000))
    min_rows = int(_setting("OBSERVABILITY_DRIFT_MIN_ROWS", 50))
    source = Source.objects.get(pk=source_id)
    report = DriftReport(source=source, computed_at=now, window_days=window_days, status=DriftReport.Status.OK)
    report.schema_drift = selectors.unknown_fields(source_id=source.pk, since=since)
    champion = ModelVersion.objects.filter(source=source, is_champion=True).first()
    if champion is None:
        report.status, report.detail = DriftReport.Status.NO_MODEL, "No champion model: nothing to compare with."
    else:
        report.model_version = champion
        reference = _reference_payloads(champion, cap=cap)
        recent = list(
            Item.objects.filter(source=source, received_at__gte=since, received_at__lte=now)
            .exclude(labels__origin=Label.Origin.IMPORT)
            .order_by("-id").values_list("payload", flat=True)[:cap]
        )
        report.n_reference, report.n_recent = len(reference), len(recent)
        if len(reference) < min_rows or len(recent) < min_rows:
            report.status = DriftReport.Status.INSUFFICIENT_DATA
            report.detail = (f"Need at least {min_rows} training rows and {min_rows} recent items; have "
                             f"{len(reference)} and {len(recent)}.")
        else:
            features = _drift_features(reference, recent, _spec_for(champion, source))
            report.features = [f.as_dict() for f in features]
            if features:
                report.max_psi, report.top_feature = features[0].psi, features[0].name[:200]
    with transaction.atomic():
        report.save()
        audit_record(
            actor=actor, verb="drift.computed", object_type="source", object_id=source.pk,
            after={"report": report.pk, "status": report.status, "window_days": window_days,
                   "model_version": champion.version if champion else None, "max_psi": report.max_psi,
                   "top_feature": report.top_feature, "n_reference": report.n_reference,
                   "n_recent": report.n_recent, "unknown_fields": report.schema_drift.get("field_count", 0)},
        )
    logger.info("drift computed", extra={"source": source.slug, "status": report.status, "max_psi": report.max_psi})
    return report


def drift_compute_all(*, window_days: int | None = None, now: datetime | None = None) -> list[DriftReport]:
    """One report per source that has received items (sources without a champion get a no_model report)."""
    ids = list(Source.objects.filter(items__isnull=False).distinct().values_list("pk", flat=True))
    return [drift_compute(source_id=sid, window_days=window_days, now=now) for sid in sorted(ids)]


# --- Alerts -----------------------------------------------------------------------------------------

UNITS = {
    AlertRule.Metric.QUEUE_AGE: "seconds",
    AlertRule.Metric.LAG_P95_SCORED: "seconds",
    AlertRule.Metric.LAG_P95_DECIDED: "seconds",
    AlertRule.Metric.DRIFT_PSI: "psi",
    AlertRule.Metric.FAILURE_RATE: "share",
    AlertRule.Metric.DEAD_ACTIONS: "count",
    AlertRule.Metric.PROMISE_BREACH: "share",
}


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "seconds":
        return format_duration(value)
    if unit == "share":
        return f"{value * 100:.1f}%"
    if unit == "count":
        return f"{value:.0f}"
    return f"{value:.3f}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


@dataclass
class AlertStatus:
    rule: AlertRule
    firing: bool
    value: float | None
    source_id: int | None
    detail: str
    # Every covered source past the threshold, with its value.
    breaching: dict[int, float] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return UNITS.get(self.rule.metric, "")


def _promise_values(*, start: datetime, end: datetime) -> dict[int, float]:
    """Per source whose policy promises an error bound: the one-sided lower confidence bound of the QA
    error rate minus the promised ``target_error``. Positive means the promise is broken at the policy's
    confidence (Clopper-Pearson, so a few unlucky samples do not raise it)."""
    from scipy.stats import beta

    policies = {sid: p for sid, p in selectors.current_policies().items() if p.target_error is not None}
    out: dict[int, float] = {}
    for sid, (n, correct) in selectors.qa_outcomes(start=start, end=end).items():
        policy = policies.get(sid)
        if policy is None or n == 0:
            continue
        errors = n - correct
        lower = 0.0 if errors == 0 else float(beta.ppf(1 - policy.confidence, errors, n - errors + 1))
        out[sid] = lower - float(policy.target_error)
    return out


def _metric_values(metric: str, *, window_hours: int, now: datetime) -> dict[int, float]:
    start, end = now - timedelta(hours=window_hours), now + timedelta(microseconds=1)
    if metric == AlertRule.Metric.QUEUE_AGE:
        return {s: age for s, (_n, age) in selectors.queue_now(now=now).items() if age is not None}
    if metric in (AlertRule.Metric.LAG_P95_SCORED, AlertRule.Metric.LAG_P95_DECIDED):
        stage = "scored" if metric == AlertRule.Metric.LAG_P95_SCORED else "decided"
        return {s: p95 for s, (_n, _p50, p95) in selectors.lag_percentiles(start=start, end=end, stage=stage).items()
                if p95 is not None}
    if metric == AlertRule.Metric.DRIFT_PSI:
        return {s: r.max_psi for s, r in selectors.latest_drift_reports().items()
                if r.status == DriftReport.Status.OK and r.max_psi is not None}
    if metric == AlertRule.Metric.FAILURE_RATE:
        return {s: row["failed_in_window"] / row["received"]
                for s, row in selectors.failures(start=start, end=end).items() if row["received"]}
    if metric == AlertRule.Metric.DEAD_ACTIONS:
        # Every source counts, with 0 when none of its runs died.
        counts = {s: 0.0 for s in Source.objects.values_list("pk", flat=True)}
        counts.update({s: float(w) for s, (_n, w) in selectors.dead_actions(start=start, end=end).items()})
        return counts
    if metric == AlertRule.Metric.PROMISE_BREACH:
        return _promise_values(start=start, end=end)
    raise ValueError(f"unknown alert metric {metric!r}")


def alerts_evaluate(*, now: datetime | None = None, rules: list[AlertRule] | None = None) -> list[AlertStatus]:
    """Evaluate the enabled rules against the ledger now (reads only). Rules sharing a metric and window
    share the queries."""
    now = now or timezone.now()
    if rules is None:
        rules = list(AlertRule.objects.filter(enabled=True).select_related("source").order_by("name"))
    slugs = dict(Source.objects.values_list("pk", "slug"))
    cache: dict[tuple[str, int], dict[int, float]] = {}
    statuses = []
    for rule in rules:
        key = (rule.metric, rule.window_hours)
        if key not in cache:
            cache[key] = _metric_values(rule.metric, window_hours=rule.window_hours, now=now)
        values = cache[key]
        if rule.source_id is not None:
            values = {rule.source_id: values[rule.source_id]} if rule.source_id in values else {}
        unit = UNITS.get(rule.metric, "")
        label = AlertRule.Metric(rule.metric).label
        if not values:
            statuses.append(AlertStatus(rule, False, None, rule.source_id, f"{label}: no data yet."))
            continue
        worst = max(values, key=lambda s: (values[s], -s))
        breaching = {s: v for s, v in values.items() if v > rule.threshold}
        where = ", ".join(f"{slugs.get(s, s)} {format_value(v, unit)}" for s, v in sorted(breaching.items()))
        if breaching:
            detail = f"{label} is past {format_value(rule.threshold, unit)}: {where}."
        else:
            detail = (f"{label}: highest {format_value(values[worst], unit)} ({slugs.get(worst, worst)}), "
                      f"threshold {format_value(rule.threshold, unit)}.")
        statuses.append(AlertStatus(rule, bool(breaching), values[worst], worst, detail[:500], breaching))
    return statuses


def alerts_record(*, statuses: list[AlertStatus], now: datetime | None = None) -> dict[str, int]:
    """Store the evaluation on the rules; a rule that starts or stops firing writes an audit event."""
    now = now or timezone.now()
    changed = {"fired": 0, "resolved": 0}
    with transaction.atomic():
        locked = {r.pk: r for r in AlertRule.objects.select_for_update().filter(pk__in=[s.rule.pk for s in statuses])}
        for status in statuses:
            rule = locked.get(status.rule.pk)
            if rule is None:
                continue
            if status.firing != rule.firing:
                verb = "alert.fired" if status.firing else "alert.resolved"
                changed["fired" if status.firing else "resolved"] += 1
                rule.firing_since = now if status.firing else None
                audit_record(actor=None, verb=verb, object_type="alert_rule", object_id=rule.pk,
                             before={"firing": rule.firing}, after={"firing": status.firing, "value": status.value,
                                                                   "detail": status.detail})
                log = logger.warning if status.firing else logger.info
                log("%s: %s", verb, rule.name, extra={"rule": rule.name, "value": status.value})
            rule.firing = status.firing
            rule.last_value = status.value
            rule.last_detail = status.detail[:500]
            rule.last_evaluated_at = now
        AlertRule.objects.bulk_update(
            list(locked.values()), ["firing", "firing_since", "last_value", "last_detail", "last_evaluated_at"]
        )
    return changed


def alert_rule_update(*, rule: AlertRule, actor: Any, threshold: float, enabled: bool,
                      window_hours: int) -> AlertRule:
    if threshold < 0 and rule.metric != AlertRule.Metric.PROMISE_BREACH:
        raise ValidationFailed("The threshold must not be negative.",
                               [{"field": "threshold", "message": "must be 0 or more"}])
    if not 1 <= window_hours <= 24 * 90:
        raise ValidationFailed("The window must be 1 hour to 90 days.",
                               [{"field": "window_hours", "message": "between 1 and 2160"}])
    with transaction.atomic():
        locked = AlertRule.objects.select_for_update().get(pk=rule.pk)
        before = {"threshold": locked.threshold, "enabled": locked.enabled, "window_hours": locked.window_hours}
        locked.threshold, locked.enabled, locked.window_hours = threshold, enabled, window_hours
        if not enabled:
            locked.firing, locked.firing_since = False, None
        locked.save(update_fields=["threshold", "enabled", "window_hours", "firing", "firing_since"])
        audit_record(actor=actor, verb="alert_rule.updated", object_type="alert_rule", object_id=locked.pk,
                     before=before, after={"threshold": threshold, "enabled": enabled, "window_hours": window_hours})
    return locked


# --- Health in words --------------------------------------------------------------------------------


@dataclass
class Health:
    healthy: bool
    reasons: list[str]
    notes: list[str]

    @property
    def label(self) -> str:
        return "healthy" if self.healthy else "needs attention"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.0f}%"


def health_summary(*, figures: selectors.SourceFigures, statuses: list[AlertStatus],
                   source_id: int | None = None, min_routed: int = 20) -> Health:
    """The figures and firing alerts (of ``source_id``, or all) in sentences: what needs attention, and
    whether the model still agrees with people."""
    reasons: list[str] = []
    for status in statuses:
        if status.firing and (source_id is None or source_id in status.breaching):
            reasons.append(status.detail)
    lo, hi = selectors.HUMAN_SHARE_BAND
    share = figures.human_share
    if share is not None and figures.routed >= min_routed and not lo <= share <= hi:
        side = "above" if share > hi else "below"
        reasons.append(f"Human review share is {_pct(share)}, {side} the {_pct(lo)}–{_pct(hi)} band "
                       f"({figures.routed} items routed).")
    if figures.failed_now:
        reasons.append(f"{figures.failed_now} item(s) failed scoring and wait for a retry.")
    if figures.dead_actions_now:
        reasons.append(f"{figures.dead_actions_now} action run(s) are dead-lettered.")
    notes: list[str] = []
    if figures.qa_n:
        notes.append(f"The model agrees with QA reviewers on {_pct(figures.accuracy_vs_qa)} of sampled "
                     f"auto-decisions (n={figures.qa_n}).")
    if figures.reviewer_n:
        notes.append(f"On items sent to review, reviewers chose the model's label "
                     f"{_pct(figures.accuracy_vs_reviewers)} of the time (n={figures.reviewer_n}).")
    if figures.agreement_items:
        notes.append(f"Reviewers agree with each other on {_pct(figures.agreement)} of items seen twice "
                     f"(n={figures.agreement_items}).")
    if figures.overrides:
        notes.append(f"{figures.overrides} auto-decision(s) were overridden by a reviewer.")
    if not notes:
        notes.append("No human verdicts in this window to compare the model with.")
    return Health(not reasons, reasons, notes)
