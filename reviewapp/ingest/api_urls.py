"""Ingest endpoints under /api/v1/ (names are prefixed "api-" because this urlconf has no namespace)."""

from django.urls import path

from reviewapp.ingest import api

urlpatterns = [
    path("sources/", api.SourcesApi.as_view(), name="api-sources"),
    path("sources/<slug:slug>/", api.SourceDetailApi.as_view(), name="api-source-detail"),
    path("sources/<slug:slug>/schemas/", api.SchemasApi.as_view(), name="api-source-schemas"),
    path("sources/<slug:slug>/batches/", api.BatchCreateApi.as_view(), name="api-batch-create"),
    path("sources/<slug:slug>/items/", api.ItemCreateApi.as_view(), name="api-item-create"),
    path("batches/<int:batch_id>/", api.BatchDetailApi.as_view(), name="api-batch-detail"),
    path("batches/<int:batch_id>/errors/", api.BatchErrorsApi.as_view(), name="api-batch-errors"),
    path("batches/<int:batch_id>/quarantine/", api.BatchQuarantineApi.as_view(), name="api-batch-quarantine"),
    path("schemas/infer/", api.SchemaInferApi.as_view(), name="api-schema-infer"),
    path("items/", api.ItemListApi.as_view(), name="api-item-list"),
    path("items/<int:item_id>/", api.ItemDetailApi.as_view(), name="api-item-detail"),
]
