"""Writes for the action plane: configurations, the outbox of runs, delivery bookkeeping, approvals.

The run row is the ledger. It is created in the transaction of its decision; a Celery message
(``actions.deliver_run``) is only a wake-up call sent on commit, and ``action_runs_reconcile``
re-sends it for due runs and for runs whose worker died mid-delivery. Every attempt carries the
same idempotency key, so receivers apply the effect once.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from actions import registry, selectors, signing
from actions.handlers import DeliveryRequest, DeliveryResult, Outcome
from actions.models import ActionConfig, ActionRun, EgressAllowRule
from actions.ssrf import parse_rule
from reviewapp.core.audit import AuditEntry, audit_record, audit_record_many
from reviewapp.core.errors import Conflict, PermissionDeniedError, ValidationFailed
from reviewapp.core.roles import can
from reviewapp.ingest.models import Item, Source
from reviewapp.queues import Queue
from reviewapp.review.models import Decision

logger = logging.getLogger(__name__)

State = ActionRun.State
MAX_CONNECT_TIMEOUT = 30.0
MAX_READ_TIMEOUT = 60.0
MAX_ATTEMPTS_LIMIT = 50


def _setting(name: str, default: Any) -> Any:
    return getattr(settings, name, default)


def default_backoff_base_seconds() -> float:
    return float(_setting("ACTIONS_BACKOFF_BASE_SECONDS", 10.0))


def default_backoff_max_seconds() -> float:
    return float(_setting("ACTIONS_BACKOFF_MAX_SECONDS", 3600.0))


def stuck_after_seconds() -> float:
    """A run in `delivering` for longer than this lost its worker (above any request timeout)."""
    return float(_setting("ACTIONS_STUCK_SECONDS", 300.0))


def reconcile_grace_seconds() -> float:
    """A due pending run is re-enqueued once it has waited this long (its own message may be in flight)."""
    return float(_setting("ACTIONS_RECONCILE_GRACE_SECONDS", 60.0))


def retry_after_max_seconds() -> float:
    return float(_setting("ACTIONS_RETRY_AFTER_MAX_SECONDS", 3600.0))


def max_countdown_seconds() -> float:
    """Longer waits are not held by the broker (an ETA message past Redis' visibility timeout is
    delivered twice): the reconciler sends the run once it is due."""
    return float(_setting("ACTIONS_MAX_COUNTDOWN_SECONDS", 300.0))


def actions_queue() -> str:
    return str(_setting("ACTIONS_QUEUE", Queue.ACTIONS.value))


def idempotency_key_for(*, decision_id: int, config_id: int) -> str:
    return hashlib.sha256(f"{decision_id}:{config_id}".encode()).hexdigest()


def compensation_key_for(*, run_key: str, config_id: int) -> str:
    return hashlib.sha256(f"{run_key}:compensate:{config_id}".encode()).hexdigest()


def backoff_delay(*, attempts: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^(attempts-1)))."""
    ceiling = min(cap, base * (2 ** max(0, attempts - 1)))
    return random.uniform(0, ceiling)


# --- Enqueueing ------------------------------------------------------------------------------------

def _send(run_id: int, countdown: float | None, queue: str | None) -> None:
    from actions.tasks import deliver_run  # tasks import this module

    try:
        deliver_run.apply_async(args=[run_id], countdown=countdown or None, queue=queue or actions_queue())
    except BrokerError:
        # The row is committed and due: the reconciler sends it again once the broker is back.
        logger.warning("actions: broker unavailable, run %s left for the reconciler", run_id, exc_info=True)


def _enqueue_on_commit(run_ids: Sequence[int], *, countdown: float | None = None, queue: str | None = None) -> None:
    for run_id in run_ids:
        transaction.on_commit(partial(_send, run_id, countdown, queue), robust=True)


def _audit_run(run: ActionRun) -> dict[str, Any]:
    return {
        "state": run.state, "attempts": run.attempts, "config": run.config_id, "decision": run.decision_id,
        "idempotency_key": run.idempotency_key, "last_status_code": run.last_status_code,
        "last_error": run.last_error[:300], "is_compensation": run.is_compensation,
    }


# --- Configuration -----------------------------------------------------------------------------------

