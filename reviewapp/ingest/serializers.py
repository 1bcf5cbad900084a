"""Input and output serializers of the ingest API. Inputs check shapes; services check meaning."""

from __future__ import annotations

from typing import Any

from django.urls import reverse
from rest_framework import serializers

from reviewapp.ingest import selectors
from reviewapp.ingest.models import BatchRowError, IngestBatch, Item, SchemaVersion, Source


def _absolute(serializer: serializers.Serializer, path: str) -> str:
    request = serializer.context.get("request")
    return request.build_absolute_uri(path) if request is not None else path


# --- inputs ------------------------------------------------------------------------------------
class SourceCreateInput(serializers.Serializer):
    slug = serializers.CharField(max_length=64)
    name = serializers.CharField(max_length=200)
    labels = serializers.ListField(child=serializers.CharField(max_length=100, trim_whitespace=False), min_length=1)
    schema = serializers.JSONField()
    id_field = serializers.CharField(max_length=100)
    label_field = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
    text_fields = serializers.ListField(child=serializers.CharField(max_length=100), required=False, default=list)


class SchemaCreateInput(serializers.Serializer):
    schema = serializers.JSONField()
    comment = serializers.CharField(max_length=500, required=False, allow_blank=True, default="")
    new_major = serializers.BooleanField(required=False, default=False)


class BatchCreateInput(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=True)
    mode = serializers.ChoiceField(choices=IngestBatch.Mode.values, required=False,
                                   default=IngestBatch.Mode.ALL_OR_NOTHING)
    resend_of = serializers.IntegerField(required=False, min_value=1,
                                         help_text="The quarantine batch whose fixed rows this file sends again.")


class SampleInput(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=True)


class BatchErrorsInput(serializers.Serializer):
    kind = serializers.ChoiceField(choices=BatchRowError.Kind.values, required=False)


class InferredOutput(serializers.Serializer):
    schema = serializers.JSONField()
    rows = serializers.IntegerField()
    id_field = serializers.CharField()
    label_field = serializers.CharField()
    labels = serializers.ListField(child=serializers.CharField())
    text_fields = serializers.ListField(child=serializers.CharField())
    notes = serializers.ListField(child=serializers.CharField())


class ItemListInput(serializers.Serializer):
    source = serializers.SlugField(required=False)
    status = serializers.ChoiceField(choices=Item.State.values, required=False)


# --- outputs -----------------------------------------------------------------------------------
class SchemaVersionOutput(serializers.ModelSerializer):
    version = serializers.CharField(source="label")
    schema = serializers.JSONField(source="json_schema")
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = SchemaVersion
        fields = ["version", "major", "minor", "schema", "comment", "created_by", "created_at"]


