"""HTML pages for sources, schemas and batches. Each view checks a capability, calls one service or
selector and renders; with htmx it renders just the fragment that changes.

Views that take a file install the upload size guard before the body is read, which means before
Django's CSRF check (it reads the form): they are csrf_exempt on the outside and csrf_protect on the
inside, the pattern Django documents for changing upload handlers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.text import slugify
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from reviewapp.core.errors import DomainError, NotFound, ValidationFailed
from reviewapp.core.roles import can
from reviewapp.ingest import schemas, selectors, services, uploads
from reviewapp.ingest.api import MULTIPART_OVERHEAD
from reviewapp.ingest.forms import SampleForm, SchemaVersionForm, SourceForm, UploadForm
from reviewapp.ingest.models import IngestBatch, SchemaVersion, Source

ERRORS_PER_PAGE = 100
QUARANTINE_SHOWN = 200


def _require_any(request: HttpRequest, *capabilities: str) -> None:
    if not any(can(request.user, c) for c in capabilities):
        raise PermissionDenied


def _source_or_404(slug: str) -> Source:
    try:
        return selectors.source_get(slug=slug)
    except NotFound as exc:
        raise Http404(exc.detail) from exc


def _batch_or_404(batch_id: int) -> IngestBatch:
    try:
        return selectors.batch_get(batch_id=batch_id)
    except NotFound as exc:
        raise Http404(exc.detail) from exc


def _add_errors(form: Any, error: DomainError) -> None:
    fields = set(form.fields)
    if not error.errors:
        form.add_error(None, error.detail)
    for item in error.errors:
        name = item.get("field")
        form.add_error(name if name in fields else None, item.get("message") or error.detail)


def _guarded(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Upload size guard first, CSRF check second (see the module docstring)."""
    protected = csrf_protect(view)

    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method == "POST":
            uploads.guard(request)
        return protected(request, *args, **kwargs)

    wrapper.__name__ = view.__name__
    wrapper.__doc__ = view.__doc__
    return csrf_exempt(wrapper)


def _too_large_message() -> str:
    return f"The file is larger than the limit of {settings.MAX_UPLOAD_BYTES} bytes."


# --- sources ------------------------------------------------------------------------------------------


@login_required
@require_GET
def source_list(request: HttpRequest) -> HttpResponse:
    _require_any(request, "manage_sources", "ingest_data")
    return render(request, "ingest/source_list.html", {"sources": selectors.source_list_with_counts()})