def _number(errors: list[dict[str, Any]], field: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not (low < float(value) <= high):
        errors.append({"field": field, "message": f"must be greater than {low:g} and at most {high:g}"})


def action_config_create(
    *,
    source: Source,
    actor: Any,
    kind: str,
    name: str,
    label: str = "",
    url: str = "",
    template: Any = None,
    high_risk: bool = False,
    compensating_config: ActionConfig | None = None,
    compensation_only: bool = False,
    enabled: bool = True,
    connect_timeout_seconds: float | None = None,
    read_timeout_seconds: float | None = None,
    max_attempts: int | None = None,
    backoff_base_seconds: float | None = None,
    backoff_max_seconds: float | None = None,
) -> tuple[ActionConfig, str]:
    """Create an action for ``source``. Returns ``(config, secret)``: the signing secret is returned
    here once and never shown again (empty for kinds that send nothing out)."""
    if not can(actor, "manage_policies"):
        raise PermissionDeniedError("Only an admin may configure actions.")
    name = (name or "").strip()
    label = (label or "").strip()
    url = (url or "").strip()
    template = {} if template is None else template
    errors: list[dict[str, Any]] = []
    if kind not in registry.HANDLERS:
        errors.append({"field": "kind", "message": f"must be one of {', '.join(registry.HANDLERS)}"})
    if not name or len(name) > 200:
        errors.append({"field": "name", "message": "a name of 1 to 200 characters is required"})
    if label and label not in source.labels:
        errors.append({"field": "label", "message": f"must be blank (any label) or one of {', '.join(source.labels)}"})
    if kind in registry.HANDLERS:
        handler_errors = registry.handler_for(kind).config_errors(url=url, template=template)
        if kind in registry.NETWORK_KINDS and not url:
            errors.append({"field": "url", "message": "a URL is required"})
            handler_errors = [e for e in handler_errors if e["field"] != "url"]
        errors.extend(handler_errors)
    if compensating_config is not None and compensating_config.source_id != source.pk:
        errors.append({"field": "compensating_config", "message": "must be an action of the same source"})
    _number(errors, "connect_timeout_seconds", connect_timeout_seconds, 0, MAX_CONNECT_TIMEOUT)
    _number(errors, "read_timeout_seconds", read_timeout_seconds, 0, MAX_READ_TIMEOUT)
    if max_attempts is not None and not 1 <= int(max_attempts) <= MAX_ATTEMPTS_LIMIT:
        errors.append({"field": "max_attempts", "message": f"must be between 1 and {MAX_ATTEMPTS_LIMIT}"})
    _number(errors, "backoff_base_seconds", backoff_base_seconds, 0, 3600)
    _number(errors, "backoff_max_seconds", backoff_max_seconds, 0, 86400)
    if errors:
        raise ValidationFailed("Invalid action.", errors)
    if kind not in registry.NETWORK_KINDS:
        url = ""  # nothing is sent anywhere
    secret = signing.secret_generate() if kind in registry.NETWORK_KINDS else ""
    try:
        with transaction.atomic():
            config = ActionConfig.objects.create(
                source=source, kind=kind, name=name, label=label, url=url, secret=secret, template=template,
                high_risk=high_risk, compensating_config=compensating_config, compensation_only=compensation_only,
                enabled=enabled,
                connect_timeout_seconds=connect_timeout_seconds or ActionConfig._meta.get_field(
                    "connect_timeout_seconds").default,
                read_timeout_seconds=read_timeout_seconds or ActionConfig._meta.get_field(
                    "read_timeout_seconds").default,
                max_attempts=max_attempts or int(_setting("ACTIONS_MAX_ATTEMPTS", 8)),
                backoff_base_seconds=backoff_base_seconds, backoff_max_seconds=backoff_max_seconds,
                created_by=actor if getattr(actor, "pk", None) else None,
            )
            audit_record(
                actor=actor, verb="action_config.created", object_type="action_config", object_id=config.pk,
                after=action_config_as_dict(config),
            )
    except IntegrityError as exc:
        raise Conflict(f"Source {source.slug} already has an action named {name!r}.",
                       [{"field": "name", "message": "already used for this source"}]) from exc
    return config, secret


def action_config_as_dict(config: ActionConfig) -> dict[str, Any]:
    """The configuration without its secret (safe to show and to audit)."""
    return {
        "id": config.pk, "source": config.source.slug, "name": config.name, "kind": config.kind,
        "label": config.label, "url": config.url, "template": config.template, "high_risk": config.high_risk,
        "compensating_config": config.compensating_config_id, "compensation_only": config.compensation_only,
        "enabled": config.enabled, "connect_timeout_seconds": config.connect_timeout_seconds,
        "read_timeout_seconds": config.read_timeout_seconds, "max_attempts": config.max_attempts,
        "backoff_base_seconds": config.backoff_base_seconds, "backoff_max_seconds": config.backoff_max_seconds,
        "has_secret": bool(config.secret),
    }


def egress_allow_rule_create(*, actor: Any, cidr_or_host: str, comment: str = "") -> EgressAllowRule:
    if not can(actor, "manage_policies"):
        raise PermissionDeniedError("Only an admin may change the egress allow-list.")
    try:
        parsed = parse_rule(cidr_or_host)
    except ValueError as exc:
        raise ValidationFailed("Invalid rule.", [{"field": "cidr_or_host", "message": str(exc)}]) from exc
    with transaction.atomic():
        rule, created = EgressAllowRule.objects.get_or_create(cidr_or_host=str(parsed), defaults={"comment": comment})
        if created:
            audit_record(actor=actor, verb="egress_rule.created", object_type="egress_rule", object_id=rule.pk,
                         after={"cidr_or_host": rule.cidr_or_host, "comment": comment})
    return rule


# --- Creating runs -----------------------------------------------------------------------------------

def _new_run(*, decision_id: int, config: ActionConfig, key: str, now: Any, compensates: ActionRun | None = None
             ) -> ActionRun:
    gated = config.high_risk
    return ActionRun(
        decision_id=decision_id, config=config, idempotency_key=key,
        state=State.PENDING_APPROVAL if gated else State.PENDING, next_attempt_at=None if gated else now,
        is_compensation=compensates is not None, compensates=compensates, created_at=now, state_changed_at=now,
    )


def _insert_runs(runs: list[ActionRun]) -> list[ActionRun]:
    """Insert the runs whose key is new (a second call for the same decision creates nothing)."""
    if not runs:
        return []
    existing = set(
        ActionRun.objects.filter(idempotency_key__in=[r.idempotency_key for r in runs])
        .values_list("idempotency_key", flat=True)
    )
    fresh = [r for r in runs if r.idempotency_key not in existing]
    return ActionRun.objects.bulk_create(fresh) if fresh else []


def action_runs_create_for_decisions(*, decisions: Sequence[Decision]) -> list[ActionRun]:
    """The set-based form of ``action_runs_create_for_decision`` (for bulk auto-decisions)."""
    decisions = [d for d in decisions if d.pk is not None and d.origin != Decision.Origin.IMPORT]
    if not decisions:
        return []
    # The review services create decisions with their item loaded: read its source from there, and only
    # ask the database for the others (one query for a bulk auto-decision, none for a verdict).
    source_of = {d.item_id: d.item.source_id for d in decisions if Decision.item.is_cached(d)}
    missing = {d.item_id for d in decisions} - source_of.keys()
    if missing:
        source_of.update(Item.objects.filter(pk__in=missing).values_list("pk", "source_id"))
    configs: dict[int, list[ActionConfig]] = {}
    for config in ActionConfig.objects.filter(
        source_id__in=set(source_of.values()), enabled=True, compensation_only=False
    ).order_by("id"):
        configs.setdefault(config.source_id, []).append(config)
    if not configs:
        return []
    now = timezone.now()
    runs = [
        _new_run(decision_id=d.pk, config=c, key=idempotency_key_for(decision_id=d.pk, config_id=c.pk), now=now)
        for d in decisions
        for c in configs.get(source_of[d.item_id], [])
        if not c.label or c.label == d.label
    ]
    with transaction.atomic():
        created = _insert_runs(runs)
        if created:
            decision_ids = sorted({r.decision_id for r in created})
            audit_record(
                actor=None, verb="action_runs.created", object_type="decision",
                object_id=str(decision_ids[0]) if len(decision_ids) == 1 else f"{decision_ids[0]}..{decision_ids[-1]}",
                after={
                    "count": len(created),
                    "pending": sum(r.state == State.PENDING for r in created),
                    "pending_approval": sum(r.state == State.PENDING_APPROVAL for r in created),
                    "runs": [[r.pk, r.config_id, r.decision_id, r.state] for r in created[:200]],
                },
            )
            _enqueue_on_commit([r.pk for r in created if r.state == State.PENDING])
    return created


def action_runs_create_for_decision(*, decision: Decision) -> list[ActionRun]:
    """Create the runs of every enabled action matching the decision's source and label.

    Call it inside the transaction that creates the decision: runs commit (or roll back) with it,
    and deliveries are enqueued on commit. High-risk actions wait in ``pending_approval``.
    """
    return action_runs_create_for_decisions(decisions=[decision])


def _compensations(*, runs: Sequence[ActionRun], decision: Decision, now: Any) -> list[ActionRun]:
    """Compensation runs (on ``decision``, the one in force) for delivered runs whose action has one."""
    out: list[ActionRun] = []
    for run in runs:
        comp = run.config.compensating_config
        if run.is_compensation or run.state != State.DELIVERED or comp is None or not comp.enabled:
            continue
        key = compensation_key_for(run_key=run.idempotency_key, config_id=comp.pk)
        out.append(_new_run(decision_id=decision.pk, config=comp, key=key, now=now, compensates=run))
    return _insert_runs(out)


def _override_reason(*, old_decision_id: int, new_decision_id: int) -> str:
    """Why a run was cancelled by an override. Undo finds the runs to reinstate by this exact text, which
    only an override writes (an admin's rejection carries the admin's own reason)."""
    return f"decision {old_decision_id} overridden by decision {new_decision_id}"


def action_runs_create_compensation(*, old_decision: Decision, new_decision: Decision) -> list[ActionRun]:
    """An override replaced ``old_decision`` by ``new_decision`` (call it in that transaction).

    Runs of the old decision that have not acted yet are cancelled (``rejected``); delivered ones
    whose action names a compensating action get a compensation run. A run still in flight is
    handled when its outcome is recorded (see ``_record``).
    """
    now = timezone.now()
    with transaction.atomic():
        runs = list(
            ActionRun.objects.select_for_update(of=("self",))
            .filter(decision=old_decision)
            .select_related("config__compensating_config")
            .order_by("id")
        )
        cancelled = []
        for run in runs:
            if run.state in (State.PENDING, State.PENDING_APPROVAL):
                run.state = State.REJECTED
                run.rejection_reason = _override_reason(old_decision_id=old_decision.pk,
                                                        new_decision_id=new_decision.pk)
                run.rejected_at = now
                run.next_attempt_at = None
                run.state_changed_at = now
                cancelled.append(run)
        if cancelled:
            ActionRun.objects.bulk_update(
                cancelled, ["state", "rejection_reason", "rejected_at", "next_attempt_at", "state_changed_at"]
            )
        created = _compensations(runs=runs, decision=new_decision, now=now)
        if cancelled or created:
            audit_record(
                actor=None, verb="action_runs.override", object_type="decision", object_id=old_decision.pk,
                after={"new_decision": new_decision.pk, "cancelled": [r.pk for r in cancelled],
                       "compensations": [[r.pk, r.config_id, r.compensates_id, r.state] for r in created]},
            )
        _enqueue_on_commit([r.pk for r in created if r.state == State.PENDING])
    return created


@dataclass(frozen=True)
class RunsWithdrawal:
    """What withdrawing a decision did to its action runs (each entry: run, action, kind, state)."""

    # Had not acted (pending, waiting for approval, failed or dead): cancelled, they will never be sent.
    cancelled: list[dict[str, Any]] = field(default_factory=list)
    # Acted already: cannot be withdrawn. ``compensation`` names the compensating run queued, if the
    # action has a compensating action; otherwise the effect stays and someone must undo it by hand.
    delivered: list[dict[str, Any]] = field(default_factory=list)
    # Being sent at this moment: if the receiver acts, a compensation is queued when that is recorded.
    in_flight: list[dict[str, Any]] = field(default_factory=list)
    # Runs of the restored decision that the withdrawn override had cancelled before they acted: pending
    # again (or waiting for approval again), as if the override had never happened.
    reinstated: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"cancelled": self.cancelled, "delivered": self.delivered, "in_flight": self.in_flight,
                "reinstated": self.reinstated}

    def summary(self) -> str:
        """One sentence for the person who undid the decision ("" when it had no actions)."""
        parts = []
        if self.cancelled:
            names = ", ".join(sorted({r["action"] for r in self.cancelled}))
            parts.append(f"{len(self.cancelled)} action{'s' if len(self.cancelled) != 1 else ''} not yet sent "
                         f"withdrawn ({names})")
        for run in self.delivered:
            then = (f"compensation {run['compensation_action']!r} queued" if run["compensation"]
                    else "no compensating action is configured")
            parts.append(f"{run['action']!r} was already delivered and cannot be withdrawn ({then})")
        for run in self.in_flight:
            parts.append(f"{run['action']!r} is being sent right now and cannot be withdrawn (compensated if it "
                         "lands, when a compensating action is configured)")
        if self.reinstated:
            names = ", ".join(sorted({r["action"] for r in self.reinstated}))
            parts.append(f"{len(self.reinstated)} action{'s' if len(self.reinstated) != 1 else ''} of the restored "
                         f"decision queued again ({names})")
        return "; ".join(parts) + "." if parts else ""


