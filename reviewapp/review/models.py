"""Routing policies, review tasks with claim leases, verdicts, decisions and training labels."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Policy(models.Model):
    """One version of a source's confidence bands. The newest version is the one in force."""

    class Mode(models.TextChoices):
        THRESHOLD = "threshold"
        TARGET_ERROR = "target_error"

    class Priority(models.TextChoices):
        UNCERTAINTY = "uncertainty", "Most uncertain first"
        OLDEST = "oldest", "Oldest first"

    source = models.ForeignKey("ingest.Source", on_delete=models.CASCADE, related_name="policies")
    version = models.PositiveIntegerField()
    mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.THRESHOLD)
    thresholds = models.JSONField(default=dict, blank=True)
    target_error = models.FloatField(null=True, blank=True)
    confidence = models.FloatField(default=0.95)
    qa_sample_rate = models.FloatField(default=0.02)
    # Share of items sent to review that two analysts answer independently (disagreements are adjudicated).
    double_review_rate = models.FloatField(default=0.0, db_default=0.0)
    priority = models.CharField(max_length=16, choices=Priority.choices, default=Priority.UNCERTAINTY)
    comment = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["source", "-version"]
        verbose_name_plural = "policies"
        constraints = [
            models.UniqueConstraint(fields=["source", "version"], name="policy_version_unique"),
            models.CheckConstraint(condition=Q(mode__in=["threshold", "target_error"]), name="policy_mode_valid"),
            models.CheckConstraint(
                condition=Q(qa_sample_rate__gte=0) & Q(qa_sample_rate__lte=1), name="policy_qa_rate_range"
            ),
            models.CheckConstraint(
                condition=Q(confidence__gt=0) & Q(confidence__lt=1), name="policy_confidence_range"
            ),
            models.CheckConstraint(
                condition=Q(double_review_rate__gte=0) & Q(double_review_rate__lte=1),
                name="policy_double_review_rate_range",
            ),
            models.CheckConstraint(
                condition=Q(target_error__isnull=True) | (Q(target_error__gt=0) & Q(target_error__lt=1)),
                name="policy_target_error_range",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.source.slug} policy v{self.version}"


class ReviewTask(models.Model):
    """A unit of human work on an item. Claimed with a lease; the claim is one locked statement."""

    class Kind(models.TextChoices):
        REVIEW = "review", "Review"
        QA = "qa", "QA sample of an auto-decision"
        ESCALATION = "escalation", "Escalation"
        # The second, independent review of a double-reviewed item (its pair is the REVIEW task, same round).
        DOUBLE = "double", "Double review"
        ADJUDICATION = "adjudication", "Adjudication of a disagreement"

    class State(models.TextChoices):
        OPEN = "open"
        CLAIMED = "claimed"
        DONE = "done"
        CANCELLED = "cancelled"

    item = models.ForeignKey("ingest.Item", on_delete=models.CASCADE, related_name="tasks")
    source = models.ForeignKey("ingest.Source", on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.REVIEW)
    round = models.PositiveSmallIntegerField(default=1)
    state = models.CharField(max_length=16, choices=State.choices, default=State.OPEN)
    # Sort key for claim-next: lower first (the top label's confidence for "most uncertain first").
    priority = models.FloatField(default=0.0)
    reason = models.CharField(max_length=300, blank=True)
    # Both tasks of a double review: claim-next checks that the other one is not the claimer's own.
    paired = models.BooleanField(default=False, db_default=False)
    # An escalation points at the task it came from and carries the analyst's note.
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    note = models.TextField(blank=True, default="", db_default="")
    claimed_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    claimed_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["priority", "created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["item", "kind", "round"], name="task_unique_item_kind_round"),
            models.CheckConstraint(
                condition=Q(state__in=["open", "claimed", "done", "cancelled"]), name="task_state_valid"
            ),
            models.CheckConstraint(
                condition=~Q(state="claimed") | (Q(claimed_by__isnull=False) & Q(lease_expires_at__isnull=False)),
                name="task_claim_has_lease",
            ),
        ]
        indexes = [
            # Claim-next reads only open tasks, in priority order.
            models.Index(
                fields=["source", "priority", "created_at", "id"],
                condition=Q(state="open"),
                name="task_open_queue_idx",
            ),
            models.Index(
                fields=["lease_expires_at"], condition=Q(state="claimed"), name="task_claimed_lease_idx"
            ),
            # Claim order and queue pages across all sources, and the oldest-first sort (keyset pagination).
            models.Index(fields=["priority", "created_at", "id"], condition=Q(state="open"),
                         name="task_open_all_idx"),
            models.Index(fields=["source", "created_at", "id"], condition=Q(state="open"),
                         name="task_open_age_idx"),
            models.Index(fields=["created_at", "id"], condition=Q(state="open"), name="task_open_age_all_idx"),
            # Live counts per kind, bounded index-only scans (see selectors.queue_counts).
            models.Index(fields=["source", "kind", "state"], condition=Q(state__in=["open", "claimed"]),
                         name="task_waiting_kind_idx"),
            # The admin queue: escalations and adjudications are few among a million open reviews.
            models.Index(fields=["created_at", "id"],
                         condition=Q(state="open", kind__in=["escalation", "adjudication"]),
                         name="task_open_admin_idx"),
        ]

    def __str__(self) -> str:
        return f"task {self.pk} ({self.kind}) for item {self.item_id}"


class Verdict(models.Model):
    task = models.ForeignKey(ReviewTask, on_delete=models.PROTECT, related_name="verdicts")
    item = models.ForeignKey("ingest.Item", on_delete=models.PROTECT, related_name="verdicts")
    round = models.PositiveSmallIntegerField(default=1)
    reviewer = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT)
    label = models.CharField(max_length=100)
    note = models.TextField(blank=True)
    handling_ms = models.PositiveIntegerField(null=True, blank=True)
    # NULL, not "", when absent: the unique constraint only covers verdicts that carry a key.
    idempotency_key = models.CharField(max_length=100, null=True, blank=True)  # noqa: DJ001
    created_at = models.DateTimeField(default=timezone.now)
    withdrawn_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["task"], condition=Q(withdrawn_at__isnull=True), name="verdict_one_active_per_task"
            ),
            models.UniqueConstraint(
                fields=["reviewer", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="verdict_idempotency_key_unique",
            ),
        ]
        indexes = [
            # A reviewer's latest verdict (undo) and per-analyst figures.
            models.Index(fields=["reviewer", "created_at"], name="verdict_reviewer_created_idx"),
        ]

    def __str__(self) -> str:
        return f"verdict {self.pk}: {self.label} on item {self.item_id}"


