"""The model registry and predictions (the Django edge of the ML package)."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class ModelVersion(models.Model):
    class Status(models.TextChoices):
        TRAINING = "training"
        READY = "ready"
        FAILED = "failed"

    source = models.ForeignKey("ingest.Source", on_delete=models.CASCADE, related_name="model_versions")
    version = models.PositiveIntegerField()
    algorithm = models.CharField(max_length=64)
    params = models.JSONField(default=dict, blank=True)
    feature_spec = models.JSONField(default=dict, blank=True)
    schema_version = models.ForeignKey("ingest.SchemaVersion", null=True, on_delete=models.PROTECT)
    label_snapshot = models.JSONField(default=dict, blank=True, help_text="count, label id range, sha256")
    metrics = models.JSONField(default=dict, blank=True)
    risk_control = models.JSONField(default=dict, blank=True)
    artifact_sha256 = models.CharField(max_length=64, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.TRAINING)
    is_champion = models.BooleanField(default=False)
    # A shadow scores live items beside the champion; its predictions never route anything.
    is_shadow = models.BooleanField(default=False)
    promoted_at = models.DateTimeField(null=True, blank=True)
    # What started the run ("manual", "api", "command", "retraining_check", ...) and the newest active label id
    # when it started, so the retraining check counts new labels since the last run, not since the dawn of time.
    trigger = models.CharField(max_length=32, blank=True)
    label_watermark = models.BigIntegerField(null=True, blank=True)
    # Held-out evidence for risk control (confidence, top label, correct; .npz by hash) and the nearest-neighbour
    # index of decided items (.skops by hash). Both are artifacts like the model itself.
    heldout_sha256 = models.CharField(max_length=64, blank=True)
    similarity_sha256 = models.CharField(max_length=64, blank=True)
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)
    trained_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["source", "-version"]
        constraints = [
            models.UniqueConstraint(fields=["source", "version"], name="model_version_unique"),
            models.UniqueConstraint(
                fields=["source"], condition=Q(is_champion=True), name="model_one_champion_per_source"
            ),
            models.CheckConstraint(
                condition=Q(status__in=["training", "ready", "failed"]), name="model_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(is_champion=False) | Q(status="ready"), name="model_champion_is_ready"
            ),
            models.CheckConstraint(
                condition=Q(is_shadow=False) | (Q(status="ready") & Q(is_champion=False)),
                name="model_shadow_is_ready_candidate",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.source.slug} model v{self.version} ({self.algorithm})"


class Prediction(models.Model):
    # No index of its own: the unique (item, model_version) leads with it. One index less per prediction written
    # (and per explanation written onto one): scoring writes a row per item.
    # item and model_version: enforced by statement-level triggers (scoring/0004, reviewapp.core.setrefs), not
    # row-level foreign keys, which cost a scoring chunk per row at COMMIT.
    item = models.ForeignKey(
        "ingest.Item", on_delete=models.CASCADE, related_name="predictions", db_index=False, db_constraint=False
    )
    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.PROTECT, related_name="predictions", db_constraint=False
    )
    probabilities = models.JSONField(help_text="label -> calibrated probability")
    top_label = models.CharField(max_length=100)
    confidence = models.FloatField()
    alternatives = models.JSONField(default=list, help_text="[[label, probability], ...] after the top label")
    prediction_set = models.JSONField(default=list)
    explanation = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["item", "model_version"], name="prediction_unique_item_model"),
            models.CheckConstraint(condition=Q(confidence__gte=0) & Q(confidence__lte=1), name="prediction_conf_range"),
        ]

    def __str__(self) -> str:
        return f"prediction {self.pk}: {self.top_label} {self.confidence:.2f} for item {self.item_id}"
