"""The policy editor pages: bands per source, the live what-if, history with restore, the promise check and
re-route progress. Admins (manage_policies) get the controls; other staff see the same numbers read-only."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from reviewapp.core.errors import NotFound, ValidationFailed
from reviewapp.core.roles import can
from reviewapp.ingest.models import Source
from reviewapp.review import policy_selectors, policy_services
from reviewapp.review.models import Policy
from reviewapp.review.policy_simulation import policy_simulate
from reviewapp.review.services import policy_as_dict, policy_current

VIEW_CAPS = ("manage_policies", "manage_models", "review_items")
SLIDER_MIN_FLOOR = 0.5
DEFAULT_THRESHOLD = 0.99


def _viewer_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @login_required
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not any(can(request.user, c) for c in VIEW_CAPS):
            raise PermissionDenied("Your role may not see policies.")
        return view(request, *args, **kwargs)

    return wrapper


def _admin_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @login_required
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not can(request.user, "manage_policies"):
            raise PermissionDenied("Only admins may change policies.")
        return view(request, *args, **kwargs)

    return wrapper


def _source(slug: str) -> Source:
    source = Source.objects.filter(slug=slug).first()
    if source is None:
        raise Http404(f"No source {slug!r}.")
    return source


def _float(data: Any, name: str, default: float | None) -> float | None:
    raw = data.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ValidationFailed("Invalid policy.", [{"field": name, "message": "must be a number"}]) from None


def candidate_from_params(source: Source, data: Any, base: dict[str, Any]) -> dict[str, Any]:
    """A candidate policy from the editor's form fields; a field not sent keeps the value of ``base``.

    Thresholds travel as ``auto_<i>`` (checkbox: the label may be auto-decided) and ``thr_<i>`` (the slider) with
    ``i`` the label's position, so label names never become field names."""
    mode = data.get("mode") or base.get("mode") or Policy.Mode.THRESHOLD
    if mode not in Policy.Mode.values:
        raise ValidationFailed("Invalid policy.", [{"field": "mode", "message": "unknown mode"}])
    sent_thresholds = any(k.startswith(("thr_", "auto_")) for k in data) or data.get("thresholds_sent")
    thresholds: dict[str, float] = {}
    if sent_thresholds:
        for i, label in enumerate(source.labels):
            if data.get(f"auto_{i}"):
                value = _float(data, f"thr_{i}", DEFAULT_THRESHOLD)
                thresholds[str(label)] = round(float(value), 6)  # type: ignore[arg-type]
    else:
        thresholds = dict(base.get("thresholds") or {})
    # The target-error inputs are on the page in both modes (one is hidden): in threshold mode they keep the
    # values in force, so a save does not record changes nobody meant.
    if mode == Policy.Mode.TARGET_ERROR:
        target_error = _float(data, "target_error", base.get("target_error"))
        target_error = 0.02 if target_error is None else target_error
        confidence = _float(data, "confidence", base.get("confidence", 0.95))
    else:
        target_error, confidence = base.get("target_error"), base.get("confidence", 0.95)
    return {
        "mode": mode,
        "thresholds": thresholds,
        "target_error": target_error,
        "confidence": confidence if confidence is not None else 0.95,
        "qa_sample_rate": _float(data, "qa_sample_rate", base.get("qa_sample_rate", 0.02)),
        "priority": data.get("priority") or base.get("priority") or Policy.Priority.UNCERTAINTY,
    }


def _label_rows(source: Source, candidate: dict[str, Any]) -> list[dict[str, Any]]:
    floor = max(SLIDER_MIN_FLOOR, round(1.0 / max(len(source.labels), 1), 3))
    rows = []
    for i, label in enumerate(source.labels):
        value = (candidate.get("thresholds") or {}).get(str(label))
        rows.append({"index": i, "name": label, "enabled": value is not None,
                     "value": value if value is not None else DEFAULT_THRESHOLD, "min": floor})
    return rows


def _whatif(source: Source, candidate: dict[str, Any], current: Policy | None) -> dict[str, Any]:
    sim = policy_simulate(source=source, candidate=candidate,
                          current=policy_as_dict(current) if current is not None else None, with_charts=True)
    sim["reroute_preview"] = policy_selectors.reroute_preview_for(source=source, candidate=candidate, sim=sim)
    return sim


