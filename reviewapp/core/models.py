"""The shared kernel: the append-only, hash-chained audit trail and role capabilities."""

from __future__ import annotations

from django.db import models
from django.utils import timezone


class Capability(models.Model):
    """Holds the custom permissions the roles are built from; it has no table of its own."""

    class Meta:
        managed = False
        default_permissions = ()
        permissions = [
            ("review_items", "Claim items and record verdicts"),
            ("adjudicate", "Resolve escalations and disagreements"),
            ("manage_sources", "Create sources and edit their schemas"),
            ("ingest_data", "Upload batches and send items"),
            ("manage_policies", "Change confidence bands"),
            ("manage_models", "Train, promote and roll back models"),
            ("export_labels", "Export labeled feedback"),
        ]

    def __str__(self) -> str:
        return "capabilities"


class AuditEvent(models.Model):
    """One state change. Rows are never updated or deleted (a trigger refuses it on PostgreSQL);
    each row's hash covers its content and the previous row's hash in its chain, so any edit breaks it.

    The trail is several independent chains (``chain``), so concurrent writers do not queue on one lock;
    rows written before chains existed are chain 0, which simply continues (see reviewapp.core.audit)."""

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    # No foreign key: deleting a user must never rewrite the trail.
    actor_id = models.BigIntegerField(null=True, blank=True)
    actor_label = models.CharField(max_length=150, blank=True)
    verb = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=64)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    correlation_id = models.CharField(max_length=64, blank=True, db_index=True)
    # Which hash chain the row extends; prev_hash is the hash of the previous row (by id) of this chain.
    chain = models.PositiveSmallIntegerField(default=0, db_default=0)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["object_type", "object_id"], name="audit_object_idx"),
            # A chain's head (the writer's one lookup) and verification's walk, chain by chain in id order.
            models.Index(fields=["chain", "id"], name="audit_chain_idx"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.verb} {self.object_type}:{self.object_id}"
