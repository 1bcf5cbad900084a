"""Actions API: configure actions per source, read a decision's runs, approve, reject and replay."""

from __future__ import annotations

from typing import Any

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from actions import selectors, services
from actions.models import ActionConfig, ActionRun
from actions.serializers import (
    ActionConfigCreated,
    ActionConfigInput,
    ActionConfigOutput,
    ActionRunOutput,
    RejectInput,
    RunListQuery,
    config_created_output,
)
from reviewapp.core.errors import ValidationFailed
from reviewapp.core.roles import can
from reviewapp.ingest.models import Source
from reviewapp.review.models import Decision


class CanManageActions(BasePermission):
    message = "Only an admin may configure actions."

    def has_permission(self, request: Request, view: Any) -> bool:
        return can(request.user, "manage_policies")


class CanOperateActions(BasePermission):
    message = "Only an admin may approve, reject or replay actions."

    def has_permission(self, request: Request, view: Any) -> bool:
        return can(request.user, "adjudicate") or can(request.user, "manage_policies")


class CanSeeRuns(BasePermission):
    message = "Your role may not see action runs."

    def has_permission(self, request: Request, view: Any) -> bool:
        return any(can(request.user, c) for c in ("review_items", "adjudicate", "manage_policies"))


def _run_or_404(run_id: int) -> ActionRun:
    return get_object_or_404(selectors.action_runs_detailed(), pk=run_id)


class SourceActionsApi(APIView):
    permission_classes = [IsAuthenticated, CanManageActions]

    @extend_schema(responses={200: ActionConfigOutput(many=True)})
    def get(self, request: Request, slug: str) -> Response:
        source = get_object_or_404(Source, slug=slug)
        configs = selectors.action_configs_for_source(source=source).select_related("source")
        return Response(ActionConfigOutput(configs, many=True).data)

    @extend_schema(request=ActionConfigInput, responses={201: ActionConfigCreated, 400: dict, 409: dict})
    def post(self, request: Request, slug: str) -> Response:
        source = get_object_or_404(Source, slug=slug)
        data = ActionConfigInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        compensating_id = values.pop("compensating_config")
        compensating = None
        if compensating_id is not None:
            compensating = ActionConfig.objects.filter(pk=compensating_id, source=source).first()
            if compensating is None:
                raise ValidationFailed("Invalid action.", [
                    {"field": "compensating_config", "message": "no such action for this source"}])
        config, secret = services.action_config_create(
            source=source, actor=request.user, compensating_config=compensating, **values
        )
        return Response(config_created_output(config, secret), status=status.HTTP_201_CREATED)


class DecisionRunsApi(APIView):
    permission_classes = [IsAuthenticated, CanSeeRuns]

    @extend_schema(responses={200: ActionRunOutput(many=True)})
    def get(self, request: Request, decision_id: int) -> Response:
        decision = get_object_or_404(Decision, pk=decision_id)
        runs = selectors.action_runs_for_decision(decision_id=decision.pk)
        return Response(ActionRunOutput(runs, many=True).data)


class RunListApi(APIView):
    """Runs by state; without ``state``: those needing a person (waiting, failed, dead)."""

    permission_classes = [IsAuthenticated, CanOperateActions]

    @extend_schema(
        parameters=[OpenApiParameter("state", str, description="comma-separated states")],
        responses={200: ActionRunOutput(many=True)},
    )
    def get(self, request: Request) -> Response:
        query = RunListQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        states = query.validated_data["state"] or list(selectors.ATTENTION_STATES)
        runs = selectors.action_runs_needing_attention(states=tuple(states))[:500]
        return Response(ActionRunOutput(runs, many=True).data)


class RunApproveApi(APIView):
    permission_classes = [IsAuthenticated, CanOperateActions]

    @extend_schema(request=None, responses={200: ActionRunOutput, 403: dict, 409: dict})
    def post(self, request: Request, run_id: int) -> Response:
        run = services.action_run_approve(run=_run_or_404(run_id), actor=request.user)
        return Response(ActionRunOutput(_run_or_404(run.pk)).data)


class RunRejectApi(APIView):
    permission_classes = [IsAuthenticated, CanOperateActions]

    @extend_schema(request=RejectInput, responses={200: ActionRunOutput, 400: dict, 409: dict})
    def post(self, request: Request, run_id: int) -> Response:
        run = _run_or_404(run_id)
        data = RejectInput(data=request.data)
        data.is_valid(raise_exception=True)
        run = services.action_run_reject(run=run, actor=request.user, reason=data.validated_data["reason"])
        return Response(ActionRunOutput(_run_or_404(run.pk)).data)


class RunReplayApi(APIView):
    permission_classes = [IsAuthenticated, CanOperateActions]

    @extend_schema(request=None, responses={200: ActionRunOutput, 409: dict})
    def post(self, request: Request, run_id: int) -> Response:
        run = services.action_run_replay(run=_run_or_404(run_id), actor=request.user)
        return Response(ActionRunOutput(_run_or_404(run.pk)).data)
