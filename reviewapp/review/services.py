"""Writes for the review domain: policies, routing, claims, verdicts, decisions and labels."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Exists, Max, OuterRef, Subquery
from django.utils import timezone

from actions.services import (
    RunsWithdrawal,
    action_runs_create_compensation,
    action_runs_create_for_decision,
    action_runs_create_for_decisions,
    action_runs_withdraw,
)
from reviewapp.core.audit import (
    AuditEntry,
    audit_record,
    audit_record_many,
    audit_remember_chain,
    audit_sql_params,
)
from reviewapp.core.errors import Conflict, PermissionDeniedError, ValidationFailed
from reviewapp.core.roles import can
from reviewapp.ingest.models import Item, Source
from reviewapp.ingest.pgcopy import copy_stage, id_array, id_set
from reviewapp.review.models import Decision, Label, Policy, ReviewTask, Verdict
from scoring.models import ModelVersion

POLICY_FIELDS = ("mode", "thresholds", "target_error", "confidence", "qa_sample_rate", "priority", "double_review_rate")


def policy_as_dict(policy: Policy) -> dict[str, Any]:
    return {
        "version": policy.version,
        "mode": policy.mode,
        "thresholds": policy.thresholds,
        "target_error": policy.target_error,
        "confidence": policy.confidence,
        "qa_sample_rate": policy.qa_sample_rate,
        "priority": policy.priority,
        "double_review_rate": policy.double_review_rate,
        "comment": policy.comment,
    }


def _validate_policy(*, source: Source, mode: str, thresholds: dict[str, float], target_error: float | None,
                     confidence: float, qa_sample_rate: float, priority: str, double_review_rate: float = 0.0) -> None:
    errors: list[dict[str, Any]] = []
    if mode not in Policy.Mode.values:
        errors.append({"field": "mode", "message": f"must be one of {', '.join(Policy.Mode.values)}"})
    if not isinstance(thresholds, dict):
        errors.append({"field": "thresholds", "message": "must be an object of label -> probability"})
    else:
        for label, value in thresholds.items():
            if label not in source.labels:
                errors.append({"field": f"thresholds.{label}", "message": f"{label!r} is not in the label set"})
            elif not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 1:
                errors.append({"field": f"thresholds.{label}", "message": "must be a number between 0 and 1"})
    if mode == Policy.Mode.TARGET_ERROR and (target_error is None or not 0 < target_error < 1):
        errors.append({"field": "target_error", "message": "target_error mode needs a value between 0 and 1"})
    if not 0 < confidence < 1:
        errors.append({"field": "confidence", "message": "must be between 0 and 1 (exclusive)"})
    if not 0 <= qa_sample_rate <= 1:
        errors.append({"field": "qa_sample_rate", "message": "must be between 0 and 1"})
    if not isinstance(double_review_rate, int | float) or not 0 <= double_review_rate <= 1:
        errors.append({"field": "double_review_rate", "message": "must be between 0 and 1"})
    if priority not in Policy.Priority.values:
        errors.append({"field": "priority", "message": f"must be one of {', '.join(Policy.Priority.values)}"})
    if errors:
        raise ValidationFailed("Invalid policy.", errors)


def policy_create(
    *,
    source: Source,
    actor: Any | None,
    mode: str = Policy.Mode.THRESHOLD,
    thresholds: dict[str, float] | None = None,
    target_error: float | None = None,
    confidence: float = 0.95,
    qa_sample_rate: float = 0.02,
    priority: str = Policy.Priority.UNCERTAINTY,
    comment: str = "",
    double_review_rate: float | None = None,
) -> Policy:
    """Save a new policy version for ``source``; it is in force from its commit on.

    ``double_review_rate`` left out (None) keeps the rate of the policy in force (0 for a first policy)."""
    thresholds = dict(thresholds or {})
    if double_review_rate is None:
        previous_policy = policy_current(source=source)
        double_review_rate = previous_policy.double_review_rate if previous_policy is not None else 0.0
    _validate_policy(source=source, mode=mode, thresholds=thresholds, target_error=target_error,
                     confidence=confidence, qa_sample_rate=qa_sample_rate, priority=priority,
                     double_review_rate=double_review_rate)
    with transaction.atomic():
        # Lock the source row so two concurrent saves get consecutive versions.
        Source.objects.select_for_update().filter(pk=source.pk).first()
        previous = policy_current(source=source)
        number = (Policy.objects.filter(source=source).aggregate(m=Max("version"))["m"] or 0) + 1
        policy = Policy.objects.create(
            source=source, version=number, mode=mode, thresholds=thresholds, target_error=target_error,
            confidence=confidence, qa_sample_rate=qa_sample_rate, priority=priority, comment=comment,
            double_review_rate=double_review_rate, created_by=actor if getattr(actor, "pk", None) else None,
        )
        audit_record(
            actor=actor, verb="policy.created", object_type="policy", object_id=policy.pk,
            before=policy_as_dict(previous) if previous else None, after=policy_as_dict(policy),
        )
    return policy


def policy_current(*, source: Source) -> Policy | None:
    return Policy.objects.filter(source=source).order_by("-version").first()


# --- Routing --------------------------------------------------------------------------------------

AUTO_NONE_TARGET_ERROR = "target-error policy: the model has no risk-control evidence; nothing is auto-decided"
QA_REASON = "QA sample of an auto-decision"
QA_OVERRIDE_REASON = "QA override"


def _fmt(p: float, *, floor: bool = False) -> str:
    """A probability in words: up to 4 decimals; floored when it must read as *below* a threshold."""
    if floor:
        # The epsilon absorbs binary noise (0.29 * 10_000 == 2899.9999...).
        p = math.floor(p * 10_000 + 1e-6) / 10_000
    return f"{p:.4f}".rstrip("0").rstrip(".")


def qa_draw(*, item_id: int, policy: Policy) -> float:
    """A deterministic uniform draw in [0, 1) per (item, policy version): reruns make the same choice."""
    digest = hashlib.sha256(f"qa:{item_id}:{policy.source_id}:{policy.version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def policy_thresholds(*, policy: Policy, model_version: ModelVersion | None) -> tuple[dict[str, float] | None, str]:
    """The thresholds in force for a prediction of ``model_version`` and, when there are none, why.

    target_error mode reads the thresholds chosen by the model version's selective risk control.
    """
    if policy.mode == Policy.Mode.TARGET_ERROR:
        risk: dict[str, Any] = {}
        if model_version is not None and policy.target_error is not None:
            from scoring.services import model_risk_control

            # Thresholds for exactly this policy's (target, confidence): the stored pair may be another one.
            risk = model_risk_control(model_version=model_version, target_error=policy.target_error,
                                      confidence=policy.confidence)
        thresholds = risk.get("thresholds")
        if not thresholds:
            return None, AUTO_NONE_TARGET_ERROR
        return {str(k): float(v) for k, v in thresholds.items() if v is not None}, ""
    return {str(k): float(v) for k, v in (policy.thresholds or {}).items() if v is not None}, ""


@dataclass(frozen=True)
class RouteOutcome:
    auto: bool
    reason: str


def route_one(*, label: str, confidence: float, thresholds: dict[str, float] | None, why_none: str) -> RouteOutcome:
    """The policy rule for one prediction, as a pure function (issue 6's simulator can reuse it)."""
    if thresholds is None:
        return RouteOutcome(False, why_none)
    threshold = thresholds.get(label)
    if threshold is None:
        return RouteOutcome(False, f"no threshold for label {label}")
    if confidence >= threshold:
        return RouteOutcome(True, f"{label} {_fmt(confidence)} at or above its threshold {_fmt(threshold)}")
    return RouteOutcome(False, f"{label} {_fmt(confidence, floor=True)} below its threshold {_fmt(threshold)}")


def _current_policies(source_ids: set[int]) -> dict[int, Policy]:
    newest = Policy.objects.filter(source_id=OuterRef("source_id")).order_by("-version").values("version")[:1]
    rows = Policy.objects.filter(source_id__in=source_ids, version=Subquery(newest)).select_related("source")
    return {p.source_id: p for p in rows}


def _next_rounds(item_ids: list[int], kinds: set[str]) -> dict[tuple[int, str], int]:
    """Round number for a new task per (item, kind): one more than any earlier task (re-routing)."""
    if not item_ids:
        return {}
    rows = (
        ReviewTask.objects.filter(item_id__in=id_set(item_ids), kind__in=kinds)
        .values("item_id", "kind")
        .annotate(top=Max("round"))
    )
    return {(r["item_id"], r["kind"]): r["top"] + 1 for r in rows}


def _pair_round(rounds: dict[tuple[int, str], int], item_id: int) -> int:
    """One round number for both tasks of a double review: past any earlier review or double task."""
    return max(rounds.get((item_id, ReviewTask.Kind.REVIEW), 1), rounds.get((item_id, ReviewTask.Kind.DOUBLE), 1))


def _task_priority(policy: Policy | None, confidence: float) -> float:
    return confidence if policy is None or policy.priority == Policy.Priority.UNCERTAINTY else 0.0


DOUBLE_REASON_SUFFIX = " · double review"


def double_draw(*, item_id: int, policy: Policy) -> float:
    """A deterministic uniform draw in [0, 1) per (item, policy version), independent of the QA draw."""
    digest = hashlib.sha256(f"double:{item_id}:{policy.source_id}:{policy.version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _review_tasks(*, item_id: int, source_id: int, policy: Policy | None, round_: int, priority: float, reason: str
                  ) -> list[TaskRow]:
    """The review task for a queued item, plus its independent twin when the item is drawn for double review."""
    double = bool(policy is not None and policy.double_review_rate
                  and double_draw(item_id=item_id, policy=policy) < policy.double_review_rate)
    kinds = [ReviewTask.Kind.REVIEW, ReviewTask.Kind.DOUBLE] if double else [ReviewTask.Kind.REVIEW]
    text = (reason[:300 - len(DOUBLE_REASON_SUFFIX)] + DOUBLE_REASON_SUFFIX) if double else reason[:300]
    return [TaskRow(item_id, source_id, str(kind), round_, priority, text, double) for kind in kinds]


class TaskRow(NamedTuple):
    """An open review task to create (plain tuples: building 2,000 model instances costs more than writing them)."""

    item_id: int
    source_id: int
    kind: str
    round: int
    priority: float
    reason: str
    paired: bool


class DecisionRow(NamedTuple):
    item_id: int
    label: str
    prediction_id: int
    model_version_id: int
    policy_id: int | None
    reason: str


@dataclass
class RoutePlan:
    """What routing decided for a set of items, before anything is written: one row per item (its new state,
    policy version and rule in words), plus the model decisions and review tasks to create."""

    now: datetime
    sources: set[int] = field(default_factory=set)
    items: list[tuple[int, str, int | None, str]] = field(default_factory=list)
    decisions: list[DecisionRow] = field(default_factory=list)
    tasks: list[TaskRow] = field(default_factory=list)
    # Item id -> the prediction to point the item at in the same UPDATE (scoring writes an item's prediction and
    # route in one statement); an item not in it keeps its own.
    predictions: dict[int, int] = field(default_factory=dict)


_ROUTE_STAGE = [("item_id", "bigint"), ("state", "text"), ("policy_id", "bigint"), ("reason", "text"),
                ("decide", "boolean"), ("label", "text"), ("prediction_id", "bigint"), ("model_version_id", "bigint")]


def _route_plan_write_pg(plan: RoutePlan) -> list[tuple[int, int]]:
    """PostgreSQL: the items and their decisions are staged with one COPY, then one UPDATE of the items, one
    INSERT of the decisions and one COPY of the tasks, whatever the number of items. Returns the new
    decisions' (id, item id)."""
    decided = {d.item_id: d for d in plan.decisions}
    created: list[tuple[int, int]] = []
    with connection.cursor() as cursor:
        rows = []
        predictions = plan.predictions
        for item_id, state, policy_id, reason in plan.items:
            d = decided.get(item_id)
            rows.append((item_id, state, policy_id, reason, d is not None, d.label if d else None,
                         predictions.get(item_id, d.prediction_id if d else None), d.model_version_id if d else None))
        copy_stage(cursor, table="review_route_stage", columns=_ROUTE_STAGE, rows=rows)
        # ``i.id = ANY(...)`` gives the planner the items' ids: it probes the primary key instead of hash-joining
        # a seq scan of the whole table (what it chose with an unanalysed stage and lagging statistics).
        cursor.execute(
            "UPDATE ingest_item AS i SET state = s.state, policy_id = s.policy_id, route_reason = s.reason,"
            " state_changed_at = %s, prediction_id = COALESCE(s.prediction_id, i.prediction_id)"
            " FROM review_route_stage AS s WHERE i.id = s.item_id AND i.id = ANY(%s::bigint[])",
            [plan.now, id_array(item_id for item_id, *_ in plan.items)],
        )
        if plan.decisions:
            cursor.execute(
                "INSERT INTO review_decision (item_id, label, origin, prediction_id, model_version_id, policy_id,"
                " reason, is_current, created_at)"
                " SELECT s.item_id, s.label, %s, s.prediction_id, s.model_version_id, s.policy_id, s.reason, true, %s"
                " FROM review_route_stage AS s WHERE s.decide ORDER BY s.item_id RETURNING id, item_id",
                [Decision.Origin.MODEL, plan.now],
            )
            created = cursor.fetchall()
        if plan.tasks:
            # New rows only (rounds were numbered under the items' locks): straight into the table.
            with cursor.copy("COPY review_reviewtask (item_id, source_id, kind, round, state, priority, reason,"
                             " paired, note, created_at) FROM STDIN") as copy:
                for t in plan.tasks:
                    copy.write_row((t.item_id, t.source_id, t.kind, t.round, str(ReviewTask.State.OPEN), t.priority,
                                    t.reason, t.paired, "", plan.now))
    return created


def route_plan_write(plan: RoutePlan) -> list[int]:
    """Write a plan, with the action runs of its decisions; returns the ids of the decisions created.
    On PostgreSQL set-based (see ``_route_plan_write_pg``); elsewhere (SQLite) the ORM's bulk path. Django's
    ``bulk_update`` builds a ``CASE WHEN`` per row and field: it was most of a scoring chunk's time."""
    if not plan.items:
        return []
    if connection.vendor == "postgresql":
        created = _route_plan_write_pg(plan)
        if not created or not _any_actions(plan.sources):
            return sorted(pk for pk, _ in created)
        decided = {d.item_id: d for d in plan.decisions}
        decisions = []
        for pk, item_id in created:
            d = decided[item_id]
            decision = Decision(pk=pk, item_id=item_id, label=d.label, origin=Decision.Origin.MODEL,
                                prediction_id=d.prediction_id, model_version_id=d.model_version_id,
                                policy_id=d.policy_id, reason=d.reason, created_at=plan.now)
            decision._state.adding = False
            decisions.append(decision)
        action_runs_create_for_decisions(decisions=decisions)
        return sorted(pk for pk, _ in created)
    else:
        decisions = Decision.objects.bulk_create([
            Decision(item_id=d.item_id, label=d.label, origin=Decision.Origin.MODEL, prediction_id=d.prediction_id,
                     model_version_id=d.model_version_id, policy_id=d.policy_id, reason=d.reason,
                     created_at=plan.now)
            for d in plan.decisions
        ], batch_size=1000)
        ReviewTask.objects.bulk_create([
            ReviewTask(item_id=t.item_id, source_id=t.source_id, kind=t.kind, round=t.round, priority=t.priority,
                       reason=t.reason, paired=t.paired, created_at=plan.now)
            for t in plan.tasks
        ], batch_size=1000)
        rows = [Item(pk=pk, state=state, policy_id=policy_id, route_reason=reason, state_changed_at=plan.now)
                for pk, state, policy_id, reason in plan.items]
        fields = ["state", "policy", "route_reason", "state_changed_at"]
        if plan.predictions:
            for row in rows:
                row.prediction_id = plan.predictions[row.pk]
            fields.append("prediction")
        Item.objects.bulk_update(rows, fields, batch_size=1000)
    if decisions and _any_actions(plan.sources):
        action_runs_create_for_decisions(decisions=decisions)
    return sorted(d.pk for d in decisions)


def _any_actions(source_ids: set[int]) -> bool:
    """Whether any enabled action could fire for these sources. Most sources have none; asking first saves
    ``action_runs_create_for_decisions`` a lookup of every decided item."""
    from actions.models import ActionConfig

    return ActionConfig.objects.filter(source_id__in=source_ids, enabled=True).exists()


def _items_route_locked(*, item_ids: list[int]) -> tuple[dict[str, Any], AuditEntry | None]:
    """The body of ``items_route`` without its audit write, for a caller that writes the event itself (scoring
    writes its events last, so the audit trail's lock is held only at the end of its transaction).
    Must run inside a transaction."""
    # Narrow rows (no payload, no probabilities): only what the rule reads.
    rows = list(
        Item.objects.filter(pk__in=id_set(item_ids), state=Item.State.SCORED, prediction__isnull=False)
        .select_for_update(of=("self",))
        .order_by("id")
        .values_list("pk", "source_id", "prediction_id", "prediction__top_label", "prediction__confidence",
                     "prediction__model_version_id")
    )
    return items_route_rows_locked(rows=rows, skipped=len(set(item_ids)) - len(rows))


RouteRow = tuple[int, int, int, str, float, int]  # item, source, prediction, top label, confidence, model version


def items_route_rows_locked(
    *, rows: list[RouteRow], skipped: int = 0, set_prediction: bool = False,
) -> tuple[dict[str, Any], AuditEntry | None]:
    """Route ``rows`` (item ids ascending, every item already locked by the caller's transaction) and return the
    counts and the ``items.routed`` audit entry for the caller to write. With ``set_prediction`` the items are
    also pointed at their prediction in the same UPDATE: scoring's one write per item and chunk instead of two
    (an item's ``scored`` state was never visible outside that transaction anyway)."""
    planned = route_rows_plan(rows=rows, skipped=skipped, set_prediction=set_prediction)
    if planned is None:
        return _route_counts(skipped), None
    return route_rows_write(planned)


def _route_counts(skipped: int) -> dict[str, Any]:
    return {"routed": 0, "auto_decided": 0, "queued": 0, "qa_sampled": 0, "double_review": 0, "skipped": skipped}


@dataclass
class PlannedRoute:
    """A routing decided but not written (``route_rows_plan``): the plan, its counts, and what the audit entry
    names. A caller may fill in prediction ids it learns between the two steps (``with_predictions``)."""

    plan: RoutePlan
    result: dict[str, Any]
    rows: list[RouteRow]
    policies: dict[int, Policy]

    def open_task_items(self) -> set[int]:
        """Items that routing gives a new open task (review, double or QA)."""
        return {t.item_id for t in self.plan.tasks}

    def with_predictions(self, prediction_ids: dict[int, int]) -> None:
        """Point the plan's items and decisions at ``prediction_ids`` (item id -> prediction id)."""
        self.plan.predictions = {r[0]: prediction_ids[r[0]] for r in self.rows}
        self.plan.decisions = [d._replace(prediction_id=prediction_ids[d.item_id]) for d in self.plan.decisions]
        self.rows = [(r[0], r[1], prediction_ids[r[0]], *r[3:]) for r in self.rows]


def route_rows_plan(*, rows: list[RouteRow], skipped: int = 0, set_prediction: bool = False) -> PlannedRoute | None:
    """The routing of ``rows`` (see ``items_route_rows_locked``) without writing it; None for no rows."""
    now = timezone.now()
    result: dict[str, Any] = _route_counts(skipped)
    if not rows:
        return None
    policies = _current_policies({r[1] for r in rows})
    rounds = _next_rounds([r[0] for r in rows], {ReviewTask.Kind.REVIEW, ReviewTask.Kind.QA, ReviewTask.Kind.DOUBLE})
    model_versions: dict[int, ModelVersion] = {}
    if any(p.mode == Policy.Mode.TARGET_ERROR for p in policies.values()):
        model_versions = ModelVersion.objects.in_bulk({r[5] for r in rows})
    thresholds_cache: dict[tuple[int, int], tuple[dict[str, float] | None, str]] = {}
    plan = RoutePlan(now=now, sources={r[1] for r in rows},
                     predictions={r[0]: r[2] for r in rows} if set_prediction else {})
    auto_state, queued_state, qa_kind = str(Item.State.AUTO_DECIDED), str(Item.State.QUEUED), str(ReviewTask.Kind.QA)
    for item_id, source_id, prediction_id, top_label, confidence, model_version_id in rows:
        policy = policies.get(source_id)
        if policy is None:
            outcome = RouteOutcome(False, "no policy for this source; nothing is auto-decided")
        else:
            key = (policy.pk, model_version_id)
            if key not in thresholds_cache:
                thresholds_cache[key] = policy_thresholds(policy=policy,
                                                          model_version=model_versions.get(model_version_id))
            thresholds, why_none = thresholds_cache[key]
            outcome = route_one(label=top_label, confidence=confidence, thresholds=thresholds, why_none=why_none)
        policy_id = policy.pk if policy is not None else None
        priority = _task_priority(policy, confidence)
        reason = outcome.reason[:300]
        if outcome.auto:
            plan.items.append((item_id, auto_state, policy_id, reason))
            plan.decisions.append(DecisionRow(item_id, top_label, prediction_id, model_version_id, policy_id, reason))
            result["auto_decided"] += 1
            if policy is not None and qa_draw(item_id=item_id, policy=policy) < policy.qa_sample_rate:
                plan.tasks.append(TaskRow(item_id, source_id, qa_kind, rounds.get((item_id, qa_kind), 1), priority,
                                          QA_REASON, False))
                result["qa_sampled"] += 1
        else:
            plan.items.append((item_id, queued_state, policy_id, reason))
            pair = _review_tasks(item_id=item_id, source_id=source_id, policy=policy,
                                 round_=_pair_round(rounds, item_id), priority=priority, reason=outcome.reason)
            plan.tasks += pair
            result["queued"] += 1
            result["double_review"] += len(pair) - 1
    return PlannedRoute(plan=plan, result=result, rows=rows, policies=policies)


def route_rows_write(planned: PlannedRoute) -> tuple[dict[str, Any], AuditEntry]:
    """Write a ``route_rows_plan`` plan; the counts and the ``items.routed`` entry for the caller to write."""
    plan, result, rows, policies = planned.plan, planned.result, planned.rows, planned.policies
    decision_ids = route_plan_write(plan)
    result["routed"] = len(rows)
    source_ids = sorted({r[1] for r in rows})
    # One event per routed chunk: counts and ranges. Each item's route stays traceable row by row: the item
    # names its policy version and prediction, and each decision its prediction, model version and policy.
    entry = AuditEntry(
        "items.routed", "source", ",".join(str(s) for s in source_ids),
        after={
            **{k: result[k] for k in ("routed", "auto_decided", "queued", "qa_sampled", "double_review")},
            "policy_versions": {str(s): policies[s].version if s in policies else None for s in source_ids},
            "first_item_id": rows[0][0], "last_item_id": rows[-1][0],
            "first_decision_id": decision_ids[0] if decision_ids else None,
            "last_decision_id": decision_ids[-1] if decision_ids else None,
        },
    )
    return result, entry


def items_route(*, item_ids: list[int]) -> dict[str, Any]:
    """Apply the policy in force to freshly scored items: auto-decide or queue for review.

    Called by scoring inside its transaction after it set ``item.prediction`` and state ``scored``.
    Only items still ``scored`` with a prediction are touched, so a second call changes nothing.
    The number of statements does not grow with the items (see ``route_plan_write``).
    """
    with transaction.atomic():
        result, entry = _items_route_locked(item_ids=item_ids)
        if entry is not None:
            audit_record_many(actor=None, entries=[entry])
    return result


def items_route_unscored(*, item_ids: list[int], reason: str) -> int:
    """Cold start: items no model can score yet go straight to review with ``reason``."""
    now = timezone.now()
    with transaction.atomic():
        rows = list(
            Item.objects.filter(pk__in=id_set(item_ids), state=Item.State.RECEIVED)
            .select_for_update().order_by("id").values_list("pk", "source_id")
        )
        if not rows:
            return 0
        policies = _current_policies({r[1] for r in rows})
        rounds = _next_rounds([r[0] for r in rows], {ReviewTask.Kind.REVIEW, ReviewTask.Kind.DOUBLE})
        plan = RoutePlan(now=now, sources={r[1] for r in rows})
        for item_id, source_id in rows:
            policy = policies.get(source_id)
            plan.items.append((item_id, str(Item.State.QUEUED), policy.pk if policy is not None else None,
                               reason[:300]))
            # Without a confidence every item ties; created_at then gives oldest-first.
            plan.tasks += _review_tasks(item_id=item_id, source_id=source_id, policy=policy,
                                        round_=_pair_round(rounds, item_id), priority=0.0, reason=reason)
        route_plan_write(plan)
        source_ids = sorted({r[1] for r in rows})
        audit_record(
            actor=None, verb="items.routed_unscored", object_type="source",
            object_id=",".join(str(s) for s in source_ids),
            after={"queued": len(rows), "reason": reason, "first_item_id": rows[0][0],
                   "last_item_id": rows[-1][0]},
        )
    return len(rows)


# --- Claims -----------------------------------------------------------------------------------------

REVIEW_QUEUE = "review"
ADJUDICATION_QUEUE = "adjudication"
# What each work queue hands out. Escalations and adjudications go to people who may adjudicate.
QUEUE_KINDS: dict[str, tuple[str, ...]] = {
    REVIEW_QUEUE: (ReviewTask.Kind.REVIEW, ReviewTask.Kind.DOUBLE, ReviewTask.Kind.QA),
    ADJUDICATION_QUEUE: (ReviewTask.Kind.ESCALATION, ReviewTask.Kind.ADJUDICATION),
}
CLAIMABLE_KINDS = QUEUE_KINDS[REVIEW_QUEUE]
ADMIN_KINDS = QUEUE_KINDS[ADJUDICATION_QUEUE]
# The two independent tasks of a double review share an item and a round.
PAIR_KINDS = (ReviewTask.Kind.REVIEW, ReviewTask.Kind.DOUBLE)
ESCALATABLE_KINDS = (ReviewTask.Kind.REVIEW, ReviewTask.Kind.DOUBLE, ReviewTask.Kind.QA)
WAITING_STATES = (ReviewTask.State.OPEN, ReviewTask.State.CLAIMED)

DISAGREEMENT_REASON = "Double review disagreement"
ADJUDICATED_REASON = "adjudication of a double-review disagreement"


def _lease_end(now: datetime) -> datetime:
    return now + timedelta(seconds=settings.CLAIM_LEASE_SECONDS)


def undo_window() -> timedelta:
    return timedelta(seconds=getattr(settings, "REVIEW_UNDO_SECONDS", 300))


def _task_state(task: ReviewTask) -> dict[str, Any]:
    return {
        "state": task.state,
        "claimed_by": task.claimed_by_id,
        "lease_expires_at": task.lease_expires_at.isoformat() if task.lease_expires_at else None,
    }


def queue_kinds(*, user: Any, queue: str) -> tuple[str, ...]:
    """The task kinds ``queue`` hands out, once the user is known to be allowed to work it."""
    if queue not in QUEUE_KINDS:
        raise ValidationFailed(f"Unknown queue {queue!r}.",
                               [{"field": "queue", "message": f"must be one of {', '.join(QUEUE_KINDS)}"}])
    if queue == ADJUDICATION_QUEUE and not can(user, "adjudicate"):
        raise PermissionDeniedError("Only people who may adjudicate work the escalation and adjudication queue.")
    return QUEUE_KINDS[queue]


def _owns_twin(task: ReviewTask, user: Any) -> bool:
    """Whether the user holds or answered the other task of this double review: the second opinion must
    come from someone else. One probe of the (item, kind, round) index, and only for paired tasks."""
    if not task.paired:
        return False
    return (ReviewTask.objects.filter(item_id=task.item_id, round=task.round, kind__in=PAIR_KINDS, claimed_by=user)
            .exclude(pk=task.pk).exists())


# Claim-next on PostgreSQL is one statement, run in autocommit when the caller holds no transaction: the
# live claim the user already holds (lease renewed), or the next open task (row lock with SKIP LOCKED, the
# claim, the item's move to in_review, and the ``task.claimed`` audit event appended by
# ``core_audit_append``), atomic as any single statement is. No BEGIN or COMMIT round trip, no second
# statement for the audit event: one round trip in all, which is most of a claim's time at a reviewer's
# pace (each round trip wakes an idle backend). ``{held}`` (the live claim) is checked first: when there is
# one, nothing new is picked (the NOT EXISTS is a one-time filter) and nothing is audited (a lease renewal
# is not a state change). The user's own twin of a double review is passed over inside the statement (the
# second opinion must come from someone else).
# ``no_flush_wait`` lets the claim commit without waiting for its WAL flush (``synchronous_commit = off``
# for this statement's own transaction only; it is joined to the claimed row, so it runs whenever something
# is claimed; never inside a caller's transaction, whose commit may carry durable work).
# A claim is a lease with no effect outside the database: if PostgreSQL crashed within the WAL writer's
# delay (at most 3 x ``wal_writer_delay``, 600 ms by default) after a claim, the claim and its audit event
# would be gone together and the task open again, as when a lease expires (the verdict sent on it gets the
# usual "you no longer hold this item"). WAL is flushed in order, so any later durable commit (a verdict)
# makes every earlier claim durable too: the audit chain never loses a middle link. The flush wait was
# most of a claim's time under load (pgbench, 16 clients: COMMIT 6.3 ms -> 1.2 ms).
# The table names and ORDER BY are constants of this module; every value is a parameter.
# Claim order per queue: the review queue by the policy's priority (most uncertain first), then age; the
# adjudication queue oldest first.
_CLAIM_ORDER = {"priority": ("priority", "created_at", "id"), "oldest": ("created_at", "id")}
_HELD_SQL = """
held AS (
    SELECT id FROM review_reviewtask
    WHERE state = 'claimed' AND claimed_by_id = %(user)s AND lease_expires_at > %(now)s
      AND kind = ANY(%(kinds)s){source}
    ORDER BY claimed_at, id LIMIT 1 FOR UPDATE SKIP LOCKED
), renewed AS (
    UPDATE review_reviewtask AS t SET lease_expires_at = %(lease)s
    FROM held WHERE t.id = held.id
    RETURNING t.*
), """
_CLAIM_SQL = """
WITH no_flush_wait AS MATERIALIZED (SELECT {no_flush_wait}),
{held}picked AS (
    SELECT id FROM review_reviewtask AS open_task
    WHERE {not_held}state = 'open' AND kind = ANY(%(kinds)s){source}{exclude}
      AND NOT (paired AND EXISTS (
          SELECT 1 FROM review_reviewtask AS twin
          WHERE twin.item_id = open_task.item_id AND twin.round = open_task.round
            AND twin.kind = ANY(%(pair_kinds)s) AND twin.claimed_by_id = %(user)s AND twin.id <> open_task.id))
    ORDER BY {order} LIMIT 1 FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE review_reviewtask AS t
    SET state = 'claimed', claimed_by_id = %(user)s, claimed_at = %(now)s, lease_expires_at = %(lease)s
    FROM picked WHERE t.id = picked.id
    RETURNING t.*
), moved AS (
    UPDATE ingest_item AS i SET state = 'in_review', state_changed_at = %(now)s
    FROM claimed WHERE i.id = claimed.item_id AND i.state = 'queued'
    RETURNING i.id
), audited AS MATERIALIZED (
    SELECT appended.chain_id
    FROM claimed AS c CROSS JOIN LATERAL core_audit_append(
        %(audit_ns)s, %(audit_chain)s, %(audit_chains)s,
        jsonb_build_array(%(audit_entry)s::jsonb || jsonb_build_object(
            'object_id', c.id::text,
            'after', (%(audit_entry)s::jsonb -> 'after') || jsonb_build_object('item', c.item_id, 'kind', c.kind),
            'body', replace(replace(replace(%(audit_body)s,
                %(audit_mark_object_id)s, to_json(c.id::text)::text),
                %(audit_mark_item)s, c.item_id::text),
                %(audit_mark_kind)s, to_json(c.kind)::text)))) AS appended
)
SELECT claimed.*, false AS was_held, audited.chain_id AS audit_chain
FROM claimed CROSS JOIN no_flush_wait CROSS JOIN audited{renewed}
"""


def _claim_postgresql(*, user: Any, kinds: tuple[str, ...], source: Source | None, exclude: list[int],
                      order: str, now: datetime) -> ReviewTask | None:
    """See ``_CLAIM_SQL``. The task comes back with ``was_held`` set when it is the live claim the user held."""
    order_by = _CLAIM_ORDER[order]
    source_sql = " AND source_id = %(source)s" if source is not None else ""
    sql = _CLAIM_SQL.format(
        held=_HELD_SQL.format(source=source_sql),
        not_held="NOT EXISTS (SELECT 1 FROM held) AND ",
        renewed=" UNION ALL SELECT renewed.*, true AS was_held, NULL::integer AS audit_chain FROM renewed",
        source=source_sql,
        exclude=" AND NOT (id = ANY(%(exclude)s))" if exclude else "",
        order=", ".join(order_by),
        # Inside a caller's transaction the commit is the caller's, and may carry durable work: leave it be.
        no_flush_wait="NULL" if connection.in_atomic_block else "set_config('synchronous_commit', 'off', true)",
    )
    lease = _lease_end(now)
    params = {"kinds": list(kinds), "source": source.pk if source is not None else None, "exclude": exclude,
              "user": user.pk, "now": now, "lease": lease, "pair_kinds": list(PAIR_KINDS),
              **audit_sql_params(
                  actor=user, verb="task.claimed", object_type="review_task", created_at=now,
                  before={"state": ReviewTask.State.OPEN, "claimed_by": None, "lease_expires_at": None},
                  after={"state": ReviewTask.State.CLAIMED, "claimed_by": user.pk,
                         "lease_expires_at": lease.isoformat()},
                  slots=("item", "kind"))}
    rows = list(ReviewTask.objects.raw(sql, params))
    if not rows:
        return None
    audit_remember_chain(rows[0].audit_chain)
    return rows[0]


def _pick_and_claim(*, user: Any, kinds: tuple[str, ...], source: Source | None, exclude: list[int], order: str,
                    now: datetime) -> ReviewTask | None:
    """The portable path (SQLite): claim the first open task in ``order`` that nobody has locked; a QA task
    leaves its item auto_decided (the model's decision stands until overridden): only a queued item moves
    to in_review."""
    order_by = _CLAIM_ORDER[order]
    qs = ReviewTask.objects.filter(state=ReviewTask.State.OPEN, kind__in=kinds)
    if source is not None:
        qs = qs.filter(source=source)
    if exclude:
        qs = qs.exclude(pk__in=exclude)
    task = qs.order_by(*order_by).select_for_update(skip_locked=True).first()
    if task is None:
        return None
    task.state = ReviewTask.State.CLAIMED
    task.claimed_by = user
    task.claimed_at = now
    task.lease_expires_at = _lease_end(now)
    task.save(update_fields=["state", "claimed_by", "claimed_at", "lease_expires_at"])
    Item.objects.filter(pk=task.item_id, state=Item.State.QUEUED).update(
        state=Item.State.IN_REVIEW, state_changed_at=now
    )
    return task


def task_claim_next(
    *, user: Any, source: Source | None = None, exclude_task_ids: Iterable[int] = (), queue: str = REVIEW_QUEUE
) -> ReviewTask | None:
    """Claim the next open task (by priority, age, id) with a lease, or return the live claim the
    user already holds. ``SKIP LOCKED`` lets concurrent reviewers pass each other's rows, so two
    callers never get the same task and nobody waits. ``queue="adjudication"`` hands out
    escalations and adjudications (oldest first) to people who may adjudicate."""
    kinds = queue_kinds(user=user, queue=queue)
    now = timezone.now()
    order = "priority" if queue == REVIEW_QUEUE else "oldest"
    exclude = list(exclude_task_ids)
    if connection.vendor == "postgresql":
        return _claim_postgresql(user=user, kinds=kinds, source=source, exclude=exclude, order=order, now=now)
    with transaction.atomic():
        held_qs = ReviewTask.objects.filter(
            state=ReviewTask.State.CLAIMED, claimed_by=user, lease_expires_at__gt=now, kind__in=kinds
        )
        if source is not None:
            held_qs = held_qs.filter(source=source)
        held = held_qs.select_for_update(skip_locked=True).order_by("claimed_at", "id").first()
        if held is not None:
            # Coming back to a held item is activity: keep its lease fresh.
            held.lease_expires_at = _lease_end(now)
            held.save(update_fields=["lease_expires_at"])
            return held
        while True:
            task = _pick_and_claim(user=user, kinds=kinds, source=source, exclude=exclude, order=order, now=now)
            if task is None:
                return None
            if not _owns_twin(task, user):
                break
            # The user's own twin of a double review: give it back (its row lock lasts until commit, so
            # nobody else waits on it) and take the next one.
            _reopen([task], now)
            exclude.append(task.pk)
        audit_record(actor=user, verb="task.claimed", object_type="review_task", object_id=task.pk,
                     before={"state": ReviewTask.State.OPEN, "claimed_by": None, "lease_expires_at": None},
                     after={**_task_state(task), "item": task.item_id, "kind": task.kind})
    return task


def task_renew_lease(*, user: Any, task: ReviewTask) -> ReviewTask:
    """Extend the user's claim. Not audited: a keep-alive every minute is not a state change."""
    now = timezone.now()
    with transaction.atomic():
        locked = ReviewTask.objects.select_for_update().filter(pk=task.pk).first()
        if locked is None or locked.state != ReviewTask.State.CLAIMED or locked.claimed_by_id != user.pk:
            raise Conflict("You no longer hold this item; it may have been given to someone else.")
        locked.lease_expires_at = _lease_end(now)
        locked.save(update_fields=["lease_expires_at"])
    return locked


def _reopen(tasks: list[ReviewTask], now: datetime) -> None:
    for task in tasks:
        task.state = ReviewTask.State.OPEN
        task.claimed_by = None
        task.claimed_at = None
        task.lease_expires_at = None
    ReviewTask.objects.bulk_update(tasks, ["state", "claimed_by", "claimed_at", "lease_expires_at"], batch_size=1000)
    # An item stays in review while someone still holds another of its tasks (the twin of a double review).
    still_held = ReviewTask.objects.filter(item_id=OuterRef("pk"), state=ReviewTask.State.CLAIMED)
    Item.objects.filter(pk__in={t.item_id for t in tasks}, state=Item.State.IN_REVIEW).exclude(
        Exists(still_held)
    ).update(state=Item.State.QUEUED, state_changed_at=now)


def task_release(*, user: Any, item: Item) -> None:
    """Give a claim back: the task is open again and the item waits in the queue."""
    now = timezone.now()
    with transaction.atomic():
        task = (
            ReviewTask.objects.select_for_update()
            .filter(item=item, state=ReviewTask.State.CLAIMED, claimed_by=user).order_by("id").first()
        )
        if task is None:
            raise Conflict("You do not hold a claim on this item.")
        before = _task_state(task)
        _reopen([task], now)
        audit_record(actor=user, verb="task.released", object_type="review_task", object_id=task.pk,
                     before=before, after={**_task_state(task), "item": task.item_id})


def leases_release_expired(*, chunk_size: int = 1000) -> int:
    """Return claims whose lease ran out to the queue; one audit event per chunk."""
    released = 0
    while True:
        now = timezone.now()
        with transaction.atomic():
            tasks = list(
                ReviewTask.objects.select_for_update(skip_locked=True)
                .filter(state=ReviewTask.State.CLAIMED, lease_expires_at__lt=now)
                .order_by("lease_expires_at", "id")[:chunk_size]
            )
            if not tasks:
                return released
            holders = sorted({t.claimed_by_id for t in tasks if t.claimed_by_id})
            _reopen(tasks, now)
            audit_record(actor=None, verb="tasks.leases_expired", object_type="review_task",
                         object_id=tasks[0].pk,
                         after={"released": len(tasks), "task_ids": [t.pk for t in tasks][:100],
                                "holders": holders})
        released += len(tasks)
        if len(tasks) < chunk_size:
            return released


def _next_round(item: Item, kind: str) -> int:
    return (ReviewTask.objects.filter(item=item, kind=kind).aggregate(m=Max("round"))["m"] or 0) + 1


def _sync_waiting_state(item: Item) -> None:
    """A queued or in-review item's state from its tasks: in review while someone holds one, else queued.
    The caller holds the item's row lock and saves it."""
    if item.state not in (Item.State.QUEUED, Item.State.IN_REVIEW):
        return
    states = set(
        ReviewTask.objects.filter(item=item, state__in=WAITING_STATES).values_list("state", flat=True).distinct()
    )
    if ReviewTask.State.CLAIMED in states:
        item.state = Item.State.IN_REVIEW
    elif ReviewTask.State.OPEN in states:
        item.state = Item.State.QUEUED


def _qa_track(task: ReviewTask) -> bool:
    """QA semantics (the model's decision stands unless the answer differs) for QA tasks and their escalations."""
    if task.kind == ReviewTask.Kind.QA:
        return True
    if task.kind == ReviewTask.Kind.ESCALATION and task.parent_id:
        return ReviewTask.objects.filter(pk=task.parent_id, kind=ReviewTask.Kind.QA).exists()
    return False


# --- Verdicts ---------------------------------------------------------------------------------------

def _earlier_verdict(user: Any, idempotency_key: str | None, item: Item) -> Verdict | None:
    if not idempotency_key:
        return None
    earlier = Verdict.objects.filter(reviewer=user, idempotency_key=idempotency_key).first()
    if earlier is not None and earlier.item_id != item.pk:
        raise Conflict("This idempotency key was already used for a verdict on another item.",
                       [{"field": "idempotency_key", "message": f"used for item {earlier.item_id}"}])
    return earlier


def _no_claim_conflict(*, user: Any, item: Item) -> Conflict:
    other = (
        ReviewTask.objects.filter(item=item, state=ReviewTask.State.CLAIMED).exclude(claimed_by=user).exists()
    )
    if other:
        return Conflict("This item is claimed by someone else.")
    state = Item.objects.filter(pk=item.pk).values_list("state", flat=True).first()
    pending = ReviewTask.objects.filter(item=item, state=ReviewTask.State.OPEN).exists()
    if state in (Item.State.DECIDED, Item.State.AUTO_DECIDED) and not pending:
        return Conflict("This item is already decided.")
    return Conflict("You have not claimed this item (or your claim expired); claim it first.")


def _check_label(item: Item, label: str) -> None:
    source = item.source
    if label not in source.labels:
        raise ValidationFailed(
            f"{label!r} is not a label of source {source.slug}.",
            [{"field": "label", "message": f"must be one of {', '.join(source.labels)}"}],
        )


def _label_replace(*, item: Item, label: str, origin: str, verdict: Verdict, decision: Decision | None, user: Any,
                   now: datetime) -> Label:
    # One active training label per item: the newest human answer replaces an older one. Undo finds the
    # replaced label by this shared timestamp (withdrawn_at == the verdict's created_at).
    Label.objects.filter(item=item, is_active=True).update(is_active=False, withdrawn_at=now)
    return Label.objects.create(item=item, source_id=item.source_id, label=label, origin=origin, verdict=verdict,
                                decision=decision, created_by=user, created_at=now)


def _cancel_tasks(tasks: Iterable[ReviewTask], now: datetime) -> list[int]:
    ids = [t.pk for t in tasks]
    if ids:
        ReviewTask.objects.filter(pk__in=ids).update(state=ReviewTask.State.CANCELLED, completed_at=now,
                                                      lease_expires_at=None)
    return ids


@dataclass(frozen=True)
class VerdictResult:
    verdict: Verdict
    decision: Decision | None
    # decided | confirmed | overridden | awaiting_peer | disagreed | escalation_pending
    outcome: str


def _verdict_record(*, user: Any, task: ReviewTask, item: Item, label: str, note: str, idempotency_key: str | None,
                    handling_ms: int | None, now: datetime, current: Decision | None) -> VerdictResult:
    """Record the verdict on the locked task and item and carry out what it means for the item.

    Single review: the verdict decides. QA: the model's decision stands unless the answer differs.
    Double review: the first answer waits for the second; two equal answers decide, two different ones
    open an adjudication task. Escalations and adjudications decide, with an adjudication label."""
    if task.kind in ADMIN_KINDS and not can(user, "adjudicate"):
        raise PermissionDeniedError("Only people who may adjudicate resolve escalations and adjudications.")
    verdict = Verdict.objects.create(
        task=task, item=item, round=task.round, reviewer=user, label=label, note=note,
        handling_ms=handling_ms, idempotency_key=idempotency_key, created_at=now,
    )
    task.state = ReviewTask.State.DONE
    task.completed_at = now
    task.save(update_fields=["state", "completed_at"])
    decision: Decision | None = current
    outcome = "decided"
    label_origin: str | None = Label.Origin.REVIEW
    if _qa_track(task):
        label_origin = Label.Origin.QA if task.kind == ReviewTask.Kind.QA else Label.Origin.ADJUDICATION
        outcome = "confirmed"
        if current is None or current.label != label:
            reason = QA_OVERRIDE_REASON
            if task.kind != ReviewTask.Kind.QA:
                reason = f"escalation resolved: {QA_OVERRIDE_REASON}"
            decision = _decision_replace(item=item, current=current, verdict=verdict, user=user, reason=reason, now=now)
            item.state = Item.State.DECIDED
            outcome = "overridden"
    elif task.kind in ADMIN_KINDS:
        label_origin = Label.Origin.ADJUDICATION
        reason = ADJUDICATED_REASON
        if task.kind == ReviewTask.Kind.ESCALATION:
            reason = f"escalation resolved ({task.reason})"
        decision = _decision_replace(item=item, current=current, verdict=verdict, user=user, reason=reason, now=now)
        item.state = Item.State.DECIDED
        # The adjudicator's answer is final for this item: nothing else about it waits any more.
        _cancel_tasks(ReviewTask.objects.filter(item=item, state__in=WAITING_STATES, kind__in=PAIR_KINDS + ADMIN_KINDS)
                      .exclude(pk=task.pk), now)
    else:
        # Only the two tasks of a double review have a twin, or an escalation by the other reviewer.
        siblings = [] if not task.paired else list(
            ReviewTask.objects.filter(item=item, round=task.round, kind__in=PAIR_KINDS)
            .exclude(pk=task.pk).exclude(state=ReviewTask.State.CANCELLED)
        )
        escalated = task.paired and ReviewTask.objects.filter(
            item=item, kind=ReviewTask.Kind.ESCALATION, state__in=WAITING_STATES).exists()
        peers = [] if not siblings else list(
            Verdict.objects.filter(task__in=siblings, withdrawn_at__isnull=True).values_list("label", flat=True)
        )
        if escalated:
            outcome, label_origin = "escalation_pending", None
        elif any(s.state != ReviewTask.State.DONE for s in siblings):
            outcome, label_origin = "awaiting_peer", None
        elif peers and any(p != label for p in peers):
            outcome, label_origin = "disagreed", None
            ReviewTask.objects.create(
                item=item, source_id=item.source_id, kind=ReviewTask.Kind.ADJUDICATION,
                round=_next_round(item, ReviewTask.Kind.ADJUDICATION), priority=task.priority,
                reason=DISAGREEMENT_REASON, parent=task, created_at=now,
            )
        else:
            decision = _decision_replace(item=item, current=current, verdict=verdict, user=user, reason=task.reason,
                                         now=now)
            item.state = Item.State.DECIDED
            outcome = "agreed" if peers else "decided"
        if label_origin is None:
            _sync_waiting_state(item)
    if label_origin is not None:
        _label_replace(item=item, label=label, origin=label_origin, verdict=verdict, decision=decision, user=user,
                       now=now)
    item.state_changed_at = now
    item.save(update_fields=["state", "state_changed_at"])
    return VerdictResult(verdict=verdict, decision=decision if label_origin is not None else None, outcome=outcome)


def verdict_submit(
    *,
    user: Any,
    item: Item,
    label: str,
    note: str = "",
    idempotency_key: str | None = None,
    handling_ms: int | None = None,
) -> tuple[Verdict, bool]:
    """Record a reviewer's verdict on the item they hold. Returns ``(verdict, created)``; the same
    ``idempotency_key`` again returns the earlier verdict with ``created=False`` and changes nothing."""
    idempotency_key = idempotency_key or None
    # No look-up of the key up front (a query on every verdict for the rare resend): a resent verdict
    # finds its task done (or held by someone else) and returns the earlier one below, and a resend that
    # races the first is stopped by the (reviewer, key) unique constraint and answered the same way.
    _check_label(item, label)
    if handling_ms is not None and not 0 <= handling_ms <= 2_147_483_647:
        raise ValidationFailed("Invalid handling time.", [{"field": "handling_ms", "message": "out of range"}])
    now = timezone.now()
    try:
        with transaction.atomic():
            # The task row lock is the serialisation point: of two racing verdicts one wins, the
            # other re-reads the task as done and gets a conflict (or its earlier verdict). The item
            # lock (taken second, as claims do) serialises the two answers of a double review.
            task = (
                ReviewTask.objects.select_for_update()
                .filter(item=item, state=ReviewTask.State.CLAIMED, claimed_by=user).order_by("id").first()
            )
            if task is None:
                earlier = _earlier_verdict(user, idempotency_key, item)
                if earlier is not None:
                    return earlier, False
                raise _no_claim_conflict(user=user, item=item)
            locked_item = Item.objects.select_for_update(of=("self",)).select_related("prediction").get(pk=item.pk)
            current = Decision.objects.select_for_update().filter(item=locked_item, is_current=True).first()
            before = {"item_state": locked_item.state, "task_state": task.state,
                      "decision": current.label if current else None}
            result = _verdict_record(user=user, task=task, item=locked_item, label=label, note=note,
                                     idempotency_key=idempotency_key, handling_ms=handling_ms, now=now,
                                     current=current)
            audit_record(
                actor=user, verb="verdict.submitted", object_type="item", object_id=locked_item.pk,
                correlation_id=str(locked_item.correlation_id), before=before,
                after={"item_state": locked_item.state, "task_state": task.state, "task": task.pk,
                       "kind": task.kind, "verdict": result.verdict.pk, "label": label,
                       "outcome": result.outcome,
                       "decision": result.decision.label if result.decision else None},
            )
    except IntegrityError:
        # Same key sent twice at once: the unique constraint let one through; return that one.
        earlier = _earlier_verdict(user, idempotency_key, item)
        if earlier is None:
            raise
        return earlier, False
    item.state = locked_item.state
    return result.verdict, True


def _decision_replace(*, item: Item, current: Decision | None, verdict: Verdict, user: Any, reason: str,
                      now: datetime) -> Decision:
    if current is not None:
        # The partial unique index allows one current decision: retire the old one first.
        current.is_current = False
        current.save(update_fields=["is_current"])
    prediction = item.prediction
    decision = Decision.objects.create(
        item=item, label=verdict.label, origin=Decision.Origin.REVIEWER, verdict=verdict, prediction=prediction,
        model_version_id=prediction.model_version_id if prediction else None, policy_id=item.policy_id,
        decided_by=user, supersedes=current, is_current=True, reason=reason[:300], created_at=now,
    )
    # The outbox rows commit with the decision (or not at all); delivery starts after commit.
    if current is not None:
        action_runs_create_compensation(old_decision=current, new_decision=decision)
    action_runs_create_for_decision(decision=decision)
    return decision


# --- Escalation -------------------------------------------------------------------------------------

def task_escalate(*, user: Any, item: Item, note: str = "") -> ReviewTask:
    """Hand the item the user holds to the admin queue: their task is cancelled, an open twin of a double
    review too, and an escalation task (with the note) waits for someone who may adjudicate."""
    note = (note or "").strip()[:5000]
    now = timezone.now()
    with transaction.atomic():
        task = (
            ReviewTask.objects.select_for_update()
            .filter(item=item, state=ReviewTask.State.CLAIMED, claimed_by=user).order_by("id").first()
        )
        if task is None:
            raise _no_claim_conflict(user=user, item=item)
        if task.kind not in ESCALATABLE_KINDS:
            raise Conflict("Escalations and adjudications are decided here; they cannot be escalated further.")
        locked_item = Item.objects.select_for_update(of=("self",)).get(pk=item.pk)
        before = {**_task_state(task), "item_state": locked_item.state}
        task.state = ReviewTask.State.CANCELLED
        task.completed_at = now
        task.lease_expires_at = None
        task.save(update_fields=["state", "completed_at", "lease_expires_at"])
        cancelled: list[int] = []
        if task.kind in PAIR_KINDS:
            cancelled = _cancel_tasks(
                ReviewTask.objects.filter(item=locked_item, round=task.round, kind__in=PAIR_KINDS,
                                          state=ReviewTask.State.OPEN).exclude(pk=task.pk), now)
        escalation = ReviewTask.objects.create(
            item=locked_item, source_id=locked_item.source_id, kind=ReviewTask.Kind.ESCALATION,
            round=_next_round(locked_item, ReviewTask.Kind.ESCALATION), priority=task.priority,
            reason=f"Escalated by {user.get_username()}"[:300], note=note, parent=task, created_at=now,
        )
        _sync_waiting_state(locked_item)
        locked_item.state_changed_at = now
        locked_item.save(update_fields=["state", "state_changed_at"])
        audit_record(
            actor=user, verb="task.escalated", object_type="item", object_id=locked_item.pk,
            correlation_id=str(locked_item.correlation_id), before=before,
            after={"task": task.pk, "kind": task.kind, "escalation": escalation.pk, "note": note,
                   "cancelled": cancelled, "item_state": locked_item.state},
        )
    return escalation


# --- Undo -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UndoResult:
    task: ReviewTask
    # What happened to the action runs of the withdrawn decision (None when the verdict decided nothing).
    actions: RunsWithdrawal | None

    @property
    def actions_summary(self) -> str:
        return self.actions.summary() if self.actions is not None else ""


def verdict_undo(*, user: Any, verdict_id: int | None = None) -> ReviewTask:
    """Withdraw the user's latest verdict (or ``verdict_id``); see ``verdict_withdraw``."""
    return verdict_withdraw(user=user, verdict_id=verdict_id).task


def verdict_withdraw(*, user: Any, verdict_id: int | None = None) -> UndoResult:
    """Withdraw the user's latest verdict (or ``verdict_id``) of the last few minutes: its label and the
    decision it made are withdrawn (a decision it superseded is current again), the decision's action
    runs that have not acted are cancelled (delivered ones cannot be: the result says so, and their
    compensating action is queued where one is configured), and the task is the user's claim again,
    with a fresh lease. Refused once someone else has acted on the item."""
    now = timezone.now()
    qs = Verdict.objects.filter(reviewer=user, withdrawn_at__isnull=True, created_at__gte=now - undo_window())
    if verdict_id is not None:
        qs = qs.filter(pk=verdict_id)
    found = qs.order_by("-created_at", "-id").first()
    if found is None:
        minutes = int(undo_window().total_seconds() // 60)
        raise Conflict(f"Nothing to undo: only your own verdicts of the last {minutes} minutes can be undone.")
    with transaction.atomic():
        task = ReviewTask.objects.select_for_update().get(pk=found.task_id)
        item = Item.objects.select_for_update(of=("self",)).get(pk=found.item_id)
        verdict = Verdict.objects.select_for_update().get(pk=found.pk)
        if verdict.withdrawn_at is not None or task.state != ReviewTask.State.DONE:
            raise Conflict("This verdict was already undone.")
        if (Verdict.objects.filter(item=item, withdrawn_at__isnull=True, created_at__gt=verdict.created_at)
                .exclude(pk=verdict.pk).exists()):
            raise Conflict("Someone has answered on this item since your verdict; it cannot be undone now.")
        follow_ups = list(ReviewTask.objects.select_for_update().filter(parent=task, kind=ReviewTask.Kind.ADJUDICATION))
        if any(t.state != ReviewTask.State.OPEN for t in follow_ups if t.state != ReviewTask.State.CANCELLED):
            raise Conflict("An adjudicator already has this disagreement; it cannot be undone now.")
        cancelled = _cancel_tasks([t for t in follow_ups if t.state == ReviewTask.State.OPEN], now)
        before = {"item_state": item.state, "task_state": task.state, "label": verdict.label}
        decision = Decision.objects.select_for_update().filter(verdict=verdict, is_current=True).first()
        restored: Decision | None = None
        withdrawal: RunsWithdrawal | None = None
        if decision is not None:
            decision.is_current = False
            decision.withdrawn_at = now
            decision.save(update_fields=["is_current", "withdrawn_at"])
            if decision.supersedes_id:
                restored = Decision.objects.select_for_update().get(pk=decision.supersedes_id)
                if restored.withdrawn_at is None:
                    restored.is_current = True
                    restored.save(update_fields=["is_current"])
                else:
                    restored = None
            # Runs of the withdrawn decision that have not acted are cancelled; delivered ones get their
            # compensation (attached to the restored decision, or to the withdrawn one when none is restored).
            withdrawal = action_runs_withdraw(
                decision=decision, restored=restored, actor=user,
                reason=f"decision {decision.pk} withdrawn: verdict {verdict.pk} undone by {user.get_username()}",
            )
        Label.objects.filter(verdict=verdict, is_active=True).update(is_active=False, withdrawn_at=now)
        replaced = (Label.objects.filter(item=item, is_active=False, withdrawn_at=verdict.created_at)
                    .exclude(verdict=verdict).order_by("-id").first())
        if replaced is not None and not Label.objects.filter(item=item, is_active=True).exists():
            replaced.is_active = True
            replaced.withdrawn_at = None
            replaced.save(update_fields=["is_active", "withdrawn_at"])
        verdict.withdrawn_at = now
        verdict.save(update_fields=["withdrawn_at"])
        task.state = ReviewTask.State.CLAIMED
        task.claimed_by = user
        task.claimed_at = now
        task.lease_expires_at = _lease_end(now)
        task.completed_at = None
        task.save(update_fields=["state", "claimed_by", "claimed_at", "lease_expires_at", "completed_at"])
        if _qa_track(task):
            # The model's decision is current again (or, after a reviewer's, that one).
            if decision is not None and restored is not None:
                model_made = restored.origin == Decision.Origin.MODEL
                item.state = Item.State.AUTO_DECIDED if model_made else Item.State.DECIDED
        else:
            item.state = Item.State.IN_REVIEW
        item.state_changed_at = now
        item.save(update_fields=["state", "state_changed_at"])
        audit_record(
            actor=user, verb="verdict.withdrawn", object_type="item", object_id=item.pk,
            correlation_id=str(item.correlation_id), before=before,
            after={"verdict": verdict.pk, "task": task.pk, "task_state": task.state, "item_state": item.state,
                   "decision_withdrawn": decision.pk if decision else None,
                   "decision_restored": restored.pk if restored else None, "cancelled": cancelled,
                   "actions": withdrawal.as_dict() if withdrawal is not None else None},
        )
    return UndoResult(task=task, actions=withdrawal)


# --- Bulk verdicts ----------------------------------------------------------------------------------

BULK_MAX_ITEMS = 200


@dataclass(frozen=True)
class BulkOutcome:
    item_id: int
    external_id: str
    status: str  # "recorded" or "skipped"
    detail: str
    verdict_id: int | None = None


def _bulk_task(*, user: Any, item: Item, now: datetime) -> ReviewTask:
    """The user's claim on ``item``, or a fresh claim on its open task; a conflict says why there is none."""
    task = (ReviewTask.objects.select_for_update()
            .filter(item=item, state=ReviewTask.State.CLAIMED, claimed_by=user, kind__in=CLAIMABLE_KINDS)
            .order_by("id").first())
    if task is not None:
        return task
    candidates = (ReviewTask.objects.filter(item=item, state=ReviewTask.State.OPEN, kind__in=CLAIMABLE_KINDS)
                  .order_by("id").select_for_update(skip_locked=True))
    task = next((t for t in candidates if not _owns_twin(t, user)), None)
    if task is None:
        if ReviewTask.objects.filter(item=item, state=ReviewTask.State.CLAIMED).exclude(claimed_by=user).exists():
            raise Conflict("held by another reviewer")
        if ReviewTask.objects.filter(item=item, state=ReviewTask.State.OPEN, kind__in=CLAIMABLE_KINDS).exists():
            raise Conflict("being claimed by someone else right now, or you already reviewed it")
        raise Conflict("nothing waits for review on this item")
    task.state = ReviewTask.State.CLAIMED
    task.claimed_by = user
    task.claimed_at = now
    task.lease_expires_at = _lease_end(now)
    task.save(update_fields=["state", "claimed_by", "claimed_at", "lease_expires_at"])
    return task


def verdicts_bulk_submit(*, user: Any, item_ids: Iterable[int], label: str, note: str = "") -> list[BulkOutcome]:
    """One verdict (``label``) on each item: each item is claimed and decided in its own savepoint, so one
    that another reviewer holds is skipped (and reported) while the others go through. One audit event
    for the whole request lists every item's outcome."""
    ids = list(dict.fromkeys(int(i) for i in item_ids))
    if not ids:
        raise ValidationFailed("Select at least one item.", [{"field": "items", "message": "empty selection"}])
    if len(ids) > BULK_MAX_ITEMS:
        raise ValidationFailed(f"At most {BULK_MAX_ITEMS} items at once.",
                               [{"field": "items", "message": f"{len(ids)} selected"}])
    items = {i.pk: i for i in Item.objects.filter(pk__in=ids).select_related("source")}
    outcomes: list[BulkOutcome] = []
    now = timezone.now()
    with transaction.atomic():
        for item_id in ids:
            item = items.get(item_id)
            if item is None:
                outcomes.append(BulkOutcome(item_id, "", "skipped", "no such item"))
                continue
            if label not in item.source.labels:
                outcomes.append(BulkOutcome(item_id, item.external_id, "skipped",
                                            f"{label!r} is not a label of {item.source.slug}"))
                continue
            try:
                with transaction.atomic():
                    task = _bulk_task(user=user, item=item, now=now)
                    locked = Item.objects.select_for_update(of=("self",)).select_related("prediction").get(pk=item_id)
                    current = Decision.objects.select_for_update().filter(item=locked, is_current=True).first()
                    result = _verdict_record(user=user, task=task, item=locked, label=label, note=note,
                                             idempotency_key=None, handling_ms=None, now=now, current=current)
            except Conflict as exc:
                outcomes.append(BulkOutcome(item_id, item.external_id, "skipped", str(exc.detail)))
                continue
            detail = {"decided": "decided", "agreed": "decided (agrees with the other reviewer)",
                      "confirmed": "confirmed the model's decision", "overridden": "overrode the model's decision",
                      "awaiting_peer": "recorded; waits for the second reviewer",
                      "disagreed": "recorded; disagreement goes to adjudication",
                      "escalation_pending": "recorded; the item is escalated"}.get(result.outcome, result.outcome)
            outcomes.append(BulkOutcome(item_id, item.external_id, "recorded", detail, result.verdict.pk))
        recorded = [o for o in outcomes if o.status == "recorded"]
        audit_record(
            actor=user, verb="verdicts.bulk_submitted", object_type="item",
            object_id=str(ids[0]) if len(ids) == 1 else f"{min(ids)}..{max(ids)}",
            after={"label": label, "note": note[:500], "recorded": len(recorded),
                   "skipped": len(outcomes) - len(recorded),
                   "items": [[o.item_id, o.status, o.verdict_id] for o in outcomes]},
        )
    return outcomes