def action_runs_withdraw(*, decision: Decision, restored: Decision | None, actor: Any, reason: str
                         ) -> RunsWithdrawal:
    """The decision was withdrawn (an undo), ``restored`` (if any) is current again: cancel every run of
    ``decision`` that has not acted, and for delivered ones, which cannot be withdrawn, queue their
    compensating action (on the restored decision, or on the withdrawn one when none is restored).
    Call it in the transaction that withdraws the decision; one audit event lists every run."""
    now = timezone.now()
    out = RunsWithdrawal()
    with transaction.atomic():
        # The row lock makes a delivery claim that races us wait and then find the run rejected.
        runs = list(
            ActionRun.objects.select_for_update(of=("self",)).filter(decision=decision)
            .select_related("config__compensating_config").order_by("id")
        )
        cancelled = []
        delivered = []
        for run in runs:
            entry = {"run": run.pk, "action": run.config.name, "kind": run.config.kind, "state": run.state,
                     "is_compensation": run.is_compensation}
            if run.state in (State.PENDING, State.PENDING_APPROVAL, State.FAILED, State.DEAD):
                run.state = State.REJECTED
                run.rejection_reason = reason[:500]
                run.rejected_at = now
                run.next_attempt_at = None
                run.state_changed_at = now
                cancelled.append(run)
                out.cancelled.append(entry)
            elif run.state == State.DELIVERED:
                delivered.append(run)
                out.delivered.append({**entry, "delivered_at": run.delivered_at.isoformat() if run.delivered_at
                                      else None, "compensation": None, "compensation_action": None})
            elif run.state == State.DELIVERING:
                out.in_flight.append(entry)
        if cancelled:
            ActionRun.objects.bulk_update(
                cancelled, ["state", "rejection_reason", "rejected_at", "next_attempt_at", "state_changed_at"]
            )
        created = _compensations(runs=delivered, decision=restored or decision, now=now)
        by_run = {c.compensates_id: c for c in created}
        for entry in out.delivered:
            comp = by_run.get(entry["run"])
            if comp is not None:
                entry["compensation"], entry["compensation_action"] = comp.pk, comp.config.name
        reinstated = _reinstate(restored=restored, withdrawn=decision, now=now) if restored is not None else []
        out.reinstated.extend({"run": r.pk, "action": r.config.name, "kind": r.config.kind, "state": r.state}
                              for r in reinstated)
        if runs or reinstated:
            audit_record(
                actor=actor, verb="action_runs.withdrawn", object_type="decision", object_id=decision.pk,
                after={"reason": reason[:500], "restored_decision": restored.pk if restored else None,
                       **out.as_dict()},
            )
        _enqueue_on_commit([r.pk for r in [*created, *reinstated] if r.state == State.PENDING])
    return out


