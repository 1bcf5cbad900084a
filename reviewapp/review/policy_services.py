"""Writes for the policy editor: save a version (with target-error thresholds from risk control), restore an
earlier one, re-route waiting items under the policy in force; plus the promise-breach metric."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from celery import current_app
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError
from prometheus_client.core import GaugeMetricFamily, Metric

from reviewapp.core.audit import audit_record
from reviewapp.core.errors import NotFound, ValidationFailed
from reviewapp.ingest.models import Item, Source
from reviewapp.review.models import Decision, Policy, ReviewTask
from reviewapp.review.policy_selectors import (
    auto_back_counts,
    auto_region_q,
    policy_diff,
    promise_checks_current,
    reversible_auto_items,
)
from reviewapp.review.policy_simulation import honest_evidence, thresholds_for_target
from reviewapp.review.services import (
    QA_REASON,
    RoutePlan,
    _next_rounds,
    _pair_round,
    _review_tasks,
    _task_priority,
    policy_as_dict,
    policy_create,
    policy_current,
    policy_thresholds,
    qa_draw,
    route_one,
    route_plan_write,
)
from scoring.models import ModelVersion, Prediction
from scoring.selectors import champion_for

logger = logging.getLogger(__name__)

REROUTE_TASK = "review.reroute_waiting"
REROUTE_CHUNK = 500


@dataclass
class PolicySaved:
    policy: Policy
    diff: list[dict[str, Any]]
    derived_thresholds: dict[str, float] | None = None
    risk_control_stored: bool = False
    reroute_run_id: str | None = None
    warnings: list[str] = field(default_factory=list)


def _send_reroute(policy_id: int, run_id: str) -> None:
    """Publish after commit. A broker outage is recorded on the run (visible on the page) instead of raised."""
    try:
        current_app.send_task(REROUTE_TASK, kwargs={"policy_id": policy_id, "run_id": run_id})
    except (BrokerError, OSError) as exc:
        logger.warning("broker unavailable, re-route of policy %s not sent: %s", policy_id, exc)
        with transaction.atomic():
            audit_record(actor=None, verb="policy.reroute_failed", object_type="policy", object_id=policy_id,
                         after={"reason": f"broker unavailable: {exc}"}, correlation_id=run_id)


def _store_risk_control(*, champion: ModelVersion, risk_control: dict[str, Any], actor: Any,
                        policy_version: int) -> None:
    """Record on the champion the risk control the new target-error policy relies on (routing reads it there)."""
    mv = ModelVersion.objects.select_for_update().get(pk=champion.pk)
    before = mv.risk_control or {}
    mv.risk_control = {**risk_control, "computed_for_policy_version": policy_version,
                       "computed_at": timezone.now().isoformat()}
    mv.save(update_fields=["risk_control"])
    audit_record(
        actor=actor, verb="model.risk_control_set", object_type="model_version", object_id=mv.pk,
        before={k: before.get(k) for k in ("target_error", "confidence", "thresholds")} if before else None,
        after={k: mv.risk_control.get(k) for k in ("target_error", "confidence", "thresholds", "reason",
                                                  "computed_for_policy_version")},
    )


def policy_update(
    *,
    source: Source,
    actor: Any,
    mode: str = Policy.Mode.THRESHOLD,
    thresholds: dict[str, float] | None = None,
    target_error: float | None = None,
    confidence: float = 0.95,
    qa_sample_rate: float = 0.02,
    priority: str = Policy.Priority.UNCERTAINTY,
    comment: str = "",
    reroute: bool = False,
    double_review_rate: float | None = None,
) -> PolicySaved:
    """Save a new policy version (via ``policy_create``) and, in target-error mode, make sure the champion carries
    risk-control thresholds for exactly this (target_error, confidence): its stored ones when they match, else
    thresholds computed now from labels it never trained on. With ``reroute`` the items still waiting are
    re-routed in the background under the new version."""
    warnings: list[str] = []
    derived: dict[str, float] | None = None
    resolved: dict[str, Any] | None = None
    champion = champion_for(source_id=source.pk)
    if mode == Policy.Mode.TARGET_ERROR and target_error is not None and 0 < target_error < 1 and 0 < confidence < 1:
        if champion is None:
            warnings.append("no champion model yet: nothing is auto-decided until one is trained")
        else:
            bundle = honest_evidence(source=source, champion=champion)
            resolved = thresholds_for_target(source=source, champion=champion, target_error=target_error,
                                              confidence=confidence, bundle=bundle)
            derived = resolved["thresholds"] or {}
            if resolved.get("reason"):
                warnings.append(resolved["reason"])
    run_id = uuid.uuid4().hex if reroute else None
    with transaction.atomic():
        previous = policy_current(source=source)
        # Fields other areas add to policies (double review) pass through only when given.
        extra = {} if double_review_rate is None else {"double_review_rate": double_review_rate}
        policy = policy_create(source=source, actor=actor, mode=mode, thresholds=thresholds,
                               target_error=target_error, confidence=confidence, qa_sample_rate=qa_sample_rate,
                               priority=priority, comment=comment, **extra)
        stored = False
        if resolved is not None and resolved["from"] == "computed" and champion is not None:
            _store_risk_control(champion=champion, risk_control=resolved["risk_control"], actor=actor,
                                policy_version=policy.version)
            stored = True
        diff = policy_diff(before=previous, after=policy)
        audit_record(
            actor=actor, verb="policy.applied", object_type="policy", object_id=policy.pk,
            before={"version": previous.version} if previous else None,
            after={"version": policy.version, "source": source.slug, "diff": diff, "derived_thresholds": derived,
                   "thresholds_from": resolved["from"] if resolved else None, "reroute": bool(reroute)},
            correlation_id=run_id or "",
        )
        if run_id:
            audit_record(actor=actor, verb="policy.reroute_requested", object_type="policy", object_id=policy.pk,
                         after={"version": policy.version}, correlation_id=run_id)
            policy_id = policy.pk
            transaction.on_commit(lambda: _send_reroute(policy_id, run_id))
    return PolicySaved(policy=policy, diff=diff, derived_thresholds=derived, risk_control_stored=stored,
                       reroute_run_id=run_id, warnings=warnings)


def policy_restore(*, source: Source, actor: Any, version: int, comment: str = "",
                   reroute: bool = False) -> PolicySaved:
    """Restore an earlier version as a new version (history is never rewritten)."""
    old = Policy.objects.filter(source=source, version=version).first()
    if old is None:
        raise NotFound(f"Source {source.slug!r} has no policy version {version}.")
    values = policy_as_dict(old)
    return policy_update(
        source=source, actor=actor, mode=values["mode"], thresholds=values["thresholds"],
        target_error=values["target_error"], confidence=values["confidence"],
        qa_sample_rate=values["qa_sample_rate"], priority=values["priority"],
        comment=(comment or f"restore of version {version}")[:500], reroute=reroute,
        double_review_rate=values.get("double_review_rate"),
    )


def policy_reroute_start(*, source: Source, actor: Any) -> str:
    """Re-route waiting items under the policy in force (a run of its own, e.g. after a model change)."""
    policy = policy_current(source=source)
    if policy is None:
        raise ValidationFailed("The source has no policy to re-route under.")
    run_id = uuid.uuid4().hex
    with transaction.atomic():
        audit_record(actor=actor, verb="policy.reroute_requested", object_type="policy", object_id=policy.pk,
                     after={"version": policy.version}, correlation_id=run_id)
        policy_id = policy.pk
        transaction.on_commit(lambda: _send_reroute(policy_id, run_id))
    return run_id


# --- Re-route (the task's body) --------------------------------------------------------------------------


def waiting_tasks(source_id: int) -> Any:
    """Open, unclaimed review tasks of queued items: the items a re-route may auto-decide."""
    return ReviewTask.objects.filter(source_id=source_id, kind=ReviewTask.Kind.REVIEW, state=ReviewTask.State.OPEN,
                                     item__state=Item.State.QUEUED)


def _finished(run_id: str, policy_id: int) -> bool:
    from reviewapp.core.models import AuditEvent

    return AuditEvent.objects.filter(object_type="policy", object_id=str(policy_id), correlation_id=run_id,
                                     verb="policy.reroute_finished").exists()


def _reroute_chunk(*, policy: Policy, after_task_id: int, chunk_size: int, run_id: str) -> tuple[int, dict[str, int]]:
    """One transaction: lock a chunk of waiting tasks (skipping ones a reviewer is claiming right now) and route
    their items under ``policy``. Returns the last task id seen (0 when nothing is left) and the counts."""
    now = timezone.now()
    counts = {"examined": 0, "auto_decided": 0, "kept": 0, "qa_sampled": 0, "busy": 0}
    with transaction.atomic():
        tasks = list(
            waiting_tasks(policy.source_id).filter(id__gt=after_task_id).order_by("id")
            .select_for_update(skip_locked=True, of=("self",))[:chunk_size]
        )
        if not tasks:
            return 0, counts
        items = {
            i.pk: i for i in Item.objects.filter(pk__in=[t.item_id for t in tasks], state=Item.State.QUEUED)
            .select_related("prediction", "prediction__model_version").select_for_update(of=("self",))
        }
        # Other human tasks on the same items (e.g. the twin of a double review): an item is only auto-decided
        # when none of them is claimed or locked by a reviewer right now.
        siblings: dict[int, list[ReviewTask]] = {}
        busy: set[int] = set()
        task_ids = {t.pk for t in tasks}
        twin_kinds = {k for k in ReviewTask.Kind.values if k == "double"}  # issue 5's independent second review
        for other in (ReviewTask.objects.filter(item_id__in=list(items), state=ReviewTask.State.OPEN)
                      .exclude(kind=ReviewTask.Kind.QA).exclude(pk__in=task_ids)
                      .select_for_update(skip_locked=True, of=("self",))):
            if other.kind in twin_kinds:
                siblings.setdefault(other.item_id, []).append(other)
            else:
                busy.add(other.item_id)  # escalated or in adjudication: a person decides it, not the re-route
        locked = {t.pk for group in siblings.values() for t in group}
        for pk, item_id, kind in (ReviewTask.objects.filter(item_id__in=list(items), state=ReviewTask.State.OPEN)
                                  .exclude(kind=ReviewTask.Kind.QA).exclude(pk__in=task_ids)
                                  .values_list("pk", "item_id", "kind")):
            if kind in twin_kinds and pk not in locked:
                busy.add(item_id)  # its twin is being claimed right now (its row lock was skipped)
        busy |= set(
            ReviewTask.objects.filter(item_id__in=list(items), state=ReviewTask.State.CLAIMED)
            .values_list("item_id", flat=True)
        )
        qa_rounds = _next_rounds(list(items), {ReviewTask.Kind.QA})
        thresholds_cache: dict[int, tuple[dict[str, float] | None, str]] = {}
        decisions: list[Decision] = []
        new_tasks: list[ReviewTask] = []
        changed_tasks: list[ReviewTask] = []
        changed_items: list[Item] = []
        for task in tasks:
            item = items.get(task.item_id)
            if item is None or item.prediction is None:
                continue  # not scored (cold start) or no longer waiting: nothing to decide by
            counts["examined"] += 1
            prediction = item.prediction
            key = prediction.model_version_id
            if key not in thresholds_cache:
                thresholds_cache[key] = policy_thresholds(policy=policy, model_version=prediction.model_version)
            thresholds, why_none = thresholds_cache[key]
            outcome = route_one(label=prediction.top_label, confidence=prediction.confidence,
                                thresholds=thresholds, why_none=why_none)
            item.policy = policy
            item.state_changed_at = now
            if outcome.auto and item.pk in busy:
                counts["busy"] += 1  # a reviewer holds part of it: leave it to them
                continue
            if outcome.auto:
                reason = f"{outcome.reason} (re-routed under policy v{policy.version})"[:300]
                for open_task in [task, *siblings.get(item.pk, [])]:
                    open_task.state = ReviewTask.State.CANCELLED
                    open_task.completed_at = now
                    if open_task is not task:
                        changed_tasks.append(open_task)
                item.state = Item.State.AUTO_DECIDED
                item.route_reason = reason
                decisions.append(Decision(
                    item=item, label=prediction.top_label, origin=Decision.Origin.MODEL, prediction=prediction,
                    model_version_id=prediction.model_version_id, policy=policy, reason=reason, created_at=now,
                ))
                counts["auto_decided"] += 1
                if qa_draw(item_id=item.pk, policy=policy) < policy.qa_sample_rate:
                    new_tasks.append(ReviewTask(
                        item=item, source_id=item.source_id, kind=ReviewTask.Kind.QA,
                        round=qa_rounds.get((item.pk, ReviewTask.Kind.QA), 1),
                        priority=_task_priority(policy, prediction.confidence), reason=QA_REASON, created_at=now,
                    ))
                    counts["qa_sampled"] += 1
            else:
                # Still waiting: it now waits under the new version (its rule text and priority may change).
                item.route_reason = outcome.reason[:300]
                task.reason = outcome.reason[:300]
                task.priority = _task_priority(policy, prediction.confidence)
                counts["kept"] += 1
            changed_tasks.append(task)
            changed_items.append(item)
        if decisions:
            from actions.services import action_runs_create_for_decisions

            Decision.objects.bulk_create(decisions, batch_size=1000)
            action_runs_create_for_decisions(decisions=decisions)
        ReviewTask.objects.bulk_create(new_tasks, batch_size=1000)
        ReviewTask.objects.bulk_update(changed_tasks, ["state", "completed_at", "reason", "priority"], batch_size=1000)
        Item.objects.bulk_update(changed_items, ["state", "policy", "route_reason", "state_changed_at"],
                                 batch_size=1000)
        audit_record(actor=None, verb="policy.reroute_progress", object_type="policy", object_id=policy.pk,
                     after={**counts, "first_task_id": tasks[0].pk, "last_task_id": tasks[-1].pk},
                     correlation_id=run_id)
    return tasks[-1].pk, counts


def policy_reroute_waiting(*, policy_id: int, run_id: str, chunk_size: int = REROUTE_CHUNK) -> dict[str, Any]:
    """Re-route the items still waiting (queued, with an open unclaimed review task) under policy ``policy_id``:
    those now inside its auto region are auto-decided (their task cancelled, a QA task drawn as routing does),
    the rest keep waiting under the new version. Chunked, audited per chunk; a rerun changes nothing new because
    only items still queued are touched. Stops when a newer policy version takes over."""
    policy = Policy.objects.select_related("source").filter(pk=policy_id).first()
    if policy is None:
        return {"status": "missing"}
    if _finished(run_id, policy_id):
        return {"status": "already_finished"}
    totals = {"examined": 0, "auto_decided": 0, "kept": 0, "qa_sampled": 0, "busy": 0, "to_review": 0,
              "auto_kept": 0}
    by_model = _thresholds_by_model(policy)
    back_ids = _auto_back_candidates(policy, by_model)
    with transaction.atomic():
        total = waiting_tasks(policy.source_id).count()
        acted_on = auto_back_counts(source_id=policy.source_id, thresholds_by_model=by_model)["auto_kept_acted_on"]
        audit_record(actor=None, verb="policy.reroute_started", object_type="policy", object_id=policy.pk,
                     after={"version": policy.version, "total": total + len(back_ids), "waiting": total,
                            "auto_to_review": len(back_ids), "auto_kept_acted_on": acted_on},
                     correlation_id=run_id)
    totals["auto_kept"] = acted_on
    status, reason = "done", ""
    cursor = 0
    while True:
        current = policy_current(source=policy.source)
        if current is None or current.pk != policy.pk:
            status = "superseded"
            reason = f"policy v{current.version if current else '?'} replaced v{policy.version} during the run"
            break
        cursor, counts = _reroute_chunk(policy=policy, after_task_id=cursor, chunk_size=chunk_size, run_id=run_id)
        for k, v in counts.items():
            totals[k] += v
        if cursor == 0:
            break
    # Then the reverse: auto-decisions that now fall in the review band and can still be taken back.
    for start in range(0, len(back_ids) if status == "done" else 0, chunk_size):
        current = policy_current(source=policy.source)
        if current is None or current.pk != policy.pk:
            status = "superseded"
            reason = f"policy v{current.version if current else '?'} replaced v{policy.version} during the run"
            break
        counts = _reroute_auto_chunk(policy=policy, item_ids=back_ids[start:start + chunk_size],
                                     thresholds_by_model=by_model, run_id=run_id)
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    with transaction.atomic():
        audit_record(actor=None, verb="policy.reroute_finished", object_type="policy", object_id=policy.pk,
                     after={**totals, "status": status, "reason": reason, "version": policy.version},
                     correlation_id=run_id)
    return {**totals, "status": status, "total": total}


def policy_reroute_mark_failed(*, policy_id: int, run_id: str, reason: str) -> None:
    """For a re-route task that died: the run must not show as running forever."""
    if not Policy.objects.filter(pk=policy_id).exists() or _finished(run_id, policy_id):
        return
    with transaction.atomic():
        audit_record(actor=None, verb="policy.reroute_failed", object_type="policy", object_id=policy_id,
                     after={"reason": reason[:1000]}, correlation_id=run_id)


def _thresholds_by_model(policy: Policy) -> dict[int, dict[str, float] | None]:
    """The policy's thresholds for each model version that scored an auto-decided item of its source."""
    model_ids = set(Item.objects.filter(source_id=policy.source_id, state=Item.State.AUTO_DECIDED,
                                        prediction__isnull=False)
                    .values_list("prediction__model_version_id", flat=True).distinct())
    versions = ModelVersion.objects.in_bulk(model_ids)
    return {m: policy_thresholds(policy=policy, model_version=versions.get(m))[0] for m in model_ids}


