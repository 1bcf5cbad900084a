"""Review API: claim the next item, release it, record verdicts, read and change the policy."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from reviewapp.core.errors import Conflict, NotFound, PermissionDeniedError, ValidationFailed
from reviewapp.core.roles import can
from reviewapp.ingest.models import Item, Source
from reviewapp.review import selectors, services
from reviewapp.review.models import Decision
from reviewapp.review.serializers import (
    AnalystFiguresOutput,
    BulkOutcomeOutput,
    BulkVerdictInput,
    ClaimInput,
    EscalateInput,
    PolicyInput,
    PolicyOutput,
    UndoInput,
    VerdictInput,
    VerdictOutput,
    claimed_item_output,
    policy_output,
)


class CanReviewItems(BasePermission):
    message = "Your role may not review items."

    def has_permission(self, request: Request, view: Any) -> bool:
        return can(request.user, "review_items")


def _source_or_400(slug: str | None) -> Source | None:
    if not slug:
        return None
    source = Source.objects.filter(slug=slug).first()
    if source is None:
        raise ValidationFailed(f"No source {slug!r}.", [{"field": "source", "message": "unknown source"}])
    return source


class ClaimNextApi(APIView):
    permission_classes = [IsAuthenticated, CanReviewItems]

    @extend_schema(request=ClaimInput, responses={200: dict, 204: OpenApiResponse(description="Nothing waits.")})
    def post(self, request: Request) -> Response:
        data = ClaimInput(data=request.data)
        data.is_valid(raise_exception=True)
        source = _source_or_400(data.validated_data.get("source"))
        task = services.task_claim_next(user=request.user, source=source,
                                        queue=data.validated_data.get("queue") or services.REVIEW_QUEUE)
        if task is None:
            return Response(status=status.HTTP_204_NO_CONTENT)
        view = selectors.item_view_data(item_id=task.item_id, task=task, user=request.user, with_history=False)
        return Response(claimed_item_output(view, task))


class ItemReleaseApi(APIView):
    permission_classes = [IsAuthenticated, CanReviewItems]

    @extend_schema(request=None, responses={200: dict, 409: dict})
    def post(self, request: Request, item_id: int) -> Response:
        item = get_object_or_404(Item, pk=item_id)
        services.task_release(user=request.user, item=item)
        item.refresh_from_db(fields=["state"])
        return Response({"id": item.pk, "status": item.state})


class ItemLeaseApi(APIView):
    """Renew the lease on a held item (a keep-alive for clients that keep an item open)."""

    permission_classes = [IsAuthenticated, CanReviewItems]

    @extend_schema(request=None, responses={200: dict, 409: dict})
    def post(self, request: Request, item_id: int) -> Response:
        item = get_object_or_404(Item, pk=item_id)
        task = selectors.task_for_user(user=request.user, item=item, include_expired=True)
        if task is None:
            raise Conflict("You do not hold a claim on this item.")
        task = services.task_renew_lease(user=request.user, task=task)
        return Response({"id": item.pk, "task_id": task.pk, "lease_expires_at": task.lease_expires_at})


class ItemVerdictApi(APIView):
    permission_classes = [IsAuthenticated, CanReviewItems]

    @extend_schema(request=VerdictInput, responses={201: VerdictOutput, 200: VerdictOutput, 400: dict, 409: dict})
    def post(self, request: Request, item_id: int) -> Response:
        item = get_object_or_404(Item.objects.select_related("source"), pk=item_id)
        data = VerdictInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        key = values.get("idempotency_key") or request.headers.get("Idempotency-Key") or None
        if key is not None and len(key) > 100:
            raise ValidationFailed("Invalid idempotency key.",
                                   [{"field": "idempotency_key", "message": "at most 100 characters"}])
        verdict, created = services.verdict_submit(
            user=request.user, item=item, label=values["label"], note=values.get("note") or "",
            idempotency_key=key, handling_ms=values.get("handling_ms"),
        )
        decision = Decision.objects.filter(item_id=item.pk, is_current=True).first()
        body = {
            **VerdictOutput(verdict).data,
            "item_status": Item.objects.values_list("state", flat=True).get(pk=item.pk),
            "decision": None if decision is None else {
                "id": decision.pk, "label": decision.label, "origin": decision.origin, "reason": decision.reason,
            },
        }
        return Response(body, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class ItemEscalateApi(APIView):
    """Hand the held item to the admin queue (``note`` goes with it)."""

    permission_classes = [IsAuthenticated, CanReviewItems]

    @extend_schema(request=EscalateInput, responses={201: dict, 409: dict})
    def post(self, request: Request, item_id: int) -> Response:
        item = get_object_or_404(Item, pk=item_id)
        data = EscalateInput(data=request.data)
        data.is_valid(raise_exception=True)
        task = services.task_escalate(user=request.user, item=item, note=data.validated_data.get("note") or "")
        return Response({"id": item.pk, "escalation_task_id": task.pk, "kind": task.kind},
                        status=status.HTTP_201_CREATED)


class VerdictUndoApi(APIView):
    """Withdraw the caller's latest verdict (or ``verdict``) of the last 5 minutes; the item is theirs again."""

    permission_classes = [IsAuthenticated, CanReviewItems]

    @extend_schema(request=UndoInput, responses={200: dict, 409: dict})
    def post(self, request: Request) -> Response:
        data = UndoInput(data=request.data)
        data.is_valid(raise_exception=True)
        result = services.verdict_withdraw(user=request.user, verdict_id=data.validated_data.get("verdict"))
        task = result.task
        item_state = Item.objects.values_list("state", flat=True).get(pk=task.item_id)
        # ``actions``: runs cancelled, and delivered (or in-flight) ones that could not be withdrawn.
        return Response({"id": task.item_id, "status": item_state, "task_id": task.pk,
                         "lease_expires_at": task.lease_expires_at,
                         "actions": result.actions.as_dict() if result.actions is not None else None,
                         "actions_summary": result.actions_summary})