def _reinstate(*, restored: Decision, withdrawn: Decision, now: Any) -> list[ActionRun]:
    """The runs of ``restored`` that the override by ``withdrawn`` cancelled before they acted, back to where
    they were: pending, or waiting for approval when the action is high-risk and nobody had approved the run.
    They keep their idempotency key, so a receiver that somehow saw one before still sees one request."""
    runs = list(
        ActionRun.objects.select_for_update(of=("self",)).select_related("config")
        .filter(decision=restored, state=State.REJECTED, is_compensation=False, rejected_by__isnull=True,
                rejection_reason=_override_reason(old_decision_id=restored.pk, new_decision_id=withdrawn.pk))
        .order_by("id")
    )
    for run in runs:
        gated = run.config.high_risk and run.approved_at is None
        run.state = State.PENDING_APPROVAL if gated else State.PENDING
        run.next_attempt_at = None if gated else now
        run.rejection_reason = ""
        run.rejected_at = None
        run.state_changed_at = now
    if runs:
        ActionRun.objects.bulk_update(
            runs, ["state", "rejection_reason", "rejected_at", "next_attempt_at", "state_changed_at"]
        )
    return runs


# --- Approvals and replays -----------------------------------------------------------------------------

def _require_admin(actor: Any) -> None:
    if not (can(actor, "adjudicate") or can(actor, "manage_policies")):
        raise PermissionDeniedError("Only an admin may approve, reject or replay actions.")


