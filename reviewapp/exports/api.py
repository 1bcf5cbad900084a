"""Export API: a streamed export, and asynchronous export jobs with a manifest and a download link."""

from __future__ import annotations

from django.http import FileResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from reviewapp.core.errors import NotFound, PermissionDeniedError
from reviewapp.core.roles import can
from reviewapp.exports.models import ExportJob
from reviewapp.exports.services import (
    CONTENT_TYPES,
    FORMATS,
    ExportFilters,
    Snapshot,
    export_job_create,
    labels_export_stream,
)
from reviewapp.ingest.models import Source
from reviewapp.review.models import Label


class ExportFiltersSerializer(serializers.Serializer):
    format = serializers.ChoiceField(choices=FORMATS, default="csv")
    since = serializers.DateTimeField(required=False)
    until = serializers.DateTimeField(required=False)
    label = serializers.CharField(required=False)
    origin = serializers.ChoiceField(choices=Label.Origin.values, required=False)
    reviewer = serializers.CharField(required=False)
    model_version = serializers.IntegerField(required=False, min_value=1)
    qa_only = serializers.BooleanField(required=False, default=False)
    agreed_only = serializers.BooleanField(required=False, default=False)
    include_raw = serializers.BooleanField(required=False, default=False)

    def validate(self, attrs: dict) -> dict:
        if attrs.get("since") and attrs.get("until") and attrs["since"] >= attrs["until"]:
            raise serializers.ValidationError({"until": "must be after since"})
        return attrs

    def filters(self) -> ExportFilters:
        data = self.validated_data
        return ExportFilters(
            since=data.get("since"),
            until=data.get("until"),
            label=data.get("label"),
            origin=data.get("origin"),
            reviewer=data.get("reviewer"),
            model_version=data.get("model_version"),
            qa_only=data["qa_only"],
            agreed_only=data["agreed_only"],
        )


class StreamQuerySerializer(ExportFiltersSerializer):
    cutoff = serializers.DateTimeField(required=False, help_text="reproduce an earlier snapshot")
    max_label_id = serializers.IntegerField(required=False, min_value=0)


class ExportJobSerializer(serializers.ModelSerializer):
    source = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    format = serializers.CharField(source="file_format")
    download_url = serializers.SerializerMethodField()
    url = serializers.SerializerMethodField()

    class Meta:
        model = ExportJob
        fields = [
            "id",
            "url",
            "source",
            "format",
            "status",
            "filters",
            "include_raw",
            "cutoff",
            "total_rows",
            "rows_written",
            "size_bytes",
            "sha256",
            "manifest",
            "error",
            "created_at",
            "finished_at",
            "download_url",
        ]

    def get_url(self, job: ExportJob) -> str:
        return reverse("api-export-job", args=[job.pk])

    def get_download_url(self, job: ExportJob) -> str | None:
        return reverse("api-export-download", args=[job.pk]) if job.status == ExportJob.Status.DONE else None


def _require_export(request: Request) -> None:
    if not can(request.user, "export_labels"):
        raise PermissionDeniedError("Only ML engineers and admins may export labels.")


def _source(slug: str) -> Source:
    source = Source.objects.filter(slug=slug).first()
    if source is None:
        raise NotFound(f"Unknown source {slug!r}.", [{"field": "slug", "message": "no such source"}])
    return source


class LabelExportApi(APIView):
    @extend_schema(
        parameters=[StreamQuerySerializer],
        responses={(200, "text/csv"): bytes},
        summary="Stream the source's labeled rows with provenance",
    )
    def get(self, request: Request, slug: str) -> StreamingHttpResponse:
        _require_export(request)
        source = _source(slug)
        query = StreamQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        snapshot = None
        if query.validated_data.get("cutoff"):
            latest = Snapshot.now()
            snapshot = Snapshot(
                cutoff=query.validated_data["cutoff"],
                max_label_id=query.validated_data.get("max_label_id", latest.max_label_id),
                last_audit_event_id=None,
            )
        spec, stream = labels_export_stream(
            actor=request.user,
            source=source,
            fmt=query.validated_data["format"],
            filters=query.filters(),
            snapshot=snapshot,
            include_raw=query.validated_data["include_raw"],
        )
        response = StreamingHttpResponse(stream, content_type=CONTENT_TYPES[spec.fmt])
        response["Content-Disposition"] = f'attachment; filename="{source.slug}-labels.{spec.fmt}"'
        response["X-Export-Cutoff"] = spec.snapshot.cutoff.isoformat()
        response["X-Export-Max-Label-Id"] = str(spec.snapshot.max_label_id)
        return response


class ExportJobListApi(APIView):
    @extend_schema(responses=ExportJobSerializer(many=True), summary="Past and running export jobs")
    def get(self, request: Request, slug: str) -> Response:
        _require_export(request)
        jobs = ExportJob.objects.filter(source=_source(slug)).select_related("source")[:100]
        return Response(ExportJobSerializer(jobs, many=True).data)

    @extend_schema(
        request=ExportFiltersSerializer, responses={202: ExportJobSerializer}, summary="Start an asynchronous export"
    )
    def post(self, request: Request, slug: str) -> Response:
        _require_export(request)
        source = _source(slug)
        body = ExportFiltersSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        job = export_job_create(
            actor=request.user,
            source=source,
            fmt=body.validated_data["format"],
            filters=body.filters(),
            include_raw=body.validated_data["include_raw"],
        )
        return Response(ExportJobSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class ExportJobApi(APIView):
    @extend_schema(responses=ExportJobSerializer, summary="An export job's status, progress and manifest")
    def get(self, request: Request, pk: int) -> Response:
        _require_export(request)
        return Response(ExportJobSerializer(get_object_or_404(ExportJob, pk=pk)).data)


class ExportDownloadApi(APIView):
    @extend_schema(responses={(200, "application/octet-stream"): bytes}, summary="Download a finished export")
    def get(self, request: Request, pk: int) -> FileResponse:
        _require_export(request)
        job = get_object_or_404(ExportJob, pk=pk)
        if job.status != ExportJob.Status.DONE:
            raise NotFound("This export has no file yet.", [{"field": "status", "message": job.status}])
        response = FileResponse(
            open(job.file_path, "rb"),  # noqa: SIM115 - closed by Django
            as_attachment=True,
            filename=f"{job.source.slug}-labels-{job.pk}.{job.file_format}",
            content_type=CONTENT_TYPES[job.file_format],
        )
        response["X-Content-SHA256"] = job.sha256
        return response
