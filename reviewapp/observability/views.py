"""Dashboard, drift, alerts and decision trail pages. One view, two renderings where htmx polls a partial."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST
from kombu.exceptions import OperationalError as BrokerError

from reviewapp.core.errors import DomainError
from reviewapp.core.roles import can
from reviewapp.ingest.models import Source
from reviewapp.observability import charts, selectors, services, trail
from reviewapp.observability.charts import Series
from reviewapp.observability.forms import AlertRuleForm, DriftComputeForm
from reviewapp.observability.models import AlertRule, DriftReport

DEFAULT_PSI_THRESHOLD = 0.2


def _require(*capabilities: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Any one of ``capabilities`` lets the user in."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @login_required
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not any(can(request.user, c) for c in capabilities):
                raise PermissionDenied("Your role may not see this page.")
            return view(request, *args, **kwargs)

        return wrapper

    return decorator


def can_see_trail(user: Any) -> bool:
    return can(user, "manage_models") or can(user, "manage_policies")


def _selected_source(request: HttpRequest) -> Source | None:
    slug = (request.GET.get("source") or request.POST.get("source") or "").strip()
    return Source.objects.filter(slug=slug).first() if slug else None


def _bucket_labels(frame: selectors.TimeFrame) -> list[str]:
    fmt = {"24h": "%H:%M", "7d": "%a %H:%M", "30d": "%b %d"}[frame.key]
    return [e.strftime(fmt) for e in frame.edges()]


def _dashboard_charts(series: dict[str, Any]) -> dict[str, Any]:
    frame: selectors.TimeFrame = series["frame"]
    labels = _bucket_labels(frame)
    per = frame.unit
    lo, hi = selectors.HUMAN_SHARE_BAND
    return {
        "throughput": charts.line_chart(
            title=f"Items per {per}", labels=labels, css="throughput",
            series=[Series("received", series["received"]), Series("scored", series["scored"]),
                    Series("auto-decided", series["auto_decided"]), Series("reviewed", series["reviewed"])]),
        "queue_depth": charts.line_chart(
            title="Queue depth (tasks waiting)", labels=labels, css="queue-depth",
            series=[Series("waiting", series["queue_depth"])]),
        "oldest_wait": charts.line_chart(
            title="Age of the oldest waiting item", labels=labels, fmt="duration", css="oldest-wait",
            series=[Series("oldest", series["oldest_wait"], color=charts.PALETTE[2])]),
        "shares": charts.line_chart(
            title="Automation and human review share", labels=labels, fmt="pct", y_max=1.0, css="shares",
            band=(lo, hi), band_label=f"planned human review band {lo:.0%}–{hi:.0%}",
            series=[Series("automated", series["automation_share"]),
                    Series("human review", series["human_share"], color=charts.PALETTE[2])]),
        "lag_scored": charts.line_chart(
            title="Lag received → scored", labels=labels, fmt="duration", css="lag-scored",
            series=[Series("median", series["lag_scored_p50"]),
                    Series("p95", series["lag_scored_p95"], color=charts.PALETTE[3], dashed=True)]),
        "lag_decided": charts.line_chart(
            title="Lag received → decided", labels=labels, fmt="duration", css="lag-decided",
            series=[Series("median", series["lag_decided_p50"]),
                    Series("p95", series["lag_decided_p95"], color=charts.PALETTE[3], dashed=True)]),
        "handling": charts.line_chart(
            title="Median handling time per verdict", labels=labels, fmt="duration", css="handling",
            series=[Series("median", series["handling_p50"], color=charts.PALETTE[4])]),
        "accuracy": charts.line_chart(
            title="Model accuracy against people", labels=labels, fmt="pct", y_max=1.0, css="accuracy",
            series=[Series("vs QA samples", series["accuracy_vs_qa"]),
                    Series("vs reviewers", series["accuracy_vs_reviewers"], color=charts.PALETTE[2])]),
        "problems": charts.bar_chart(
            title=f"Overrides, failed items and dead-lettered actions per {per}", categories=labels,
            css="problems", all_labels=False,
            series=[Series("overrides", series["overrides"], color=charts.PALETTE[2]),
                    Series("failed items", series["failed"], color=charts.PALETTE[3]),
                    Series("dead actions", series["dead_actions"], color=charts.PALETTE[6])]),
    }


def _source_rows(figs: dict[int, selectors.SourceFigures], statuses: list[services.AlertStatus],
                 sources: list[Source], drift: dict[int, DriftReport]) -> list[dict[str, Any]]:
    return [
        {"source": s, "figures": figs.get(s.pk) or selectors.SourceFigures(source_id=s.pk),
         "health": services.health_summary(figures=figs.get(s.pk) or selectors.SourceFigures(source_id=s.pk),
                                           statuses=statuses, source_id=s.pk),
         "drift": drift.get(s.pk)}
        for s in sources
    ]


def dashboard_context(*, source: Source | None, range_key: str, now: datetime | None = None) -> dict[str, Any]:
    now = now or timezone.now()
    frame = selectors.time_frame(key=range_key, now=now)
    # Figures cover the range up to now (the frame's last bucket is still filling).
    end = now + timedelta(microseconds=1)
    figs = selectors.source_figures(start=frame.start, end=end, now=now,
                                    source_id=source.pk if source else None)
    sources = list(selectors.sources())
    current = figs.get(source.pk) if source else selectors.overall_figures(figs.values(), start=frame.start, end=end)
    current = current or selectors.SourceFigures(source_id=source.pk if source else 0)
    statuses = services.alerts_evaluate(now=now)
    drift = selectors.latest_drift_reports()
    series = selectors.dashboard_series(frame=frame, now=now, source_id=source.pk if source else None)
    shown = [s for s in sources if source is None or s.pk == source.pk]
    rows = _source_rows(figs, statuses, shown, drift)
    chart_map = _dashboard_charts(series)
    chart_map["calibration"] = charts.reliability_chart(title="Calibration: accuracy per confidence bin",
                                                        bins=current.reliability)
    if source is None and len(shown) > 1:
        lo, hi = selectors.HUMAN_SHARE_BAND
        chart_map["per_source_share"] = charts.bar_chart(
            title="Human review share per source", categories=[r["source"].slug for r in rows], fmt="pct",
            band=(lo, hi), y_max=1.0, css="per-source",
            series=[Series("human review", [r["figures"].human_share for r in rows], color=charts.PALETTE[2]),
                    Series("automated", [r["figures"].automation_share for r in rows])])
    drift_rows = [(s.slug, drift[s.pk].max_psi) for s in shown if s.pk in drift and drift[s.pk].max_psi is not None]
    if drift_rows:
        chart_map["drift"] = charts.hbar_chart(
            title="Highest feature drift (PSI) per source", categories=[d[0] for d in drift_rows],
            values=[d[1] for d in drift_rows], threshold=_psi_threshold(source), css="drift-summary")
    query = {"range": range_key, **({"source": source.slug} if source else {})}
    return {
        "now": now,
        "frame": frame,
        "range_key": range_key,
        "ranges": list(selectors.RANGES),
        "selected_source": source,
        "sources": sources,
        "figures": current,
        "health": services.health_summary(figures=current, statuses=statuses,
                                          source_id=source.pk if source else None),
        "statuses": statuses,
        "firing": [s for s in statuses if s.firing and (source is None or source.pk in s.breaching)],
        "rows": rows,
        "charts": chart_map,
        "band": selectors.HUMAN_SHARE_BAND,
        "refresh_url": f"{reverse('observability:dashboard')}?{urlencode(query)}",
        "source_query": f"&source={source.slug}" if source else "",
    }


@require_GET
@_require("manage_policies", "manage_sources")
def dashboard(request: HttpRequest) -> HttpResponse:
    range_key = request.GET.get("range", "24h")
    if range_key not in selectors.RANGES:
        range_key = "24h"
    context = dashboard_context(source=_selected_source(request), range_key=range_key)
    if request.htmx:
        return render(request, "observability/_dashboard_body.html", context)
    return render(request, "observability/dashboard.html", context)


# --- Drift ------------------------------------------------------------------------------------------


def _psi_threshold(source: Source | None) -> float:
    rules = AlertRule.objects.filter(metric=AlertRule.Metric.DRIFT_PSI, enabled=True)
    if source is not None:
        rules = rules.filter(source__isnull=True) | rules.filter(source=source)
    thresholds = list(rules.values_list("threshold", flat=True))
    return min(thresholds) if thresholds else DEFAULT_PSI_THRESHOLD


@require_GET
@_require("manage_policies", "manage_sources", "manage_models")
def drift_page(request: HttpRequest) -> HttpResponse:
    sources = list(selectors.sources())
    source = _selected_source(request) or (sources[0] if sources else None)
    may_compute = can(request.user, "manage_policies") or can(request.user, "manage_models")
    context: dict[str, Any] = {"sources": sources, "selected_source": source, "form": DriftComputeForm(),
                               "can_compute": may_compute}
    if source is not None:
        threshold = _psi_threshold(source)
        report = selectors.latest_drift_reports(source_id=source.pk).get(source.pk)
        history = selectors.drift_history(source_id=source.pk)
        since = timezone.now() - timedelta(days=report.window_days if report else 7)
        rejected = selectors.rejected_rows(source_id=source.pk, since=since)
        chart_map: dict[str, Any] = {}
        if report and report.features:
            top = report.features[:15]
            chart_map["psi"] = charts.hbar_chart(
                title="PSI per feature (most drifted first)", categories=[f["name"] for f in top],
                values=[f["psi"] for f in top], threshold=threshold, css="psi")
            chart_map["bins"] = [
                charts.bar_chart(
                    title=f"{f['name']}: share per bin (PSI {f['psi']:.3f})", categories=[b["bin"] for b in f["bins"]],
                    fmt="pct", css="bins", all_labels=f["kind"] == "categorical",
                    series=[Series("training data", [b["expected"] for b in f["bins"]]),
                            Series("recent items", [b["actual"] for b in f["bins"]], color=charts.PALETTE[2])])
                for f in report.features[:3]
            ]
        if history:
            chart_map["history"] = charts.line_chart(
                title="Highest PSI per report", labels=[r.computed_at.strftime("%b %d %H:%M") for r in history],
                fmt="float", css="psi-history",
                series=[Series("max PSI", [r.max_psi for r in history], color=charts.PALETTE[3])])
        schema = (report.schema_drift if report else {}) or {}
        if schema.get("fields"):
            chart_map["unknown"] = charts.hbar_chart(
                title="Unknown payload fields (items carrying each)", fmt="int", css="unknown-fields",
                categories=[f["field"] for f in schema["fields"][:15]],
                values=[f["items"] for f in schema["fields"][:15]])
        if schema.get("by_day"):
            chart_map["unknown_days"] = charts.line_chart(
                title="Items with unknown fields per day (by field occurrence)", fmt="int", css="unknown-days",
                labels=[d["day"] for d in schema["by_day"]],
                series=[Series("occurrences", [d["items"] for d in schema["by_day"]], color=charts.PALETTE[2])])
        if rejected["per_batch"]:
            batches = rejected["per_batch"][::-1]
            chart_map["rejected"] = charts.bar_chart(
                title="Rejected rows per batch", fmt="int", css="rejected",
                categories=[f"#{b['id']}" for b in batches],
                series=[Series("rejected", [b["rejected"] for b in batches], color=charts.PALETTE[3])])
        if rejected["by_day"]:
            chart_map["rejected_days"] = charts.line_chart(
                title="Rows received and rejected per day", fmt="int", css="rejected-days",
                labels=[d["day"].strftime("%b %d") for d in rejected["by_day"]],
                series=[Series("received", [d["received"] for d in rejected["by_day"]]),
                        Series("rejected", [d["rejected"] for d in rejected["by_day"]], color=charts.PALETTE[3])])
        context.update({
            "report": report, "threshold": threshold, "schema": schema, "rejected": rejected,
            "charts": chart_map,
            "drifted": [f for f in (report.features if report else []) if f["psi"] > threshold],
        })
    return render(request, "observability/drift.html", context)


@require_POST
@_require("manage_policies", "manage_models")
def drift_compute(request: HttpRequest) -> HttpResponse:
    from reviewapp.observability.tasks import compute_drift

    source = _selected_source(request)
    form = DriftComputeForm(request.POST)
    target = reverse("observability:drift") + (f"?source={source.slug}" if source else "")
    if source is None or not form.is_valid():
        messages.error(request, "Choose a source and a window of 1 to 365 days.")
        return redirect(target)
    try:
        compute_drift.apply_async(kwargs={"source_id": source.pk, "window_days": form.cleaned_data["window_days"]})
    except BrokerError:
        messages.error(request, "The task queue is unreachable; the drift report was not started.")
        return redirect(target)
    messages.success(request, f"Drift computation for {source.slug} started; refresh in a moment.")
    return redirect(target)


# --- Alerts -----------------------------------------------------------------------------------------


@require_GET
@_require("manage_policies", "manage_sources")
def alerts_page(request: HttpRequest) -> HttpResponse:
    rules = list(selectors.alert_rules())
    statuses = {s.rule.pk: s for s in services.alerts_evaluate(rules=[r for r in rules if r.enabled])}
    editable = can(request.user, "manage_policies")
    rows = [{"rule": r, "status": statuses.get(r.pk), "unit": services.UNITS.get(r.metric, ""),
             "form": AlertRuleForm(instance=r, prefix=f"r{r.pk}") if editable else None} for r in rules]
    return render(request, "observability/alerts.html", {"rows": rows, "editable": editable})


@require_POST
@_require("manage_policies")
def alert_rule_edit(request: HttpRequest, pk: int) -> HttpResponse:
    rule = get_object_or_404(AlertRule, pk=pk)
    form = AlertRuleForm(request.POST, instance=rule, prefix=f"r{rule.pk}")
    if not form.is_valid():
        messages.error(request, f"Rule {rule.name} was not changed: " + "; ".join(
            f"{k}: {', '.join(v)}" for k, v in form.errors.items()))
        return redirect("observability:alerts")
    try:
        services.alert_rule_update(rule=rule, actor=request.user, threshold=form.cleaned_data["threshold"],
                                   enabled=form.cleaned_data["enabled"], window_hours=form.cleaned_data["window_hours"])
    except DomainError as exc:
        messages.error(request, str(exc))
        return redirect("observability:alerts")
    messages.success(request, f"Rule {rule.name} saved.")
    return redirect("observability:alerts")


# --- Decision trail ---------------------------------------------------------------------------------


@require_GET
@login_required
def decision_trail(request: HttpRequest, pk: int) -> HttpResponse:
    if not can_see_trail(request.user):
        raise PermissionDenied("Only admins and ML engineers see decision trails.")
    try:
        data = trail.decision_trail(decision_id=pk)
    except DomainError as exc:
        return render(request, "observability/trail_missing.html", {"message": str(exc)}, status=404)
    return render(request, "observability/trail.html", {
        "trail": data,
        "json_url": reverse("api-decision-trail", args=[pk]),
    })