def _locked_run(run: ActionRun) -> ActionRun:
    return (
        ActionRun.objects.select_for_update(of=("self",))
        .select_related("decision__verdict", "config")
        .get(pk=run.pk)
    )


def action_run_approve(*, run: ActionRun, actor: Any) -> ActionRun:
    """The second person's approval of a high-risk run: an admin who did not review the decision."""
    _require_admin(actor)
    now = timezone.now()
    with transaction.atomic():
        run = _locked_run(run)
        decision = run.decision
        reviewers = {decision.decided_by_id, decision.verdict.reviewer_id if decision.verdict else None} - {None}
        if actor.pk in reviewers:
            raise PermissionDeniedError("A second person must approve this action: you made the decision.")
        if run.state != State.PENDING_APPROVAL:
            raise Conflict(f"This run is {run.state}, not waiting for approval.")
        before = _audit_run(run)
        run.state = State.PENDING
        run.approved_by = actor
        run.approved_at = now
        run.next_attempt_at = now
        run.state_changed_at = now
        run.save(update_fields=["state", "approved_by", "approved_at", "next_attempt_at", "state_changed_at"])
        audit_record(actor=actor, verb="action_run.approved", object_type="action_run", object_id=run.pk,
                     before=before, after=_audit_run(run))
        _enqueue_on_commit([run.pk])
    return run


