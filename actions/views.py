"""Actions pages: runs that need a person (approve, reject, replay) and per-source configuration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from actions import selectors, services
from actions.forms import ActionConfigForm, RejectForm
from actions.models import ActionRun
from reviewapp.core.errors import DomainError
from reviewapp.core.roles import can
from reviewapp.ingest.models import Source


def _require(request: HttpRequest, *capabilities: str) -> None:
    if not any(can(request.user, c) for c in capabilities):
        raise PermissionDenied("Your role may not use this page.")


@login_required
def run_list(request: HttpRequest) -> HttpResponse:
    _require(request, "adjudicate", "manage_policies")
    runs = selectors.action_runs_needing_attention()[:500]
    context = {"runs": runs, "sources": Source.objects.order_by("slug"), "reject_form": RejectForm()}
    if request.htmx:
        return render(request, "actions/_run_table.html", context)
    return render(request, "actions/run_list.html", context)


def _run_action(request: HttpRequest, run_id: int, act: Callable[[ActionRun], Any], done: str) -> HttpResponse:
    _require(request, "adjudicate", "manage_policies")
    run = get_object_or_404(ActionRun, pk=run_id)
    error = ""
    try:
        act(run)
    except DomainError as exc:
        error = exc.detail
    if request.htmx:
        # The row is swapped in place either way; an error shows in the row (htmx ignores 4xx bodies).
        fresh = selectors.action_runs_detailed().get(pk=run_id)
        return render(request, "actions/_run_row.html",
                      {"run": fresh, "row_error": error, "row_done": "" if error else done})
    if error:
        messages.error(request, error)
    else:
        messages.success(request, f"Run {run_id}: {done}.")
    return redirect("actions:run_list")


@login_required
@require_POST
def run_approve(request: HttpRequest, run_id: int) -> HttpResponse:
    return _run_action(request, run_id, lambda run: services.action_run_approve(run=run, actor=request.user),
                       "approved")


@login_required
@require_POST
def run_reject(request: HttpRequest, run_id: int) -> HttpResponse:
    form = RejectForm(request.POST)
    reason = form.cleaned_data["reason"] if form.is_valid() else ""
    return _run_action(request, run_id,
                       lambda run: services.action_run_reject(run=run, actor=request.user, reason=reason), "rejected")


@login_required
@require_POST
def run_replay(request: HttpRequest, run_id: int) -> HttpResponse:
    return _run_action(request, run_id, lambda run: services.action_run_replay(run=run, actor=request.user),
                       "queued again")


@login_required
@require_http_methods(["GET", "POST"])
def source_actions(request: HttpRequest, slug: str) -> HttpResponse:
    _require(request, "manage_policies")
    source = get_object_or_404(Source, slug=slug)
    form = ActionConfigForm(request.POST or None, source=source)
    created = None
    secret = ""
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                created, secret = services.action_config_create(source=source, actor=request.user, **form.cleaned_data)
                form = ActionConfigForm(source=source)
            except DomainError as exc:
                for error in exc.errors or [{"message": exc.detail}]:
                    field = error.get("field")
                    form.add_error(field if field in form.fields else None, error["message"])
                status = exc.status_code
        else:
            status = 400
    context = {
        "source": source, "configs": selectors.action_configs_for_source(source=source), "form": form,
        "created": created, "secret": secret,
    }
    response = render(request, "actions/source_actions.html", context, status=status)
    if secret:
        # The page carries the secret once: never from a cache.
        response["Cache-Control"] = "no-store"
    return response