def _auto_back_candidates(policy: Policy, by_model: dict[int, dict[str, float] | None]) -> list[int]:
    """Ids of auto-decided items outside the policy's auto region whose decision can still be taken back."""
    return list(
        reversible_auto_items(source_id=policy.source_id)
        .exclude(auto_region_q(by_model, prefix="prediction__")).order_by("id").values_list("pk", flat=True)
    )


def _reroute_auto_chunk(*, policy: Policy, item_ids: list[int], thresholds_by_model: dict[int, dict[str, float] | None],
                        run_id: str) -> dict[str, int]:
    """One transaction: send a chunk of auto-decided items back to review under ``policy``. The items and the
    action runs of their decisions are locked, then the rule (``reversible_auto_items``) is checked again under
    the locks: a delivery that started meanwhile, or a reviewer who claimed the QA task, keeps the decision."""
    from actions.models import ActionRun

    now = timezone.now()
    counts = {"auto_examined": len(item_ids), "to_review": 0, "auto_kept": 0, "busy": 0}
    with transaction.atomic():
        locked = list(Item.objects.filter(pk__in=item_ids, state=Item.State.AUTO_DECIDED)
                      .select_for_update(skip_locked=True, of=("self",)).order_by("id").values_list("pk", flat=True))
        counts["busy"] = len(item_ids) - len(locked)
        decisions = {d.item_id: d for d in Decision.objects.filter(item_id__in=locked, is_current=True)}
        # Lock the runs: a worker claiming one (pending -> delivering) waits for this transaction, then finds it
        # rejected. Only then is "nothing has acted" checked.
        list(ActionRun.objects.filter(decision_id__in=[d.pk for d in decisions.values()])
             .select_for_update(of=("self",)).values_list("pk", flat=True))
        ok = set(reversible_auto_items(source_id=policy.source_id, now=now).filter(pk__in=locked)
                 .values_list("pk", flat=True))
        rows = dict(Item.objects.filter(pk__in=list(ok)).values_list("pk", "source_id"))
        predictions = {p.item_id: p for p in Prediction.objects.filter(item__in=list(ok), item__prediction=F("pk"))}
        plan = RoutePlan(now=now, sources={policy.source_id})
        back: list[int] = []
        for item_id in sorted(ok):
            prediction = predictions.get(item_id)
            if prediction is None:
                continue
            outcome = route_one(label=prediction.top_label, confidence=prediction.confidence,
                                thresholds=thresholds_by_model.get(prediction.model_version_id),
                                why_none="no thresholds in force for this prediction's model")
            if outcome.auto:
                continue  # inside the auto region after all (a newer prediction): the decision stands
            back.append(item_id)
            reason = f"{outcome.reason} (auto-decision withdrawn: re-routed to review under policy v{policy.version})"
            plan.items.append((item_id, str(Item.State.QUEUED), policy.pk, reason[:300]))
        counts["auto_kept"] = len(locked) - len(ok)
        if back:
            rounds = _next_rounds(back, {ReviewTask.Kind.REVIEW, ReviewTask.Kind.DOUBLE})
            for item_id, _state, _policy, reason in plan.items:
                plan.tasks += _review_tasks(item_id=item_id, source_id=rows[item_id], policy=policy,
                                            round_=_pair_round(rounds, item_id),
                                            priority=_task_priority(policy, predictions[item_id].confidence),
                                            reason=reason)
            withdrawn = sorted(decisions[i].pk for i in back if i in decisions)
            Decision.objects.filter(pk__in=withdrawn).update(is_current=False, withdrawn_at=now)
            rejected = sorted(ActionRun.objects.filter(
                decision_id__in=withdrawn, state__in=[ActionRun.State.PENDING, ActionRun.State.PENDING_APPROVAL]
            ).values_list("pk", flat=True))
            ActionRun.objects.filter(pk__in=rejected).update(
                state=ActionRun.State.REJECTED, rejected_at=now, next_attempt_at=None, state_changed_at=now,
                rejection_reason=f"auto-decision withdrawn by the re-route under policy v{policy.version}")
            cancelled = sorted(ReviewTask.objects.filter(item_id__in=back, kind=ReviewTask.Kind.QA,
                                                         state=ReviewTask.State.OPEN).values_list("pk", flat=True))
            ReviewTask.objects.filter(pk__in=cancelled).update(state=ReviewTask.State.CANCELLED, completed_at=now)
            route_plan_write(plan)
            counts["to_review"] = len(back)
            # Each item traces back: the withdrawn decision (its prediction and policy version) by id here, the
            # item's new policy version and route reason on the row.
            audit_record(actor=None, verb="policy.reroute_auto_back", object_type="policy", object_id=policy.pk,
                         after={"version": policy.version, "items": back, "withdrawn_decisions": withdrawn,
                                "rejected_action_runs": rejected, "cancelled_qa_tasks": cancelled},
                         correlation_id=run_id)
        audit_record(actor=None, verb="policy.reroute_progress", object_type="policy", object_id=policy.pk,
                     after={**counts, "examined": counts["auto_examined"], "first_item_id": item_ids[0],
                            "last_item_id": item_ids[-1]},
                     correlation_id=run_id)
    return counts


