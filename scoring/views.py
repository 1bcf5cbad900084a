"""Model registry pages: versions per source with a Train button, and a model card per version."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import HttpResponseClientRedirect

from reviewapp.core.errors import Conflict, NotFound, ValidationFailed
from reviewapp.core.roles import can
from scoring import selectors, services
from scoring.estimators import algorithm_names, algorithm_title
from scoring.models import ModelVersion

# Reliability diagram geometry (SVG user units).
SVG_SIZE = 300
SVG_PAD_LEFT = 44
SVG_PAD_BOTTOM = 36
SVG_PAD_TOP = 10
SVG_PAD_RIGHT = 10


def models_manager_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @login_required
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not can(request.user, "manage_models"):
            raise PermissionDenied("Your role may not manage models.")
        return view(request, *args, **kwargs)

    return wrapper


def _redirect(request: HttpRequest, url: str) -> HttpResponse:
    return HttpResponseClientRedirect(url) if request.htmx else redirect(url)


def _version_or_404(pk: int) -> ModelVersion:
    try:
        return selectors.model_version_get(pk=pk)
    except NotFound as exc:
        raise Http404(exc.detail) from exc


def _algorithm_choices() -> list[dict[str, str]]:
    # Titles come from the registry: listing families must not import them (torch stays out of web processes).
    return [{"name": name, "title": algorithm_title(name)} for name in algorithm_names()]


@require_GET
@login_required
def model_list(request: HttpRequest) -> HttpResponse:
    rows = selectors.sources_with_versions()
    context = {
        "sources": [{"source": s, "versions": versions, "champion": champion} for s, versions, champion in rows],
        "any_training": any(v.status == ModelVersion.Status.TRAINING for _, versions, _ in rows for v in versions),
        "algorithms": _algorithm_choices(),
    }
    template = "scoring/_model_tables.html" if request.htmx else "scoring/model_list.html"
    return render(request, template, context)


@require_POST
@models_manager_required
def model_train_start(request: HttpRequest, slug: str) -> HttpResponse:
    try:
        source = selectors.source_get(slug=slug)
    except NotFound as exc:
        messages.error(request, exc.detail)
        return _redirect(request, reverse("scoring:model_list"))
    algorithm = request.POST.get("algorithm") or "logreg"
    try:
        mv = services.model_training_start(source=source, actor=request.user, algorithm=algorithm, trigger="ui")
    except ValidationFailed as exc:
        messages.error(request, "; ".join(e["message"] for e in exc.errors) or exc.detail)
        return _redirect(request, reverse("scoring:model_list"))
    messages.success(request, f"Training {source.slug} model v{mv.version} ({algorithm}) started.")
    return _redirect(request, reverse("scoring:model_detail", kwargs={"pk": mv.pk}))


def reliability_geometry(bins: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers for the SVG reliability diagram: one bar per non-empty bin (accuracy) and a dot at its mean
    confidence; the diagonal is perfect calibration. Only numbers computed here reach the SVG."""
    width = height = SVG_SIZE
    plot_w = width - SVG_PAD_LEFT - SVG_PAD_RIGHT
    plot_h = height - SVG_PAD_TOP - SVG_PAD_BOTTOM

    def x(v: float) -> float:
        return round(SVG_PAD_LEFT + v * plot_w, 2)

    def y(v: float) -> float:
        return round(SVG_PAD_TOP + (1 - v) * plot_h, 2)

    total = sum(b.get("count") or 0 for b in bins) or 1
    bars, dots = [], []
    for b in bins:
        if not b.get("count"):
            continue
        lo, hi, acc, conf = float(b["lo"]), float(b["hi"]), float(b["accuracy"]), float(b["confidence"])
        bars.append({
            "x": x(lo) + 1, "y": y(acc), "w": max(round(x(hi) - x(lo) - 2, 2), 1), "h": round(y(0) - y(acc), 2),
            "title": f"{lo:.1f}-{hi:.1f}: accuracy {acc:.3f}, mean confidence {conf:.3f}, {b['count']} items",
        })
        dots.append({"cx": x(conf), "cy": y(acc), "r": round(2.5 + 5 * (b["count"] / total) ** 0.5, 2)})
    ticks = [{"v": f"{t / 10:.1f}", "x": x(t / 10), "y": y(t / 10)} for t in range(0, 11, 2)]
    return {
        "width": width, "height": height, "x0": x(0), "x1": x(1), "y0": y(0), "y1": y(1),
        "bars": bars, "dots": dots, "ticks": ticks,
        "xlabel_x": round(SVG_PAD_LEFT + plot_w / 2, 2), "xlabel_y": height - 4,
        "ylabel_x": 12, "ylabel_y": round(SVG_PAD_TOP + plot_h / 2, 2),
    }


