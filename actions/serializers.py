"""Input and output serializers of the actions API (one pair per operation)."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from actions.models import ActionConfig, ActionRun


class ActionConfigInput(serializers.Serializer):
    kind = serializers.ChoiceField(choices=ActionConfig.Kind.choices)
    name = serializers.CharField(max_length=200)
    label = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
    url = serializers.CharField(max_length=2000, required=False, allow_blank=True, default="")
    template = serializers.JSONField(required=False, default=dict)
    high_risk = serializers.BooleanField(required=False, default=False)
    compensating_config = serializers.IntegerField(required=False, allow_null=True, default=None)
    compensation_only = serializers.BooleanField(required=False, default=False)
    enabled = serializers.BooleanField(required=False, default=True)
    connect_timeout_seconds = serializers.FloatField(required=False, allow_null=True, default=None)
    read_timeout_seconds = serializers.FloatField(required=False, allow_null=True, default=None)
    max_attempts = serializers.IntegerField(required=False, allow_null=True, default=None)
    backoff_base_seconds = serializers.FloatField(required=False, allow_null=True, default=None)
    backoff_max_seconds = serializers.FloatField(required=False, allow_null=True, default=None)


class ActionConfigOutput(serializers.Serializer):
    """Never carries the secret (only the create response adds it, once)."""

    id = serializers.IntegerField()
    source = serializers.CharField(source="source.slug")
    name = serializers.CharField()
    kind = serializers.CharField()
    label = serializers.CharField(allow_blank=True)
    url = serializers.CharField(allow_blank=True)
    template = serializers.JSONField()
    high_risk = serializers.BooleanField()
    compensating_config = serializers.IntegerField(source="compensating_config_id", allow_null=True)
    compensation_only = serializers.BooleanField()
    enabled = serializers.BooleanField()
    connect_timeout_seconds = serializers.FloatField()
    read_timeout_seconds = serializers.FloatField()
    max_attempts = serializers.IntegerField()
    backoff_base_seconds = serializers.FloatField(allow_null=True)
    backoff_max_seconds = serializers.FloatField(allow_null=True)
    has_secret = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()

    def get_has_secret(self, config: ActionConfig) -> bool:
        return bool(config.secret)


class ActionConfigCreated(ActionConfigOutput):
    secret = serializers.CharField(help_text="Shown only in this response. Store it now.")


class ActionRunOutput(serializers.Serializer):
    id = serializers.IntegerField()
    decision = serializers.IntegerField(source="decision_id")
    item = serializers.IntegerField(source="decision.item_id")
    action = serializers.CharField(source="config.name")
    action_id = serializers.IntegerField(source="config_id")
    kind = serializers.CharField(source="config.kind")
    high_risk = serializers.BooleanField(source="config.high_risk")
    status = serializers.CharField(source="state")
    attempts = serializers.IntegerField()
    max_attempts = serializers.IntegerField(source="config.max_attempts")
    next_attempt_at = serializers.DateTimeField(allow_null=True)
    last_error = serializers.CharField(allow_blank=True)
    response_code = serializers.IntegerField(source="last_status_code", allow_null=True)
    idempotency_key = serializers.CharField()
    is_compensation = serializers.BooleanField()
    compensates = serializers.IntegerField(source="compensates_id", allow_null=True)
    approved_by = serializers.SerializerMethodField()
    approved_at = serializers.DateTimeField(allow_null=True)
    rejected_by = serializers.SerializerMethodField()
    rejected_at = serializers.DateTimeField(allow_null=True)
    rejection_reason = serializers.CharField(allow_blank=True)
    delivered_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()

    def get_approved_by(self, run: ActionRun) -> str | None:
        return run.approved_by.get_username() if run.approved_by else None

    def get_rejected_by(self, run: ActionRun) -> str | None:
        return run.rejected_by.get_username() if run.rejected_by else None


class RejectInput(serializers.Serializer):
    reason = serializers.CharField(max_length=500)


class RunListQuery(serializers.Serializer):
    state = serializers.CharField(required=False, allow_blank=True, default="")

    def validate_state(self, value: str) -> list[str]:
        states = [s.strip() for s in value.split(",") if s.strip()]
        unknown = [s for s in states if s not in ActionRun.State.values]
        if unknown:
            raise serializers.ValidationError(f"unknown state(s): {', '.join(unknown)}")
        return states


def config_created_output(config: ActionConfig, secret: str) -> dict[str, Any]:
    return {**ActionConfigOutput(config).data, "secret": secret}
