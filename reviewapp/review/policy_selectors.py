"""Reads for the policy editor: version history with diffs, the promise check, re-route progress."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import OuterRef, Subquery

from reviewapp.core.models import AuditEvent
from reviewapp.ingest.models import Source
from reviewapp.review.models import Decision, Label, Policy
from reviewapp.review.policy_simulation import DEFAULT_Z, MIN_AUTO_LABELS, wilson_interval
from reviewapp.review.services import POLICY_FIELDS, policy_as_dict

REROUTE_VERBS = ("policy.reroute_requested", "policy.reroute_started", "policy.reroute_progress",
                 "policy.reroute_finished", "policy.reroute_failed")


def policy_diff(*, before: Policy | dict[str, Any] | None, after: Policy | dict[str, Any]) -> list[dict[str, Any]]:
    """Field-by-field changes from ``before`` to ``after`` (thresholds per label)."""
    a = policy_as_dict(after) if isinstance(after, Policy) else dict(after)
    b = (policy_as_dict(before) if isinstance(before, Policy) else dict(before)) if before is not None else {}
    changes: list[dict[str, Any]] = []
    for name in POLICY_FIELDS:
        if name == "thresholds":
            old, new = b.get("thresholds") or {}, a.get("thresholds") or {}
            for label in sorted(set(old) | set(new)):
                if old.get(label) != new.get(label):
                    changes.append({"field": f"thresholds.{label}", "before": old.get(label), "after": new.get(label)})
        elif b.get(name) != a.get(name):
            changes.append({"field": name, "before": b.get(name), "after": a.get(name)})
    return changes


@dataclass
class PolicyVersionRow:
    policy: Policy
    diff: list[dict[str, Any]]
    is_current: bool


def policy_history(*, source: Source, limit: int = 100) -> list[PolicyVersionRow]:
    """Versions newest first, each with its diff against the version before it."""
    policies = list(Policy.objects.filter(source=source).select_related("created_by").order_by("-version")[:limit + 1])
    rows = []
    for index, policy in enumerate(policies[:limit]):
        previous = policies[index + 1] if index + 1 < len(policies) else None
        rows.append(PolicyVersionRow(policy=policy, diff=policy_diff(before=previous, after=policy),
                                     is_current=index == 0))
    return rows


# --- Promise check -------------------------------------------------------------------------------------


def _qa_label_subquery() -> Subquery:
    return Subquery(
        Label.objects.filter(item_id=OuterRef("item_id"), origin=Label.Origin.QA, is_active=True)
        .order_by("-id").values("label")[:1]
    )


def _promise_row(policy: Policy, n: int, errors: int) -> dict[str, Any]:
    interval = wilson_interval(errors, n, z=DEFAULT_Z) if n else None
    promised = policy.target_error if policy.mode == Policy.Mode.TARGET_ERROR else None
    breach = bool(promised is not None and interval is not None and interval[0] > promised)
    if n == 0:
        status = "no_data"
    elif breach:
        status = "breach"
    elif n < MIN_AUTO_LABELS:
        status = "too_few"
    else:
        status = "ok"
    return {
        "source": policy.source.slug if hasattr(policy, "source") else None,
        "policy_version": policy.version,
        "since": policy.created_at,
        "mode": policy.mode,
        "promised_error": promised,
        "confidence": policy.confidence,
        "qa_samples": n,
        "qa_errors": errors,
        "measured_error": (errors / n) if n else None,
        "interval": list(interval) if interval else None,
        "breach": breach,
        "status": status,
        "min_samples": MIN_AUTO_LABELS,
    }


def promise_check(*, source: Source, policy: Policy | None = None) -> dict[str, Any] | None:
    """The policy in force (or ``policy``): promised auto-error against the error measured on QA samples of the
    items it auto-decided. A breach is a Wilson lower bound (95%) above the promise."""
    from reviewapp.review.services import policy_current

    policy = policy or policy_current(source=source)
    if policy is None:
        return None
    n, k = _count_qa(policy_ids=[policy.pk]).get(policy.pk, (0, 0))
    return _promise_row(policy, n, k)


def _count_qa(*, policy_ids: list[int]) -> dict[int, tuple[int, int]]:
    """(QA samples, QA disagreements) per policy id among its model decisions, in one grouped query."""
    if not policy_ids:
        return {}
    rows = (
        Decision.objects.filter(policy_id__in=policy_ids, origin=Decision.Origin.MODEL)
        .annotate(qa=_qa_label_subquery()).filter(qa__isnull=False)
        .values("policy_id", "label", "qa")
    )
    out: dict[int, list[int]] = {}
    for row in rows.iterator(chunk_size=5000):
        entry = out.setdefault(row["policy_id"], [0, 0])
        entry[0] += 1
        entry[1] += row["label"] != row["qa"]
    return {pid: (v[0], v[1]) for pid, v in out.items()}


def promise_checks_current() -> list[dict[str, Any]]:
    """The promise check for every source's policy in force (a fixed number of queries)."""
    newest = Policy.objects.filter(source_id=OuterRef("source_id")).order_by("-version").values("version")[:1]
    policies = list(Policy.objects.filter(version=Subquery(newest)).select_related("source"))
    counts = _count_qa(policy_ids=[p.pk for p in policies])
    return [_promise_row(p, *counts.get(p.pk, (0, 0))) for p in policies]