class Decision(models.Model):
    """An item's final label. Overrides add a new current decision and keep the old one."""

    class Origin(models.TextChoices):
        MODEL = "model"
        REVIEWER = "reviewer"
        IMPORT = "import"

    # item, prediction, model_version and policy: enforced by statement-level triggers (review/0003,
    # reviewapp.core.setrefs), not row-level foreign keys, which cost a scoring chunk per row at COMMIT.
    item = models.ForeignKey("ingest.Item", on_delete=models.PROTECT, related_name="decisions", db_constraint=False)
    label = models.CharField(max_length=100)
    origin = models.CharField(max_length=16, choices=Origin.choices)
    verdict = models.ForeignKey(Verdict, null=True, blank=True, on_delete=models.PROTECT)
    prediction = models.ForeignKey(
        "scoring.Prediction", null=True, blank=True, on_delete=models.PROTECT, db_constraint=False
    )
    model_version = models.ForeignKey(
        "scoring.ModelVersion", null=True, blank=True, on_delete=models.PROTECT, db_constraint=False
    )
    policy = models.ForeignKey(Policy, null=True, blank=True, on_delete=models.PROTECT, db_constraint=False)
    decided_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    supersedes = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT)
    is_current = models.BooleanField(default=True)
    reason = models.CharField(max_length=300, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    # Set when the verdict behind it was undone; the decision it superseded (if any) is current again.
    withdrawn_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["item"], condition=Q(is_current=True), name="decision_one_current"),
            models.CheckConstraint(
                condition=Q(origin__in=["model", "reviewer", "import"]), name="decision_origin_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"decision {self.pk}: {self.label} ({self.origin}) on item {self.item_id}"


class Label(models.Model):
    """A training label with provenance. Undo withdraws it; it is never deleted."""

    class Origin(models.TextChoices):
        IMPORT = "import"
        REVIEW = "review"
        ADJUDICATION = "adjudication"
        QA = "qa"

    item = models.ForeignKey("ingest.Item", on_delete=models.PROTECT, related_name="labels")
    source = models.ForeignKey("ingest.Source", on_delete=models.PROTECT, related_name="+")
    label = models.CharField(max_length=100)
    origin = models.CharField(max_length=16, choices=Origin.choices)
    verdict = models.ForeignKey(
        Verdict, null=True, blank=True, on_delete=models.PROTECT, related_name="training_labels"
    )
    decision = models.ForeignKey(
        Decision, null=True, blank=True, on_delete=models.PROTECT, related_name="training_labels"
    )
    is_active = models.BooleanField(default=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)
    withdrawn_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["item"], condition=Q(is_active=True), name="label_one_active"),
            models.CheckConstraint(
                condition=Q(origin__in=["import", "review", "adjudication", "qa"]), name="label_origin_valid"
            ),
        ]
        indexes = [
            models.Index(fields=["source", "created_at"], condition=Q(is_active=True), name="label_active_idx"),
        ]

    def __str__(self) -> str:
        return f"label {self.pk}: {self.label} ({self.origin}) on item {self.item_id}"
