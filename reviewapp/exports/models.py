"""Export jobs: an asynchronous export and the manifest that lets a training set be verified later."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class ExportJob(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    class Format(models.TextChoices):
        CSV = "csv", "CSV"
        JSONL = "jsonl", "JSON lines"
        PARQUET = "parquet", "Parquet"

    source = models.ForeignKey("ingest.Source", on_delete=models.PROTECT, related_name="export_jobs")
    file_format = models.CharField(max_length=10, choices=Format.choices)
    filters = models.JSONField(default=dict, blank=True)
    include_raw = models.BooleanField(default=False)
    # The snapshot: labels as they stood at this instant, up to this label id and audit event.
    cutoff = models.DateTimeField()
    max_label_id = models.BigIntegerField(default=0)
    last_audit_event_id = models.BigIntegerField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    total_rows = models.PositiveIntegerField(default=0)
    rows_written = models.PositiveIntegerField(default=0)
    file_path = models.CharField(max_length=500, blank=True)
    size_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    manifest = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    state_changed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(file_format__in=["csv", "jsonl", "parquet"]), name="export_format_valid"
            ),
            models.CheckConstraint(
                condition=Q(status__in=["queued", "running", "done", "failed"]), name="export_status_valid"
            ),
        ]
        indexes = [
            models.Index(
                fields=["state_changed_at"], condition=Q(status__in=["queued", "running"]), name="export_pending_idx"
            )
        ]

    def __str__(self) -> str:
        return f"export {self.pk} ({self.source_id}, {self.file_format})"