def action_run_reject(*, run: ActionRun, actor: Any, reason: str) -> ActionRun:
    """Refuse a waiting run (or dismiss a failed or dead one); the reason is recorded."""
    _require_admin(actor)
    reason = (reason or "").strip()
    if not reason:
        raise ValidationFailed("A reason is required.", [{"field": "reason", "message": "required"}])
    now = timezone.now()
    with transaction.atomic():
        run = _locked_run(run)
        if run.state not in (State.PENDING_APPROVAL, State.FAILED, State.DEAD):
            raise Conflict(f"This run is {run.state}; only waiting, failed or dead runs can be rejected.")
        before = _audit_run(run)
        run.state = State.REJECTED
        run.rejected_by = actor
        run.rejected_at = now
        run.rejection_reason = reason[:500]
        run.next_attempt_at = None
        run.state_changed_at = now
        run.save(update_fields=["state", "rejected_by", "rejected_at", "rejection_reason", "next_attempt_at",
                                "state_changed_at"])
        audit_record(actor=actor, verb="action_run.rejected", object_type="action_run", object_id=run.pk,
                     before=before, after={**_audit_run(run), "reason": run.rejection_reason})
    return run


def action_run_replay(*, run: ActionRun, actor: Any) -> ActionRun:
    """Send a failed or dead-lettered run again, attempts reset, with the same idempotency key."""
    _require_admin(actor)
    now = timezone.now()
    with transaction.atomic():
        run = _locked_run(run)
        if run.state not in (State.FAILED, State.DEAD):
            raise Conflict(f"This run is {run.state}; only failed or dead runs can be replayed.")
        if not run.decision.is_current:
            raise Conflict("The decision was overridden since; its action is not replayed.")
        if not run.config.enabled:
            raise Conflict("The action is disabled; enable it before replaying.")
        before = _audit_run(run)
        run.state = State.PENDING
        run.attempts = 0
        run.next_attempt_at = now
        run.state_changed_at = now
        run.save(update_fields=["state", "attempts", "next_attempt_at", "state_changed_at"])
        audit_record(actor=actor, verb="action_run.replayed", object_type="action_run", object_id=run.pk,
                     before=before, after=_audit_run(run))
        _enqueue_on_commit([run.pk])
    return run


