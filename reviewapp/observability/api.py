"""Auditor API: a decision's trail and decision record as JSON, with the verification of its events."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from reviewapp.observability import trail
from reviewapp.observability.views import can_see_trail


class CanAudit(BasePermission):
    message = "Only admins and ML engineers read decision trails."

    def has_permission(self, request: Request, view: Any) -> bool:
        return can_see_trail(request.user)


class DecisionTrailApi(APIView):
    permission_classes = [IsAuthenticated, CanAudit]

    @extend_schema(
        responses={200: dict},
        parameters=[OpenApiParameter("download", bool, description="Send as an attachment (a .json file).")],
    )
    def get(self, request: Request, pk: int) -> Response:
        data = trail.decision_trail(decision_id=pk)
        response = Response(data)
        if request.query_params.get("download") in ("1", "true", "yes"):
            response["Content-Disposition"] = f'attachment; filename="decision-{pk}-trail.json"'
        return response
