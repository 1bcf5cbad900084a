"""Downstream actions: per-source configuration, the egress allow-list and the outbox of action runs.

An ActionRun is the ledger row of one delivery: it is written in the transaction that creates its
decision, and a Celery message only wakes a worker up to deliver it (see services.py).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class ActionConfig(models.Model):
    """What to do when a source's item is decided with a given label (blank label: any label)."""

    class Kind(models.TextChoices):
        WEBHOOK = "webhook", "Signed webhook"
        TICKET = "ticket", "Ticket (HTTP JSON template)"
        LOG = "log", "Internal log"

    source = models.ForeignKey("ingest.Source", on_delete=models.CASCADE, related_name="action_configs")
    label = models.CharField(max_length=100, blank=True, help_text="Blank: every label.")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    name = models.CharField(max_length=200)
    url = models.CharField(max_length=2000, blank=True)
    # Needed in clear to sign requests; shown once at creation, never rendered again.
    secret = models.CharField(max_length=200, blank=True)
    template = models.JSONField(default=dict, blank=True, help_text="Ticket body with {{placeholders}}.")
    high_risk = models.BooleanField(default=False, help_text="Runs wait for a second person's approval.")
    compensating_config = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="compensates_for",
        help_text="Queued when a decision that already acted through this action is overridden.",
    )
    compensation_only = models.BooleanField(
        default=False, help_text="Never triggered by a decision directly; only as another action's compensation."
    )
    enabled = models.BooleanField(default=True)
    connect_timeout_seconds = models.FloatField(default=5.0)
    read_timeout_seconds = models.FloatField(default=10.0)
    max_attempts = models.PositiveSmallIntegerField(default=8)
    # Null: ACTIONS_BACKOFF_BASE_SECONDS / ACTIONS_BACKOFF_MAX_SECONDS from settings at delivery time.
    backoff_base_seconds = models.FloatField(null=True, blank=True)
    backoff_max_seconds = models.FloatField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["source", "name"]
        constraints = [
            models.UniqueConstraint(fields=["source", "name"], name="actionconfig_unique_name"),
            models.CheckConstraint(condition=Q(kind__in=["webhook", "ticket", "log"]), name="actionconfig_kind_valid"),
            models.CheckConstraint(condition=Q(max_attempts__gte=1), name="actionconfig_max_attempts_positive"),
            models.CheckConstraint(
                condition=Q(connect_timeout_seconds__gt=0) & Q(read_timeout_seconds__gt=0),
                name="actionconfig_timeouts_positive",
            ),
        ]
        indexes = [
            models.Index(fields=["source", "label"], condition=Q(enabled=True), name="actionconfig_enabled_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.source_id}:{self.name} ({self.kind})"


class ActionRun(models.Model):
    """One action for one decision: the outbox row. Its idempotency key goes out with every attempt."""

    class State(models.TextChoices):
        PENDING_APPROVAL = "pending_approval", "Waiting for approval"
        PENDING = "pending"
        DELIVERING = "delivering"
        DELIVERED = "delivered"
        FAILED = "failed", "Failed (not retried)"
        DEAD = "dead", "Dead-lettered"
        REJECTED = "rejected"

    decision = models.ForeignKey("review.Decision", on_delete=models.PROTECT, related_name="action_runs")
    config = models.ForeignKey(ActionConfig, on_delete=models.PROTECT, related_name="runs")
    idempotency_key = models.CharField(max_length=64)
    state = models.CharField(max_length=20, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    approved_at = models.DateTimeField(null=True, blank=True)
    rejected_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    rejected_at = models.DateTimeField(null=True, blank=True)
    rejection_reason = models.CharField(max_length=500, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    is_compensation = models.BooleanField(default=False)
    compensates = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="compensations"
    )
    created_at = models.DateTimeField(default=timezone.now)
    # When the state last changed: the reconciler finds runs stuck in `delivering` by it.
    state_changed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["idempotency_key"], name="actionrun_idempotency_key_unique"),
            models.CheckConstraint(
                condition=Q(
                    state__in=["pending_approval", "pending", "delivering", "delivered", "failed", "dead", "rejected"]
                ),
                name="actionrun_state_valid",
            ),
            models.CheckConstraint(
                condition=~Q(state="pending") | Q(next_attempt_at__isnull=False), name="actionrun_pending_has_due"
            ),
            models.CheckConstraint(
                condition=Q(is_compensation=False) | Q(compensates__isnull=False),
                name="actionrun_compensation_names_run",
            ),
        ]
        indexes = [
            # The reconciler reads only due pending runs, and runs stuck in delivery.
            models.Index(fields=["next_attempt_at"], condition=Q(state="pending"), name="actionrun_pending_due_idx"),
            models.Index(
                fields=["state_changed_at"], condition=Q(state="delivering"), name="actionrun_delivering_idx"
            ),
            # The admin page: runs that need a person.
            models.Index(
                fields=["state", "created_at"],
                condition=Q(state__in=["pending_approval", "failed", "dead"]),
                name="actionrun_attention_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"run {self.pk} ({self.state}) of config {self.config_id} for decision {self.decision_id}"

    @property
    def needs_attention(self) -> bool:
        return self.state in (self.State.PENDING_APPROVAL, self.State.FAILED, self.State.DEAD)


class EgressAllowRule(models.Model):
    """An admin's exception to the SSRF guard: a host name (exact) or an IP address / CIDR range that
    actions may reach even though it is loopback, private, link-local or otherwise non-public."""

    cidr_or_host = models.CharField(max_length=255, unique=True)
    comment = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["cidr_or_host"]

    def __str__(self) -> str:
        return self.cidr_or_host
