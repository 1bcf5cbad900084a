"""Input and output serializers of the model registry API."""

from __future__ import annotations

from typing import Any

from django.urls import reverse
from rest_framework import serializers

from scoring.estimators import algorithm_names
from scoring.models import ModelVersion

KEY_METRICS = ("accuracy", "macro_f1", "log_loss", "ece", "roc_auc")


class TrainInput(serializers.Serializer):
    algorithm = serializers.ChoiceField(choices=[(a, a) for a in algorithm_names()], default="logreg")


class TrainAccepted(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.CharField()
    url = serializers.CharField()


class ModelVersionSummary(serializers.Serializer):
    id = serializers.IntegerField()
    url = serializers.CharField()
    source = serializers.CharField()
    version = serializers.IntegerField()
    algorithm = serializers.CharField()
    status = serializers.CharField()
    is_champion = serializers.BooleanField()
    is_shadow = serializers.BooleanField()
    key_metrics = serializers.DictField()
    error = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()
    trained_at = serializers.DateTimeField(allow_null=True)
    promoted_at = serializers.DateTimeField(allow_null=True)


class ModelVersionDetail(ModelVersionSummary):
    params = serializers.DictField()
    feature_spec = serializers.DictField()
    schema_version = serializers.CharField(allow_null=True)
    label_snapshot = serializers.DictField()
    metrics = serializers.DictField()
    risk_control = serializers.DictField()
    artifact_sha256 = serializers.CharField(allow_blank=True)
    heldout_sha256 = serializers.CharField(allow_blank=True)
    similarity_sha256 = serializers.CharField(allow_blank=True)
    trigger = serializers.CharField(allow_blank=True)
    label_watermark = serializers.IntegerField(allow_null=True)
    shadow = serializers.DictField(help_text="agreement with, and accuracy beside, the predictions that routed the "
                                             "same live items")
    created_by = serializers.CharField(allow_null=True)


class ShadowInput(serializers.Serializer):
    enabled = serializers.BooleanField()


class RiskControlQuery(serializers.Serializer):
    target_error = serializers.FloatField(min_value=0.0, max_value=1.0)
    confidence = serializers.FloatField(min_value=0.0, max_value=1.0, default=0.95)


class SimilarQuery(serializers.Serializer):
    k = serializers.IntegerField(min_value=1, max_value=50, default=5)


class SimilarDecision(serializers.Serializer):
    item_id = serializers.IntegerField()
    external_id = serializers.CharField()
    label = serializers.CharField(allow_null=True)
    distance = serializers.FloatField()


def model_url(mv: ModelVersion) -> str:
    return reverse("api-model-detail", kwargs={"pk": mv.pk})


def _summary(mv: ModelVersion) -> dict[str, Any]:
    metrics = mv.metrics or {}
    return {
        "id": mv.pk,
        "url": model_url(mv),
        "source": mv.source.slug,
        "version": mv.version,
        "algorithm": mv.algorithm,
        "status": mv.status,
        "is_champion": mv.is_champion,
        "is_shadow": mv.is_shadow,
        "key_metrics": {
            **{k: metrics.get(k) for k in KEY_METRICS if k in metrics},
            **({"coverage": metrics["conformal"].get("coverage")} if metrics.get("conformal") else {}),
        },
        "error": mv.error,
        "created_at": mv.created_at,
        "trained_at": mv.trained_at,
        "promoted_at": mv.promoted_at,
    }


def model_summary_output(mv: ModelVersion) -> dict[str, Any]:
    return ModelVersionSummary(_summary(mv)).data


def model_detail_output(mv: ModelVersion, *, shadow: dict[str, Any] | None = None) -> dict[str, Any]:
    return ModelVersionDetail({
        **_summary(mv),
        "params": mv.params,
        "feature_spec": mv.feature_spec,
        "schema_version": mv.schema_version.label if mv.schema_version else None,
        "label_snapshot": mv.label_snapshot,
        "metrics": mv.metrics,
        "risk_control": mv.risk_control,
        "artifact_sha256": mv.artifact_sha256,
        "heldout_sha256": mv.heldout_sha256,
        "similarity_sha256": mv.similarity_sha256,
        "trigger": mv.trigger,
        "label_watermark": mv.label_watermark,
        "shadow": shadow or {},
        "created_by": mv.created_by.get_username() if mv.created_by else None,
    }).data