class SourceOutput(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()

    class Meta:
        model = Source
        fields = ["slug", "name", "labels", "id_field", "label_field", "text_fields", "created_at", "url"]

    def get_url(self, source: Source) -> str:
        return _absolute(self, reverse("api-source-detail", kwargs={"slug": source.slug}))


class SourceListOutput(SourceOutput):
    item_count = serializers.IntegerField()
    counts = serializers.DictField(child=serializers.IntegerField())

    class Meta(SourceOutput.Meta):
        fields = [*SourceOutput.Meta.fields, "item_count", "counts"]


class SourceDetailOutput(SourceOutput):
    counts = serializers.SerializerMethodField()
    schema_version = serializers.SerializerMethodField()
    schema = serializers.SerializerMethodField()

    class Meta(SourceOutput.Meta):
        fields = [*SourceOutput.Meta.fields, "counts", "schema_version", "schema"]

    def get_counts(self, source: Source) -> dict[str, int]:
        return selectors.source_counts(source=source)

    def _current(self, source: Source) -> SchemaVersion | None:
        if not hasattr(self, "_current_schema"):
            self._current_schema = selectors.schema_current(source=source)
        return self._current_schema

    def get_schema_version(self, source: Source) -> str | None:
        current = self._current(source)
        return current.label if current else None

    def get_schema(self, source: Source) -> dict[str, Any] | None:
        current = self._current(source)
        return current.json_schema if current else None


class BatchOutput(serializers.ModelSerializer):
    source = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    uploaded_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    schema_version = serializers.CharField(source="schema_version.label")
    progress = serializers.SerializerMethodField()
    url = serializers.SerializerMethodField()
    errors_url = serializers.SerializerMethodField()
    quarantine_url = serializers.SerializerMethodField()
    drift = serializers.DictField(child=serializers.IntegerField(), help_text="Fields outside the schema: rows "
                                                                              "carrying each (kept in the payload).")

    class Meta:
        model = IngestBatch
        fields = [
            "id", "source", "filename", "file_format", "size_bytes", "content_sha256", "mode", "status", "phase",
            "received", "accepted", "duplicates", "conflicts", "rejected", "labeled", "rows_processed",
            "total_rows", "rows_loaded", "progress", "error", "attempts", "schema_version", "encoding", "delimiter",
            "columns", "notes", "drift", "resend_of", "uploaded_by", "created_at", "started_at", "finished_at",
            "url", "errors_url", "quarantine_url",
        ]

    def get_progress(self, batch: IngestBatch) -> float | None:
        return selectors.batch_progress(batch)

    def get_quarantine_url(self, batch: IngestBatch) -> str:
        return _absolute(self, reverse("api-batch-quarantine", kwargs={"batch_id": batch.pk}))

    def get_url(self, batch: IngestBatch) -> str:
        return _absolute(self, reverse("api-batch-detail", kwargs={"batch_id": batch.pk}))

    def get_errors_url(self, batch: IngestBatch) -> str:
        return _absolute(self, reverse("api-batch-errors", kwargs={"batch_id": batch.pk}))


class BatchAcceptedOutput(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.CharField()
    url = serializers.CharField()


class BatchErrorOutput(serializers.ModelSerializer):
    row = serializers.IntegerField(source="row_number")

    class Meta:
        model = BatchRowError
        fields = ["row", "field", "message", "kind", "raw"]


class ItemAcceptedOutput(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.CharField()
    url = serializers.CharField()


class ItemListOutput(serializers.ModelSerializer):
    source = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    status = serializers.CharField(source="state")
    batch = serializers.IntegerField(source="batch_id", allow_null=True)
    top_label = serializers.SerializerMethodField()
    confidence = serializers.SerializerMethodField()
    url = serializers.SerializerMethodField()

    class Meta:
        model = Item
        fields = ["id", "source", "external_id", "status", "batch", "top_label", "confidence", "received_at",
                  "state_changed_at", "url"]

    def get_top_label(self, item: Item) -> str | None:
        return item.prediction.top_label if item.prediction_id else None

    def get_confidence(self, item: Item) -> float | None:
        return item.prediction.confidence if item.prediction_id else None

    def get_url(self, item: Item) -> str:
        return _absolute(self, reverse("api-item-detail", kwargs={"item_id": item.pk}))


def _model_version(model_version: Any) -> dict[str, Any] | None:
    if model_version is None:
        return None
    return {"id": model_version.pk, "version": model_version.version, "algorithm": model_version.algorithm}


class ItemDetailOutput(serializers.ModelSerializer):
    source = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    status = serializers.CharField(source="state")
    prediction = serializers.SerializerMethodField()
    decision = serializers.SerializerMethodField()
    provenance = serializers.SerializerMethodField()

    class Meta:
        model = Item
        fields = ["id", "source", "external_id", "status", "payload", "payload_sha256", "received_at",
                  "state_changed_at", "route_reason", "prediction", "decision", "provenance"]

    def _prediction(self, item: Item) -> Any | None:
        if not hasattr(self, "_pred_cache"):
            self._pred_cache = selectors.item_latest_prediction(item=item)
        return self._pred_cache

    def get_prediction(self, item: Item) -> dict[str, Any] | None:
        p = self._prediction(item)
        if p is None:
            return None
        return {
            "id": p.pk,
            "probabilities": p.probabilities,
            "top_label": p.top_label,
            "confidence": p.confidence,
            "alternatives": p.alternatives,
            "prediction_set": p.prediction_set,
            "explanation": p.explanation,
            "model_version": _model_version(p.model_version),
            "created_at": serializers.DateTimeField().to_representation(p.created_at),
        }

    def get_decision(self, item: Item) -> dict[str, Any] | None:
        d = selectors.item_current_decision(item=item)
        if d is None:
            return None
        return {
            "label": d.label,
            "origin": d.origin,
            "decided_by": d.decided_by.get_username() if d.decided_by_id else None,
            "reason": d.reason,
            "created_at": serializers.DateTimeField().to_representation(d.created_at),
        }

    def get_provenance(self, item: Item) -> dict[str, Any]:
        p = self._prediction(item)
        batch = item.batch
        return {
            "source": item.source.slug,
            "batch": None if batch is None else {
                "id": batch.pk,
                "filename": batch.filename,
                "uploaded_by": batch.uploaded_by.get_username() if batch.uploaded_by_id else None,
                "created_at": serializers.DateTimeField().to_representation(batch.created_at),
            },
            "schema_version": item.schema_version.label,
            "model_version": _model_version(p.model_version) if p is not None else None,
            "policy_version": item.policy.version if item.policy_id else None,
            "route_reason": item.route_reason,
        }
