"""Internal log action: an audit event ``action.logged``, no network.

It de-duplicates by idempotency key the way an external receiver would: the event carries the key as
its correlation id, so a redelivery after a lost worker finds it and writes nothing new.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from actions.handlers import DeliveryRequest, DeliveryResult, Outcome
from actions.models import ActionRun
from reviewapp.core.audit import audit_record
from reviewapp.core.models import AuditEvent

VERB = "action.logged"


def deliver(request: DeliveryRequest) -> DeliveryResult:
    with transaction.atomic():
        # The run's row lock serialises two deliveries of the same run, so the check below holds.
        ActionRun.objects.select_for_update().filter(pk=request.run_id).first()
        if not AuditEvent.objects.filter(verb=VERB, correlation_id=request.idempotency_key).exists():
            audit_record(
                actor=None, verb=VERB, object_type="decision", object_id=request.context["decision_id"],
                after={"action": request.name, "run_id": request.run_id, **request.context},
                correlation_id=request.idempotency_key,
            )
    return DeliveryResult(Outcome.DELIVERED)


def config_errors(*, url: str, template: Any) -> list[dict[str, Any]]:
    return []