class BulkVerdictApi(APIView):
    """One label for many items; each is claimed and decided on its own, and reported."""

    permission_classes = [IsAuthenticated, CanReviewItems]

    @extend_schema(request=BulkVerdictInput, responses={200: BulkOutcomeOutput(many=True), 400: dict})
    def post(self, request: Request) -> Response:
        data = BulkVerdictInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        outcomes = services.verdicts_bulk_submit(user=request.user, item_ids=values["items"], label=values["label"],
                                                 note=values.get("note") or "")
        return Response({"results": BulkOutcomeOutput(outcomes, many=True).data,
                         "recorded": sum(o.status == "recorded" for o in outcomes),
                         "skipped": sum(o.status == "skipped" for o in outcomes)})


class AnalystFiguresApi(APIView):
    """Per-analyst figures: everyone's for adjudicators, the caller's own otherwise."""

    permission_classes = [IsAuthenticated, CanReviewItems]

    @extend_schema(responses={200: AnalystFiguresOutput(many=True)})
    def get(self, request: Request) -> Response:
        days = request.query_params.get("days") or "30"
        if days != "all" and not days.isdigit():
            raise ValidationFailed("Invalid period.", [{"field": "days", "message": "a number of days or 'all'"}])
        since = None if days == "all" else timezone.now() - timedelta(days=int(days))
        everyone = can(request.user, "adjudicate")
        figures = selectors.analyst_figures(since=since, source=_source_or_400(request.query_params.get("source")),
                                            reviewer_ids=None if everyone else [request.user.pk])
        return Response({"days": days, "analysts": AnalystFiguresOutput(figures, many=True).data})


class SourcePolicyApi(APIView):
    permission_classes = [IsAuthenticated]

    def _source(self, slug: str) -> Source:
        source = Source.objects.filter(slug=slug).first()
        if source is None:
            raise NotFound(f"No source {slug!r}.")
        return source

    @extend_schema(responses={200: PolicyOutput, 404: dict})
    def get(self, request: Request, slug: str) -> Response:
        source = self._source(slug)
        policy = services.policy_current(source=source)
        if policy is None:
            raise NotFound(f"Source {slug!r} has no policy yet.")
        return Response(policy_output(policy))

    @extend_schema(request=PolicyInput, responses={200: PolicyOutput, 400: dict, 403: dict})
    def put(self, request: Request, slug: str) -> Response:
        if not can(request.user, "manage_policies"):
            raise PermissionDeniedError("Only admins may change policies.")
        source = self._source(slug)
        data = PolicyInput(data=request.data)
        data.is_valid(raise_exception=True)
        values = dict(data.validated_data)
        values.pop("version", None)
        current = services.policy_current(source=source)
        base = services.policy_as_dict(current) if current is not None else {}
        merged = {k: values.get(k, base.get(k)) for k in services.POLICY_FIELDS if k in values or k in base}
        # The same path as the editor: target-error mode resolves thresholds for exactly this promise.
        from reviewapp.review.policy_services import policy_update

        policy = policy_update(source=source, actor=request.user, comment=values.get("comment", ""), **merged).policy
        return Response(policy_output(policy))
