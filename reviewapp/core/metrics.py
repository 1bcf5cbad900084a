"""Prometheus metrics read from the ledger at scrape time (never counters kept by signals).

Labels are bounded: source slugs, states, kinds, origins, task names, alert rule names and schema feature
names, never item ids or payload values. Windowed gauges (shares, accuracy, calibration, lags) cover the
last ``OBSERVABILITY_METRICS_WINDOW_HOURS`` (24 by default; lag quantiles ``OBSERVABILITY_LAG_WINDOW_HOURS``,
1 by default); counters count every row ever written, so ``rate()`` works on them. A scrape costs a fixed
number of grouped queries (about forty) whatever the data volume.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, F, Q, Sum
from django.utils import timezone
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Upper bounds (seconds) of the verdict handling-time histogram.
HANDLING_BUCKETS = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def _hours(name: str, default: int) -> int:
    return int(getattr(settings, name, default))


class LedgerCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        from reviewapp.ingest.models import IngestBatch, Item, Source
        from reviewapp.review.models import ReviewTask

        slugs: dict[int, str] = dict(Source.objects.values_list("pk", "slug"))
        items = GaugeMetricFamily("reviewapp_items", "Items per source and state", labels=["source", "state"])
        for row in Item.objects.values("source__slug", "state").annotate(n=Count("id")).order_by():
            items.add_metric([row["source__slug"], row["state"]], row["n"])
        yield items
        tasks = GaugeMetricFamily("reviewapp_review_tasks", "Review tasks per kind and state", labels=["kind", "state"])
        for row in ReviewTask.objects.values("kind", "state").annotate(n=Count("id")).order_by():
            tasks.add_metric([row["kind"], row["state"]], row["n"])
        yield tasks
        batches = GaugeMetricFamily("reviewapp_batches", "Ingest batches per status", labels=["status"])
        for row in IngestBatch.objects.values("status").annotate(n=Count("id")).order_by():
            batches.add_metric([row["status"]], row["n"])
        yield batches
        yield from self._counters(slugs)
        yield from self._window_gauges(slugs)
        yield from self._handling_histogram(slugs)
        yield from self._actions(slugs)
        yield from self._drift(slugs)
        yield from self._alerts()
        yield from self._celery_tasks()
        from reviewapp.review.policy_services import promise_breach_metrics

        yield from promise_breach_metrics()

    # --- counters over the whole ledger ---------------------------------------------------------------

    def _counters(self, slugs: dict[int, str]) -> Iterator[Metric]:
        from reviewapp.ingest.models import IngestBatch, Item
        from reviewapp.review.models import Decision, Verdict
        from scoring.models import Prediction

        received = CounterMetricFamily("reviewapp_items_received", "Items received", labels=["source"])
        for row in Item.objects.values("source_id").annotate(n=Count("id")).order_by():
            received.add_metric([slugs.get(row["source_id"], "?")], row["n"])
        yield received
        predictions = CounterMetricFamily("reviewapp_predictions", "Predictions made by champions (shadow models "
                                          "excluded)", labels=["source"])
        champion_made = Prediction.objects.filter(model_version__is_shadow=False)
        for row in champion_made.values(s=F("item__source_id")).annotate(n=Count("id")).order_by():
            predictions.add_metric([slugs.get(row["s"], "?")], row["n"])
        yield predictions
        decisions = CounterMetricFamily("reviewapp_decisions", "Decisions per origin (model = auto-decided)",
                                        labels=["source", "origin"])
        overrides = CounterMetricFamily("reviewapp_overrides", "Auto-decisions overridden by a reviewer",
                                        labels=["source"])
        per_source_overrides: dict[int, int] = {}
        for row in Decision.objects.values("origin", s=F("item__source_id")).annotate(
            n=Count("id"), o=Count("id", filter=Q(supersedes__origin=Decision.Origin.MODEL))
        ).order_by():
            decisions.add_metric([slugs.get(row["s"], "?"), row["origin"]], row["n"])
            per_source_overrides[row["s"]] = per_source_overrides.get(row["s"], 0) + row["o"]
        for sid, n in sorted(per_source_overrides.items()):
            overrides.add_metric([slugs.get(sid, "?")], n)
        yield decisions
        yield overrides
        verdicts = CounterMetricFamily("reviewapp_verdicts", "Verdicts recorded (not withdrawn)", labels=["source"])
        for row in Verdict.objects.filter(withdrawn_at__isnull=True).values(s=F("item__source_id")).annotate(
            n=Count("id")
        ).order_by():
            verdicts.add_metric([slugs.get(row["s"], "?")], row["n"])
        yield verdicts
        rejected = CounterMetricFamily("reviewapp_rejected_rows", "Upload rows rejected by validation",
                                       labels=["source"])
        for row in IngestBatch.objects.values("source_id").annotate(n=Sum("rejected")).order_by():
            rejected.add_metric([slugs.get(row["source_id"], "?")], row["n"] or 0)
        yield rejected

    # --- gauges over a recent window ------------------------------------------------------------------

    def _window_gauges(self, slugs: dict[int, str]) -> Iterator[Metric]:
        from reviewapp.observability import selectors

        now = timezone.now()
        hours = _hours("OBSERVABILITY_METRICS_WINDOW_HOURS", 24)
        figs = selectors.source_figures(start=now - timedelta(hours=hours), end=now + timedelta(microseconds=1),
                                        now=now)
        window = GaugeMetricFamily("reviewapp_metrics_window_seconds", "Window of the windowed gauges")
        window.add_metric([], hours * 3600)
        yield window
        families: dict[str, GaugeMetricFamily] = {}

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            if name not in families:
                families[name] = GaugeMetricFamily(name, doc, labels=labels)
            return families[name]

        for sid, f in sorted(figs.items()):
            s = slugs.get(sid, "?")
            gauge("reviewapp_queue_depth", "Review tasks waiting (open or claimed)", ["source"]).add_metric(
                [s], f.queue_depth)
            if f.oldest_wait_seconds is not None:
                gauge("reviewapp_queue_oldest_age_seconds", "Age of the oldest waiting review task",
                      ["source"]).add_metric([s], f.oldest_wait_seconds)
            gauge("reviewapp_failed_items", "Items in state failed", ["source"]).add_metric([s], f.failed_now)
            gauge("reviewapp_dead_lettered_actions", "Action runs dead-lettered", ["source"]).add_metric(
                [s], f.dead_actions_now)
            windowed = {
                "reviewapp_automation_share": ("Share of routed items auto-decided", f.automation_share),
                "reviewapp_human_review_share": ("Share of routed items a person reviews (review + QA)",
                                                 f.human_share),
                "reviewapp_reviewer_agreement": ("Share of items seen by several reviewers with one label",
                                                 f.agreement),
                "reviewapp_calibration_error": ("Expected calibration error over recent labels", f.ece),
                "reviewapp_handling_time_median_seconds": ("Median verdict handling time", f.handling_p50_seconds),
            }
            for name, (doc, value) in windowed.items():
                if value is not None:
                    gauge(name, doc, ["source"]).add_metric([s], value)
            for against, value in (("reviewers", f.accuracy_vs_reviewers), ("qa", f.accuracy_vs_qa)):
                if value is not None:
                    gauge("reviewapp_model_accuracy", "Model top label equal to the human label",
                          ["source", "against"]).add_metric([s, against], value)
            for name, value in (("received", f.received), ("scored", f.scored), ("auto_decided", f.auto_decided),
                                ("reviewed", f.reviewed)):
                gauge("reviewapp_window_items", "Items per pipeline step in the window",
                      ["source", "step"]).add_metric([s, name], value)
        lag_hours = _hours("OBSERVABILITY_LAG_WINDOW_HOURS", 1)
        lag = gauge("reviewapp_pipeline_lag_seconds", f"Pipeline lag quantiles over the last {lag_hours} h",
                    ["source", "stage", "quantile"])
        for stage in ("scored", "decided"):
            rows = selectors.lag_percentiles(start=now - timedelta(hours=lag_hours),
                                             end=now + timedelta(microseconds=1), stage=stage)
            for sid, (_n, p50, p95) in sorted(rows.items()):
                for q, value in (("0.5", p50), ("0.95", p95)):
                    if value is not None:
                        lag.add_metric([slugs.get(sid, "?"), stage, q], value)
        yield from families.values()

    def _handling_histogram(self, slugs: dict[int, str]) -> Iterator[Metric]:
        from reviewapp.review.models import Verdict

        hist = HistogramMetricFamily("reviewapp_handling_time_seconds", "Time a reviewer spent per verdict",
                                     labels=["source"])
        aggregates: dict[str, Any] = {f"b{i}": Count("id", filter=Q(handling_ms__lte=b * 1000))
                                      for i, b in enumerate(HANDLING_BUCKETS)}
        rows = (Verdict.objects.filter(withdrawn_at__isnull=True, handling_ms__isnull=False)
                .values(s=F("item__source_id")).annotate(n=Count("id"), total=Sum("handling_ms"), **aggregates)
                .order_by())
        for row in rows:
            buckets = [(str(b), row[f"b{i}"]) for i, b in enumerate(HANDLING_BUCKETS)] + [("+Inf", row["n"])]
            hist.add_metric([slugs.get(row["s"], "?")], buckets, (row["total"] or 0) / 1000.0)
        yield hist

    def _actions(self, slugs: dict[int, str]) -> Iterator[Metric]:
        from actions.models import ActionRun

        runs = GaugeMetricFamily("reviewapp_action_runs", "Action runs per kind and state",
                                 labels=["source", "kind", "state"])
        for row in ActionRun.objects.values("state", kind=F("config__kind"), s=F("decision__item__source_id")).annotate(
            n=Count("id")
        ).order_by():
            runs.add_metric([slugs.get(row["s"], "?"), row["kind"], row["state"]], row["n"])
        yield runs

    def _drift(self, slugs: dict[int, str]) -> Iterator[Metric]:
        from reviewapp.observability import selectors
        from reviewapp.observability.models import DriftReport

        psi = GaugeMetricFamily("reviewapp_drift_psi", "PSI per feature in the latest drift report",
                                labels=["source", "feature"])
        top = GaugeMetricFamily("reviewapp_drift_max_psi", "Highest feature PSI in the latest drift report",
                                labels=["source"])
        unknown = GaugeMetricFamily("reviewapp_schema_unknown_fields", "Payload fields not in the schema, in the "
                                    "latest drift report's window", labels=["source"])
        for sid, report in sorted(selectors.latest_drift_reports().items()):
            s = slugs.get(sid, "?")
            unknown.add_metric([s], (report.schema_drift or {}).get("field_count", 0))
            if report.status != DriftReport.Status.OK:
                continue
            if report.max_psi is not None:
                top.add_metric([s], report.max_psi)
            for feature in report.features:
                psi.add_metric([s, str(feature["name"])], feature["psi"])
        yield psi
        yield top
        yield unknown

    def _alerts(self) -> Iterator[Metric]:
        from reviewapp.observability.services import alerts_evaluate

        firing = GaugeMetricFamily("reviewapp_alert_firing", "1 when the alert rule is past its threshold",
                                   labels=["rule"])
        value = GaugeMetricFamily("reviewapp_alert_value", "The alert rule's figure (worst source)", labels=["rule"])
        for status in alerts_evaluate():
            firing.add_metric([status.rule.name], 1.0 if status.firing else 0.0)
            if status.value is not None:
                value.add_metric([status.rule.name], status.value)
        yield firing
        yield value

    def _celery_tasks(self) -> Iterator[Metric]:
        from reviewapp.observability.models import TASK_LATENCY_BUCKETS, TaskStat

        runs = CounterMetricFamily("reviewapp_celery_task_runs", "Finished Celery task runs per outcome",
                                   labels=["task", "outcome"])
        failures = CounterMetricFamily("reviewapp_celery_task_failures", "Celery task runs that raised",
                                       labels=["task"])
        latency = HistogramMetricFamily("reviewapp_celery_task_duration_seconds", "Celery task run time",
                                        labels=["task"])
        for stat in TaskStat.objects.order_by("task"):
            for column, outcome in (("successes", "success"), ("failures", "failure"), ("retries", "retry")):
                runs.add_metric([stat.task, outcome], getattr(stat, column))
            failures.add_metric([stat.task], stat.failures)
            buckets = [(str(b), getattr(stat, col)) for b, col in TASK_LATENCY_BUCKETS] + [("+Inf", stat.runs)]
            latency.add_metric([stat.task], buckets, stat.duration_sum)
        yield runs
        yield failures
        yield latency
