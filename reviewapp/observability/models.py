"""Alert rules, stored drift reports and the Celery task-run ledger behind /metrics."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone


class AlertRule(models.Model):
    """A threshold on one pipeline figure. A rule without a source applies to every source and fires
    when any of them is past the threshold."""

    class Metric(models.TextChoices):
        QUEUE_AGE = "queue_age_seconds", "Age of the oldest waiting review task (seconds)"
        LAG_P95_SCORED = "lag_p95_scored_seconds", "p95 lag from received to scored (seconds)"
        LAG_P95_DECIDED = "lag_p95_decided_seconds", "p95 lag from received to first decision (seconds)"
        DRIFT_PSI = "drift_psi", "Highest feature PSI in the latest drift report"
        FAILURE_RATE = "failure_rate", "Share of items received in the window that are now failed"
        DEAD_ACTIONS = "dead_actions", "Action runs dead-lettered in the window"
        PROMISE_BREACH = "promise_breach", "QA error lower bound minus the policy's target_error"

    name = models.SlugField(max_length=64, unique=True)
    metric = models.CharField(max_length=32, choices=Metric.choices)
    source = models.ForeignKey("ingest.Source", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    threshold = models.FloatField(help_text="Fires when the figure is strictly above this value.")
    window_hours = models.PositiveIntegerField(default=24, help_text="How far back windowed figures look.")
    enabled = models.BooleanField(default=True)
    description = models.CharField(max_length=300, blank=True)
    # Written by the periodic evaluation (observability.evaluate_alerts); transitions are audited.
    firing = models.BooleanField(default=False)
    firing_since = models.DateTimeField(null=True, blank=True)
    last_value = models.FloatField(null=True, blank=True)
    last_detail = models.CharField(max_length=500, blank=True)
    last_evaluated_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(metric__in=[
                    "queue_age_seconds", "lag_p95_scored_seconds", "lag_p95_decided_seconds", "drift_psi",
                    "failure_rate", "dead_actions", "promise_breach",
                ]),
                name="alertrule_metric_valid",
            ),
            models.CheckConstraint(condition=Q(window_hours__gte=1), name="alertrule_window_positive"),
        ]

    def __str__(self) -> str:
        return self.name


class DriftReport(models.Model):
    """Per-feature PSI of a source's recent items against its champion's training data, plus schema drift
    (payload fields the schema does not know) over the same window."""

    class Status(models.TextChoices):
        OK = "ok"
        INSUFFICIENT_DATA = "insufficient_data"
        NO_MODEL = "no_model"

    source = models.ForeignKey("ingest.Source", on_delete=models.CASCADE, related_name="+")
    model_version = models.ForeignKey(
        "scoring.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    computed_at = models.DateTimeField(default=timezone.now)
    window_days = models.PositiveIntegerField()
    status = models.CharField(max_length=20, choices=Status.choices)
    detail = models.CharField(max_length=500, blank=True)
    n_reference = models.PositiveIntegerField(default=0)
    n_recent = models.PositiveIntegerField(default=0)
    max_psi = models.FloatField(null=True, blank=True)
    top_feature = models.CharField(max_length=200, blank=True)
    # [{"name", "kind", "psi", "bins": [{"bin", "expected", "actual"}]}], most drifted first.
    features = models.JSONField(default=list, blank=True)
    # {"fields": [{"field", "items", "batches"}], "by_batch": [...], "by_day": [...], "items_with_unknown": n}
    schema_drift = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-computed_at", "-id"]
        indexes = [models.Index(fields=["source", "-computed_at"], name="drift_source_time_idx")]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=["ok", "insufficient_data", "no_model"]), name="driftreport_status_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"drift report {self.pk} for source {self.source_id} ({self.status})"


# Upper bounds (seconds) of the task latency histogram; one cumulative counter column each.
TASK_LATENCY_BUCKETS: tuple[tuple[float, str], ...] = (
    (0.05, "le_0_05"), (0.1, "le_0_1"), (0.25, "le_0_25"), (0.5, "le_0_5"), (1.0, "le_1"), (2.5, "le_2_5"),
    (5.0, "le_5"), (10.0, "le_10"), (30.0, "le_30"), (60.0, "le_60"), (300.0, "le_300"), (1800.0, "le_1800"),
)


class TaskStat(models.Model):
    """Cumulative counters for one Celery task name, incremented by one UPDATE per finished run.

    Workers run on other processes and hosts than the web process that serves /metrics; the database
    they already share holds the counters, so they survive restarts and never depend on which process
    is scraped. One row per registered task name keeps the label set bounded."""

    task = models.CharField(max_length=200, unique=True)
    runs = models.BigIntegerField(default=0)
    successes = models.BigIntegerField(default=0)
    failures = models.BigIntegerField(default=0)
    retries = models.BigIntegerField(default=0)
    duration_sum = models.FloatField(default=0.0)
    le_0_05 = models.BigIntegerField(default=0)
    le_0_1 = models.BigIntegerField(default=0)
    le_0_25 = models.BigIntegerField(default=0)
    le_0_5 = models.BigIntegerField(default=0)
    le_1 = models.BigIntegerField(default=0)
    le_2_5 = models.BigIntegerField(default=0)
    le_5 = models.BigIntegerField(default=0)
    le_10 = models.BigIntegerField(default=0)
    le_30 = models.BigIntegerField(default=0)
    le_60 = models.BigIntegerField(default=0)
    le_300 = models.BigIntegerField(default=0)
    le_1800 = models.BigIntegerField(default=0)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_failure_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["task"]

    def __str__(self) -> str:
        return f"{self.task}: {self.runs} runs, {self.failures} failures"
