"""Sources, their schema registry, ingest batches and items."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Source(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    labels = models.JSONField(help_text="The label set, in display order.")
    id_field = models.CharField(max_length=100)
    label_field = models.CharField(max_length=100, blank=True)
    text_fields = models.JSONField(default=list, blank=True)
    retrain_min_new_labels = models.PositiveIntegerField(default=500)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class SchemaVersion(models.Model):
    source = models.ForeignKey(Source, on_delete=models.CASCADE, related_name="schema_versions")
    major = models.PositiveIntegerField(default=1)
    minor = models.PositiveIntegerField(default=0)
    json_schema = models.JSONField()
    comment = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["source", "-major", "-minor"]
        constraints = [
            models.UniqueConstraint(fields=["source", "major", "minor"], name="schema_version_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.source.slug} schema v{self.label}"

    @property
    def label(self) -> str:
        return f"{self.major}.{self.minor}"


class IngestBatch(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    class Mode(models.TextChoices):
        ALL_OR_NOTHING = "all_or_nothing", "Refuse the whole batch if any row is bad"
        QUARANTINE = "quarantine", "Accept good rows, quarantine bad ones"

    class Phase(models.TextChoices):
        NONE = "", "—"
        VALIDATING = "validating", "Validating every row"
        LOADING = "loading", "Loading valid rows"

    source = models.ForeignKey(Source, on_delete=models.PROTECT, related_name="batches")
    schema_version = models.ForeignKey(SchemaVersion, on_delete=models.PROTECT)
    filename = models.CharField(max_length=255)
    file_format = models.CharField(max_length=16)
    stored_path = models.CharField(max_length=500, blank=True)
    size_bytes = models.BigIntegerField(default=0)
    content_sha256 = models.CharField(max_length=64)
    mode = models.CharField(max_length=20, choices=Mode.choices, default=Mode.ALL_OR_NOTHING)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    received = models.PositiveIntegerField(default=0)
    accepted = models.PositiveIntegerField(default=0)
    duplicates = models.PositiveIntegerField(default=0)
    conflicts = models.PositiveIntegerField(default=0)
    rejected = models.PositiveIntegerField(default=0)
    labeled = models.PositiveIntegerField(default=0)
    rows_processed = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    state_changed_at = models.DateTimeField(default=timezone.now)
    # Added for the bulk path (issue 3): how the file was read, what it carried beyond the schema, and
    # a checkpoint so that a load interrupted half-way resumes instead of starting over.
    encoding = models.CharField(max_length=32, blank=True)
    delimiter = models.CharField(max_length=4, blank=True)
    columns = models.JSONField(default=list, blank=True, help_text="CSV header / column names, in file order.")
    notes = models.JSONField(default=list, blank=True, help_text="Things the sender should know, in words.")
    drift = models.JSONField(default=dict, blank=True, help_text="Fields outside the schema: rows carrying each.")
    phase = models.CharField(max_length=16, choices=Phase.choices, default=Phase.NONE, blank=True)
    total_rows = models.PositiveBigIntegerField(null=True, blank=True)
    rows_loaded = models.PositiveBigIntegerField(default=0, help_text="Checkpoint: data rows loaded and committed.")
    progress = models.FloatField(null=True, blank=True)
    resend_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="resends",
        help_text="The quarantine batch whose fixed rows this upload sends again.",
    )

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # An identical file returns the earlier batch; a failed one may be sent again.
            models.UniqueConstraint(
                fields=["source", "content_sha256"],
                condition=~Q(status="failed"),
                name="batch_unique_content",
            ),
            models.CheckConstraint(
                condition=Q(status__in=["queued", "running", "done", "failed"]), name="batch_status_valid"
            ),
        ]
        indexes = [
            models.Index(
                fields=["state_changed_at"],
                condition=Q(status__in=["queued", "running"]),
                name="batch_pending_idx",
            )
        ]

    def __str__(self) -> str:
        return f"batch {self.pk} ({self.filename})"


class BatchRowError(models.Model):
    class Kind(models.TextChoices):
        INVALID = "invalid", "Row not valid"
        CONFLICT = "conflict", "Known id, different payload"
        FILE = "file", "The file as a whole"

    batch = models.ForeignKey(IngestBatch, on_delete=models.CASCADE, related_name="row_errors")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.INVALID)
    row_number = models.PositiveIntegerField(help_text="1-based data row; the header is row 0.")
    field = models.CharField(max_length=200, blank=True)
    message = models.TextField()
    raw = models.TextField(blank=True)

    class Meta:
        ordering = ["batch", "row_number", "id"]
        indexes = [models.Index(fields=["batch", "row_number"], name="rowerror_batch_row_idx")]

    def __str__(self) -> str:
        return f"batch {self.batch_id} row {self.row_number}: {self.message[:60]}"


class Item(models.Model):
    class State(models.TextChoices):
        RECEIVED = "received"
        SCORED = "scored"
        AUTO_DECIDED = "auto_decided"
        QUEUED = "queued"
        IN_REVIEW = "in_review"
        DECIDED = "decided"
        FAILED = "failed"

    # No index of its own: (source, external_id) and (source, state) both lead with it. Fewer indexes on
    # this table is ingest speed (every index costs each inserted row; see docs/benchmarks.md).
    # source, schema_version and batch are still enforced by the database, but set-based: PostgreSQL checks
    # a real foreign key row by row (about a third of a bulk chunk's time), so migration 0005 replaces these
    # three with one statement-level trigger per INSERT and guards on the parent tables. On SQLite they are
    # checked by the ORM only (on_delete below is unchanged).
    source = models.ForeignKey(
        Source, on_delete=models.PROTECT, related_name="items", db_index=False, db_constraint=False
    )
    external_id = models.CharField(max_length=200)
    payload = models.JSONField()
    payload_sha256 = models.CharField(max_length=64)
    schema_version = models.ForeignKey(SchemaVersion, on_delete=models.PROTECT, db_constraint=False)
    batch = models.ForeignKey(
        IngestBatch, null=True, blank=True, on_delete=models.PROTECT, related_name="items", db_constraint=False
    )
    state = models.CharField(max_length=16, choices=State.choices, default=State.RECEIVED)
    # The prediction and policy version that routed the item, and the rule in words.
    # Both are NULL when an item arrives: their indexes are partial (see Meta), so ingest does not pay
    # for indexing NULLs and lookups by a given prediction or policy still use an index.
    prediction = models.ForeignKey(
        "scoring.Prediction", null=True, blank=True, on_delete=models.SET_NULL, related_name="+", db_index=False
    )
    policy = models.ForeignKey(
        "review.Policy", null=True, blank=True, on_delete=models.PROTECT, related_name="+", db_index=False
    )
    route_reason = models.CharField(max_length=300, blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    last_error = models.TextField(blank=True)
    correlation_id = models.UUIDField(default=uuid.uuid4, editable=False)
    received_at = models.DateTimeField(default=timezone.now)
    state_changed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["source", "external_id"], name="item_unique_external_id"),
            models.CheckConstraint(
                condition=Q(
                    state__in=["received", "scored", "auto_decided", "queued", "in_review", "decided", "failed"]
                ),
                name="item_state_valid",
            ),
        ]
        indexes = [
            models.Index(fields=["source", "state"], name="item_source_state_idx"),
            # The reconciler looks only at items that still need a worker.
            models.Index(
                fields=["state_changed_at"],
                condition=Q(state__in=["received", "scored"]),
                name="item_pending_idx",
            ),
            models.Index(fields=["prediction"], condition=Q(prediction__isnull=False), name="item_prediction_idx"),
            models.Index(fields=["policy"], condition=Q(policy__isnull=False), name="item_policy_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.source_id}:{self.external_id}"
