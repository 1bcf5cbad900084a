"""Model registry API: list and train versions of a source, read one, promote one, run one in shadow, risk
control for other targets; similar past decisions of an item."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from reviewapp.core.errors import PermissionDeniedError
from reviewapp.core.roles import can
from scoring import selectors, services
from scoring.serializers import (
    ModelVersionDetail,
    ModelVersionSummary,
    RiskControlQuery,
    ShadowInput,
    SimilarDecision,
    SimilarQuery,
    TrainAccepted,
    TrainInput,
    model_detail_output,
    model_summary_output,
    model_url,
)


def _require_manage_models(request: Request) -> None:
    if not can(request.user, "manage_models"):
        raise PermissionDeniedError("Your role may not manage models.")


class SourceModelsApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(responses={200: ModelVersionSummary(many=True)})
    def get(self, request: Request, slug: str) -> Response:
        source = selectors.source_get(slug=slug)
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(selectors.model_version_list(source=source), request, view=self)
        return paginator.get_paginated_response([model_summary_output(mv) for mv in page or []])

    @extend_schema(request=TrainInput, responses={202: TrainAccepted})
    def post(self, request: Request, slug: str) -> Response:
        _require_manage_models(request)
        source = selectors.source_get(slug=slug)
        data = TrainInput(data=request.data)
        data.is_valid(raise_exception=True)
        mv = services.model_training_start(source=source, actor=request.user,
                                           algorithm=data.validated_data["algorithm"], trigger="api")
        return Response({"id": mv.pk, "status": mv.status, "url": model_url(mv)}, status=status.HTTP_202_ACCEPTED)


class ModelDetailApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(responses={200: ModelVersionDetail})
    def get(self, request: Request, pk: int) -> Response:
        mv = selectors.model_version_get(pk=pk)
        return Response(model_detail_output(mv, shadow=selectors.shadow_comparison(model_version=mv)))


class ModelPromoteApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(request=None, responses={200: ModelVersionDetail})
    def post(self, request: Request, pk: int) -> Response:
        _require_manage_models(request)
        mv = services.model_promote(model_version=selectors.model_version_get(pk=pk), actor=request.user)
        return Response(model_detail_output(selectors.model_version_get(pk=mv.pk)))


class ModelShadowApi(APIView):
    """Start or stop shadow scoring of a candidate (beside the contract: an addition)."""

    permission_classes = [IsAuthenticated]

    @extend_schema(request=ShadowInput, responses={200: ModelVersionDetail})
    def post(self, request: Request, pk: int) -> Response:
        _require_manage_models(request)
        data = ShadowInput(data=request.data)
        data.is_valid(raise_exception=True)
        mv = services.model_shadow_set(model_version=selectors.model_version_get(pk=pk), actor=request.user,
                                       enabled=data.validated_data["enabled"])
        mv = selectors.model_version_get(pk=mv.pk)
        return Response(model_detail_output(mv, shadow=selectors.shadow_comparison(model_version=mv)))


class ModelRiskControlApi(APIView):
    """Risk-control thresholds of a version for another target error and confidence, from its held-out labels."""

    permission_classes = [IsAuthenticated]

    @extend_schema(parameters=[RiskControlQuery], responses={200: dict})
    def get(self, request: Request, pk: int) -> Response:
        data = RiskControlQuery(data=request.query_params)
        data.is_valid(raise_exception=True)
        mv = selectors.model_version_get(pk=pk)
        return Response(services.model_risk_control(model_version=mv, **data.validated_data))


class ItemSimilarApi(APIView):
    """The k already-decided items of the same source nearest to an item, with their labels."""

    permission_classes = [IsAuthenticated]

    @extend_schema(parameters=[SimilarQuery], responses={200: SimilarDecision(many=True)})
    def get(self, request: Request, pk: int) -> Response:
        data = SimilarQuery(data=request.query_params)
        data.is_valid(raise_exception=True)
        found = services.similar_decisions(item=selectors.item_get(pk=pk), k=data.validated_data["k"])
        return Response({"results": SimilarDecision(found, many=True).data})