def _card_context(mv: ModelVersion, request: HttpRequest) -> dict[str, Any]:
    metrics = mv.metrics or {}
    per_label = metrics.get("per_label") or {}
    labels = list(mv.source.labels)
    per_label_rows = [{"label": lab, **per_label[lab]} for lab in labels if lab in per_label]
    promotion = metrics.get("promotion") or {}
    risk = mv.risk_control or {}
    risk_evidence = (risk.get("evidence") or {}).get("per_label") or {}
    risk_rows = [{"label": lab, "threshold": (risk.get("thresholds") or {}).get(lab), **risk_evidence.get(lab, {})}
                 for lab in labels if lab in risk_evidence]
    is_candidate = mv.status == ModelVersion.Status.READY and not mv.is_champion
    return {
        "mv": mv,
        "metrics": metrics,
        "per_label": per_label_rows,
        "reliability": reliability_geometry(metrics.get("reliability") or []),
        "reliability_bins": [b for b in metrics.get("reliability") or [] if b.get("count")],
        "conformal": metrics.get("conformal") or {},
        "promotion": promotion,
        "comparison": promotion.get("comparison") or {},
        "champion": selectors.champion_for(source_id=mv.source_id),
        "can_promote": can(request.user, "manage_models") and mv.status == ModelVersion.Status.READY
        and not mv.is_champion,
        "family_title": algorithm_title(mv.algorithm),
        "risk": risk,
        "risk_rows": risk_rows,
        "shadow": selectors.shadow_comparison(model_version=mv) if mv.status == ModelVersion.Status.READY else {},
        "can_shadow": can(request.user, "manage_models") and (is_candidate or mv.is_shadow),
    }


@require_GET
@login_required
def model_detail(request: HttpRequest, pk: int) -> HttpResponse:
    mv = _version_or_404(pk)
    template = "scoring/_model_card.html" if request.htmx else "scoring/model_detail.html"
    return render(request, template, _card_context(mv, request))


@require_POST
@models_manager_required
def model_promote(request: HttpRequest, pk: int) -> HttpResponse:
    mv = _version_or_404(pk)
    try:
        services.model_promote(model_version=mv, actor=request.user)
    except Conflict as exc:
        messages.error(request, exc.detail)
    else:
        messages.success(request, f"{mv.source.slug} model v{mv.version} is now the champion.")
    return _redirect(request, reverse("scoring:model_detail", kwargs={"pk": mv.pk}))


@require_POST
@models_manager_required
def model_shadow(request: HttpRequest, pk: int) -> HttpResponse:
    mv = _version_or_404(pk)
    enabled = request.POST.get("enabled") == "1"
    try:
        services.model_shadow_set(model_version=mv, actor=request.user, enabled=enabled)
    except Conflict as exc:
        messages.error(request, exc.detail)
    else:
        messages.success(request, f"{mv.source.slug} model v{mv.version} "
                                  f"{'now scores live items in shadow' if enabled else 'no longer runs in shadow'}.")
    return _redirect(request, reverse("scoring:model_detail", kwargs={"pk": mv.pk}))
