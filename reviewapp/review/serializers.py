"""Input and output serializers of the review API (one pair per operation)."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from reviewapp.review.models import Policy, ReviewTask, Verdict
from reviewapp.review.selectors import ItemView

MAX_HANDLING_MS = 24 * 3600 * 1000


class ClaimInput(serializers.Serializer):
    source = serializers.SlugField(required=False, allow_blank=True, max_length=64)
    queue = serializers.ChoiceField(choices=["review", "adjudication"], required=False, default="review")


class EscalateInput(serializers.Serializer):
    note = serializers.CharField(required=False, allow_blank=True, max_length=5000, default="")


class UndoInput(serializers.Serializer):
    verdict = serializers.IntegerField(required=False, allow_null=True, min_value=1)


class BulkVerdictInput(serializers.Serializer):
    items = serializers.ListField(child=serializers.IntegerField(min_value=1), allow_empty=False, max_length=200)
    label = serializers.CharField(max_length=100)
    note = serializers.CharField(required=False, allow_blank=True, max_length=5000, default="")


class BulkOutcomeOutput(serializers.Serializer):
    item_id = serializers.IntegerField()
    external_id = serializers.CharField()
    status = serializers.CharField()
    detail = serializers.CharField()
    verdict_id = serializers.IntegerField(allow_null=True)


class AnalystFiguresOutput(serializers.Serializer):
    reviewer = serializers.CharField(source="username")
    items = serializers.IntegerField()
    median_handling_s = serializers.FloatField(allow_null=True)
    peer_pairs = serializers.IntegerField()
    peer_agreement = serializers.FloatField(allow_null=True)
    kappa = serializers.FloatField(allow_null=True)
    final_n = serializers.IntegerField()
    final_agreement = serializers.FloatField(allow_null=True)


class VerdictInput(serializers.Serializer):
    label = serializers.CharField(max_length=100)
    note = serializers.CharField(required=False, allow_blank=True, max_length=5000, default="")
    idempotency_key = serializers.CharField(required=False, allow_blank=True, allow_null=True, max_length=100)
    handling_ms = serializers.IntegerField(required=False, allow_null=True, min_value=0, max_value=MAX_HANDLING_MS)


class PolicyInput(serializers.Serializer):
    """The contract's policy JSON. ``version`` is ignored (the server numbers versions); a field left
    out keeps its value from the policy in force."""

    version = serializers.IntegerField(required=False)
    mode = serializers.ChoiceField(choices=Policy.Mode.choices, required=False)
    thresholds = serializers.DictField(child=serializers.FloatField(min_value=0, max_value=1), required=False)
    target_error = serializers.FloatField(required=False, allow_null=True)
    confidence = serializers.FloatField(required=False)
    qa_sample_rate = serializers.FloatField(required=False)
    priority = serializers.ChoiceField(choices=Policy.Priority.choices, required=False)
    double_review_rate = serializers.FloatField(required=False, min_value=0, max_value=1)
    comment = serializers.CharField(required=False, allow_blank=True, max_length=500)


class PolicyOutput(serializers.Serializer):
    version = serializers.IntegerField()
    mode = serializers.CharField()
    thresholds = serializers.DictField(child=serializers.FloatField())
    target_error = serializers.FloatField(allow_null=True)
    confidence = serializers.FloatField()
    qa_sample_rate = serializers.FloatField()
    priority = serializers.CharField()
    double_review_rate = serializers.FloatField()
    comment = serializers.CharField(allow_blank=True)
    created_at = serializers.DateTimeField()
    created_by = serializers.CharField(allow_null=True)


def policy_output(policy: Policy) -> dict[str, Any]:
    return PolicyOutput({
        "version": policy.version, "mode": policy.mode, "thresholds": policy.thresholds,
        "target_error": policy.target_error, "confidence": policy.confidence,
        "qa_sample_rate": policy.qa_sample_rate, "priority": policy.priority,
        "double_review_rate": policy.double_review_rate, "comment": policy.comment,
        "created_at": policy.created_at,
        "created_by": policy.created_by.get_username() if policy.created_by else None,
    }).data


def _iso(value: Any) -> str | None:
    return serializers.DateTimeField().to_representation(value) if value else None


def claimed_item_output(view: ItemView, task: ReviewTask) -> dict[str, Any]:
    """The claimed item: payload, routing prediction, provenance, the task and its lease."""
    item = view.item
    provenance = dict(view.provenance)
    if provenance.get("batch"):
        provenance["batch"] = {**provenance["batch"], "created_at": _iso(provenance["batch"]["created_at"])}
    provenance["received_at"] = _iso(provenance.get("received_at"))
    prediction = None
    if view.prediction is not None:
        prediction = {k: v for k, v in view.prediction.items() if k not in ("confidence_pct",)}
        prediction["alternatives"] = [[a["label"], a["probability"]] for a in view.prediction["alternatives"]]
    return {
        "id": item.pk,
        "external_id": item.external_id,
        "source": item.source.slug,
        "status": item.state,
        "payload": item.payload,
        "labels": view.labels,
        "prediction": prediction,
        "provenance": provenance,
        "task_id": task.pk,
        "task": {"id": task.pk, "kind": task.kind, "reason": task.reason, "round": task.round},
        "lease_expires_at": _iso(task.lease_expires_at),
    }


class VerdictOutput(serializers.ModelSerializer):
    item = serializers.IntegerField(source="item_id")
    task = serializers.IntegerField(source="task_id")
    reviewer = serializers.CharField(source="reviewer.get_username")

    class Meta:
        model = Verdict
        fields = ["id", "item", "task", "round", "reviewer", "label", "note", "handling_ms", "idempotency_key",
                  "created_at"]