# --- Re-route progress ---------------------------------------------------------------------------------


def reroute_progress(*, policy: Policy, run_id: str | None = None) -> dict[str, Any] | None:
    """Progress of the newest (or the given) re-route run for ``policy``, read from its audit events."""
    events = AuditEvent.objects.filter(object_type="policy", object_id=str(policy.pk), verb__in=REROUTE_VERBS)
    if run_id is None:
        first = events.filter(verb="policy.reroute_requested").order_by("-id").first()
        if first is None:
            return None
        run_id = first.correlation_id
    rows = list(events.filter(correlation_id=run_id).order_by("id").values("verb", "after", "created_at"))
    if not rows:
        return None
    status = "queued"
    total = examined = auto = kept = qa = busy = 0
    reason = ""
    finished_at = None
    for row in rows:
        after = row["after"] or {}
        if row["verb"] == "policy.reroute_started":
            status, total = "running", int(after.get("total", 0))
            examined = auto = kept = qa = busy = 0  # a redelivered run starts counting again
        elif row["verb"] == "policy.reroute_progress":
            examined += int(after.get("examined", 0))
            auto += int(after.get("auto_decided", 0))
            kept += int(after.get("kept", 0))
            qa += int(after.get("qa_sampled", 0))
            busy += int(after.get("busy", 0))
        elif row["verb"] == "policy.reroute_finished":
            status = after.get("status", "done")
            reason = after.get("reason", "")
            finished_at = row["created_at"]
        elif row["verb"] == "policy.reroute_failed":
            status, reason = "failed", after.get("reason", "")
    done = status in ("done", "superseded", "failed")
    percent = 100 if done else (int(100 * min(examined, total) / total) if total else 0)
    return {"run_id": run_id, "policy_version": policy.version, "status": status, "total": total,
            "examined": examined, "auto_decided": auto, "kept": kept, "qa_sampled": qa, "busy": busy,
            "percent": percent, "done": done, "reason": reason, "finished_at": finished_at}


def reroute_progress_for_run(*, source: Source, run_id: str) -> dict[str, Any] | None:
    """Progress of run ``run_id`` of any policy version of ``source`` (a run may outlive its version)."""
    event = (AuditEvent.objects.filter(object_type="policy", correlation_id=run_id, verb="policy.reroute_requested")
             .order_by("id").first())
    if event is None:
        return None
    policy = Policy.objects.filter(pk=int(event.object_id), source=source).first()
    if policy is None:
        return None
    return reroute_progress(policy=policy, run_id=run_id)
