"""Reads for the policy editor: version history with diffs, the promise check, re-route progress."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Exists, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from reviewapp.core.models import AuditEvent
from reviewapp.ingest.models import Item, Source
from reviewapp.review.models import Decision, Label, Policy, ReviewTask, Verdict
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
    total = examined = auto = kept = qa = busy = to_review = auto_kept = 0
    reason = ""
    finished_at = None
    for row in rows:
        after = row["after"] or {}
        if row["verb"] == "policy.reroute_started":
            status, total = "running", int(after.get("total", 0))
            auto_kept = int(after.get("auto_kept_acted_on", 0))
            examined = auto = kept = qa = busy = to_review = 0  # a redelivered run starts counting again
        elif row["verb"] == "policy.reroute_progress":
            examined += int(after.get("examined", 0))
            auto += int(after.get("auto_decided", 0))
            kept += int(after.get("kept", 0))
            qa += int(after.get("qa_sampled", 0))
            busy += int(after.get("busy", 0))
            to_review += int(after.get("to_review", 0))
            auto_kept += int(after.get("auto_kept", 0))
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
            "to_review": to_review, "auto_kept": auto_kept,
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


# --- Re-route of auto-decisions back to review ---------------------------------------------------------
#
# The rule (docs/policies.md): a new policy version may take back an auto-decision whose
# item now falls in the review band only while nothing irreversible has happened to it:
#   * it is the item's current decision, made by the model, less than REROUTE_AUTO_WINDOW_HOURS ago (default
#     24 h: past that, downstream systems and people may rely on it in ways no row here records);
#   * no downstream action has started: every action run of the decision is still pending, awaiting approval,
#     or was rejected (a run delivering, delivered, failed or dead may have acted; such items stay decided);
#   * no person has looked at it: no active verdict on the item, and no task on it claimed right now.
# Taken back means: the decision is withdrawn (kept, no longer current), its pending action runs are rejected,
# open QA tasks are cancelled, and the item is queued for review with a new review task.

DEFAULT_REROUTE_AUTO_WINDOW_HOURS = 24.0


def reroute_auto_window() -> timedelta:
    return timedelta(hours=float(getattr(settings, "REROUTE_AUTO_WINDOW_HOURS", DEFAULT_REROUTE_AUTO_WINDOW_HOURS)))


def auto_region_q(thresholds_by_model: dict[int, dict[str, float] | None], *, prefix: str = "") -> Q:
    """The auto region of a policy as a filter on predictions: (model version, top label, confidence at or above
    the label's threshold). ``thresholds_by_model`` holds the thresholds in force per model version (None or a
    missing label: nothing auto-decided), as ``policy_thresholds`` gives them, so the SQL agrees with
    ``route_one``."""
    region = Q(pk__in=[])
    for model_version_id, thresholds in thresholds_by_model.items():
        for label, threshold in (thresholds or {}).items():
            region |= Q(**{f"{prefix}model_version_id": model_version_id, f"{prefix}top_label": label,
                           f"{prefix}confidence__gte": threshold})
    return region


def recent_auto_items(*, source_id: int, now: datetime | None = None) -> QuerySet[Item]:
    """Auto-decided items of the source whose current decision is the model's, made within the window."""
    now = now or timezone.now()
    recent_model_decision = Decision.objects.filter(
        item_id=OuterRef("pk"), is_current=True, origin=Decision.Origin.MODEL, withdrawn_at__isnull=True,
        created_at__gte=now - reroute_auto_window(),
    )
    return Item.objects.filter(source_id=source_id, state=Item.State.AUTO_DECIDED, prediction__isnull=False).filter(
        Exists(recent_model_decision))


def reversible_auto_items(*, source_id: int, now: datetime | None = None) -> QuerySet[Item]:
    """Auto-decided items of the source whose decision can still be taken back (the rule above)."""
    from actions.models import ActionRun

    acted = ActionRun.objects.filter(decision__item_id=OuterRef("pk"), decision__is_current=True).exclude(
        state__in=[ActionRun.State.PENDING, ActionRun.State.PENDING_APPROVAL, ActionRun.State.REJECTED])
    seen = Verdict.objects.filter(item_id=OuterRef("pk"), withdrawn_at__isnull=True)
    held = ReviewTask.objects.filter(item_id=OuterRef("pk"), state=ReviewTask.State.CLAIMED)
    return (recent_auto_items(source_id=source_id, now=now)
            .exclude(Exists(acted)).exclude(Exists(seen)).exclude(Exists(held)))


def auto_back_counts(*, source_id: int, thresholds_by_model: dict[int, dict[str, float] | None],
                     now: datetime | None = None) -> dict[str, int]:
    """Auto-decisions made within the window whose items now fall in the review band: how many a re-route would
    send back, and how many stay decided because something has acted on them (older ones are out of scope)."""
    region = auto_region_q(thresholds_by_model, prefix="prediction__")
    in_band = recent_auto_items(source_id=source_id, now=now).exclude(region)
    back = reversible_auto_items(source_id=source_id, now=now).exclude(region).count()
    return {"auto_to_review": back, "auto_kept_acted_on": in_band.count() - back}


def reroute_preview(*, source: Source, thresholds: dict[str, float] | None) -> dict[str, Any]:
    """What applying a candidate policy with re-route would move now: waiting items it would auto-decide, and
    auto-decided items it would send back to review (or could not: acted on, seen or too old). ``thresholds``
    are the candidate's (for target-error mode, the ones the what-if derived for the champion), applied to the
    predictions of every model version."""
    from reviewapp.review.policy_services import waiting_tasks

    model_ids = set(Item.objects.filter(source=source, state__in=[Item.State.QUEUED, Item.State.AUTO_DECIDED],
                                        prediction__isnull=False)
                    .values_list("prediction__model_version_id", flat=True).distinct())
    by_model = {m: thresholds for m in model_ids}
    waiting = waiting_tasks(source.pk).filter(item__prediction__isnull=False)
    to_auto = waiting.filter(auto_region_q(by_model, prefix="item__prediction__")).count()
    back = auto_back_counts(source_id=source.pk, thresholds_by_model=by_model)
    return {"waiting": waiting.count(), "waiting_to_auto": to_auto, **back,
            "window_hours": reroute_auto_window().total_seconds() / 3600}


def reroute_preview_for(*, source: Source, candidate: dict[str, Any], sim: dict[str, Any]) -> dict[str, Any]:
    """``reroute_preview`` for a what-if: the candidate's thresholds, or in target-error mode the derived ones."""
    mode = candidate.get("mode")
    thresholds = sim.get("thresholds") if mode == Policy.Mode.TARGET_ERROR else candidate.get("thresholds")
    return reroute_preview(source=source, thresholds=thresholds)