# --- Delivery ------------------------------------------------------------------------------------------

def _delivery_request(run: ActionRun) -> DeliveryRequest:
    config = run.config
    return DeliveryRequest(
        run_id=run.pk, idempotency_key=run.idempotency_key, kind=config.kind, name=config.name, url=config.url,
        secret=config.secret, template=config.template, connect_timeout=config.connect_timeout_seconds,
        read_timeout=config.read_timeout_seconds, context=selectors.run_context(run=run),
        allow_list=selectors.egress_allow_list(),
    )


def action_run_deliver(*, run_id: int, queue: str | None = None) -> str:
    """One delivery attempt (the body of ``actions.deliver_run``). Returns what happened, in a word.

    The claim is one conditional UPDATE (pending and due -> delivering, attempts + 1), so two
    messages for the same run never deliver it concurrently; no transaction is held during the
    request. A run left in ``delivering`` by a dead worker is taken back by ``action_runs_reconcile``.
    """
    now = timezone.now()
    claimed = ActionRun.objects.filter(pk=run_id, state=State.PENDING, next_attempt_at__lte=now).update(
        state=State.DELIVERING, attempts=F("attempts") + 1, state_changed_at=now
    )
    if not claimed:
        row = ActionRun.objects.filter(pk=run_id).values("state", "next_attempt_at").first()
        if row is None:
            return "missing"
        if row["state"] == State.PENDING and row["next_attempt_at"] > now:
            # Woken early (a duplicate or redelivered message): sleep again until due, or leave the
            # run to the reconciler when that is far off.
            remaining = (row["next_attempt_at"] - now).total_seconds()
            if remaining <= max_countdown_seconds():
                _send(run_id, max(0.05, remaining), queue)
            return "early"
        return f"skipped:{row['state']}"
    run = selectors.run_for_delivery(run_id=run_id)
    # A compensation repairs what an earlier run did, so it goes out even when its decision is no longer
    # current (an undo that restored nothing leaves it on the withdrawn decision).
    if not run.decision.is_current and not run.is_compensation:
        return _record(run_id=run_id, attempt=run.attempts, queue=queue, result=DeliveryResult(
            Outcome.FAIL, None, "decision overridden before delivery; not sent"), cancel=True)
    if not run.config.enabled:
        result = DeliveryResult(Outcome.FAIL, None, "the action was disabled; not sent")
    else:
        result = registry.handler_for(run.config.kind).deliver(_delivery_request(run))
    return _record(run_id=run_id, attempt=run.attempts, queue=queue, result=result)


def _retry_delay(run: ActionRun, result: DeliveryResult) -> float:
    if result.retry_after_seconds is not None:
        return min(result.retry_after_seconds, retry_after_max_seconds())
    config = run.config
    base = config.backoff_base_seconds if config.backoff_base_seconds is not None else default_backoff_base_seconds()
    cap = config.backoff_max_seconds if config.backoff_max_seconds is not None else default_backoff_max_seconds()
    return backoff_delay(attempts=run.attempts, base=base, cap=cap)


