"""The exports page for ML engineers and admins: start an export, watch it, download it, see past ones."""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET

from reviewapp.core.errors import DomainError
from reviewapp.core.roles import can
from reviewapp.exports.models import ExportJob
from reviewapp.exports.services import CONTENT_TYPES, FORMATS, ExportFilters, export_job_create
from reviewapp.ingest.models import Source
from reviewapp.review.models import Label


class ExportForm(forms.Form):
    source = forms.ModelChoiceField(queryset=Source.objects.all(), to_field_name="slug", empty_label=None)
    format = forms.ChoiceField(choices=[(f, f.upper() if f != "jsonl" else "JSON lines") for f in FORMATS])
    since = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    until = forms.DateTimeField(required=False, widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    label = forms.CharField(required=False)
    origin = forms.ChoiceField(required=False, choices=[("", "any"), *[(o, o) for o in Label.Origin.values]])
    reviewer = forms.CharField(required=False)
    model_version = forms.IntegerField(required=False, min_value=1)
    qa_only = forms.BooleanField(required=False, label="QA samples only")
    agreed_only = forms.BooleanField(required=False, label="Agreed double reviews only")
    include_raw = forms.BooleanField(required=False, label="Include the raw payload JSON")


def _require(request: HttpRequest) -> None:
    if not can(request.user, "export_labels"):
        raise PermissionDenied("Only ML engineers and admins may export labels.")


@login_required
def export_list(request: HttpRequest) -> HttpResponse:
    _require(request)
    form = ExportForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            job = export_job_create(
                actor=request.user,
                source=data["source"],
                fmt=data["format"],
                include_raw=data["include_raw"],
                filters=ExportFilters(
                    since=data["since"],
                    until=data["until"],
                    label=data["label"] or None,
                    origin=data["origin"] or None,
                    reviewer=data["reviewer"] or None,
                    model_version=data["model_version"],
                    qa_only=data["qa_only"],
                    agreed_only=data["agreed_only"],
                ),
            )
        except DomainError as exc:
            for error in exc.errors:
                form.add_error(error["field"] if error["field"] in form.fields else None, error["message"])
        else:
            messages.success(request, f"Export {job.pk} started.")
            return redirect("exports:list")
    jobs = ExportJob.objects.select_related("source", "created_by")[:50]
    return render(request, "exports/list.html", {"form": form, "jobs": jobs})


@login_required
@require_GET
def export_rows(request: HttpRequest) -> HttpResponse:
    """The jobs table alone, polled by htmx while any export is running."""
    _require(request)
    jobs = ExportJob.objects.select_related("source", "created_by")[:50]
    return render(request, "exports/_jobs.html", {"jobs": jobs})


@login_required
@require_GET
def export_download(request: HttpRequest, pk: int) -> FileResponse:
    _require(request)
    job = get_object_or_404(ExportJob, pk=pk)
    if job.status != ExportJob.Status.DONE:
        raise Http404("This export has no file yet.")
    return FileResponse(
        open(job.file_path, "rb"),
        as_attachment=True,
        filename=f"{job.source.slug}-labels-{job.pk}.{job.file_format}",
        content_type=CONTENT_TYPES[job.file_format],
    )


@login_required
@require_GET
def export_detail(request: HttpRequest, pk: int) -> HttpResponse:
    _require(request)
    job = get_object_or_404(ExportJob.objects.select_related("source", "created_by"), pk=pk)
    return render(request, "exports/detail.html", {"job": job})