@login_required
@require_http_methods(["GET", "POST"])
def source_create(request: HttpRequest) -> HttpResponse:
    _require_any(request, "manage_sources")
    form = SourceForm(request.POST or None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            data = form.cleaned_data
            try:
                source = services.source_create(
                    actor=request.user, slug=data["slug"], name=data["name"], labels=data["labels"],
                    json_schema=data["schema"], id_field=data["id_field"], label_field=data["label_field"],
                    text_fields=data["text_fields"],
                )
            except ValidationFailed as exc:
                _add_errors(form, exc)
            else:
                messages.success(request, f"Source {source.slug} created with schema 1.0 and policy v1.")
                return redirect("ingest:source_detail", slug=source.slug)
        status = 400
    return render(request, "ingest/source_form.html", {"form": form, "sample_form": SampleForm()}, status=status)


@login_required
@require_http_methods(["GET", "POST"])
@_guarded
def source_infer(request: HttpRequest) -> HttpResponse:
    """Step 1 of creating a source from a sample: the schema is inferred, then shown in the ordinary
    source form for the admin to review and edit; nothing is saved until that form is sent."""
    _require_any(request, "manage_sources")
    if request.method == "GET":
        return redirect("ingest:source_create")
    sample_form = SampleForm(request.POST, request.FILES)
    if uploads.too_large(request):
        return render(request, "ingest/source_form.html",
                      {"form": SourceForm(), "sample_form": SampleForm(), "sample_error": _too_large_message()},
                      status=413)
    if sample_form.is_valid():
        upload = sample_form.cleaned_data["file"]
        try:
            inferred = services.schema_infer(uploaded_file=upload)
        except DomainError as exc:
            _add_errors(sample_form, exc)
        else:
            stem = Path(upload.name or "source").stem
            form = SourceForm(initial={
                "slug": slugify(stem)[:64] or "source", "name": stem.replace("_", " ").replace("-", " ").title(),
                "labels": ", ".join(inferred.labels), "schema": json.dumps(inferred.schema, indent=2),
                "id_field": inferred.id_field, "label_field": inferred.label_field,
                "text_fields": ", ".join(inferred.text_fields),
            })
            return render(request, "ingest/source_form.html",
                          {"form": form, "sample_form": SampleForm(), "inferred": inferred, "sample_name": upload.name})
    return render(request, "ingest/source_form.html", {"form": SourceForm(), "sample_form": sample_form}, status=400)


def _source_page(request: HttpRequest, source: Source, upload_form: UploadForm | None = None,
                 status: int = 200, upload_error: str = "") -> HttpResponse:
    current = selectors.schema_current(source=source)
    context = {
        "source": source,
        "counts": selectors.source_counts(source=source),
        "schema": current,
        "schema_json": json.dumps(current.json_schema, indent=2) if current else "",
        "versions": selectors.schema_versions(source=source),
        "batches": selectors.batch_list(source=source),
        "upload_form": upload_form or UploadForm(),
        "upload_error": upload_error,
        "max_upload_bytes": settings.MAX_UPLOAD_BYTES,
    }
    return render(request, "ingest/source_detail.html", context, status=status)


@login_required
@require_GET
def source_detail(request: HttpRequest, slug: str) -> HttpResponse:
    _require_any(request, "manage_sources", "ingest_data")
    return _source_page(request, _source_or_404(slug))


# --- schemas ------------------------------------------------------------------------------------------


def _pick(versions: list[SchemaVersion], label: str | None, default: SchemaVersion) -> SchemaVersion:
    return next((v for v in versions if v.label == label), default) if label else default


@login_required
@require_http_methods(["GET", "POST"])
def source_schemas(request: HttpRequest, slug: str) -> HttpResponse:
    """Versions side by side with their diff; admins add a version here (compatibility rules apply)."""
    _require_any(request, "manage_sources", "ingest_data")
    source = _source_or_404(slug)
    versions = list(selectors.schema_versions(source=source))
    if not versions:
        raise Http404("This source has no schema.")
    current = versions[0]
    form = SchemaVersionForm(initial={"schema": json.dumps(current.json_schema, indent=2)})
    status = 200
    if request.method == "POST":
        _require_any(request, "manage_sources")
        form = SchemaVersionForm(request.POST)
        status = 400
        if form.is_valid():
            data = form.cleaned_data
            try:
                version = services.schema_version_create(
                    actor=request.user, source=source, json_schema=data["schema"], comment=data["comment"],
                    new_major=data["new_major"],
                )
            except ValidationFailed as exc:
                _add_errors(form, exc)
            else:
                messages.success(request, f"Schema v{version.label} saved.")
                url = reverse("ingest:source_schemas", kwargs={"slug": source.slug})
                return redirect(f"{url}?left={current.label}&right={version.label}")
    right = _pick(versions, request.GET.get("right"), current)
    left = _pick(versions, request.GET.get("left"), versions[1] if len(versions) > 1 else current)
    context = {
        "source": source,
        "versions": versions,
        "left": left,
        "right": right,
        "diff": schemas.side_by_side(left.json_schema, right.json_schema),
        "changes": schemas.schema_changes(left.json_schema, right.json_schema),
        "form": form,
    }
    return render(request, "ingest/source_schemas.html", context, status=status)


# --- batches ------------------------------------------------------------------------------------------


@login_required
@require_POST
@_guarded
def batch_upload(request: HttpRequest, slug: str) -> HttpResponse:
    _require_any(request, "ingest_data")
    source = _source_or_404(slug)
    form = UploadForm()
    upload_error = ""
    status = 400
    if int(request.META.get("CONTENT_LENGTH") or 0) > settings.MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD:
        upload_error, status = _too_large_message(), 413
    else:
        form = UploadForm(request.POST, request.FILES)
        if uploads.too_large(request):
            form = UploadForm(initial={"mode": request.POST.get("mode"), "resend_of": request.POST.get("resend_of")})
            upload_error, status = _too_large_message(), 413
        elif form.is_valid():
            try:
                resend_of = form.cleaned_data.get("resend_of")
                batch, created = services.batch_submit(
                    actor=request.user, source=source, uploaded_file=form.cleaned_data["file"],
                    mode=form.cleaned_data["mode"],
                    resend_of=selectors.batch_get(batch_id=resend_of) if resend_of else None,
                )
            except DomainError as exc:
                _add_errors(form, exc)
                status = exc.status_code
            else:
                if not created:
                    messages.info(request, f"This file was already sent: showing batch {batch.pk}.")
                url = reverse("ingest:batch_detail", kwargs={"batch_id": batch.pk})
                return HttpResponseClientRedirect(url) if request.htmx else redirect(url)
    if request.htmx:
        # htmx swaps only 2xx responses: send the form back with its errors in place.
        return render(request, "ingest/_upload_form.html", {
            "source": source, "upload_form": form, "upload_error": upload_error,
            "max_upload_bytes": settings.MAX_UPLOAD_BYTES})
    return _source_page(request, source, form, status=status, upload_error=upload_error)


def _errors_page(request: HttpRequest, batch: IngestBatch) -> Any:
    paginator = Paginator(selectors.batch_errors(batch=batch), ERRORS_PER_PAGE)
    return paginator.get_page(request.GET.get("page"))


@login_required
@require_GET
def batch_detail(request: HttpRequest, batch_id: int) -> HttpResponse:
    _require_any(request, "manage_sources", "ingest_data")
    batch = _batch_or_404(batch_id)
    if request.htmx and request.GET.get("page"):
        return render(request, "ingest/_batch_errors.html", {"batch": batch, "errors": _errors_page(request, batch)})
    finished = batch.status in (IngestBatch.Status.DONE, IngestBatch.Status.FAILED)
    context = {
        "batch": batch,
        "finished": finished,
        "progress": selectors.batch_progress(batch),
        "errors": _errors_page(request, batch) if finished else None,
        "quarantined": selectors.quarantine_count(batch=batch) if finished else 0,
        "resends": list(batch.resends.order_by("-created_at")[:10]) if finished else [],
    }
    template = "ingest/_batch_status.html" if request.htmx else "ingest/batch_detail.html"
    return render(request, template, context)


@login_required
@require_GET
def batch_quarantine(request: HttpRequest, batch_id: int) -> HttpResponse:
    """The rows refused for being invalid, with their raw text, a download to fix them, and a form to
    send the fixed file back (linked to this batch)."""
    _require_any(request, "manage_sources", "ingest_data")
    batch = _batch_or_404(batch_id)
    rows = list(selectors.batch_quarantined(batch=batch, limit=QUARANTINE_SHOWN))
    context = {
        "batch": batch,
        "rows": rows,
        "total": selectors.quarantine_count(batch=batch),
        "shown": QUARANTINE_SHOWN,
        "cut": sum(not r.complete for r in rows),
        "upload_form": UploadForm(initial={"resend_of": batch.pk, "mode": IngestBatch.Mode.QUARANTINE}),
        "source": batch.source,
        "max_upload_bytes": settings.MAX_UPLOAD_BYTES,
    }
    return render(request, "ingest/batch_quarantine.html", context)


@login_required
@require_GET
def batch_quarantine_download(request: HttpRequest, batch_id: int) -> StreamingHttpResponse:
    _require_any(request, "manage_sources", "ingest_data")
    name, content_type, lines = selectors.quarantine_file(batch=_batch_or_404(batch_id))
    response = StreamingHttpResponse(lines, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response
