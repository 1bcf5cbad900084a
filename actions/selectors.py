"""Reads for the action plane."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from actions.handlers import iso
from actions.models import ActionConfig, ActionRun, EgressAllowRule
from actions.ssrf import AllowList, allow_list_from
from reviewapp.ingest.models import Source

ATTENTION_STATES = (ActionRun.State.PENDING_APPROVAL, ActionRun.State.FAILED, ActionRun.State.DEAD)
_RUN_RELATED = (
    "config", "decision", "decision__item", "decision__item__source", "decision__verdict__reviewer",
    "decision__decided_by", "approved_by", "rejected_by", "compensates",
)


def action_configs_for_source(*, source: Source) -> QuerySet[ActionConfig]:
    return ActionConfig.objects.filter(source=source).select_related("compensating_config", "created_by")


def action_runs_for_decision(*, decision_id: int) -> QuerySet[ActionRun]:
    return ActionRun.objects.filter(decision_id=decision_id).select_related(*_RUN_RELATED).order_by("created_at", "id")


def action_runs_for_item(*, item_id: int) -> QuerySet[ActionRun]:
    """Every run of every decision of the item, oldest first: the item's history shows original
    actions and their compensations side by side."""
    return (
        ActionRun.objects.filter(decision__item_id=item_id).select_related(*_RUN_RELATED).order_by("created_at", "id")
    )


def action_runs_detailed() -> QuerySet[ActionRun]:
    return ActionRun.objects.select_related(*_RUN_RELATED)


def action_runs_needing_attention(*, states: tuple[str, ...] = ATTENTION_STATES) -> QuerySet[ActionRun]:
    return ActionRun.objects.filter(state__in=states).select_related(*_RUN_RELATED).order_by("-created_at", "-id")


def egress_allow_list() -> AllowList:
    return allow_list_from(EgressAllowRule.objects.values_list("cidr_or_host", flat=True))


def run_context(*, run: ActionRun) -> dict[str, Any]:
    """What a run tells its receiver about the decision (the webhook body; ticket placeholders)."""
    decision = run.decision
    item = decision.item
    compensated = run.compensates
    return {
        "run_id": run.pk,
        "idempotency_key": run.idempotency_key,
        "action": run.config.name,
        "decision_id": decision.pk,
        "item_id": item.pk,
        "external_id": item.external_id,
        "source": item.source.slug,
        "label": decision.label,
        "origin": decision.origin,
        "reason": decision.reason,
        "decided_at": iso(decision.created_at),
        "model_version": decision.model_version.version if decision.model_version else None,
        "policy_version": decision.policy.version if decision.policy else None,
        "is_compensation": run.is_compensation,
        "compensates_run_id": compensated.pk if compensated else None,
        "compensates_decision_id": compensated.decision_id if compensated else None,
        "compensates_label": compensated.decision.label if compensated else None,
    }


def run_for_delivery(*, run_id: int) -> ActionRun:
    return ActionRun.objects.select_related(
        "config", "decision__item__source", "decision__model_version", "decision__policy",
        "compensates__decision",
    ).get(pk=run_id)