def _record(*, run_id: int, attempt: int, queue: str | None, result: DeliveryResult, cancel: bool = False) -> str:
    now = timezone.now()
    with transaction.atomic():
        run = (
            ActionRun.objects.select_for_update(of=("self",))
            .select_related("config__compensating_config", "decision")
            .get(pk=run_id)
        )
        before = _audit_run(run)
        if result.outcome == Outcome.DELIVERED:
            if run.state == State.DELIVERED:
                return "already delivered"
            # The receiver acted: that is the truth, whatever happened to the row meanwhile.
            run.state = State.DELIVERED
            run.delivered_at = now
            run.last_error = ""
            verb = "action_run.delivered"
        elif run.state != State.DELIVERING or run.attempts != attempt:
            return "stale"  # the reconciler took the run back meanwhile; the newer attempt decides
        elif cancel:
            run.state = State.REJECTED
            run.rejected_at = now
            run.rejection_reason = result.error
            verb = "action_run.cancelled"
        elif result.outcome == Outcome.FAIL:
            run.state = State.FAILED
            run.last_error = result.error[:2000]
            verb = "action_run.failed"
        elif run.attempts >= run.config.max_attempts:
            run.state = State.DEAD
            run.last_error = f"{result.error} (gave up after {run.attempts} attempts)"[:2000]
            verb = "action_run.dead"
        else:
            delay = _retry_delay(run, result)
            run.state = State.PENDING
            run.next_attempt_at = now + timedelta(seconds=delay)
            run.last_error = result.error[:2000]
            verb = "action_run.retry_scheduled"
            if delay <= max_countdown_seconds():
                _enqueue_on_commit([run.pk], countdown=delay, queue=queue)
        if run.state != State.PENDING:
            run.next_attempt_at = None
        run.last_status_code = result.status_code
        run.state_changed_at = now
        run.save()
        entries = [AuditEntry(verb, "action_run", run.pk, before, _audit_run(run), run.idempotency_key)]
        if run.state == State.DELIVERED and not run.is_compensation and not run.decision.is_current:
            # Delivered after its decision was overridden: compensate against the decision in force.
            # None current (an undo put the item back in review): the compensation goes on the run's own
            # decision, as action_runs_withdraw does.
            current = Decision.objects.filter(item_id=run.decision.item_id, is_current=True).first() or run.decision
            if current is not None:
                created = _compensations(runs=[run], decision=current, now=now)
                for comp in created:
                    entries.append(AuditEntry("action_run.compensation_created", "action_run", comp.pk,
                                              None, _audit_run(comp)))
                _enqueue_on_commit([c.pk for c in created if c.state == State.PENDING], queue=queue)
        audit_record_many(actor=None, entries=entries)
    return run.state


def action_run_release_after_error(*, run_id: int, error: str, queue: str | None = None) -> str:
    """The delivery task crashed (a bug, a time limit): count the attempt as a transient failure."""
    attempt = ActionRun.objects.filter(pk=run_id, state=State.DELIVERING).values_list("attempts", flat=True).first()
    if attempt is None:
        return "not delivering"
    return _record(run_id=run_id, attempt=attempt, queue=queue,
                   result=DeliveryResult(Outcome.RETRY, None, f"internal error: {error}"[:500]))


# --- Reconciliation -------------------------------------------------------------------------------------

def action_runs_reconcile(*, stuck_seconds: float | None = None, limit: int = 1000) -> dict[str, int]:
    """Re-enqueue due pending runs (a lost message only delays delivery) and take back runs stuck in
    ``delivering`` (a killed worker): they go out again with the same idempotency key, or are
    dead-lettered when their attempts are used up. Idempotent; called by ``review.reconcile``."""
    now = timezone.now()
    stuck_seconds = stuck_after_seconds() if stuck_seconds is None else stuck_seconds
    due = list(
        ActionRun.objects.filter(
            state=State.PENDING, next_attempt_at__lte=now - timedelta(seconds=reconcile_grace_seconds())
        ).order_by("next_attempt_at").values_list("pk", flat=True)[:limit]
    )
    redelivered: list[ActionRun] = []
    dead: list[ActionRun] = []
    with transaction.atomic():
        stuck = list(
            ActionRun.objects.select_for_update(skip_locked=True, of=("self",))
            .filter(state=State.DELIVERING, state_changed_at__lt=now - timedelta(seconds=stuck_seconds))
            .select_related("config").order_by("state_changed_at")[:limit]
        )
        entries = []
        for run in stuck:
            before = _audit_run(run)
            lost = f"worker lost during attempt {run.attempts}"
            if run.attempts >= run.config.max_attempts:
                run.state = State.DEAD
                run.next_attempt_at = None
                run.last_error = f"{lost}; gave up after {run.attempts} attempts"
                dead.append(run)
            else:
                run.state = State.PENDING
                run.next_attempt_at = now
                run.last_error = f"{lost}; sent again with the same idempotency key"
                redelivered.append(run)
            run.state_changed_at = now
            entries.append(AuditEntry("action_run.reclaimed", "action_run", run.pk, before, _audit_run(run),
                                      run.idempotency_key))
        if stuck:
            ActionRun.objects.bulk_update(stuck, ["state", "next_attempt_at", "last_error", "state_changed_at"])
            audit_record_many(actor=None, entries=entries)
        _enqueue_on_commit([r.pk for r in redelivered])
    for run_id in due:
        _send(run_id, None, None)
    report = {"requeued": len(due), "stuck_redelivered": len(redelivered), "stuck_dead": len(dead)}
    if any(report.values()):
        logger.info("actions reconcile: %s", report)
    return report