# --- Metrics ----------------------------------------------------------------------------------------------


def promise_breach_metrics() -> Iterator[Metric]:
    """Prometheus gauges for the promise check of each source's policy in force (two grouped queries).

    reviewapp_policy_promise_breach{source}: 1 when the auto-error measured on QA samples exceeds the promised
    target error beyond its 95% Wilson interval, else 0 (target-error policies only);
    reviewapp_policy_promised_auto_error / reviewapp_policy_measured_auto_error / reviewapp_policy_qa_samples.
    """
    breach = GaugeMetricFamily("reviewapp_policy_promise_breach",
                               "1 when the measured auto-error exceeds the policy's promise beyond its interval",
                               labels=["source"])
    promised = GaugeMetricFamily("reviewapp_policy_promised_auto_error", "Target error of the policy in force",
                                 labels=["source"])
    measured = GaugeMetricFamily("reviewapp_policy_measured_auto_error",
                                 "Auto-decision error measured on QA samples under the policy in force",
                                 labels=["source"])
    samples = GaugeMetricFamily("reviewapp_policy_qa_samples", "QA samples under the policy in force",
                                labels=["source"])
    for row in promise_checks_current():
        slug = row["source"] or "?"
        samples.add_metric([slug], row["qa_samples"])
        if row["measured_error"] is not None:
            measured.add_metric([slug], row["measured_error"])
        if row["promised_error"] is not None:
            promised.add_metric([slug], row["promised_error"])
            breach.add_metric([slug], 1.0 if row["breach"] else 0.0)
    yield breach
    yield promised
    yield measured
    yield samples
