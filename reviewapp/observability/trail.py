"""A decision's full trail and its decision record, as one JSON-ready dict (the page renders the same).

The record answers what the EU AI Act's record-keeping (Art. 12) and human-oversight (Art. 14) articles
ask of each decision: the input (by hash), the model version, the output and its confidence, whether a
person was involved and who, when, and any override. The trail lists every audit event about the item,
its decisions, tasks, verdicts and action runs, and a ``verification`` block re-checks those events'
hashes and their links to the previous event in the chain, so an auditor can trust what they export.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.db.models import OuterRef, Q, Subquery
from django.utils import timezone

from actions.selectors import action_runs_for_decision
from reviewapp.core.audit import GENESIS_HASH, audit_chain_heads, event_matches
from reviewapp.core.errors import NotFound
from reviewapp.core.models import AuditEvent
from reviewapp.ingest.models import Item
from reviewapp.ingest.parsing import payload_digest
from reviewapp.review.models import Decision, ReviewTask, Verdict

HASH_ALGORITHM = (
    "hash = sha256(prev_hash + canonical JSON of {created_at (UTC ISO 8601, microseconds), actor_id, actor_label, "
    "verb, object_type, object_id, before, after, correlation_id}, keys sorted, separators ',' ':', UTF-8); "
    "the trail is several chains (each event's `chain`): prev_hash is the hash of the previous event (by id) "
    f"of the same chain, and a chain's first event's prev_hash is {GENESIS_HASH[:8]}… (64 zeros)"
)
# Events that cover a range of items (one event per chunk): included when the item's id is in the range.
RANGE_VERBS = ("items.scored", "items.routed", "items.routed_unscored", "items.scoring_failed")
MAX_EVENTS = 500


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="microseconds") if value else None


def _user(user: Any) -> dict[str, Any] | None:
    return {"id": user.pk, "username": user.get_username()} if user is not None else None


def _prediction(p: Any) -> dict[str, Any] | None:
    if p is None:
        return None
    mv = p.model_version
    return {
        "id": p.pk,
        "created_at": _iso(p.created_at),
        "top_label": p.top_label,
        "confidence": p.confidence,
        "probabilities": p.probabilities,
        "alternatives": p.alternatives,
        "prediction_set": p.prediction_set,
        "model_version": _model(mv),
    }


def _model(mv: Any) -> dict[str, Any] | None:
    if mv is None:
        return None
    snapshot = mv.label_snapshot or {}
    return {
        "id": mv.pk,
        "version": mv.version,
        "algorithm": mv.algorithm,
        "artifact_sha256": mv.artifact_sha256,
        "trained_at": _iso(mv.trained_at),
        "training_labels_sha256": snapshot.get("sha256"),
        "training_label_count": snapshot.get("count"),
    }


def _decision_brief(d: Decision) -> dict[str, Any]:
    return {
        "id": d.pk,
        "label": d.label,
        "origin": d.origin,
        "reason": d.reason,
        "created_at": _iso(d.created_at),
        "is_current": d.is_current,
        "decided_by": _user(d.decided_by),
        "verdict_id": d.verdict_id,
        "supersedes_id": d.supersedes_id,
    }


def _event_row(e: AuditEvent, match: str) -> dict[str, Any]:
    return {
        "id": e.pk,
        "created_at": _iso(e.created_at),
        "actor_id": e.actor_id,
        "actor_label": e.actor_label,
        "verb": e.verb,
        "object_type": e.object_type,
        "object_id": e.object_id,
        "before": e.before,
        "after": e.after,
        "correlation_id": e.correlation_id,
        "chain": e.chain,
        "prev_hash": e.prev_hash,
        "hash": e.hash,
        "included_because": match,
    }


def verify_events(events: list[AuditEvent]) -> dict[str, Any]:
    """Re-check each event: its hash over its content, and its prev_hash against the hash of the row that
    precedes it in its chain (annotated as ``preceding_hash``). Same checks as ``audit_verify``, limited
    to these events: an edited row fails the first; a deleted, reordered or moved row fails the second."""
    breaks = []
    for e in events:
        expected_prev = getattr(e, "preceding_hash", None) or GENESIS_HASH
        if e.prev_hash != expected_prev:
            breaks.append({"event_id": e.pk, "reason": f"prev_hash does not match the preceding event of chain "
                                                       f"{e.chain} (a row was removed, reordered or moved)"})
        if not event_matches(e):
            breaks.append({"event_id": e.pk, "reason": "content does not match its hash (the row was edited)"})
    head = AuditEvent.objects.order_by("-id").values("id", "hash", "chain").first()
    chains = {e.chain for e in events}
    return {
        "status": "ok" if not breaks else "broken",
        "events_checked": len(events),
        "breaks": breaks,
        "first_break": breaks[0]["event_id"] if breaks else None,
        "hashes": [{"id": e.pk, "chain": e.chain, "prev_hash": e.prev_hash, "hash": e.hash} for e in events],
        "chain_head": head,
        # The newest event of each chain these events belong to: what to compare with an anchored copy.
        "chain_heads": [h for h in audit_chain_heads() if h["chain"] in chains],
        "algorithm": HASH_ALGORITHM,
        "note": "Checks the events listed here; `manage.py verify_audit` checks the whole chain.",
        "checked_at": _iso(timezone.now()),
    }


def _audit_events(*, item: Item, decisions: list[Decision], task_ids: list[int], verdict_ids: list[int],
                  runs: list[Any], model_version_id: int | None, policy_id: int | None) -> list[tuple[AuditEvent, str]]:
    rules: list[tuple[str, Q]] = [
        ("item", Q(object_type="item", object_id=str(item.pk))),
        ("correlation_id", Q(correlation_id=str(item.correlation_id))),
        ("decision", Q(object_type="decision", object_id__in=[str(d.pk) for d in decisions])),
        ("review_task", Q(object_type="review_task", object_id__in=[str(t) for t in task_ids])),
        ("verdict", Q(object_type="verdict", object_id__in=[str(v) for v in verdict_ids])),
        ("action_run", Q(object_type="action_run", object_id__in=[str(r.pk) for r in runs])
         | Q(correlation_id__in=[r.idempotency_key for r in runs])),
        ("covers item", Q(verb__in=RANGE_VERBS, after__first_item_id__lte=item.pk,
                          after__last_item_id__gte=item.pk)),
    ]
    if item.batch_id:
        rules.append(("batch", Q(object_type="batch", object_id=str(item.batch_id))))
    if model_version_id:
        rules.append(("model", Q(object_type="model_version", object_id=str(model_version_id),
                                 verb__in=("model.trained", "model.promoted"))))
    if policy_id:
        rules.append(("policy", Q(object_type="policy", object_id=str(policy_id))))
    where = Q()
    for _name, q in rules:
        where |= q
    preceding = (AuditEvent.objects.filter(chain=OuterRef("chain"), id__lt=OuterRef("id")).order_by("-id")
                 .values("hash")[:1])
    events = list(AuditEvent.objects.filter(where).annotate(preceding_hash=Subquery(preceding))
                  .order_by("id")[:MAX_EVENTS])
    out = []
    for e in events:
        # The first rule an event meets says why it is listed (checked in Python: cheap, at most MAX_EVENTS).
        match = next((name for name, _q in rules if _matches(name, e, item, decisions, task_ids, verdict_ids, runs,
                                                               model_version_id, policy_id)), "related")
        out.append((e, match))
    return out


def _matches(name: str, e: AuditEvent, item: Item, decisions: list[Decision], task_ids: list[int],
             verdict_ids: list[int], runs: list[Any], model_version_id: int | None, policy_id: int | None) -> bool:
    oid = e.object_id
    if name == "item":
        return e.object_type == "item" and oid == str(item.pk)
    if name == "correlation_id":
        return e.correlation_id == str(item.correlation_id)
    if name == "decision":
        return e.object_type == "decision" and oid in {str(d.pk) for d in decisions}
    if name == "review_task":
        return e.object_type == "review_task" and oid in {str(t) for t in task_ids}
    if name == "verdict":
        return e.object_type == "verdict" and oid in {str(v) for v in verdict_ids}
    if name == "action_run":
        return (e.object_type == "action_run" and oid in {str(r.pk) for r in runs}) or (
            e.correlation_id in {r.idempotency_key for r in runs})
    if name == "covers item":
        return e.verb in RANGE_VERBS
    if name == "batch":
        return e.object_type == "batch"
    if name == "model":
        return e.object_type == "model_version"
    if name == "policy":
        return e.object_type == "policy"
    return False


def decision_trail(*, decision_id: int) -> dict[str, Any]:
    """Everything about one decision, oldest first, with the verification of the audit events shown."""
    decision = (
        Decision.objects.select_related(
            "item__source", "item__schema_version", "item__batch", "item__policy",
            "item__prediction__model_version", "prediction__model_version", "model_version", "policy",
            "verdict__reviewer", "verdict__task", "decided_by", "supersedes",
        ).filter(pk=decision_id).first()
    )
    if decision is None:
        raise NotFound(f"No decision {decision_id}.")
    item = decision.item
    chain = list(Decision.objects.filter(item=item).select_related("decided_by").order_by("created_at", "id"))
    verdicts = list(Verdict.objects.filter(item=item).select_related("reviewer", "task").order_by("created_at", "id"))
    task_ids = list(ReviewTask.objects.filter(item=item).values_list("pk", flat=True))
    runs = list(action_runs_for_decision(decision_id=decision.pk))
    prediction = decision.prediction or item.prediction
    model_version = decision.model_version or (prediction.model_version if prediction else None)
    policy = decision.policy or item.policy
    events = _audit_events(item=item, decisions=chain, task_ids=task_ids, verdict_ids=[v.pk for v in verdicts],
                           runs=runs, model_version_id=model_version.pk if model_version else None,
                           policy_id=policy.pk if policy else None)

    by_id = {d.pk: d for d in chain}
    superseded_by = next((d for d in chain if d.supersedes_id == decision.pk), None)
    history = []
    cursor: Decision | None = decision
    while cursor is not None and len(history) < 50:
        history.append(cursor.pk)
        cursor = by_id.get(cursor.supersedes_id) if cursor.supersedes_id else None
    active_verdicts = [v for v in verdicts if v.withdrawn_at is None]
    humans = sorted({v.reviewer.get_username() for v in active_verdicts})
    batch = item.batch
    payload_ok = payload_digest(item.payload) == item.payload_sha256 if isinstance(item.payload, dict) else False
    record = {
        "decision_id": decision.pk,
        "time": {"received_at": _iso(item.received_at),
                 "scored_at": _iso(prediction.created_at) if prediction else None,
                 "decided_at": _iso(decision.created_at)},
        "inputs": {
            "payload_sha256": item.payload_sha256,
            "payload_sha256_matches_stored_payload": payload_ok,
            "schema_version": item.schema_version.label,
            "batch": {"id": batch.pk, "filename": batch.filename, "content_sha256": batch.content_sha256}
            if batch else None,
        },
        "model_version": _model(model_version),
        "output": {
            "label": decision.label,
            "origin": decision.origin,
            "model_label": prediction.top_label if prediction else None,
            "confidence": prediction.confidence if prediction else None,
        },
        "policy": {"id": policy.pk, "version": policy.version, "mode": policy.mode, "thresholds": policy.thresholds,
                   "target_error": policy.target_error, "confidence": policy.confidence,
                   "qa_sample_rate": policy.qa_sample_rate} if policy else None,
        "route_reason": item.route_reason,
        "human_oversight": {
            "human_involved": decision.origin == Decision.Origin.REVIEWER or bool(active_verdicts),
            "decided_by": _user(decision.decided_by),
            "reviewers": humans,
        },
        "override": {
            "is_override": decision.supersedes_id is not None,
            "overrides": _decision_brief(decision.supersedes) if decision.supersedes else None,
            "overridden_by": _decision_brief(superseded_by) if superseded_by else None,
            "supersedes_chain": history,
        },
    }
    return {
        "decision": _decision_brief(decision),
        "item": {
            "id": item.pk,
            "source": item.source.slug,
            "external_id": item.external_id,
            "state": item.state,
            "correlation_id": str(item.correlation_id),
            "received_at": _iso(item.received_at),
            "payload_sha256": item.payload_sha256,
            "schema_version": item.schema_version.label,
            "batch_id": item.batch_id,
        },
        "prediction": _prediction(prediction),
        "verdicts": [
            {"id": v.pk, "reviewer": _user(v.reviewer), "label": v.label, "note": v.note, "round": v.round,
             "task_id": v.task_id, "task_kind": v.task.kind, "handling_ms": v.handling_ms,
             "created_at": _iso(v.created_at), "withdrawn_at": _iso(v.withdrawn_at)}
            for v in verdicts
        ],
        "decisions": [_decision_brief(d) for d in chain],
        "action_runs": [
            {"id": r.pk, "action": r.config.name, "kind": r.config.kind, "state": r.state, "attempts": r.attempts,
             "idempotency_key": r.idempotency_key, "is_compensation": r.is_compensation,
             "created_at": _iso(r.created_at), "delivered_at": _iso(r.delivered_at),
             "last_status_code": r.last_status_code}
            for r in runs
        ],
        "record": record,
        "audit_events": [_event_row(e, match) for e, match in events],
        "verification": verify_events([e for e, _m in events]),
    }
