"""JSON API for sources, schemas, batches and items (see CONTRACT.md). Views parse, call one service or
selector, and serialize; domain errors become {"detail", "errors"} responses in reviewapp.core.api."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from reviewapp.core.errors import PayloadTooLarge, PermissionDeniedError, ValidationFailed
from reviewapp.core.roles import can
from reviewapp.ingest import selectors, services, uploads
from reviewapp.ingest.serializers import (
    BatchAcceptedOutput,
    BatchCreateInput,
    BatchErrorOutput,
    BatchErrorsInput,
    BatchOutput,
    InferredOutput,
    ItemAcceptedOutput,
    ItemDetailOutput,
    ItemListInput,
    ItemListOutput,
    SampleInput,
    SchemaCreateInput,
    SchemaVersionOutput,
    SourceCreateInput,
    SourceDetailOutput,
    SourceListOutput,
)

# Multipart framing around the file; anything beyond the limit plus this is refused unread.
MULTIPART_OVERHEAD = 64 * 1024


def require(request: Request, capability: str) -> None:
    if not can(request.user, capability):
        raise PermissionDeniedError(f"You need the {capability!r} permission for this.")


class SourcesApi(APIView):
    """GET: every source with item counts. POST: create a source (manage_sources)."""

    @extend_schema(responses=SourceListOutput(many=True))
    def get(self, request: Request) -> Response:
        sources = selectors.source_list_with_counts()
        return Response(SourceListOutput(sources, many=True, context={"request": request}).data)

    @extend_schema(request=SourceCreateInput, responses={201: SourceDetailOutput})
    def post(self, request: Request) -> Response:
        require(request, "manage_sources")
        data = SourceCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        source = services.source_create(
            actor=request.user, slug=v["slug"], name=v["name"], labels=v["labels"], json_schema=v["schema"],
            id_field=v["id_field"], label_field=v["label_field"], text_fields=v["text_fields"],
        )
        return Response(SourceDetailOutput(source, context={"request": request}).data, status=status.HTTP_201_CREATED)


class SourceDetailApi(APIView):
    @extend_schema(responses=SourceDetailOutput)
    def get(self, request: Request, slug: str) -> Response:
        source = selectors.source_get(slug=slug)
        return Response(SourceDetailOutput(source, context={"request": request}).data)


class SchemasApi(APIView):
    """GET: the source's schema versions, newest first. POST: a new version (manage_sources); a breaking
    change is refused with each change listed unless ``new_major`` is true."""

    @extend_schema(responses=SchemaVersionOutput(many=True))
    def get(self, request: Request, slug: str) -> Response:
        source = selectors.source_get(slug=slug)
        return Response(SchemaVersionOutput(selectors.schema_versions(source=source), many=True).data)

    @extend_schema(request=SchemaCreateInput, responses={201: SchemaVersionOutput})
    def post(self, request: Request, slug: str) -> Response:
        source = selectors.source_get(slug=slug)
        require(request, "manage_sources")
        data = SchemaCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        version = services.schema_version_create(
            actor=request.user, source=source, json_schema=data.validated_data["schema"],
            comment=data.validated_data["comment"], new_major=data.validated_data["new_major"],
        )
        return Response(SchemaVersionOutput(version).data, status=status.HTTP_201_CREATED)


def _too_large() -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The upload is larger than the limit of {settings.MAX_UPLOAD_BYTES} bytes.",
        [{"field": "file", "message": f"larger than {settings.MAX_UPLOAD_BYTES} bytes"}],
    )


class _GuardedUpload(APIView):
    """Views taking a file: the size guard goes in before DRF (or its CSRF check) reads the body."""

    parser_classes = [MultiPartParser, FormParser]

    def initialize_request(self, request: Any, *args: Any, **kwargs: Any) -> Request:
        if request.method == "POST":
            uploads.guard(request)
        return super().initialize_request(request, *args, **kwargs)

    @staticmethod
    def read(request: Request, serializer_class: type) -> dict[str, Any]:
        if int(request.META.get("CONTENT_LENGTH") or 0) > settings.MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD:
            raise _too_large()  # refused unread
        body = request.data  # parsing runs the upload handlers, the size guard first
        if uploads.too_large(request):
            raise _too_large()
        data = serializer_class(data=body)
        data.is_valid(raise_exception=True)
        return data.validated_data


class BatchCreateApi(_GuardedUpload):
    """POST a file (multipart ``file``, optional ``mode``, optional ``resend_of``) -> 202 with the batch
    to poll; the same content sent again -> 200 with the earlier batch."""

    @extend_schema(request=BatchCreateInput, responses={202: BatchAcceptedOutput, 200: BatchAcceptedOutput})
    def post(self, request: Request, slug: str) -> Response:
        source = selectors.source_get(slug=slug)
        require(request, "ingest_data")
        data = self.read(request, BatchCreateInput)
        resend_of = selectors.batch_get(batch_id=data["resend_of"]) if data.get("resend_of") else None
        batch, created = services.batch_submit(
            actor=request.user, source=source, uploaded_file=data["file"], mode=data["mode"], resend_of=resend_of,
        )
        out = BatchAcceptedOutput({
            "id": batch.pk,
            "status": batch.status,
            "url": BatchOutput(batch, context={"request": request}).get_url(batch),
        })
        return Response(out.data, status=status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK)


class SchemaInferApi(_GuardedUpload):
    """POST a sample file -> an inferred JSON Schema with guesses for the id and label fields, for an
    admin to review before ``POST /sources/``. Nothing is stored."""

    @extend_schema(request=SampleInput, responses=InferredOutput)
    def post(self, request: Request) -> Response:
        require(request, "manage_sources")
        data = self.read(request, SampleInput)
        inferred = services.schema_infer(uploaded_file=data["file"])
        return Response(InferredOutput(inferred.as_dict()).data)


class BatchDetailApi(APIView):
    @extend_schema(responses=BatchOutput)
    def get(self, request: Request, batch_id: int) -> Response:
        batch = selectors.batch_get(batch_id=batch_id)
        return Response(BatchOutput(batch, context={"request": request}).data)


class _Echo:
    def write(self, value: str) -> str:
        return value


class BatchErrorsApi(APIView):
    """Row-level errors, paginated JSON; ``?format=csv`` downloads them all as CSV. (DRF's own
    ``?format=`` override is switched off in settings, so the parameter is ours.)"""

    @extend_schema(
        parameters=[OpenApiParameter("format", str, enum=["json", "csv"], required=False),
                    OpenApiParameter("kind", str, enum=["invalid", "conflict", "file"], required=False)],
        responses=BatchErrorOutput(many=True),
    )
    def get(self, request: Request, batch_id: int) -> Any:
        batch = selectors.batch_get(batch_id=batch_id)
        params = BatchErrorsInput(data=request.query_params)
        params.is_valid(raise_exception=True)
        errors = selectors.batch_errors(batch=batch, kind=params.validated_data.get("kind"))
        wanted = request.query_params.get("format", "json")
        if wanted not in ("json", "csv"):
            raise ValidationFailed("Unknown format.", [{"field": "format", "message": "must be json or csv"}])
        if wanted == "csv":
            response = StreamingHttpResponse(self._csv_rows(errors), content_type="text/csv; charset=utf-8")
            response["Content-Disposition"] = f'attachment; filename="batch-{batch.pk}-errors.csv"'
            return response
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(errors, request, view=self)
        return paginator.get_paginated_response(BatchErrorOutput(page, many=True).data)

    @staticmethod
    def _csv_rows(errors: Any) -> Iterator[str]:
        writer = csv.writer(_Echo())
        yield writer.writerow(["row", "field", "message", "raw", "kind"])
        for error in errors.iterator(chunk_size=2000):
            yield writer.writerow([error.row_number, error.field, error.message, error.raw, error.kind])


class BatchQuarantineApi(APIView):
    """The quarantined (invalid) rows as a file to fix and send again: CSV for CSV batches, else JSON
    Lines; send it back with ``resend_of`` set to this batch."""

    @extend_schema(responses={(200, "text/csv"): str})
    def get(self, request: Request, batch_id: int) -> StreamingHttpResponse:
        name, content_type, lines = selectors.quarantine_file(batch=selectors.batch_get(batch_id=batch_id))
        response = StreamingHttpResponse(lines, content_type=content_type)
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response


class ItemCreateApi(APIView):
    """POST one item as a JSON object -> 202 {"id", "status"}; the same item again -> 200; the same
    external id with a different payload -> 409."""

    parser_classes = [JSONParser]

    @extend_schema(request=dict, responses={202: ItemAcceptedOutput, 200: ItemAcceptedOutput})
    def post(self, request: Request, slug: str) -> Response:
        source = selectors.source_get(slug=slug)
        require(request, "ingest_data")
        item, created = services.item_submit(actor=request.user, source=source, payload=request.data)
        out = ItemAcceptedOutput({
            "id": item.pk,
            "status": item.state,
            "url": ItemListOutput(item, context={"request": request}).get_url(item),
        })
        return Response(out.data, status=status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK)


class ItemListApi(APIView):
    @extend_schema(parameters=[ItemListInput], responses=ItemListOutput(many=True))
    def get(self, request: Request) -> Response:
        params = ItemListInput(data=request.query_params)
        params.is_valid(raise_exception=True)
        slug = params.validated_data.get("source")
        source = selectors.source_get(slug=slug) if slug else None
        items = selectors.item_list(source=source, state=params.validated_data.get("status"))
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(items, request, view=self)
        return paginator.get_paginated_response(ItemListOutput(page, many=True, context={"request": request}).data)


class ItemDetailApi(APIView):
    @extend_schema(responses=ItemDetailOutput)
    def get(self, request: Request, item_id: int) -> Response:
        item = selectors.item_get(item_id=item_id)
        return Response(ItemDetailOutput(item, context={"request": request}).data)
