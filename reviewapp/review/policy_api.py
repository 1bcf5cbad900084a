"""Policy editor API: simulate a candidate, list versions with diffs, save a version (optionally re-routing
waiting items), restore an earlier one, the promise check and re-route progress.

Reads: anyone who may see policies (admins, ML engineers, analysts). Simulate and every change: admins only
(capability ``manage_policies``); others get 403.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from reviewapp.core.errors import NotFound, PermissionDeniedError, ValidationFailed
from reviewapp.core.roles import can
from reviewapp.ingest.models import Source
from reviewapp.review import policy_selectors, policy_services
from reviewapp.review.models import Policy
from reviewapp.review.policy_simulation import policy_simulate
from reviewapp.review.serializers import policy_output
from reviewapp.review.services import POLICY_FIELDS, policy_as_dict, policy_current

READ_CAPS = ("manage_policies", "manage_models", "review_items")


def _source(slug: str) -> Source:
    source = Source.objects.filter(slug=slug).first()
    if source is None:
        raise NotFound(f"No source {slug!r}.")
    return source


def _require(request: Request, capability: str, message: str) -> None:
    if not can(request.user, capability):
        raise PermissionDeniedError(message)


def _require_read(request: Request) -> None:
    if not any(can(request.user, c) for c in READ_CAPS):
        raise PermissionDeniedError("Your role may not see policies.")


class CandidateInput(serializers.Serializer):
    """A candidate policy; a field left out keeps its value from the policy in force."""

    mode = serializers.ChoiceField(choices=Policy.Mode.choices, required=False)
    thresholds = serializers.DictField(child=serializers.FloatField(min_value=0, max_value=1), required=False)
    target_error = serializers.FloatField(required=False, allow_null=True, min_value=0, max_value=1)
    confidence = serializers.FloatField(required=False, min_value=0, max_value=1)
    qa_sample_rate = serializers.FloatField(required=False, min_value=0, max_value=1)
    priority = serializers.ChoiceField(choices=Policy.Priority.choices, required=False)


class VersionInput(CandidateInput):
    comment = serializers.CharField(required=False, allow_blank=True, max_length=500, default="")
    reroute = serializers.BooleanField(required=False, default=False)
    double_review_rate = serializers.FloatField(required=False, min_value=0, max_value=1)


class RestoreInput(serializers.Serializer):
    version = serializers.IntegerField(min_value=1)
    comment = serializers.CharField(required=False, allow_blank=True, max_length=500, default="")
    reroute = serializers.BooleanField(required=False, default=False)


def _merged(source: Source, values: dict[str, Any]) -> dict[str, Any]:
    current = policy_current(source=source)
    base = policy_as_dict(current) if current is not None else {}
    merged = {k: values[k] if k in values else base.get(k) for k in POLICY_FIELDS if k in values or k in base}
    if merged.get("mode") == Policy.Mode.TARGET_ERROR and merged.get("target_error") is None:
        raise ValidationFailed("Invalid policy.", [{"field": "target_error",
                                                    "message": "target_error mode needs a value between 0 and 1"}])
    for name in ("target_error", "confidence"):
        value = merged.get(name)
        if value is not None and not 0 < value < 1 and (name == "confidence" or merged.get("mode") == "target_error"):
            raise ValidationFailed("Invalid policy.", [{"field": name, "message": "must be between 0 and 1"}])
    return merged


def _simulation_output(sim: dict[str, Any]) -> dict[str, Any]:
    keys = ("mode", "review_rate", "auto_rate", "qa_review_rate", "est_auto_error", "est_auto_error_interval",
            "per_label", "thresholds", "thresholds_from", "target_error", "confidence", "n_labels", "n_effective",
            "n_labels_used", "evidence", "champion", "arrivals_per_day", "reviews_per_day", "median_handling_ms",
            "analyst_hours_per_day", "shares_from", "n_population", "warnings")
    return {k: sim.get(k) for k in keys}


class PolicySimulateApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(request=CandidateInput, responses={200: dict, 400: dict, 403: dict, 404: dict})
    def post(self, request: Request, slug: str) -> Response:
        _require(request, "manage_policies", "Only admins may simulate policy changes.")
        source = _source(slug)
        data = CandidateInput(data=request.data)
        data.is_valid(raise_exception=True)
        candidate = _merged(source, dict(data.validated_data))
        sim = policy_simulate(source=source, candidate=candidate)
        # What "re-route" would move if this candidate were applied now (counts of live items, not estimates).
        preview = policy_selectors.reroute_preview_for(source=source, candidate=candidate, sim=sim)
        return Response({**_simulation_output(sim), "reroute_preview": preview})


def _version_row(row: policy_selectors.PolicyVersionRow) -> dict[str, Any]:
    return {**policy_output(row.policy), "diff": row.diff, "in_force": row.is_current}


class PolicyVersionsApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(responses={200: dict, 403: dict, 404: dict})
    def get(self, request: Request, slug: str) -> Response:
        _require_read(request)
        source = _source(slug)
        return Response({"results": [_version_row(r) for r in policy_selectors.policy_history(source=source)]})

    @extend_schema(request=VersionInput, responses={201: dict, 400: dict, 403: dict})
    def post(self, request: Request, slug: str) -> Response:
        """Save a new version (like ``PUT .../policy/``) with target-error thresholds resolved and stored, and
        optionally re-route the items still waiting."""
        _require(request, "manage_policies", "Only admins may change policies.")
        source = _source(slug)
        data = VersionInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        comment, reroute = values.pop("comment", ""), values.pop("reroute", False)
        merged = _merged(source, values)
        saved = policy_services.policy_update(source=source, actor=request.user, comment=comment, reroute=reroute,
                                              **merged)
        return Response(_saved_output(saved), status=status.HTTP_201_CREATED)


def _saved_output(saved: policy_services.PolicySaved) -> dict[str, Any]:
    return {**policy_output(saved.policy), "diff": saved.diff, "derived_thresholds": saved.derived_thresholds,
            "risk_control_stored": saved.risk_control_stored, "reroute_run_id": saved.reroute_run_id,
            "warnings": saved.warnings}


class PolicyRestoreApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(request=RestoreInput, responses={201: dict, 400: dict, 403: dict, 404: dict})
    def post(self, request: Request, slug: str) -> Response:
        _require(request, "manage_policies", "Only admins may change policies.")
        source = _source(slug)
        data = RestoreInput(data=request.data)
        data.is_valid(raise_exception=True)
        saved = policy_services.policy_restore(source=source, actor=request.user, **data.validated_data)
        return Response(_saved_output(saved), status=status.HTTP_201_CREATED)


class PolicyPromiseApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(responses={200: dict, 403: dict, 404: dict})
    def get(self, request: Request, slug: str) -> Response:
        _require_read(request)
        source = _source(slug)
        check = policy_selectors.promise_check(source=source)
        if check is None:
            raise NotFound(f"Source {slug!r} has no policy yet.")
        return Response(check)


class PolicyRerouteApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(request=None, responses={202: dict, 403: dict})
    def post(self, request: Request, slug: str) -> Response:
        """Re-route waiting items under the policy in force (e.g. after a new champion)."""
        _require(request, "manage_policies", "Only admins may re-route items.")
        source = _source(slug)
        run_id = policy_services.policy_reroute_start(source=source, actor=request.user)
        return Response({"run_id": run_id}, status=status.HTTP_202_ACCEPTED)


class PolicyRerouteProgressApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(responses={200: dict, 403: dict, 404: dict})
    def get(self, request: Request, slug: str, run_id: str) -> Response:
        _require_read(request)
        source = _source(slug)
        progress = policy_selectors.reroute_progress_for_run(source=source, run_id=run_id)
        if progress is None:
            raise NotFound(f"No re-route run {run_id!r} for source {slug!r}.")
        return Response(progress)
