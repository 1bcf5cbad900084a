"""Review pages: the queue, work mode, the item view, the admin queue and per-analyst figures.
One view, two renderings: the full page, or the partial htmx asks for."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST
from django_htmx.http import trigger_client_event

from reviewapp.core.errors import Conflict, PermissionDeniedError, ValidationFailed
from reviewapp.core.roles import can
from reviewapp.ingest.models import Item, Source
from reviewapp.review import selectors, services
from reviewapp.review.forms import (
    BulkVerdictForm,
    ClaimForm,
    EscalateForm,
    QueueFilterForm,
    StatsForm,
    UndoForm,
    VerdictForm,
)
from reviewapp.review.models import ReviewTask

logger = logging.getLogger(__name__)

QUEUE_PAGE_SIZE = 50
# Items a reviewer skipped are not handed back to them until they ask (kept in the session).
SKIPPED_SESSION_KEY = "review_skipped_tasks"
SKIPPED_MAX = 200


def reviewer_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @login_required
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not can(request.user, "review_items"):
            raise PermissionDenied("Your role may not review items.")
        try:
            return view(request, *args, **kwargs)
        except PermissionDeniedError as exc:
            raise PermissionDenied(exc.detail) from exc

    return wrapper


def _query(*, source: str = "", queue: str = services.REVIEW_QUEUE) -> str:
    """The query string of the work and count URLs (the default queue is left out)."""
    clean = {"source": source, "queue": "" if queue == services.REVIEW_QUEUE else queue}
    clean = {k: v for k, v in clean.items() if v}
    return f"?{urlencode(clean)}" if clean else ""


# --- Queue ------------------------------------------------------------------------------------------

def _queue_context(request: HttpRequest) -> dict[str, Any]:
    form = QueueFilterForm(request.GET or None)
    filters = form.filters()
    cursor = form.cleaned_data.get("after") if form.is_bound and form.is_valid() else None
    page = selectors.queue_page(filters=filters, cursor=cursor, limit=QUEUE_PAGE_SIZE)
    sources = list(selectors.sources_for_review())
    source = filters.source
    labels: list[str] = []
    for s in [source] if source else sources:
        labels += [label for label in s.labels if label not in labels]
    params = {k: v for k, v in request.GET.items() if k != "after" and v}
    slug = source.slug if source else ""
    return {
        "form": form,
        "filters": filters,
        "tasks": page.tasks,
        "page": page,
        "next_url": (reverse("review:queue") + "?" + urlencode({**params, "after": page.next_cursor})
                     if page.next_cursor else ""),
        "first_url": reverse("review:queue") + ("?" + urlencode(params) if params else ""),
        "sources": sources,
        "batches": selectors.recent_batches(source=source),
        "labels": labels,
        "selected_source": source,
        "counts": selectors.queue_counts(source=source),
        "counts_url": reverse("review:queue_counts") + _query(source=slug),
        "work_url": reverse("review:work") + _query(source=slug),
        "bulk_labels": labels,
        "can_adjudicate": can(request.user, "adjudicate"),
    }


@require_GET
@reviewer_required
def queue(request: HttpRequest) -> HttpResponse:
    context = _queue_context(request)
    if request.htmx and request.htmx.target == "queue-results":
        return render(request, "review/_queue_results.html", context)
    return render(request, "review/queue.html", context)


@require_GET
@reviewer_required
def queue_counts(request: HttpRequest) -> HttpResponse:
    form = ClaimForm(request.GET or None)
    source = form.cleaned_data.get("source") if form.is_bound and form.is_valid() else None
    return render(request, "review/_queue_counts.html", {
        "counts": selectors.queue_counts(source=source),
        "counts_url": reverse("review:queue_counts") + _query(source=source.slug if source else ""),
    })


@require_POST
@reviewer_required
def queue_bulk(request: HttpRequest) -> HttpResponse:
    """Bulk verdicts from the queue list: the first POST shows what would happen, the second
    (``confirm``) records them and reports per item."""
    form = BulkVerdictForm(request.POST)
    template = "review/_bulk.html" if request.htmx else "review/bulk.html"
    if not form.is_valid():
        return render(request, template, {"form": form, "errors": form.errors}, status=400)
    data = form.cleaned_data
    ids = list(dict.fromkeys(data["item"]))
    if not data.get("confirm"):
        items = list(Item.objects.filter(pk__in=ids[: services.BULK_MAX_ITEMS + 1]).select_related("source"))
        too_many = len(ids) > services.BULK_MAX_ITEMS
        return render(request, template, {"form": form, "step": "confirm", "items": items, "label": data["label"],
                                          "note": data.get("note") or "", "too_many": too_many,
                                          "max_items": services.BULK_MAX_ITEMS})
    try:
        outcomes = services.verdicts_bulk_submit(user=request.user, item_ids=ids, label=data["label"],
                                                 note=data.get("note") or "")
    except ValidationFailed as exc:
        return render(request, template, {"form": form, "errors": {"items": [exc.detail]}}, status=400)
    response = render(request, template, {
        "step": "done", "outcomes": outcomes, "label": data["label"],
        "recorded": sum(o.status == "recorded" for o in outcomes),
        "skipped": sum(o.status == "skipped" for o in outcomes),
    })
    # The list and the counts reload themselves (they listen for this event).
    return trigger_client_event(response, "queue-changed")


# --- Work mode --------------------------------------------------------------------------------------

def _skipped(request: HttpRequest) -> list[int]:
    return list(request.session.get(SKIPPED_SESSION_KEY, []))


def _remember_skip(request: HttpRequest, task_id: int) -> None:
    skipped = [t for t in _skipped(request) if t != task_id] + [task_id]
    request.session[SKIPPED_SESSION_KEY] = skipped[-SKIPPED_MAX:]


def _work_context(request: HttpRequest, source: Source | None, queue_name: str) -> dict[str, Any]:
    # A verdict recorded by this very request is the user's latest: no need to look it up again.
    undoable = getattr(request, "review_recorded_verdict", None) or selectors.last_undoable_verdict(user=request.user)
    return {"source_slug": source.slug if source else "", "queue": queue_name, "undoable": undoable}


def _item_context(request: HttpRequest, task: ReviewTask, source: Source | None, queue_name: str,
                  notice: str = "", notice_kind: str = "info") -> dict[str, Any]:
    # The history loads when opened (hx-get): work mode renders only what a verdict needs.
    view = selectors.item_view_data(item_id=task.item_id, task=task, user=request.user, with_history=False)
    labels = [
        {"name": label, "key": index if index <= 9 else None, "predicted": bool(
            view.prediction and view.prediction["label"] == label)}
        for index, label in enumerate(view.labels, start=1)
    ]
    return {
        **_work_context(request, source, queue_name),
        "view": view,
        "item": view.item,
        "task": task,
        "prediction": view.prediction,
        "provenance": view.provenance,
        "explanation": view.explanation,
        "history_url": reverse("review:item_history", args=[task.item_id]),
        "label_buttons": labels,
        "can_escalate": task.kind in services.ESCALATABLE_KINDS,
        "similar_url": (reverse("review:item_similar", args=[task.item_id])
                        if selectors.similar_decisions_available() else ""),
        # A fallback key for clients without crypto.randomUUID; review.js replaces it when it can.
        "idempotency_key": uuid.uuid4().hex,
        "notice": notice,
        "notice_kind": notice_kind,
    }


def _render_task(request: HttpRequest, task: ReviewTask, source: Source | None, queue_name: str,
                 notice: str = "", notice_kind: str = "info", undo_actions: Any = None) -> HttpResponse:
    context = _item_context(request, task, source, queue_name, notice, notice_kind)
    # After an undo: what happened to each action of the withdrawn decision (the notice line is one line).
    context["undo_actions"] = undo_actions
    return render(request, "review/_item.html", context)


def _render_next(request: HttpRequest, source: Source | None, queue_name: str, notice: str = "",
                 notice_kind: str = "info") -> HttpResponse:
    """Claim the next item for the user and render it (or the empty-queue partial)."""
    task = services.task_claim_next(user=request.user, source=source, exclude_task_ids=_skipped(request),
                                    queue=queue_name)
    if task is None:
        return render(request, "review/_empty.html", {
            **_work_context(request, source, queue_name), "notice": notice, "notice_kind": notice_kind,
            "has_skipped": bool(_skipped(request)),
        })
    return _render_task(request, task, source, queue_name, notice, notice_kind)


def _work_url(source: Source | None, queue_name: str = services.REVIEW_QUEUE) -> str:
    return reverse("review:work") + _query(source=source.slug if source else "", queue=queue_name)


def _claim_form(request: HttpRequest, form_class: type[ClaimForm] = ClaimForm) -> tuple[Any, Source | None, str]:
    form = form_class(request.POST if request.method == "POST" else (request.GET or None))
    valid = form.is_bound and form.is_valid()
    source = form.cleaned_data.get("source") if valid else None
    queue_name = form.cleaned_data.get("queue") if valid else services.REVIEW_QUEUE
    # Fail early (403) for a queue the user may not work, before anything is claimed.
    services.queue_kinds(user=request.user, queue=queue_name)
    return form, source, queue_name


@require_GET
@reviewer_required
def work(request: HttpRequest) -> HttpResponse:
    """The work page. Showing it changes nothing: a held claim is shown, otherwise the page claims
    the next item with a POST (htmx on load, or the button without JavaScript)."""
    _form, source, queue_name = _claim_form(request)
    kinds = services.QUEUE_KINDS[queue_name]
    # The held task comes with its item and everything the item view shows, in one query.
    task = selectors.task_for_user(user=request.user, source=source, with_item=True)
    if task is not None and task.kind not in kinds:
        task = None
    context: dict[str, Any] = {"selected_source": source, "can_adjudicate": can(request.user, "adjudicate")}
    context.update(_item_context(request, task, source, queue_name) if task is not None
                   else _work_context(request, source, queue_name))
    return render(request, "review/work.html", context)


@require_POST
@reviewer_required
def claim(request: HttpRequest) -> HttpResponse:
    form, source, queue_name = _claim_form(request)
    if form.is_valid() and form.cleaned_data.get("include_skipped"):
        request.session[SKIPPED_SESSION_KEY] = []
    if not request.htmx:
        services.task_claim_next(user=request.user, source=source, exclude_task_ids=_skipped(request),
                                 queue=queue_name)
        return redirect(_work_url(source, queue_name))
    return _render_next(request, source, queue_name)


@require_POST
@reviewer_required
def verdict(request: HttpRequest, item_id: int) -> HttpResponse:
    item = get_object_or_404(Item.objects.select_related("source"), pk=item_id)
    form = VerdictForm(request.POST)
    if not form.is_valid():
        return HttpResponseBadRequest("Invalid verdict: " + "; ".join(
            f"{name}: {' '.join(errors)}" for name, errors in form.errors.items()))
    data = form.cleaned_data
    source, queue_name = data.get("source"), data["queue"]
    notice, kind = "", "info"
    try:
        recorded, created = services.verdict_submit(
            user=request.user, item=item, label=data["label"], note=data.get("note") or "",
            idempotency_key=data.get("idempotency_key") or None, handling_ms=data.get("handling_ms"),
        )
        notice = f"Recorded {recorded.label} for {item.external_id}."
        if created:
            request.review_recorded_verdict = recorded  # type: ignore[attr-defined]
    except ValidationFailed as exc:
        return HttpResponseBadRequest(exc.detail)
    except Conflict as exc:
        # The reviewer cannot fix a conflict on this item; say why and move on to the next one.
        notice, kind = f"Your verdict on {item.external_id} was not recorded: {exc.detail}", "warn"
    if not request.htmx:
        return redirect(_work_url(source, queue_name))
    return _render_next(request, source, queue_name, notice, kind)


@require_POST
@reviewer_required
def skip(request: HttpRequest, item_id: int) -> HttpResponse:
    item = get_object_or_404(Item, pk=item_id)
    _form, source, queue_name = _claim_form(request)
    task = selectors.task_for_user(user=request.user, item=item, include_expired=True)
    notice, kind = f"Skipped {item.external_id}.", "info"
    if task is not None:
        _remember_skip(request, task.pk)
        if task.paired:
            # The other task of a double review is the same item: skipping one skips both.
            for twin in ReviewTask.objects.filter(item=item, round=task.round, paired=True).exclude(pk=task.pk):
                _remember_skip(request, twin.pk)
    try:
        services.task_release(user=request.user, item=item)
    except Conflict as exc:
        notice, kind = f"{item.external_id}: {exc.detail}", "warn"
    if not request.htmx:
        services.task_claim_next(user=request.user, source=source, exclude_task_ids=_skipped(request),
                                 queue=queue_name)
        return redirect(_work_url(source, queue_name))
    return _render_next(request, source, queue_name, notice, kind)


@require_POST
@reviewer_required
def escalate(request: HttpRequest, item_id: int) -> HttpResponse:
    item = get_object_or_404(Item, pk=item_id)
    form, source, queue_name = _claim_form(request, EscalateForm)
    note = form.cleaned_data.get("note", "") if form.is_valid() else ""
    try:
        services.task_escalate(user=request.user, item=item, note=note)
        notice, kind = f"Escalated {item.external_id} to the admin queue.", "info"
    except Conflict as exc:
        notice, kind = f"{item.external_id} was not escalated: {exc.detail}", "warn"
    if not request.htmx:
        return redirect(_work_url(source, queue_name))
    return _render_next(request, source, queue_name, notice, kind)


@require_POST
@reviewer_required
def undo(request: HttpRequest) -> HttpResponse:
    """Undo the user's last verdict: the item comes back to them; the item they were looking at goes
    back to the queue (one item at a time)."""
    form, source, queue_name = _claim_form(request, UndoForm)
    data = form.cleaned_data if form.is_valid() else {}
    try:
        result = services.verdict_withdraw(user=request.user, verdict_id=data.get("verdict"))
    except Conflict as exc:
        held = selectors.task_for_user(user=request.user, source=source)
        if not request.htmx:
            return redirect(_work_url(source, queue_name))
        if held is not None:
            return _render_task(request, held, source, queue_name, f"Nothing undone: {exc.detail}", "warn")
        return _render_next(request, source, queue_name, f"Nothing undone: {exc.detail}", "warn")
    task = result.task
    current = data.get("current_item")
    if current and current != task.item_id:
        current_item = Item.objects.filter(pk=current).first()
        if current_item is not None:
            try:
                services.task_release(user=request.user, item=current_item)
            except Conflict:
                logger.info("undo: item %s was no longer held by %s", current, request.user.pk)
    if not request.htmx:
        return redirect(_work_url(source, queue_name))
    task.refresh_from_db()
    item = Item.objects.only("external_id").get(pk=task.item_id)
    notice = f"Your verdict on {item.external_id} was withdrawn; answer it again."
    if result.actions_summary:
        notice = f"{notice} Actions: {result.actions_summary}"
    # A delivered action that could not be withdrawn is worth a second look: say so as a warning.
    kind = "warn" if result.actions is not None and (result.actions.delivered or result.actions.in_flight) else "info"
    return _render_task(request, task, source, queue_name, notice, kind, undo_actions=result.actions)


@require_POST
@reviewer_required
def renew(request: HttpRequest, item_id: int) -> HttpResponse:
    item = get_object_or_404(Item, pk=item_id)
    task = selectors.task_for_user(user=request.user, item=item, include_expired=True)
    if task is None:
        return JsonResponse({"detail": "You no longer hold this item."}, status=409)
    try:
        task = services.task_renew_lease(user=request.user, task=task)
    except Conflict as exc:
        return JsonResponse({"detail": exc.detail}, status=409)
    return JsonResponse({"lease_expires_at": task.lease_expires_at.isoformat() if task.lease_expires_at else None})


# --- Item view (read-only) ---------------------------------------------------------------------------

@require_GET
@reviewer_required
def item_detail(request: HttpRequest, item_id: int) -> HttpResponse:
    if not Item.objects.filter(pk=item_id).exists():
        raise Http404("No such item.")
    held = selectors.task_for_user(user=request.user, item=Item(pk=item_id))
    view = selectors.item_view_data(item_id=item_id, task=held, user=request.user)
    return render(request, "review/item_detail.html", {
        "view": view, "item": view.item, "task": held, "prediction": view.prediction,
        "provenance": view.provenance, "explanation": view.explanation, "history": view.history,
        "similar_url": reverse("review:item_similar", args=[item_id]) if selectors.similar_decisions_available()
        else "",
    })


@require_GET
@reviewer_required
def item_history(request: HttpRequest, item_id: int) -> HttpResponse:
    """The item's decisions, verdicts (someone else's hidden while it waits) and action runs."""
    item = get_object_or_404(Item, pk=item_id)
    return render(request, "review/_history_body.html", {"history": selectors.item_history(item=item,
                                                                                             user=request.user)})


@require_GET
@reviewer_required
def item_similar(request: HttpRequest, item_id: int) -> HttpResponse:
    """Similar past decisions, loaded after the item so a slow neighbour search never delays it."""
    item = get_object_or_404(Item.objects.select_related("source"), pk=item_id)
    rows: list[dict[str, Any]] = []
    failed = False
    try:
        rows = selectors.similar_decisions(item=item, k=5)
    except Exception:
        # A side panel: its failure is logged and shown as such, never breaks the item view.
        logger.exception("similar_decisions failed for item %s", item_id)
        failed = True
    return render(request, "review/_similar.html", {"rows": rows, "failed": failed})


# --- Admin queue and figures ------------------------------------------------------------------------

@require_GET
@reviewer_required
def adjudication(request: HttpRequest) -> HttpResponse:
    if not can(request.user, "adjudicate"):
        raise PermissionDenied("Only people who may adjudicate see this queue.")
    tasks = selectors.admin_queue_tasks()
    return render(request, "review/adjudication.html", {
        "tasks": tasks,
        "work_url": _work_url(None, services.ADJUDICATION_QUEUE),
    })


@require_GET
@reviewer_required
def stats(request: HttpRequest) -> HttpResponse:
    """Per-analyst figures: everyone's for people who may adjudicate, one's own for everyone else."""
    form = StatsForm(request.GET or None)
    data = form.cleaned_data if form.is_bound and form.is_valid() else {}
    days = data.get("days") or "30"
    since = None if days == "all" else timezone.now() - timedelta(days=int(days))
    everyone = can(request.user, "adjudicate")
    figures = selectors.analyst_figures(since=since, source=data.get("source"),
                                        reviewer_ids=None if everyone else [request.user.pk])
    return render(request, "review/stats.html", {
        "form": form, "figures": figures, "everyone": everyone, "days": days,
        "sources": list(selectors.sources_for_review()), "selected_source": data.get("source"),
    })