def _context(request: HttpRequest, source: Source, candidate: dict[str, Any] | None = None,
             errors: list[dict[str, Any]] | None = None, comment: str = "") -> dict[str, Any]:
    current = policy_current(source=source)
    base = policy_as_dict(current) if current is not None else {"mode": "threshold", "thresholds": {}}
    candidate = candidate or {k: base.get(k) for k in ("mode", "thresholds", "target_error", "confidence",
                                                       "qa_sample_rate", "priority")}
    run_id = request.GET.get("run") or ""
    progress = policy_selectors.reroute_progress_for_run(source=source, run_id=run_id) if run_id else None
    return {
        "source": source,
        "policy": current,
        "candidate": candidate,
        "label_rows": _label_rows(source, candidate),
        "whatif": _whatif(source, candidate, current),
        "history": policy_selectors.policy_history(source=source, limit=50),
        "promise": policy_selectors.promise_check(source=source, policy=current) if current is not None else None,
        "progress": progress,
        "can_edit": can(request.user, "manage_policies"),
        "errors": errors or [],
        "comment": comment,
        "priorities": Policy.Priority.choices,
        "simulate_url": reverse("review:policy_simulate", args=[source.slug]),
    }


@require_GET
@_viewer_required
def policy_index(request: HttpRequest) -> HttpResponse:
    sources = list(Source.objects.order_by("slug"))
    rows = [{"source": s, "policy": policy_current(source=s)} for s in sources]
    return render(request, "review/policy_index.html", {"rows": rows})


@require_GET
@_viewer_required
def policy_editor(request: HttpRequest, slug: str) -> HttpResponse:
    source = _source(slug)
    return render(request, "review/policy_editor.html", _context(request, source))


@require_GET
@_viewer_required
def policy_simulate_view(request: HttpRequest, slug: str) -> HttpResponse:
    """The what-if partial for the candidate in the query string (htmx, on every slider move)."""
    source = _source(slug)
    current = policy_current(source=source)
    base = policy_as_dict(current) if current is not None else {}
    if not can(request.user, "manage_policies"):
        # Read-only viewers see the policy in force, whatever the query says.
        candidate = {k: base.get(k) for k in ("mode", "thresholds", "target_error", "confidence", "qa_sample_rate",
                                              "priority")}
    else:
        try:
            candidate = candidate_from_params(source, request.GET, base)
        except ValidationFailed as exc:
            return render(request, "review/_policy_errors.html", {"errors": exc.errors}, status=400)
    return render(request, "review/_policy_whatif.html", {
        "source": source, "whatif": _whatif(source, candidate, current), "candidate": candidate,
    })


@require_POST
@_admin_required
def policy_save(request: HttpRequest, slug: str) -> HttpResponse:
    source = _source(slug)
    current = policy_current(source=source)
    base = policy_as_dict(current) if current is not None else {}
    comment = (request.POST.get("comment") or "").strip()[:500]
    candidate: dict[str, Any] | None = None
    try:
        candidate = candidate_from_params(source, request.POST, base)
        saved = policy_services.policy_update(
            source=source, actor=request.user, comment=comment, reroute=bool(request.POST.get("reroute")),
            **candidate,
        )
    except ValidationFailed as exc:
        context = _context(request, source, candidate=candidate, errors=exc.errors, comment=comment)
        return render(request, "review/policy_editor.html", context, status=400)
    changed = ", ".join(c["field"] for c in saved.diff) or "nothing changed"
    messages.success(request, f"Saved policy version {saved.policy.version} ({changed}).")
    for warning in saved.warnings:
        messages.warning(request, warning)
    return redirect(_editor_url(source, saved.reroute_run_id))


def _editor_url(source: Source, run_id: str | None) -> str:
    url = reverse("review:policy_editor", args=[source.slug])
    return f"{url}?{urlencode({'run': run_id})}" if run_id else url


@require_POST
@_admin_required
def policy_restore_view(request: HttpRequest, slug: str, version: int) -> HttpResponse:
    source = _source(slug)
    try:
        saved = policy_services.policy_restore(source=source, actor=request.user, version=version,
                                               comment=(request.POST.get("comment") or "").strip()[:500],
                                               reroute=bool(request.POST.get("reroute")))
    except NotFound as exc:
        raise Http404(exc.detail) from exc
    messages.success(request, f"Restored version {version} as version {saved.policy.version}.")
    return redirect(_editor_url(source, saved.reroute_run_id))


@require_GET
@_viewer_required
def policy_reroute_progress(request: HttpRequest, slug: str) -> HttpResponse:
    """The progress partial (htmx polls it every second until the run is done)."""
    source = _source(slug)
    run_id = request.GET.get("run") or ""
    progress = policy_selectors.reroute_progress_for_run(source=source, run_id=run_id) if run_id else None
    return render(request, "review/_policy_reroute.html", {"source": source, "progress": progress})
